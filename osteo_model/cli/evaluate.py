"""``osteo-eval [hydra overrides]``: per-site and overall metrics of trained models and baselines.

Evaluates each model in ``eval.checkpoints`` (name -> path of a central ``checkpoint.pt``, a federated
``round-NNNN.npz`` or a site model: ``site_model.pt`` or the site's state folder) on ``eval.split`` of
``eval.sites`` (sites without a local part in the model, e.g. the external one or every site of a federated
checkpoint, are evaluated as new sites and after onboarding); writes ``eval.out_dir``/metrics.json,
results.md and PNG plots. A site with no patient in the split is named in a warning and left out.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from osteo_model.cli._common import run_config_cli


def evaluate(cfg: DictConfig) -> None:
    from osteo_model.central import load_sites
    from osteo_model.checkpoints import load_model_state
    from osteo_model.evaluate import (
        empty_split_sites, evaluate_baselines, evaluate_checkpoint, results_table, write_report,
    )

    out_dir = Path(cfg.eval.out_dir)
    sites = cfg.eval.sites if cfg.eval.sites is not None else [*cfg.train.sites, cfg.synth.external_site]
    datas = load_sites(cfg, sites)
    for warning in empty_split_sites(datas, str(cfg.eval.split)).values():
        print(f"warning: {warning}", file=sys.stderr)
    report: dict = {}
    for name, path in cfg.eval.checkpoints.items():
        report[name] = evaluate_checkpoint(load_model_state(path), cfg, datas, str(cfg.eval.split), out_dir, name)
    if cfg.eval.baselines:
        train_sites = {s: d for s, d in datas.items() if s in set(cfg.train.sites)}
        if train_sites:
            report.update(evaluate_baselines(train_sites, datas, str(cfg.eval.split)))
    write_report(out_dir, report)
    print(results_table(report))
    print(f"report: {out_dir / 'metrics.json'}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_config_cli(
        "osteo-eval",
        "Evaluate checkpoints and baselines per site. Arguments are Hydra overrides, e.g. "
        "eval.split=val 'eval.sites=[site_a,site_ext]' eval.checkpoints.full=outputs/train/checkpoint.pt "
        "eval.checkpoints.fed=outputs/federated/checkpoints/round-0004.npz eval.checkpoints.mine=data/state/site_a.",
        argv,
        evaluate,
    )


if __name__ == "__main__":
    sys.exit(main())
