"""`osteo-evidence` (`make evidence`): every method on every scenario and seed, with intervals.

An experiment is a YAML file in configs/experiment/ (or a path): the scenarios (name -> the Hydra overrides
that select it), the seeds (population, split and initialisation), the overrides every run gets (rounds,
steps), the methods (an engine of simulation/evidence_methods.py plus its overrides) and the reference
method the others are compared with; ``base: <experiment>`` starts from another experiment's file. For each
scenario and seed the synthetic sites are generated and prepared under ``<outputs>/<name>/data`` (the
same code as osteo-sim; ``data: as_configured`` uses the caches of ``paths.cache_root`` instead), every
method trains and predicts each site's test patients, and the statistics (osteo_model/evidence.py) go to
``<outputs>/<name>/evidence.{json,md}`` and ``forest.png``.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from osteo_model.atomic import atomic_file
from osteo_model.config import compose, resolve_device
from osteo_model.dataset import load_site_data
from osteo_model.errors import ConfigError
from osteo_model.evidence import Patients
from osteofl.server.history import write_json
from osteofl.simulation import evidence_report as report
from osteofl.simulation.evidence_methods import ENGINES

LABELS = {"osteofl": "OsteoFL (ours)", "fedavg": "FedAvg whole model", "fedprox": "FedProx whole model",
          "fedper": "FedPer (local heads)", "local_only": "local only", "central": "centralised",
          "hu_rule": "L1-HU rule", "radiomics_linear": "radiomics + linear"}
DATA_MODES = ("per_seed", "as_configured")


def _experiment_file(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        return path
    return Path(str(resources.files("osteofl.configs") / "experiment" / f"{name}.yaml"))


def load_experiment(name: str) -> DictConfig:
    """The experiment's YAML merged over its ``base``; ConfigError naming the file when it is unusable."""
    path = _experiment_file(name)
    if not path.is_file():
        raise ConfigError(path, "no such experiment (configs/experiment/<name>.yaml or a .yaml path)")
    exp = OmegaConf.load(path)
    if "base" in exp:  # each top-level key given replaces the base's whole entry (scenarios, methods, ...)
        merged = OmegaConf.to_container(load_experiment(str(exp.base)))
        merged.update({k: v for k, v in OmegaConf.to_container(exp).items() if k != "base"})
        exp = OmegaConf.create(merged)
    for key in ("name", "scenarios", "seeds", "methods", "reference"):
        if OmegaConf.select(exp, key) in (None, "", [], {}):
            raise ConfigError(path, f"'{key}' is missing or empty")
    unknown = [f"{m}: {s.get('engine')}" for m, s in exp.methods.items() if s.get("engine") not in ENGINES]
    if unknown:
        raise ConfigError(path, f"unknown engine(s) {unknown}; known: {sorted(ENGINES)}")
    if exp.reference not in exp.methods:
        raise ConfigError(path, f"reference '{exp.reference}' is not one of the methods")
    if exp.get("data", "per_seed") not in DATA_MODES:
        raise ConfigError(path, f"data: '{exp.data}' is not one of {DATA_MODES}")
    return exp


def _data_overrides(exp: DictConfig, out: Path, scenario: str, seed: int) -> list[str]:
    if exp.get("data", "per_seed") == "as_configured":
        return []
    root = out / "data" / scenario / f"seed{seed}"
    return [f"paths.sites_root={root / 'sites'}", f"paths.cache_root={root / 'cache'}",
            f"paths.ground_truth={root / 'truth'}", f"paths.state_root={root / 'state'}"]


FIELDS = ("device", "true_bmd", "pred_bmd", "true_cat", "pred_cat", "score")


def _config_key(cfg: DictConfig) -> str:
    return hashlib.sha256(OmegaConf.to_yaml(cfg, resolve=True).encode()).hexdigest()


def _load_run(path: Path, key: str) -> tuple[dict[str, Patients], list[float], float] | None:
    """A finished method's predictions, when they were made with exactly this composed config."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        if str(z["config_key"]) != key:
            return None
        sites = [str(s) for s in z["sites"]]
        preds = {s: Patients(**{f: z[f"{s}/{f}"] for f in FIELDS}) for s in sites}
        return preds, [float(x) for x in z["round_seconds"]], float(z["seconds"])


def _save_run(path: Path, key: str, preds: dict[str, Patients], rounds: list[float], seconds: float) -> None:
    """Per-patient test predictions of one method, scenario and seed (no patient ids): a rerun after an
    interruption, or with other statistics, skips what is done."""
    arrays = {f"{s}/{f}": np.asarray(getattr(p, f)) for s, p in preds.items() for f in FIELDS}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as fh:
        np.savez(fh, config_key=np.array(key), sites=np.array(list(preds)), round_seconds=np.array(rounds, float),
                 seconds=np.array(seconds), **arrays)


def run(experiment: str, overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> dict:
    """The whole benchmark; returns the report written to ``<outputs>/<name>/evidence.json``."""
    from osteofl.simulation.sim import ensure_sites, prepare_sites

    exp = load_experiment(experiment)
    base = [*map(str, exp.get("overrides") or []), *overrides]
    out = Path(compose(base).paths.outputs) / str(exp.name)
    runs_of = {str(sc): [*map(str, sc_over or [])] for sc, sc_over in exp.scenarios.items()}
    for sc, sc_over in runs_of.items():  # fail before hours of training, not after
        compose([*base, *sc_over])
    methods = [str(m) for m in exp.methods]
    result: dict = {"experiment": str(exp.name), "config": OmegaConf.to_container(exp, resolve=True),
                    "scenarios": {}, "seconds": {}, "round_seconds": {}}
    t_start = time.perf_counter()
    for scenario, sc_over in runs_of.items():
        runs: dict[int, dict] = {}
        for seed in [int(s) for s in exp.seeds]:
            run_over = [*base, *sc_over, f"seed={seed}", *_data_overrides(exp, out, scenario, seed)]
            cfg = compose(run_over)
            sites = [str(s) for s in cfg.federation.sites]
            if exp.get("data", "per_seed") == "per_seed":
                ensure_sites(cfg, log)
                prepare_sites(run_over, sites, log)
            datas = {s: load_site_data(Path(cfg.paths.cache_root) / s, cfg) for s in sites}
            runs[seed] = {}
            for method in methods:
                spec = exp.methods[method]
                mcfg = compose([*run_over, *map(str, spec.get("overrides") or [])])
                saved, key = out / "runs" / scenario / f"seed{seed}" / f"{method}.npz", _config_key(mcfg)
                if (done := _load_run(saved, key)) is not None:
                    runs[seed][method], rounds, seconds = done
                    log(f"[{scenario} seed {seed}] {LABELS.get(method, method)}: done earlier ({saved.name})")
                else:
                    t0 = time.perf_counter()
                    runs[seed][method], rounds = ENGINES[str(spec.engine)](mcfg, datas, resolve_device(mcfg))
                    seconds = time.perf_counter() - t0
                    _save_run(saved, key, runs[seed][method], rounds, seconds)
                result["seconds"].setdefault(scenario, {}).setdefault(str(seed), {})[method] = seconds
                if rounds:
                    result["round_seconds"].setdefault(method, []).extend(rounds)
                log(f"[{scenario} seed {seed}] {LABELS.get(method, method)}: {seconds:.1f} s")
        result["scenarios"][scenario] = report.summarise(runs, methods, str(exp.reference), sites,
                                                         int(exp.get("bootstrap", 1000)))
    result["seconds"]["total"] = time.perf_counter() - t_start
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "evidence.json", result)
    (out / "evidence.md").write_text(report.markdown(result, LABELS) + "\n", encoding="utf-8")
    report.forest_png(out / "forest.png", result, LABELS)
    log(f"evidence: {out / 'evidence.md'} (JSON: evidence.json, forest plot: forest.png), "
        f"{result['seconds']['total']:.0f} s")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="osteo-evidence", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="evidence", help="configs/experiment/<name>.yaml or a .yaml path")
    args, overrides = p.parse_known_args(argv)
    from osteo_model.cli._common import run_cli

    return run_cli(lambda: run(args.experiment, overrides, log=lambda m: print(m, flush=True)))


if __name__ == "__main__":
    sys.exit(main())
