"""osteo-predict on 2 CPU cores: seconds per study for prepared studies (incl. PNGs, tables, index.html)
and for new CTs (read, checks, crops, radiomics, prediction, PNG). Target: 100 prepared studies <= 30 s.

Data: one synthetic site (osteo-synth, BENCH_PREDICT_STUDIES studies, default 100) prepared with
osteo-prepare, or the prepared site ``site_a`` under ``$OSTEO_BENCH_ROOT`` when that is set. The model is
an untrained one of the default config: prediction costs the same whatever the weights.

    python -m benchmarks.bench_predict          (or: make bench)
"""
from __future__ import annotations

import contextlib
import io
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

THREADS = 2
NEW_CTS = 5


def _synth_site(root: Path, n_studies: int):
    from osteo_model.config import compose
    from osteo_model.prepare import prepare_site
    from osteofl.simulation.synth import generate

    half = n_studies // 2
    cfg = compose([f"paths.root={root}", "synth.sites=[site_a]", f"synth.labeled_per_site={n_studies - half}",
                   f"synth.unlabeled_per_site={half}", "synth.labeled_external=1", "synth.unlabeled_external=1",
                   f"synth.n_jobs={THREADS}"])
    with contextlib.redirect_stdout(io.StringIO()):
        generate(cfg)
        prepare_site(_site_cfg(root, f"radiomics.n_jobs={THREADS}"), progress=False)


def _site_cfg(root: Path | str, *extra: str):
    from osteo_model.config import compose_site

    return compose_site([f"paths.root={root}", "site.name=site_a", "device=cpu", f"predict.n_jobs={THREADS}", *extra])


def _model(cfg, path: Path) -> Path:
    from osteo_model.cache import SiteCache
    from osteo_model.central import build_site_models, checkpoint_payload
    from osteo_model.checkpoints import save_model_state

    cache = SiteCache.open(cfg.site.cache_dir)
    models = build_site_models(cfg, len(cache.feature_names), {"site_a": "hologic"})
    return save_model_state(path, checkpoint_payload(models, cfg, cache.feature_names, cache.manifest.get("crop")))


def _cpu_seconds() -> np.ndarray:
    """CPU seconds of this process (prediction) and of its finished children (the PNG workers): what the
    work costs, whatever else the machine is running (wall time on a shared machine is not)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return np.array([own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime])


def run() -> list[tuple[str, float, str]]:
    import pandas as pd

    from osteo_model.predict import run_predict

    torch.set_num_threads(THREADS)
    n_studies = int(os.environ.get("BENCH_PREDICT_STUDIES", 100))
    with tempfile.TemporaryDirectory(prefix="osteo-bench-predict-") as tmp:
        root = os.environ.get("OSTEO_BENCH_ROOT") or tmp
        if not os.environ.get("OSTEO_BENCH_ROOT"):
            _synth_site(Path(tmp), n_studies)
        cfg = _site_cfg(root)
        model = _model(cfg, Path(tmp) / "model.pt")
        start, cpu = time.perf_counter(), _cpu_seconds()
        run_predict(cfg, model, out_dir=Path(tmp) / "prepared", progress=False)
        prepared, prepared_cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        n_prepared = len(pd.read_csv(Path(tmp) / "prepared" / "report.csv").drop_duplicates("study_id"))
        studies = pd.read_csv(Path(cfg.site.dir) / "studies.csv").head(NEW_CTS)
        cts = [(Path(cfg.site.dir) / r.ct, Path(cfg.site.dir) / r.labels) for r in studies.itertuples()]
        start, cpu = time.perf_counter(), _cpu_seconds()
        run_predict(cfg, model, new_cts=cts, out_dir=Path(tmp) / "new", progress=False)
        new, new_cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return [
        (f"prepared studies, {THREADS} cores ({n_prepared} studies, incl. PNGs + index.html)", prepared, "s"),
        ("prepared: per study", prepared / n_prepared, "s/study"),
        ("prepared: 100 studies (extrapolated, target <= 30 s)", 100 * prepared / n_prepared, "s"),
        ("prepared: CPU time per study (all processes)", prepared_cpu.sum() / n_prepared, "s/study"),
        ("prepared: of which main process (model, tables)", prepared_cpu[0] / n_prepared, "s/study"),
        ("prepared: of which PNG workers (CT read + figure)", prepared_cpu[1] / n_prepared, "s/study"),
        (f"new CTs ({len(cts)}: read, checks, crops, radiomics, PNG)", new, "s"),
        ("new CT: per study", new / len(cts), "s/study"),
        ("new CT: CPU time per study", new_cpu.sum() / len(cts), "s/study"),
    ]


if __name__ == "__main__":
    for name, value, unit in run():
        print(f"{name}: {value:.2f} {unit}")
