"""Metrics history of a federated run: one record per round, saved as JSON and CSV and plotted as PNG.

Per-site values are each site's own aggregate metrics (what its evaluate reply carried); nothing per
patient ever reaches the server.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from osteo_model.atomic import atomic_file

PLOT_METRICS = ("train_loss", "auc_t", "auc", "acc3", "mae_bmd")


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class History:
    """Round records: {"round", "phase", "train": {...}, "evaluate": {...} (aggregated by the strategy),
    "site_train": {site: {...}}, "site_eval": {site: {...}} (each site's own reply, incl. its epsilon),
    "rejected": [...], "failed": [...], "upload_bytes": {site: n},
    "eval_failed": [...] (sites that did not evaluate), "clipped": [{"site", "ratio"}] and "weights": {site: w}
    (server/robust.py), "aggregate_rejected": reason (no checkpoint that round), "stopped": why the run ended}.
    Every entry of a failed/rejected list is {"node", "site", "reason"}; a site asked but silent is one too.
    Sites are keyed by their identity (server/identity.py: the key they authenticated with, or in simulation
    the first name they declared), never by what a reply says; "identity": {site: "key" | "declared"} records
    which of the two named each site that round."""

    def __init__(self, records: list[dict[str, Any]] | None = None) -> None:
        self.records: list[dict[str, Any]] = list(records or [])

    def add(self, record: dict[str, Any]) -> None:
        self.records = [r for r in self.records if r["round"] != record["round"]] + [record]

    def save(self, folder: str | Path, plot: bool = True) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "history.json", self.records)
        rows = self.rows()
        columns = sorted({k for r in rows for k in r}, key=lambda c: (c not in ("round", "phase", "site"), c))
        with atomic_file(folder / "history.csv", "w") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        if plot:
            self.plot(folder / "history.png")

    def rows(self) -> list[dict[str, Any]]:
        """Long format: one row per (round, site), plus site "ALL" for the aggregated values."""
        rows = []
        for r in self.records:
            base = {"round": r["round"], "phase": r["phase"]}
            rows.append({**base, "site": "ALL", **_prefixed(r.get("train"), "train:"),
                         **_prefixed(r.get("evaluate"), "eval:")})
            sites = sorted(set(r.get("site_train", {})) | set(r.get("site_eval", {})))
            for site in sites:
                rows.append({**base, "site": site, "identity": r.get("identity", {}).get(site),
                             **_prefixed(r.get("site_train", {}).get(site), "train:"),
                             **_prefixed(r.get("site_eval", {}).get(site), "eval:"),
                             "upload_bytes": r.get("upload_bytes", {}).get(site)})
        return rows

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [m for m in PLOT_METRICS if any(m in (r.get("evaluate") or {}) or m in (r.get("train") or {})
                                                 for r in self.records)]
        if not names:
            return
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
        for ax, name in zip(axes[0], names):
            part = "site_train" if name.startswith("train_") else "site_eval"
            sites = sorted({s for r in self.records for s in r.get(part, {})})
            for site in sites:
                pts = [(r["round"], r[part][site].get(name)) for r in self.records if site in r.get(part, {})]
                pts = [(x, y) for x, y in pts if isinstance(y, (int, float)) and math.isfinite(y)]
                if pts:
                    ax.plot(*zip(*pts), marker=".", lw=1, label=site)
            agg = [(r["round"], (r.get("evaluate") or {}).get(name, (r.get("train") or {}).get(name)))
                   for r in self.records]
            agg = [(x, y) for x, y in agg if isinstance(y, (int, float)) and math.isfinite(y)]
            if agg:
                ax.plot(*zip(*agg), color="k", lw=2, label="aggregate")
            ax.set_title(name)
            ax.set_xlabel("round")
        if axes[0][0].get_legend_handles_labels()[0]:
            axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        with atomic_file(path) as fh:
            fig.savefig(fh, format="png", dpi=90)
        plt.close(fig)


def _prefixed(metrics: dict[str, Any] | None, prefix: str) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in (metrics or {}).items()}


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic JSON write; NaN/inf become null."""
    with atomic_file(path, "w") as fh:
        fh.write(json.dumps(_clean(obj), indent=1))
