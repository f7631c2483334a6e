"""`osteo-evidence` (`make evidence`): every method on every scenario and seed, with intervals.

An experiment is a YAML file in configs/experiment/ (or a path): the scenarios (name -> the Hydra overrides
that select it), the seeds (population, split and initialisation), the overrides every run gets (rounds,
steps), the methods (an engine of simulation/evidence_methods.py plus its overrides) and the reference
method the others are compared with, and optionally ``onboarding`` (the external site onboarded onto one
federated method with k labeled patients, and overrides of its own: simulation/evidence_onboarding.py);
``base: <experiment>`` starts from another experiment's file. For each scenario and seed the synthetic
sites are generated and prepared under ``<outputs>/<store>/data`` (the same code as osteo-sim; ``data: as_configured`` uses the
caches of ``paths.cache_root`` instead), every method trains and predicts each site's test patients into
``<outputs>/<store>/runs`` (``store`` defaults to the name; experiments that name the same store reuse each
other's sites and runs wherever their configs agree: the runs are keyed by config and data), and
the statistics (osteo_model/evidence.py), the methods' diagnostics (simulation/evidence_diagnostics.py),
the task round each trained method kept per site and the onboarding curve go to
``<outputs>/<name>/evidence.{json,md}``, ``forest.png`` and ``onboarding.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from importlib import metadata, resources
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from osteo_model import run_lock
from osteo_model.atomic import atomic_file
from osteo_model.config import compose, resolve_device
from osteo_model.dataset import SiteData, load_site_data
from osteo_model.errors import ConfigError
from osteo_model.evidence import Patients
from osteo_model.pools import usable_cpus, worker_pool
from osteo_model.training import SELECTION_METRIC
from osteofl.server.history import write_json
from osteofl.simulation import evidence_goals as goals, evidence_onboarding as onboarding, evidence_report as report
from osteofl.simulation.evidence_diagnostics import simulated_dxa_bias
from osteofl.simulation.evidence_methods import ENGINES, READS_TRUTH, MethodRun

LABELS = {"osteofl": "OsteoFL (ours)", "fedavg": "FedAvg whole model", "fedprox": "FedProx whole model",
          "fedper": "FedPer (local heads)", "local_only": "local only", "central": "centralised",
          "hu_rule": "L1-HU rule", "radiomics_linear": "radiomics + linear",
          "bone_oracle": "bone oracle (truth: the floor)",
          "osteofl_nometa": "OsteoFL, no manufacturer in gate", "fedavg_nometa": "FedAvg whole, no manufacturer in gate",
          "osteofl_ssl20": "OsteoFL, 20 SSL rounds", "osteofl_fedprox": "OsteoFL + FedProx term",
          "osteofl_llr3": "OsteoFL, local lr 3x", "fedavg_ssl20": "FedAvg whole, 20 SSL rounds",
          "fedprox_ssl20": "FedProx whole, 20 SSL rounds", "local_ssl20": "local only, 20 SSL rounds"}
DATA_MODES = ("per_seed", "as_configured")


def _experiment_file(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        return path
    return Path(str(resources.files("osteofl.configs") / "experiment" / f"{name}.yaml"))


def _merged(path: Path) -> DictConfig:
    """The file over its ``base`` chain: each top-level key given replaces the base's whole entry, and a
    file with its own ``methods`` catalogue runs all of it unless it has its own ``select``."""
    if not path.is_file():
        raise ConfigError(path, "no such experiment (configs/experiment/<name>.yaml or a .yaml path)")
    exp = OmegaConf.load(path)
    if "base" in exp:
        merged = OmegaConf.to_container(_merged(_experiment_file(str(exp.base))))
        if "methods" in exp:
            merged.pop("select", None)
        merged.update({k: v for k, v in OmegaConf.to_container(exp).items() if k != "base"})
        exp = OmegaConf.create(merged)
    return exp


def load_experiment(name: str) -> DictConfig:
    """The experiment's YAML merged over its ``base``; ConfigError naming the file when it is unusable."""
    path = _experiment_file(name)
    exp = _merged(path)
    for key in ("name", "scenarios", "seeds", "methods", "reference"):
        if OmegaConf.select(exp, key) in (None, "", [], {}):
            raise ConfigError(path, f"'{key}' is missing or empty")
    if exp.get("select") is not None:  # the methods run, from the catalogue of definitions in ``methods``
        chosen = [str(m) for m in exp.select]
        if not chosen or (unknown := [m for m in chosen if m not in exp.methods]):
            raise ConfigError(path, f"select: {chosen} must name methods defined under 'methods' "
                                    f"({sorted(exp.methods)})")
        exp.methods = {m: exp.methods[m] for m in chosen}
    unknown = [f"{m}: {s.get('engine')}" for m, s in exp.methods.items() if s.get("engine") not in ENGINES]
    if unknown:
        raise ConfigError(path, f"unknown engine(s) {unknown}; known: {sorted(ENGINES)}")
    if exp.reference not in exp.methods:
        raise ConfigError(path, f"reference '{exp.reference}' is not one of the methods")
    store = Path(str(exp.get("store") or exp.name))
    if store.is_absolute() or ".." in store.parts or str(store) in ("", "."):
        raise ConfigError(path, f"store: '{store}' must name a folder under paths.outputs (no absolute path, no '..')")
    if exp.get("data", "per_seed") not in DATA_MODES:
        raise ConfigError(path, f"data: '{exp.data}' is not one of {DATA_MODES}")
    if exp.get("goals") is not None:
        found = goals.problems(OmegaConf.to_container(exp.goals, resolve=True)
                               if isinstance(exp.goals, DictConfig) else {})
        if found:
            raise ConfigError(path, "goals: " + "; ".join(found))
    if exp.get("onboarding") is not None:
        onb = exp.onboarding
        if exp.methods.get(onb.get("method"), {}).get("engine") != "federated":
            raise ConfigError(path, f"onboarding.method '{onb.get('method')}' is not a federated method of this experiment")
        ks = list(onb.get("labeled_patients") or [])
        if not ks or not all(isinstance(k, int) and k > 0 for k in ks):
            raise ConfigError(path, f"onboarding.labeled_patients must be a list of positive integers, not {ks}")
    return exp


def _data_overrides(exp: DictConfig, out: Path, scenario: str, seed: int) -> list[str]:
    if exp.get("data", "per_seed") == "as_configured":
        return []
    root = out / "data" / scenario / f"seed{seed}"
    return [f"paths.sites_root={root / 'sites'}", f"paths.cache_root={root / 'cache'}",
            f"paths.ground_truth={root / 'truth'}", f"paths.state_root={root / 'state'}"]


FIELDS = ("device", "true_bmd", "pred_bmd", "true_cat", "pred_cat", "score")
RUN_FORMAT = "4: predictions, diagnostics, payload, validation history; WHO categories of the printed T-score"
"""What a run file holds; part of its key, so files of an older format are trained again, not misread (a run
stores its patients' WHO categories, so a change of the category rule is a new format)."""
ONBOARDING_FORMAT = "onboarding 2: the point of all training patients is 'all'"
"""Part of an onboarding curve's key, so curves saved with per-seed capped names are made again."""
ONBOARDING_ONLY = ("train.fit_local_shared_lr_factor",)
"""Settings only onboarding reads: out of the method runs' keys, in the onboarding curve's (_onboard)."""
NEUTRAL_LATER = {"train.final_refit_epochs": 0, "train.loss.local_prior": 0.0, "train.eval_batch_size": 64, "data.split_seed": None}
"""Settings added after the benchmark's runs were made, left out of a run's key at the value that trains
exactly as the runs did before them (so those runs stay cached); any other value enters the key."""
NOT_TRAINING = (
    "paths", "train.out_dir", "site.dir", "site.cache_dir", "site.state_dir", "eval", "predict",
    "synth.n_jobs", "radiomics.n_jobs", "site.policy", "federation.superlink", "federation.simulation",
    "federation.identity", "federation.robust", "federation.min_available_nodes", "federation.min_train_replies",
    "federation.round_timeout", "federation.reply_poll_s", "federation.run_name", "federation.resume",
    "federation.keep_checkpoints", "federation.eval_split", "federation.final_eval_split",
    "federation.onboard_labeled_patients", "federation.onboard_epochs", *ONBOARDING_ONLY)
"""Config the in-process engines never read, left out of a run's key so that changing it keeps the cached
runs: where files live (the data enter the key by content, ``_data_key``), how a deployment's processes
meet, wait and defend the global model, osteo-sim's Ray and onboarding settings, worker counts, and
osteo-eval's and osteo-predict's settings. Everything else is in the key, read by the engines or not."""


def _parent(plain: dict, name: str) -> dict:
    """The mapping that holds dotted ``name``'s leaf in ``plain`` (an empty one where a parent is missing)."""
    node = plain
    for parent in name.split(".")[:-1]:
        node = node.get(parent) or {}
    return node


def _config_key(cfg: DictConfig, *extra: object) -> str:
    """A run's key: ``cfg`` without ``NOT_TRAINING`` (and ``NEUTRAL_LATER`` at its neutral value) and
    ``extra`` (the data's ``_data_key``, ...)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for name in NOT_TRAINING:
        _parent(plain, name).pop(name.rpartition(".")[2], None)
    for name, neutral in NEUTRAL_LATER.items():
        node, leaf = _parent(plain, name), name.rpartition(".")[2]
        if leaf in node and node[leaf] == neutral:
            del node[leaf]
    text = "\n".join([RUN_FORMAT, json.dumps(plain, sort_keys=True, default=str), *map(str, extra)])
    return hashlib.sha256(text.encode()).hexdigest()


def _content_key(parts: Iterable[bytes | np.ndarray]) -> str:
    """SHA-256 of ``parts`` in order (arrays by their bytes): what the keys below hash."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else np.ascontiguousarray(part).data)
    return digest.hexdigest()


def _data_key(datas: Mapping[str, SiteData]) -> str:
    """The content of the site caches a run trains and is judged on, wherever they live."""
    return _content_key(part for site, data in sorted(datas.items()) for part in (
        json.dumps([site, data.cache.feature_names, data.cache.manifest], sort_keys=True, default=str).encode(),
        data.cache.table.to_csv(index=False).encode(), data.cache.crops, data.cache.masks, data.cache.features))


def _truth_key(cfg: DictConfig, datas: Mapping[str, SiteData]) -> str:
    """The content of the synthetic truth of the sites a run is judged on (missing files hash as absent:
    the engine that reads them says so)."""
    paths = {site: Path(cfg.paths.ground_truth) / f"{site}.csv" for site in sorted(datas)}
    return _content_key(part for site, path in paths.items() for part in (
        json.dumps([site, path.is_file()]).encode(), path.read_bytes() if path.is_file() else b""))


def _payload_key(payload: Mapping[str, np.ndarray]) -> str:
    """The content of the global weights an onboarding curve starts from: a retrained method run (other
    CPU threads, another machine) is not bit for bit the one a cached curve was made from."""
    return _content_key(part for name, array in sorted(payload.items()) for part in (name.encode(), array))


def _load_run(path: Path, key: str) -> tuple[MethodRun, float] | None:
    """A finished method's run and its seconds, when it was made with exactly this key."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        if str(z["config_key"]) != key:
            return None
        sites = [str(s) for s in z["sites"]]
        run = MethodRun({s: Patients(**{f: z[f"pred/{s}/{f}"] for f in FIELDS}) for s in sites},
                        [float(x) for x in z["round_seconds"]])
        for name in z.files:
            kind, _, rest = name.partition("/")
            if kind == "diag":
                site, _, metric = rest.rpartition("/")
                run.diagnostics.setdefault(site, {})[metric] = float(z[name])
            elif kind == "payload":
                run.payload[rest] = z[name]
            elif kind == "val":
                run.val_history[rest] = [float(x) for x in z[name]]
            elif kind == "selected":
                run.selected_round[rest] = int(z[name])
        return run, float(z["seconds"])


def _save_run(path: Path, key: str, run: MethodRun, seconds: float) -> None:
    """One method's run in one scenario and seed (per-patient test predictions without patient ids,
    diagnostics, the global payload, each site's validation score per task round and the round kept): a
    rerun after an interruption, or with other statistics, skips what is done."""
    arrays = {f"pred/{s}/{f}": np.asarray(getattr(p, f)) for s, p in run.predictions.items() for f in FIELDS}
    arrays |= {f"diag/{s}/{n}": np.array(v, float) for s, d in run.diagnostics.items() for n, v in d.items()}
    arrays |= {f"payload/{k}": np.asarray(v) for k, v in run.payload.items()}
    arrays |= {f"val/{s}": np.array(h, float) for s, h in run.val_history.items()}
    arrays |= {f"selected/{s}": np.array(r, int) for s, r in run.selected_round.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as fh:
        np.savez(fh, config_key=np.array(key), sites=np.array(list(run.predictions)),
                 round_seconds=np.array(run.round_seconds, float), seconds=np.array(seconds), **arrays)


def _cached(path: Path, key: str, make: Callable[[], MethodRun]) -> tuple[MethodRun, float, bool]:
    """The run saved at ``path`` under ``key``, else ``make()``'s, saved; its seconds; whether it was saved earlier."""
    if (done := _load_run(path, key)) is not None:
        return *done, True
    t0 = time.perf_counter()
    run = make()
    seconds = time.perf_counter() - t0
    _save_run(path, key, run, seconds)
    return run, seconds, False


@dataclasses.dataclass
class Plan:
    """What every scenario and seed of one benchmark run shares."""

    exp: DictConfig
    base: list[str]
    out: Path
    store: Path
    scenarios: dict[str, list[str]]
    methods: list[str]

    @classmethod
    def make(cls, experiment: str, overrides: Sequence[str]) -> "Plan":
        exp = load_experiment(experiment)
        base = [*map(str, exp.get("overrides") or []), *overrides]
        scenarios = {str(sc): [*map(str, sc_over or [])] for sc, sc_over in exp.scenarios.items()}
        for sc_over in scenarios.values():  # fail before hours of training, not after
            compose([*base, *sc_over])
        outputs = Path(compose(base).paths.outputs)
        return cls(exp, base, outputs / str(exp.name), outputs / str(exp.get("store") or exp.name), scenarios,
                   [str(m) for m in exp.methods])

    def units(self) -> list[tuple[str, int]]:
        return [(sc, int(seed)) for sc in self.scenarios for seed in self.exp.seeds]


@dataclasses.dataclass
class SeedRuns:
    """One scenario and seed: every method's run, the onboarding curve, the simulated DXA biases."""

    runs: dict[str, MethodRun]
    curve: MethodRun | None
    simulated: dict
    averaged: set[str]
    sites: list[str]
    external: str


@dataclasses.dataclass
class UnitData:
    """One scenario and seed's composed config and loaded training sites."""

    run_over: list[str]
    cfg: DictConfig
    datas: dict[str, SiteData]
    key: str


def _unit_config(plan: Plan, scenario: str, seed: int) -> tuple[list[str], DictConfig]:
    """The overrides and composed config of one scenario and seed (its data under the store)."""
    run_over = [*plan.base, *plan.scenarios[scenario], f"seed={seed}", *_data_overrides(plan.exp, plan.store, scenario, seed)]
    return run_over, compose(run_over)


def _prepare_data(plan: Plan, run_over: list[str], cfg: DictConfig, log: Callable[[str], None]) -> None:
    """Generate and prepare the scenario and seed's sites (skipping what is cached; nothing for as_configured)."""
    from osteofl.simulation.sim import ensure_sites, prepare_sites

    if plan.exp.get("data", "per_seed") == "per_seed":
        ensure_sites(cfg, log)
        external = [str(cfg.synth.external_site)] if plan.exp.get("onboarding") is not None else []
        prepare_sites(run_over, [*map(str, cfg.federation.sites), *external], log)


def _unit_data(plan: Plan, scenario: str, seed: int, log: Callable[[str], None], prepare: bool = True) -> UnitData:
    """The scenario and seed's training sites, loaded (generated and prepared first when ``prepare``)."""
    run_over, cfg = _unit_config(plan, scenario, seed)
    if prepare:
        _prepare_data(plan, run_over, cfg, log)
    datas = {str(s): load_site_data(Path(cfg.paths.cache_root) / str(s), cfg) for s in cfg.federation.sites}
    return UnitData(run_over, cfg, datas, _data_key(datas))


def _method_cfg(plan: Plan, unit: UnitData, method: str, *extra: str) -> DictConfig:
    return compose([*unit.run_over, *map(str, plan.exp.methods[method].get("overrides") or []), *extra])


def _method_run(plan: Plan, scenario: str, seed: int, method: str, unit: UnitData, mcfg: DictConfig,
                result: dict, log: Callable[[str], None]) -> MethodRun:
    """One method's run (``mcfg``: its _method_cfg) on one scenario and seed: from the run cache, or trained
    and saved there."""
    spec = plan.exp.methods[method]
    saved = plan.store / "runs" / scenario / f"seed{seed}" / f"{method}.npz"
    truth = [_truth_key(mcfg, unit.datas)] if str(spec.engine) in READS_TRUTH else []
    run, seconds, earlier = _cached(saved, _config_key(mcfg, unit.key, *truth), lambda: ENGINES[
        str(spec.engine)](mcfg, unit.datas, resolve_device(mcfg)))
    result["seconds"].setdefault(scenario, {}).setdefault(str(seed), {})[method] = seconds
    if run.round_seconds:
        result["round_seconds"].setdefault(method, []).extend(run.round_seconds)
    log(f"[{scenario} seed {seed}] {LABELS.get(method, method)}: "
        + (f"done earlier ({saved.name})" if earlier else f"{seconds:.1f} s"))
    return run


def _seed_runs(plan: Plan, scenario: str, seed: int, result: dict, log: Callable[[str], None]) -> SeedRuns:
    """Data, every method and the onboarding curve of one scenario and seed, each trained unless cached."""
    exp, onb = plan.exp, plan.exp.get("onboarding")
    unit = _unit_data(plan, scenario, seed, log)
    cfg = unit.cfg
    sites, ext = list(unit.datas), str(cfg.synth.external_site)
    runs: dict[str, MethodRun] = {}
    averaged: set[str] = set()
    for method in plan.methods:
        mcfg = _method_cfg(plan, unit, method)
        runs[method] = _method_run(plan, scenario, seed, method, unit, mcfg, result, log)
        if exp.methods[method].engine == "federated" and bool(mcfg.federation.share_all):
            averaged.add(method)
    curve = None
    if onb is not None:
        ext_data = load_site_data(Path(cfg.paths.cache_root) / ext, cfg)
        curve = _onboard(plan, unit, plan.store / "runs" / scenario / f"seed{seed}", runs, ext_data, log)
    simulated = simulated_dxa_bias(Path(cfg.paths.ground_truth), [*sites, ext])
    return SeedRuns(runs, curve, simulated, averaged, sites, ext)


def _worker_log(message: str) -> None:
    print(message, flush=True)


def _prepare_unit(experiment: str, overrides: Sequence[str], scenario: str, seed: int, threads: int) -> None:
    """A worker's share of ``run(jobs > 1)``'s first stage: one scenario and seed's sites, generated and
    prepared, SimpleITK's filters held to the worker's share of the CPUs (their default is all of them)."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    plan = Plan.make(experiment, overrides)
    _prepare_data(plan, *_unit_config(plan, scenario, seed), _worker_log)


def _train_method(experiment: str, overrides: Sequence[str], scenario: str, seed: int, method: str,
                  threads: int) -> None:
    """A worker's share of the second stage: one method on one (prepared) scenario and seed, into the run cache."""
    torch.set_num_threads(threads)
    plan = Plan.make(experiment, overrides)
    unit = _unit_data(plan, scenario, seed, _worker_log, prepare=False)
    _method_run(plan, scenario, seed, method, unit, _method_cfg(plan, unit, method), {"seconds": {}, "round_seconds": {}},
                _worker_log)


def _train_in_parallel(plan: Plan, experiment: str, overrides: Sequence[str], jobs: int,
                       log: Callable[[str], None]) -> None:
    """Every scenario and seed's data, then every method on each, in ``jobs`` worker processes (each with
    its share of the CPUs), into the run cache that the sequential pass then reads: the same code and the
    same files as ``jobs=1``. Methods, not whole scenarios, are the work items, so no process idles while
    the other trains a scenario's last methods (a strong_shift seed is ~20 min of one core)."""
    from osteofl.simulation import evidence as by_name  # spawned workers cannot load __main__'s functions

    units = plan.units()
    tasks = [(sc, seed, m) for sc, seed in units for m in plan.methods]
    jobs = min(jobs, len(tasks))
    threads = max(1, usable_cpus() // jobs)
    log(f"evidence: {len(units)} scenario x seed data sets, then {len(tasks)} method runs, in {jobs} processes, "
        f"{threads} thread(s) each")
    # spawn: no fork of a process that holds torch's threads. The workers die with this process: a killed
    # osteo-evidence drops the store's lock, and a next run must not meet its workers still writing there
    with worker_pool(jobs, "spawn") as pool:
        for future in [pool.submit(by_name._prepare_unit, experiment, list(overrides), sc, seed, threads)
                       for sc, seed in units]:
            future.result()
        for future in [pool.submit(by_name._train_method, experiment, list(overrides), sc, seed, m, threads)
                       for sc, seed, m in tasks]:
            future.result()


def run(experiment: str, overrides: Sequence[str] = (), log: Callable[[str], None] = print, jobs: int = 1) -> dict:
    """The whole benchmark; returns the report written to ``<outputs>/<name>/evidence.json``. With ``jobs``
    > 1 the scenarios and seeds train in that many processes first; the report is made the same way. The
    store is locked for the run (a second osteo-evidence on it is refused, naming the first's pid)."""
    plan = Plan.make(experiment, overrides)
    lock = run_lock.acquire(plan.store, f"store {plan.store.name}", "osteo-evidence")  # its sites and runs: ours alone
    try:
        return _run(plan, experiment, overrides, log, jobs)
    finally:
        os.close(lock)


def _run(plan: Plan, experiment: str, overrides: Sequence[str], log: Callable[[str], None], jobs: int) -> dict:
    exp = plan.exp
    result: dict = {"experiment": str(exp.name), "config": OmegaConf.to_container(exp, resolve=True),
                    "environment": environment(), "scenarios": {}, "seconds": {}, "round_seconds": {}}
    t_start = time.perf_counter()
    if jobs > 1:
        _train_in_parallel(plan, experiment, overrides, jobs, log)
    for scenario in plan.scenarios:
        by_seed = {seed: _seed_runs(plan, scenario, seed, result, log) for sc, seed in plan.units() if sc == scenario}
        last = by_seed[max(by_seed)]
        averaged = sorted(set().union(*(r.averaged for r in by_seed.values())))
        result["scenarios"][scenario] = _summary(
            exp, {sd: r.runs for sd, r in by_seed.items()},
            {sd: r.curve for sd, r in by_seed.items() if r.curve is not None},
            {sd: r.simulated for sd, r in by_seed.items()}, averaged, last.sites, last.external)
    if exp.get("goals") is not None:
        result["goals"] = goals.judge(result, OmegaConf.to_container(exp.goals, resolve=True))
    result["seconds"]["total"] = time.perf_counter() - t_start
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "evidence.json", result)
    verdicts = goals.markdown(result.get("goals") or {}, f"the experiment's `goals`, {exp.name}.yaml")
    (out / "evidence.md").write_text(report.markdown(result, LABELS, verdicts) + "\n", encoding="utf-8")
    report.forest_png(out / "forest.png", result, LABELS)
    if exp.get("onboarding") is not None:
        report.onboarding_png(out / "onboarding.png", result)
    log(f"evidence: {out / 'evidence.md'} (JSON: evidence.json, forest plot: forest.png), "
        f"{result['seconds']['total']:.0f} s")
    return result


def environment() -> dict[str, str]:
    """What the figures depend on beyond code, config and seed. Training is bit-for-bit repeatable on one
    machine, not across machines: the same commit and data on another CPU (another SIMD path in torch's
    kernels) moved per-seed, per-site patient MAE by a median of 0.001-0.005 g/cm2 and up to 0.03, enough to
    flip a goal met by less. Runs reused from the store were trained by the process that wrote them, which this
    records only for itself."""
    versions = {}
    for package in ("numpy", "scipy", "SimpleITK", "monai", "scikit-learn", "pyradiomics"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": _cpu_model(),
            "threads": str(torch.get_num_threads()), **versions}


def _cpu_model() -> str:
    """The processor's name as the OS gives it (Linux: /proc/cpuinfo), else the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _summary(exp: DictConfig, runs: dict[int, dict[str, MethodRun]], curves: dict[int, MethodRun],
             simulated: dict[int, dict], averaged: list[str], sites: list[str], ext: str) -> dict:
    """One scenario's statistics, diagnostics, model selection and (when the experiment has one) onboarding curve."""
    n_boot = int(exp.get("bootstrap", 1000))
    summary = report.summarise({sd: {m: r.predictions for m, r in by_m.items()} for sd, by_m in runs.items()},
                               [str(m) for m in exp.methods], str(exp.reference), sites, n_boot)
    summary["diagnostics"] = report.summarise_diagnostics(
        {sd: {m: r.diagnostics for m, r in by_m.items()} for sd, by_m in runs.items()}, simulated, averaged)
    summary["selection"] = report.summarise_selection(
        {sd: {m: r.val_history for m, r in by_m.items()} for sd, by_m in runs.items()},
        {sd: {m: r.selected_round for m, r in by_m.items()} for sd, by_m in runs.items()}, SELECTION_METRIC)
    if curves:
        summary["onboarding"] = {"site": ext, "method": str(exp.onboarding.method),
                                 "overrides": [str(o) for o in exp.onboarding.get("overrides") or []], **report.summarise_curve(
            {sd: c.predictions for sd, c in curves.items()}, {sd: c.diagnostics for sd, c in curves.items()}, n_boot)}
    return summary


def _onboard(plan: Plan, unit: UnitData, folder: Path, runs: dict[str, MethodRun], ext_data: SiteData,
             log: Callable[[str], None]) -> MethodRun:
    """The external site's onboarding curve on ``exp.onboarding.method``'s last global payload (kept with
    the method's run; a curve made earlier from the same weights, external site, k and config is reused).
    ``onboarding.overrides`` change only the onboarding (e.g. ``train.fit_local_shared_lr_factor``), not the
    method's run they start from."""
    exp = plan.exp
    method, ks = str(exp.onboarding.method), [int(k) for k in exp.onboarding.labeled_patients]
    own = [str(o) for o in exp.onboarding.get("overrides") or []]
    cfg = _method_cfg(plan, unit, method, *own)
    key = _config_key(cfg, unit.key, ONBOARDING_FORMAT, ks, _data_key({ext_data.site: ext_data}),
                      _payload_key(runs[method].payload), *(OmegaConf.select(cfg, name) for name in ONBOARDING_ONLY))
    saved = folder / (f"onboarding-{exp.name}.npz" if own else "onboarding.npz")  # another recipe: its own file
    curve, seconds, earlier = _cached(saved, key, lambda: onboarding.curve(
        cfg, ext_data, runs[method].payload, ks, resolve_device(cfg)))
    log(f"  onboarding {ext_data.site} onto {LABELS.get(method, method)} (k = {', '.join(curve.predictions)}): "
        + ("done earlier" if earlier else f"{seconds:.1f} s"))
    return curve


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="osteo-evidence", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="evidence", help="configs/experiment/<name>.yaml or a .yaml path")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="prepare the scenarios and seeds, then train the methods on each, in N processes "
                        "(0 = one per CPU this process may use)")
    args, overrides = p.parse_known_args(argv)
    from osteo_model.cli._common import run_cli

    jobs = args.jobs if args.jobs > 0 else usable_cpus()
    return run_cli(lambda: run(args.experiment, overrides, log=lambda m: print(m, flush=True), jobs=jobs))


if __name__ == "__main__":
    sys.exit(main())
