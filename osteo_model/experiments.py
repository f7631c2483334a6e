"""The ablation study of issue 4, in the same harness and on the same splits:

    python -m osteo_model.experiments [hydra overrides]     (e.g. paths.root=/tmp/h3)

1. self-supervised pretraining once on the pooled training sites (ssl_epochs, no task epochs);
2. supervised runs: full model from the SSL weights; CNN without SSL; CNN without MoE and calibration
   (from the SSL weights); and with ``eval.few_label_fraction`` of the labels, with and without SSL;
3. osteo-eval's evaluation of every run plus the HU-threshold and radiomics baselines, written to
   ``<paths.outputs>/experiments/``: metrics.json, results.md (full table), claims.md (the claims).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from osteo_model.central import load_sites, train_central
from osteo_model.checkpoints import load_model_state
from osteo_model.config import compose
from osteo_model.evaluate import evaluate_baselines, evaluate_checkpoint, write_report

RUNS: dict[str, tuple[bool, tuple[str, ...]]] = {
    # name: (start from SSL weights, overrides)
    "full": (True, ()),
    "cnn_no_ssl": (False, ()),
    "cnn_no_moe_calibration": (True, ("model.moe=false", "model.calibration=fixed")),
    "few_labels_ssl": (True, ("data.label_fraction={few}",)),
    "few_labels_no_ssl": (False, ("data.label_fraction={few}",)),
}


def _mean_abs_device_bias(metrics: dict[str, float]) -> float:
    biases = [v for k, v in metrics.items() if k.startswith("bias_bmd_")]
    return float(np.mean(np.abs(biases))) if biases else float("nan")


def claims(report: dict) -> str:
    """The four measurable claims of issue 4 as a markdown table (numbers, not verdicts only)."""
    o = {name: sites.get("overall", {}) for name, sites in report.items()}
    g = lambda run, key: o.get(run, {}).get(key, float("nan"))  # noqa: E731
    lines = ["| claim | this method | comparison | holds |", "|---|---|---|---|"]

    def row(text, a, b, better_high=True):
        holds = (a > b) if better_high else (a < b)
        lines.append(f"| {text} | {a:.3f} | {b:.3f} | {'yes' if holds else 'NO'} |")

    row("osteoporosis AUC, full model vs HU-threshold rule (overall test)", g("full", "auc"), g("hu_threshold", "auc"))
    row("  same, model AUC from calibrated T-score", g("full", "auc_t"), g("hu_threshold", "auc"))
    row("few labels: AUC (diagnosis head) with SSL vs without", g("few_labels_ssl", "auc"), g("few_labels_no_ssl", "auc"))
    row("few labels: AUC (calibrated T-score) with SSL vs without", g("few_labels_ssl", "auc_t"), g("few_labels_no_ssl", "auc_t"))
    row("few labels: BMD Pearson r with SSL vs without", g("few_labels_ssl", "r_bmd"), g("few_labels_no_ssl", "r_bmd"))
    row("few labels: BMD MAE (g/cm²) with SSL vs without", g("few_labels_ssl", "mae_bmd"), g("few_labels_no_ssl", "mae_bmd"), False)
    row("all labels: AUC with SSL vs without", g("full", "auc"), g("cnn_no_ssl", "auc"))
    row("all labels: BMD MAE (g/cm²) with SSL vs without", g("full", "mae_bmd"), g("cnn_no_ssl", "mae_bmd"), False)
    row("mean |per-device Bland-Altman bias| (g/cm²), MoE+calibration vs none",
        _mean_abs_device_bias(o.get("full", {})), _mean_abs_device_bias(o.get("cnn_no_moe_calibration", {})), False)
    for key in sorted(k for k in o.get("full", {}) if k.startswith("bias_bmd_")):
        row(f"  {key}", abs(g("full", key)), abs(g("cnn_no_moe_calibration", key)), False)
    row("BMD MAE (g/cm²), MoE+calibration vs none", g("full", "mae_bmd"), g("cnn_no_moe_calibration", "mae_bmd"), False)
    return "\n".join(lines) + "\n"


def run(overrides: Sequence[str]) -> Path:
    cfg = compose(overrides)
    torch.manual_seed(int(cfg.seed))
    out = Path(cfg.paths.outputs) / "experiments"
    few = float(cfg.eval.few_label_fraction)
    train_sites = list(cfg.train.sites)
    eval_sites = [*train_sites, str(cfg.synth.external_site)]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ssl_dir = out / "ssl"
    # train.resume: an SSL stage already complete in ssl_dir is reused, not retrained
    train_central(compose([*overrides, "train.task_epochs=0", "train.resume=true", f"train.out_dir={ssl_dir}"]),
                  load_sites(cfg, train_sites), ssl_dir)
    timings["ssl"] = time.perf_counter() - t0
    report: dict = {}
    for name, (pretrained, extra) in RUNS.items():
        run_overrides = [*overrides, *(e.format(few=few) for e in extra), f"train.out_dir={out / name}"]
        run_overrides += ["train.ssl_epochs=0"]
        if pretrained:
            run_overrides += [f"train.pretrained={ssl_dir / 'checkpoint.pt'}"]
        run_cfg = compose(run_overrides)
        t0 = time.perf_counter()
        train_central(run_cfg, load_sites(run_cfg, train_sites), out / name)
        timings[name] = time.perf_counter() - t0
        datas = load_sites(run_cfg, eval_sites)
        report[name] = evaluate_checkpoint(load_model_state(out / name / "checkpoint.pt"), run_cfg, datas, "test", out, name)
    report.update(evaluate_baselines(load_sites(cfg, train_sites), load_sites(cfg, eval_sites), "test"))
    write_report(out, report)
    text = claims(report)
    text += "\nwall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + "\n"
    (out / "claims.md").write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    run(sys.argv[1:])
