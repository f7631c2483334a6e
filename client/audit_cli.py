"""`osteo-audit --site X [hydra overrides]`: what this hospital has sent to the federation, per run, from
its own audit log (``<site.state_dir>/audit.jsonl``), for its data-protection officer."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from osteo_model.cli._common import run_cli
from osteo_model.config import compose_site
from osteofl.client import audit


def render(site: str, runs: dict[str, dict]) -> str:
    lines = [f"osteo-audit: site {site}, {len(runs)} run(s)"]
    for run_id, r in runs.items():
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(r["messages"].items()))
        lines += [
            f"run {run_id} ({r['first']} .. {r['last']}): {sum(r['messages'].values())} messages ({kinds}), "
            f"{r['bytes'] / 1e3:.1f} kB sent; {r['refused']} refused, {r['withheld']} withheld, {r['errors']} errors",
            f"  array keys that left: {len(r['array_keys'])}; declared local among them: "
            f"{', '.join(r['local_keys']) if r['local_keys'] else 'none'}",
            f"  metrics: {', '.join(r['metrics']) or '-'}",
            f"  config fields: {', '.join(r['config']) or '-'}",
            f"  epsilon (last reported): {'-' if r['epsilon'] is None else format(r['epsilon'], '.4g')}",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="osteo-audit", description=__doc__.splitlines()[0])
    parser.add_argument("--site", required=True, help="this hospital's site name")
    parser.add_argument("--json", action="store_true", help="the summary as JSON (with every array key)")
    parser.add_argument("--keys", action="store_true", help="also list every array key that left")
    args, overrides = parser.parse_known_args(argv)

    def body() -> None:
        cfg = compose_site([*overrides, f"site.name={args.site}"])
        runs = audit.summarise(audit.read(cfg.site.state_dir))
        if args.json:
            print(json.dumps(runs, indent=2))
            return
        print(render(args.site, runs))
        if args.keys:
            for run_id, r in runs.items():
                print(f"run {run_id} array keys:\n  " + "\n  ".join(r["array_keys"]))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
