"""Preparation speed on a synthetic site: serial pyradiomics vs the parallel prepare path vs a cached re-run.

Wall-clock figures depend on what else the machine runs (the load average is reported); the CPU-second
figures do not. Environment knobs: BENCH_STUDIES (studies in the synthetic site, default 24), BENCH_JOBS (parallel
workers, default all cores).
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time

import numpy as np

from osteo_model.cache import SiteCache
from osteo_model.config import compose, compose_site
from osteo_model.prepare import prepare_site
from osteo_model.radiomics_features import FeatureExtractor, n_workers, params_path
from osteofl.simulation.synth import generate

SITE = "site_a"


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    """Wall seconds of a call (its printing silenced); the CPU seconds of this process go to _cpu."""
    start, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        result = fn(*args, **kwargs)
    _cpu[fn] = time.process_time() - cpu
    return time.perf_counter() - start, result


_cpu: dict = {}


def run() -> list[tuple[str, float, str]]:
    n_studies = int(os.environ.get("BENCH_STUDIES", 24))
    jobs = int(os.environ.get("BENCH_JOBS", 0))
    with tempfile.TemporaryDirectory(prefix="osteo-bench-") as root:
        base = [f"paths.root={root}", f"site.name={SITE}"]
        synth_cfg = compose([*base, f"synth.sites=[{SITE}]", "synth.external_site=null",
                             f"synth.labeled_per_site={n_studies // 2}", f"synth.unlabeled_per_site={n_studies - n_studies // 2}"])
        t_synth, _ = _timed(generate, synth_cfg)
        serial_cfg = compose_site([*base, "radiomics.n_jobs=1", f"site.cache_dir={root}/serial"])
        parallel_cfg = compose_site([*base, f"radiomics.n_jobs={jobs}", f"site.cache_dir={root}/parallel"])
        t_one, summary = _timed(prepare_site, serial_cfg, progress=False)
        cpu_one = _cpu[prepare_site]  # 1 process: all work happens in this one
        t_all, _ = _timed(prepare_site, parallel_cfg, progress=False)
        t_cached, cached = _timed(prepare_site, parallel_cfg, progress=False)
        assert cached.prepared == 0, "the second run should be fully cached"
        cache = SiteCache.open(parallel_cfg.site.cache_dir)
        crops, masks = np.asarray(cache.crops), np.asarray(cache.masks)
        extractor = FeatureExtractor(params_path(parallel_cfg.radiomics), float(cache.manifest["crop_spacing_mm"]))
        t_radiomics, _ = _timed(extractor.extract_many, crops, masks)
        cpu_radiomics = _cpu[extractor.extract_many]
    n, studies, workers = len(crops), summary.prepared, n_workers(parallel_cfg.radiomics)
    return [
        ("synthetic studies (site_a profile)", studies, "studies"),
        ("vertebra crops", n, "crops"),
        ("osteo-synth, for reference", t_synth, "s"),
        ("radiomics alone, serial pyradiomics", n / t_radiomics, "crops/s"),
        ("prepare, 1 process", n / t_one, "crops/s"),
        (f"prepare, {workers} processes", n / t_all, "crops/s"),
        ("prepare, second run (fully cached)", n / t_cached, "crops/s"),
        ("prepare, 1 process", t_one / studies, "s/study"),
        (f"prepare, {workers} processes", t_all / studies, "s/study"),
        ("prepare, second run (fully cached)", t_cached, "s total"),
        ("radiomics alone, serial, per CPU second", n / cpu_radiomics, "crops/CPU-s"),
        ("prepare, 1 process, per CPU second", n / cpu_one, "crops/CPU-s"),
        ("radiomics share of 1-process prepare (CPU)", cpu_radiomics / cpu_one, "fraction"),
        ("load average during the benchmark", os.getloadavg()[0], "runnable"),
    ]
