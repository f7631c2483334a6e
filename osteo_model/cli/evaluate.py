"""``osteo-eval [hydra overrides]``: per-site and overall metrics of trained checkpoints and baselines.

Evaluates each checkpoint in ``eval.checkpoints`` (name -> path) on ``eval.split`` of ``eval.sites``
(sites without a local part in the checkpoint, e.g. the external one, are evaluated as new sites and
after onboarding); writes ``eval.out_dir``/metrics.json, results.md and PNG plots.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from osteo_model.cli._common import run_config_cli


def evaluate(cfg: DictConfig) -> None:
    from osteo_model.central import load_sites
    from osteo_model.evaluate import evaluate_baselines, evaluate_checkpoint, results_table, write_report
    from osteo_model.training import load_checkpoint

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


def main(argv: Sequence[str] | None = None) -> int:
    return run_config_cli(
        "osteo-eval",
        "Evaluate checkpoints and baselines per site. Arguments are Hydra overrides, e.g. "
        "eval.split=val 'eval.sites=[site_a,site_ext]' eval.checkpoints.full=outputs/train/checkpoint.pt.",
        argv,
        evaluate,
    )


if __name__ == "__main__":
    sys.exit(main())
