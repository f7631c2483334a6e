"""Per-site and overall evaluation of a trained checkpoint and of the non-CNN baselines, on one split;
writes a JSON report, a markdown table and PNG plots. Only aggregate metrics go into the report;
per-vertebra predictions of a site without labels are written to that site's own CSV, never logged."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from osteo_model import baselines, plots
from osteo_model.config import resolve_device
from osteo_model.constants import LEVELS
from osteo_model.dataset import SiteData
from osteo_model.metrics import OSTEOPOROSIS, compute_metrics, on_row_devices
from osteo_model.model import standardise_on_site
from osteo_model.central import models_from_checkpoint
from osteo_model.checkpoints import check_compatible
from osteo_model.training import fit_local, predict

TABLE_KEYS = ("num_examples", "auc", "auc_t", "acc3", "f1_macro", "mae_sbmd", "r_sbmd", "mae_bmd", "r_bmd", "bias_bmd",
              "patient_acc3")


def _has_labels(data: SiteData) -> bool:
    return bool(len(data.splits["train"]) + len(data.splits["val"]) + len(data.splits["test"]))


def empty_split_sites(datas: Mapping[str, SiteData], split: str) -> dict[str, str]:
    """Labeled sites with no patient in ``split`` (e.g. a site whose only patient fell in the train split)
    -> why: their metrics would be all NaN, so they are left out of the tables and named instead."""
    out = {}
    for site, data in datas.items():
        if _has_labels(data) and not len(data.splits[split]):
            counts = ", ".join(f"{s} {data.patients(s)}" for s in ("train", "val", "test"))
            out[site] = f"{site}: no labeled patient in the {split} split (patients: {counts}); left out of the tables"
    return out


class _Pool:
    """Predictions and truth rows of several sites, for overall metrics and plots."""

    def __init__(self) -> None:
        self.preds: list[dict[str, np.ndarray]] = []
        self.tables: list[pd.DataFrame] = []

    def add(self, pred: dict[str, np.ndarray], table: pd.DataFrame) -> None:
        self.preds.append(pred)
        self.tables.append(table)

    def merged(self) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
        keys = set.intersection(*(set(p) for p in self.preds))
        return {k: np.concatenate([p[k] for p in self.preds]) for k in keys}, pd.concat(self.tables)


def _plots(out_dir: Path, name: str, pred: dict[str, np.ndarray], table: pd.DataFrame) -> None:
    lab = np.isfinite(table["bmd"].to_numpy(float))
    if lab.sum() < 2:
        return
    t = table[lab]
    osteo = t["category"].to_numpy(int) == OSTEOPOROSIS
    devices = t["dxa_manufacturer"].astype(str).to_numpy()
    plots.roc_png(out_dir / f"roc_{name}.png", {
        "model (head)": (osteo, pred["p"][lab, OSTEOPOROSIS]),
        "model (-T)": (osteo, -pred["t"][lab]),
        "HU rule (-HU)": (osteo, -t["hu_mean"].to_numpy(float)),
    }, f"osteoporosis vs not: {name}")
    plots.scatter_png(out_dir / f"scatter_{name}.png", pred["bmd"][lab], t["bmd"].to_numpy(float), devices, name)
    plots.bland_altman_png(out_dir / f"bland_altman_{name}.png", pred["bmd"][lab], t["bmd"].to_numpy(float), devices, name)


def _write_predictions(path: Path, pred: dict[str, np.ndarray], table: pd.DataFrame) -> None:
    """Per-vertebra predictions of a site without DXA (stays at the site)."""
    out = table[["study_id", "level"]].copy()
    out["sbmd_pred"], out["bmd_pred"], out["t_pred"] = pred["sbmd"], pred["bmd"], pred["t"]
    out["category_pred"] = [["normal", "osteopenia", "osteoporosis"][c] for c in pred["category"]]
    out["p_osteoporosis"] = pred["p"][:, OSTEOPOROSIS]
    out["level_pred"] = [LEVELS[i] for i in pred["level_pred"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(path, index=False)


def evaluate_checkpoint(
    state: dict, cfg, datas: Mapping[str, SiteData], split: str, out_dir: Path | None = None, name: str = "model",
) -> dict[str, dict[str, float]]:
    """Metrics per site (+ "overall" over the checkpoint's own sites). A site the checkpoint has no local
    part for is evaluated as a new site ("<site>") and, if it has labeled training rows, after onboarding
    its local expert and calibration with fit_local ("<site>+onboarded"). A site with no patient in
    ``split`` is left out (see empty_split_sites); data prepared with other crop settings or another
    radiomic feature set than the model's is refused (ConfigError)."""
    for data in datas.values():
        check_compatible(state, data.cache.manifest.get("crop"), data.cache.feature_names)
    device = resolve_device(cfg)
    empty = empty_split_sites(datas, split)
    new = {s: d.manufacturer for s, d in datas.items() if s not in state["manufacturers"]}
    models = models_from_checkpoint(state, cfg, new_sites=new)
    for site in new:  # a new site standardises its SSL targets on its own unlabeled rows
        standardise_on_site(models[site], datas[site])
    report: dict[str, dict[str, float]] = {}
    pool = _Pool()
    for site, data in datas.items():
        if not _has_labels(data):
            rows = data.splits["unlabeled"]
            pred = predict(models[site], data, rows, device, batch_size=int(cfg.train.eval_batch_size))
            report[site] = {"num_examples": 0.0, "num_vertebrae_predicted": float(len(rows))}
            if out_dir is not None:
                _write_predictions(out_dir / f"predictions_{name}_{site}.csv", pred, data.cache.table.iloc[rows])
            continue
        if site in empty:
            continue
        rows = data.splits[split]
        table = data.cache.table.iloc[rows]
        pred = on_row_devices(predict(models[site], data, rows, device, batch_size=int(cfg.train.eval_batch_size)),
                              table, data.manufacturer)  # pooled and plotted on each row's device too
        report[site] = compute_metrics(pred, table, data.manufacturer)
        if site in new:
            onboarded = copy.deepcopy(models[site])
            fit = fit_local(onboarded, data, cfg, device, int(cfg.train.fit_local_epochs))
            pred_on = on_row_devices(predict(onboarded, data, rows, device, batch_size=int(cfg.train.eval_batch_size)),
                                     table, data.manufacturer)
            report[f"{site}+onboarded"] = {**compute_metrics(pred_on, table, data.manufacturer),
                                           "selected_epoch": fit["selected_epoch"]}  # 0: shared-only kept
            if out_dir is not None and cfg.eval.plots:
                _plots(out_dir, f"{name}_{site}+onboarded", pred_on, table)
        else:
            pool.add(pred, table)
        if out_dir is not None and cfg.eval.plots:
            _plots(out_dir, f"{name}_{site}", pred, table)
    if pool.preds:
        pred, table = pool.merged()
        report["overall"] = compute_metrics(pred, table)
        if out_dir is not None and cfg.eval.plots:
            _plots(out_dir, f"{name}_overall", pred, table)
    return report


def evaluate_baselines(train_datas: Mapping[str, SiteData], datas: Mapping[str, SiteData], split: str) -> dict[str, dict]:
    """HU-threshold rule and radiomics + linear model (fit on the training sites' train splits)."""
    empty = empty_split_sites(datas, split)
    labeled = {s: d for s, d in datas.items() if _has_labels(d) and s not in empty}
    radiomics = baselines.RadiomicsLinear().fit(train_datas)
    hu: dict[str, dict[str, float]] = {}
    rad: dict[str, dict[str, float]] = {}
    pool, tables = _Pool(), []
    for site, data in labeled.items():
        table = data.cache.table.iloc[data.splits[split]]
        hu[site] = baselines.hu_threshold(table)
        rad[site] = radiomics.evaluate(data, split)
        if site in train_datas:
            tables.append(table)
            pool.add(on_row_devices(radiomics.predict(data, split), table, data.manufacturer), table)
    if tables:
        hu["overall"] = baselines.hu_threshold(pd.concat(tables))
        pred, table = pool.merged()
        rad["overall"] = compute_metrics(pred, table)
        rad["overall"].pop("acc3_head", None)
    return {"hu_threshold": hu, "radiomics_linear": rad}


def results_table(report: Mapping[str, Mapping[str, Mapping[str, float]]], keys=TABLE_KEYS) -> str:
    """Markdown table: one row per (method, site)."""
    lines = ["| method | site | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for method, sites in report.items():
        for site, m in sites.items():
            cells = [f"{m.get(k, float('nan')):.3f}" if k != "num_examples" else f"{m.get(k, 0):.0f}" for k in keys]
            lines.append(f"| {method} | {site} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, report: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2, default=float))
    (out_dir / "results.md").write_text(results_table(report), encoding="utf-8")
    return out_dir / "metrics.json"
