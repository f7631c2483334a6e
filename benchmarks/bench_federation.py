"""Federation costs on 3 random-content site caches with the default model: bytes a site uploads per
round (shared arrays) against the whole model, and the wall time of a round through Flower's simulation
engine against the same local steps and evaluations run directly (no Flower, sites one after another)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from osteo_model.bmd import category_from_t, t_score
from osteo_model.cache import INDEX_COLUMNS, write_site_cache
from osteo_model.config import compose

SITES = {"site_a": "hologic", "site_b": "ge_lunar", "site_c": "norland"}


def _random_cache(path: Path, site: str, manufacturer: str, size: int, n_patients: int = 15) -> None:
    rng = np.random.default_rng(len(site))
    n = 4 * n_patients
    table = pd.DataFrame({c: np.nan for c in INDEX_COLUMNS}, index=range(n))
    bmd = rng.normal(0.9, 0.15, n)
    table = table.assign(study_id=[f"s{i // 4}" for i in range(n)], patient_id=[f"p{i // 4}" for i in range(n)],
                         level=[f"L{i % 4 + 1}" for i in range(n)], level_idx=[i % 4 for i in range(n)], labeled=True,
                         dxa_manufacturer=manufacturer, bmd=bmd, sbmd=bmd, t_score=t_score(bmd, manufacturer),
                         category=category_from_t(t_score(bmd, manufacturer)), sex="female", age=65)
    crops = rng.integers(-100, 400, (n, size, size, size)).astype(np.int16)
    masks = np.ones((n, size, size, size), np.uint8)
    write_site_cache(path, table, crops, masks, rng.normal(size=(n, 16)).astype(np.float32),
                     [f"f{i}" for i in range(16)], {"site": site})


def run() -> Iterator[tuple[str, float, str]]:
    import torch

    from osteofl.server.checkpoint import load_latest
    from osteofl.simulation.sim import local_only, run_federated

    torch.set_num_threads(1)  # as each simulated site gets one CPU
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        overrides = [f"paths.root={root}", "federation.ssl_rounds=1", "federation.task_rounds=2",
                     "federation.final_eval_split=null", "federation.min_available_nodes=3",
                     "site.policy.min_cohort=5"]  # 34 patients: every split above the cohort floor, nothing withheld
        cfg = compose(overrides)
        for site, manufacturer in SITES.items():
            _random_cache(root / "data" / "cache" / site, site, manufacturer, int(cfg.crop.size), n_patients=34)
        run_federated(overrides, len(SITES), "benchmark", log=lambda m: None)
        out = root / "outputs" / "federated"
        history = json.loads((out / "history.json").read_text())
        seconds = np.diff([0.0, *[r["seconds"] for r in history]])
        upload = np.mean([b for r in history for b in r["upload_bytes"].values()])
        whole = load_latest(out / "checkpoints").meta["whole_model_bytes"]
        _, direct = local_only(compose([*overrides, "federation.final_eval_split=val"]), list(SITES), log=lambda m: None)
    yield "upload per site per round", upload / 1e3, "kB"
    yield "whole model (if all were sent)", whole / 1e3, "kB"
    yield "simulated round, Flower (2 sites in parallel)", float(np.mean(seconds[1:])), "s"
    yield "same local steps + eval, no Flower (sequential)", float(np.mean(direct[1:])), "s"
