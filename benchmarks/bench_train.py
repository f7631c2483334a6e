"""CPU training time of the default configuration (model=small, crop 32^3, default epochs) on 2 threads.

Data: the prepared synthetic caches under ``$OSTEO_BENCH_ROOT/data/cache`` when that is set (e.g. after
``osteo-synth paths.root=X`` and ``osteo-prepare --site ... paths.root=X``), otherwise fake caches of the
default synthetic dataset's size and crop shape (3 sites x 150 studies x 4 vertebrae, 32^3), which cost
the same to train on.

    python -m benchmarks.bench_train          (or: make bench)
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

THREADS = 2


def _fake_root(tmp: Path, cfg) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from cache_factory import make_site_cache

    per_site = int(cfg.synth.labeled_per_site) + int(cfg.synth.unlabeled_per_site)
    frac = int(cfg.synth.labeled_per_site) / per_site
    for i, (site, device) in enumerate(zip(cfg.train.sites, ("hologic", "ge_lunar", "norland"))):
        make_site_cache(tmp / "data" / "cache" / site, site=site, manufacturer=device, n_patients=per_site,
                        size=int(cfg.crop.size), labeled_frac=frac, seed=i)
    return tmp


def run() -> list[tuple[str, float, str]]:
    from osteo_model.central import load_sites, train_central
    from osteo_model.config import compose

    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        root = os.environ.get("OSTEO_BENCH_ROOT") or str(_fake_root(Path(tmp), compose([])))
        cfg = compose([f"paths.root={root}", f"paths.outputs={tmp}/out", "device=cpu"])
        datas = load_sites(cfg, cfg.train.sites)
        start = time.perf_counter()
        _, history = train_central(cfg, datas, Path(tmp) / "out", log=lambda s: print("   ", s, flush=True))
        total = time.perf_counter() - start
    ssl = [h for h in history if h["phase"] == "ssl"]
    task = [h for h in history if h["phase"] == "task"]
    ssl_rate = sum(h["num_examples"] for h in ssl) / max(sum(h["seconds"] for h in ssl), 1e-9)
    task_rate = sum(h["num_examples"] for h in task) / max(sum(h["seconds"] for h in task), 1e-9)
    return [
        (f"default config train, {THREADS} threads ({len(ssl)} SSL + {len(task)} task epochs)", total, "s"),
        ("SSL crops per second", ssl_rate, "crops/s"),
        ("task crops per second (incl. val eval)", task_rate, "crops/s"),
    ]


if __name__ == "__main__":
    for name, value, unit in run():
        print(f"{name}: {value:.2f} {unit}")
