"""``osteo-eval [hydra overrides]``: per-site and overall metrics of trained checkpoints and baselines.

Evaluates each checkpoint in ``eval.checkpoints`` (name -> path) on ``eval.split`` of ``eval.sites``
(sites without a local part in the checkpoint, e.g. the external one, are evaluated as new sites and
after onboarding); writes ``eval.out_dir``/metrics.json, results.md and PNG plots.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from osteo_model.cli._common import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="osteo-eval",
        description="Evaluate checkpoints and baselines per site. Arguments are Hydra overrides, e.g. "
        "eval.split=val 'eval.sites=[site_a,site_ext]' eval.checkpoints.full=outputs/train/checkpoint.pt.",
    )
    _, overrides = parser.parse_known_args(argv)

    def body() -> None:
        import torch

        from osteo_model.central import load_sites
        from osteo_model.config import compose
        from osteo_model.evaluate import evaluate_baselines, evaluate_checkpoint, results_table, write_report
        from osteo_model.training import load_checkpoint

        cfg = compose(overrides)
        torch.manual_seed(int(cfg.seed))
        out_dir = Path(cfg.eval.out_dir)
        sites = cfg.eval.sites if cfg.eval.sites is not None else [*cfg.train.sites, cfg.synth.external_site]
        datas = load_sites(cfg, sites)
        report: dict = {}
        for name, path in cfg.eval.checkpoints.items():
            report[name] = evaluate_checkpoint(load_checkpoint(path), cfg, datas, str(cfg.eval.split), out_dir, name)
        if cfg.eval.baselines:
            train_sites = {s: d for s, d in datas.items() if s in set(cfg.train.sites)}
            if train_sites:
                report.update(evaluate_baselines(train_sites, datas, str(cfg.eval.split)))
        write_report(out_dir, report)
        print(results_table(report))
        print(f"report: {out_dir / 'metrics.json'}")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
