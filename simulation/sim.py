"""`osteo-sim`: the federated method on synthetic hospitals, end to end, with the baselines it must beat.

1. synthetic sites (``osteo-synth``'s generator) when they are missing; 2. every site prepared with the
real preparation code (incremental: cached work is skipped); 3. the SAME ServerApp and ClientApp as a
deployment, run through Flower's simulation engine, twice: this method (shared parts only) and FedAvg
of the whole model (``federation.share_all``); 4. local-only training (each site alone, the same local
steps per round) and the centralised model (pooled data); 5. the external site onboarded with the
federated shared weights by fitting only its local expert and calibration on a few labeled patients.
Ends with a per-site table (test split) and writes ``<outputs>/sim/report.{json,md}``.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
import json
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from osteo_model import central, model as osteo, training
from osteo_model.config import compose, resolve_device
from osteo_model.dataset import SiteData, load_site_data
from osteo_model.errors import ConfigError, OsteoError
from osteo_model.pools import usable_cpus, worker_pool
from osteofl.server.checkpoint import load_latest
from osteofl.server.history import write_json
from osteofl.simulation.evidence_methods import Selector

METHODS = ("osteofl", "fedavg_whole", "local_only", "central")
LABELS = {"osteofl": "OsteoFL (ours)", "fedavg_whole": "FedAvg whole model", "local_only": "local only",
          "central": "centralised"}
# Patient level first (the primary endpoints: WHO category of the evaluable L1-L4 BMD; a synthetic site has
# one DXA device, so its Bland-Altman figures are per device), then the secondary per-vertebra figures.
COLUMNS = (("patient_auc_t", "patient AUC (T-score)"), ("patient_acc3", "patient 3-class accuracy"),
           ("patient_mae_bmd", "patient MAE BMD g/cm2"), ("patient_bias_bmd", "patient Bland-Altman bias"),
           ("patient_loa_low_bmd", "patient B-A lower 95% LoA"), ("patient_loa_high_bmd", "patient B-A upper 95% LoA"),
           ("auc_t", "vertebra AUC (T-score)"), ("auc", "vertebra AUC (diagnosis head)"),
           ("acc3", "vertebra 3-class accuracy"), ("mae_bmd", "vertebra MAE BMD g/cm2"),
           ("bias_bmd", "vertebra Bland-Altman bias"))
DEMO_CAVEAT = ("A demo, not evidence: one short run, one seed, a few test patients per site and no intervals. "
               "Conclusions come from the benchmark, not from this table.")


def ensure_sites(cfg: DictConfig, log: Callable[[str], None]) -> None:
    """Generate the synthetic sites (deterministic by seed) if any is missing or they were made from
    another synth config: a resized experiment would otherwise prepare and train on the old sites."""
    from osteofl.simulation.synth import config_change, generate

    sites = [*cfg.synth.sites, cfg.synth.external_site]
    missing = [s for s in sites if not (Path(cfg.paths.sites_root) / s / "studies.csv").is_file()]
    reason = f"synthetic sites missing ({', '.join(missing)})" if missing else config_change(cfg)
    if reason is None:
        return
    log(f"{reason}: generating all with seed {cfg.synth.seed}")
    t0 = time.perf_counter()
    generate(cfg)
    log(f"  generated in {time.perf_counter() - t0:.1f} s")


def prepare_sites(overrides: Sequence[str], sites: Sequence[str], log: Callable[[str], None]) -> None:
    """Run the real preparation for each site (skips what its cache already holds)."""
    from osteo_model.config import compose_site
    from osteo_model.prepare import prepare_site

    for site in sites:
        t0 = time.perf_counter()
        prepare_site(compose_site([*overrides, f"site.name={site}"]), progress=True)
        log(f"  prepared {site} in {time.perf_counter() - t0:.1f} s")


def federation_config(cfg: DictConfig, n_sites: int) -> str:
    """``flwr run --federation-config``: how many simulated sites and what each takes of Ray's resources
    (``federation.simulation``); Ray runs ``<its CPUs> / client_cpus`` sites at once, the rest queue."""
    sim = cfg.federation.simulation
    if not isinstance(sim.client_cpus, int) or sim.client_cpus < 1:  # flwr 1.42 takes whole CPUs only
        raise ConfigError(None, f"federation.simulation.client_cpus={sim.client_cpus}: expected a whole number >= 1")
    return (f"num-supernodes={n_sites} client-resources-num-cpus={sim.client_cpus} "
            f"client-resources-num-gpus={float(sim.client_gpus)}")


def ray_address(cfg: DictConfig) -> str:
    """``RAY_ADDRESS`` for the simulation process, from ``federation.simulation.ray_address``.

    flwr 1.42's backend options (``init-args``) carry only num-cpus/num-gpus/logging, and its Ray backend
    calls ``ray.init()`` without an address, so Ray's own ``RAY_ADDRESS`` is how the engine attaches to a
    running cluster. Unset, ``ray.init()`` would also join any cluster ``ray start`` left on this machine:
    "local" keeps an unconfigured run on its own private instance.
    """
    address = cfg.federation.simulation.ray_address
    if address is None:
        return "local"
    address = str(address)
    if address == "auto":
        return address
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(None, f"federation.simulation.ray_address={address}: expected null, auto or HOST:PORT")
    with socket.socket() as s:
        s.settimeout(5.0)
        if s.connect_ex((host, int(port))) != 0:
            raise ConfigError(None, f"federation.simulation.ray_address={address}: no Ray cluster answers there "
                                    f"(started with `ray start --head --port {port}`?)")
    return address


def run_federated(overrides: Sequence[str], n_sites: int, label: str, log: Callable[[str], None]) -> float:
    """One federated run through Flower's simulation runtime; returns its wall time.

    flwr 1.42's supported path (``run_simulation`` is deprecated): ``flwr run`` of the SAME app bundle a
    deployment submits, on a SuperLink in simulation mode. Not ``flwr run``'s ``:local:`` federation, which
    leaves a detached SuperLink on a fixed port behind: ours binds a free loopback port and runs below a
    process keeper, so it stops with everything it spawned (SuperExec, simulation process, Ray) when the
    run ends, fails or we are killed. Ray is a private instance unless ``federation.simulation.ray_address``
    names a running cluster (then the cluster runs the sites and outlives the run; see :func:`ray_address`).
    """
    from osteofl import runtime
    from osteofl.server.cli import run_command, write_connection

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Flower's processes need absolute paths; simulated nodes hold no keys: each is the site its first
    # reply names, duplicates refused
    paths = [f"paths.{k}={Path(str(v)).resolve()}" for k, v in compose(overrides).paths.items() if v is not None]
    run = [*overrides, *paths, "federation.identity=declared", "federation.superlink.host=127.0.0.1",
           f"federation.superlink.port={port}"]
    cfg = compose(run)
    home = Path(cfg.paths.outputs) / str(cfg.federation.run_name) / "flower"
    ray_at, resources = ray_address(cfg), federation_config(cfg, n_sites)
    env = {**runtime.flower_env(home / "flwr_home"), "RAY_ADDRESS": ray_at}
    write_connection(home / "flwr_home", cfg, insecure=True)
    where = "a private Ray instance" if ray_at == "local" else f"the Ray cluster at {ray_at}"
    log(f"federated run '{label}' ({n_sites} simulated sites on {where}) ...")
    t0 = time.perf_counter()
    owned: list[runtime.Owned] = []
    try:
        with open(home / "superlink.log", "ab") as out:
            owned.append(runtime.start(["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1",
                                        "--port", str(port), "--disable-runtime-dependency-installation"], env, out))
        if not runtime.wait_for_port("127.0.0.1", port, 120, owned[0]):
            raise OsteoError(home / "superlink.log", "the simulation SuperLink did not start")
        owned.append(runtime.start([*run_command(run, resume=False), "--federation-config",
                                    resources], env))
        rc = owned[1].wait()
    finally:
        runtime.stop(*reversed(owned))
    end = "final_metrics.json" if cfg.federation.final_eval_split else "history.json"  # the run's last write
    if rc != 0 or not (home.parent / end).is_file():  # `flwr run` exits 0 although the ServerApp failed
        raise OsteoError(home / "superlink.log", f"federated run '{label}' did not finish (see the log above)")
    seconds = time.perf_counter() - t0
    log(f"  '{label}' done in {seconds:.1f} s")
    return seconds


def _load(cfg: DictConfig, site: str) -> SiteData:
    return load_site_data(Path(cfg.paths.cache_root) / site, cfg)


def local_only(cfg: DictConfig, sites: Sequence[str], log: Callable[[str], None]) -> tuple[dict, list[float]]:
    """Each site alone, round for round the same local steps and evaluation as a federated round, without
    Flower and without aggregation. Returns test metrics per site and the wall time of each round."""
    device, fed = resolve_device(cfg), cfg.federation
    steps = None if fed.local_steps is None else int(fed.local_steps)
    datas = {site: _load(cfg, site) for site in sites}
    models = {s: osteo.build_model(cfg, d.cache.features.shape[1], d.manufacturer).to(device) for s, d in datas.items()}
    recipes = {}
    for site, model in models.items():
        osteo.standardise_on_site(model, datas[site])
        recipes[site] = training.Recipe({site: model}, cfg, training.phase_lengths(cfg, True), {site: datas[site]})
    round_seconds, selector = [], Selector(list(sites))
    for rnd in range(1, int(fed.ssl_rounds) + int(fed.task_rounds) + 1):
        phase = "ssl" if rnd <= int(fed.ssl_rounds) else "task"
        t0 = time.perf_counter()
        for site in sites:
            recipes[site].begin(phase, training.index_in_phase(cfg, phase, rnd))
            training.train_steps(models[site], datas[site], cfg, phase, recipes[site].optimizer, device, max_steps=steps,
                                 pass_index=rnd)
        if phase == "task":  # each site keeps its best validation round, as a deployed site does
            selector.update(models, datas, cfg, device)
        else:  # a federated round evaluates in every phase: the same work, for the timing comparison
            for site in sites:
                training.evaluate(models[site], datas[site], cfg, str(fed.eval_split), device)
        round_seconds.append(time.perf_counter() - t0)
    log(f"local-only: {len(round_seconds)} rounds, {np.mean(round_seconds):.1f} s per round (no Flower)")
    return _kept_metrics(selector, models, datas, cfg, device), round_seconds


def _kept_metrics(selector: Selector, models: dict, datas: dict, cfg: DictConfig, device: str) -> dict[str, dict]:
    """Each site's final metrics with the model it goes home with (``Selector.kept``), one site after
    another: the centralised sites' models share modules, so each site's state goes in just before."""
    out = {}
    for site, model in models.items():
        selector.kept(site, model, datas[site], cfg, device)
        out[site] = training.evaluate(model, datas[site], cfg, str(cfg.federation.final_eval_split), device)
    return out


def centralised(cfg: DictConfig, sites: Sequence[str], log: Callable[[str], None]) -> tuple[dict, list[float]]:
    """The centralised model: all sites' data in one place, one set of shared modules (each site keeps its
    own local expert and calibration, as in central training), trained round for round with the same
    local steps per site as the federation, but without averaging."""
    device, fed = resolve_device(cfg), cfg.federation
    steps = None if fed.local_steps is None else int(fed.local_steps)
    datas = central.load_sites(cfg, sites)
    models = osteo.build_site_models(cfg, next(iter(datas.values())).cache.features.shape[1],
                                     {s: d.manufacturer for s, d in datas.items()})
    for site, model in models.items():
        osteo.standardise_on_site(model, datas[site])
    recipe = training.Recipe(models, cfg, training.phase_lengths(cfg, True), datas)
    round_seconds, selector = [], Selector(list(sites))
    for rnd in range(1, int(fed.ssl_rounds) + int(fed.task_rounds) + 1):
        phase = "ssl" if rnd <= int(fed.ssl_rounds) else "task"
        t0 = time.perf_counter()
        recipe.begin(phase, training.index_in_phase(cfg, phase, rnd))
        for site in sites:
            training.train_steps(models[site].to(device), datas[site], cfg, phase, recipe.optimizer, device,
                                 max_steps=steps, pass_index=rnd)
        if phase == "task":
            selector.update(models, datas, cfg, device)
        round_seconds.append(time.perf_counter() - t0)
    log(f"centralised: {len(round_seconds)} rounds, {np.mean(round_seconds):.1f} s per round")
    return _kept_metrics(selector, models, datas, cfg, device), round_seconds


def onboard(cfg: DictConfig, site: str, shared: dict[str, Any]) -> tuple[dict, dict, int]:
    """External site: test metrics with the shared weights as they are, then after fitting only its
    local expert and calibration on ``onboard_labeled_patients`` labeled patients of its training split."""
    device, fed = resolve_device(cfg), cfg.federation
    data = _load(cfg, site)
    model = osteo.build_model(cfg, data.cache.features.shape[1], data.manufacturer).to(device)
    osteo.load_shared(model, shared)
    before = training.evaluate(model, data, cfg, str(fed.final_eval_split), device)
    rows = data.splits["train"]
    patients = data.cache.table["patient_id"].astype(str).to_numpy()[rows]
    keep = np.unique(patients)[: int(fed.onboard_labeled_patients)]
    small = dataclasses.replace(data, splits={**data.splits, "train": rows[np.isin(patients, keep)]})
    fit = training.fit_local(model, small, cfg, device, epochs=int(fed.onboard_epochs))
    after = {**training.evaluate(model, data, cfg, str(fed.final_eval_split), device), "selected_epoch": fit["selected_epoch"]}
    return before, after, int(len(small.splits["train"]))


BASELINES: dict[str, Callable[..., tuple[dict, list[float]]]] = {"local_only": local_only, "central": centralised}


def _baseline(name: str, overrides: list[str]) -> tuple[dict, list[float], float, list[str]]:
    """One baseline in a worker process: (test metrics per site, round seconds, wall seconds, log lines).
    One thread, as each simulated site gets one CPU; its models are seeded where they are built, so a run
    in a process of its own gives the numbers a sequential run gives."""
    torch.set_num_threads(1)
    lines: list[str] = []
    t0 = time.perf_counter()
    cfg = compose(overrides)
    metrics, rounds = BASELINES[name](cfg, [str(s) for s in cfg.federation.sites], lines.append)
    return metrics, rounds, time.perf_counter() - t0, lines


def run_baselines(runs: dict[str, list[str]]) -> dict[str, tuple[dict, list[float], float, list[str]]]:
    """The single-threaded baselines side by side, one spawned process each up to the CPUs this process may
    use: on 2 cores local-only and centralised take the time of one (the demo's from-scratch time was
    ~6 min with them in turn)."""
    from osteofl.simulation import sim as by_name  # spawned workers cannot load __main__'s functions

    with worker_pool(min(len(runs), usable_cpus()), "spawn") as pool:
        futures = {name: pool.submit(by_name._baseline, name, overrides) for name, overrides in runs.items()}
        return {name: future.result() for name, future in futures.items()}


def _fmt(v: Any) -> str:
    return "  n/a " if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:6.3f}"


def table(results: dict[str, dict[str, dict]], sites: Sequence[str]) -> str:
    lines = ["test split".ljust(24) + "".join(f"{LABELS[m]:>20}" for m in METHODS if m in results)]
    for key, name in COLUMNS:
        lines.append(name)
        for site in sites:
            lines.append(f"  {site:<22}" + "".join(f"{_fmt(results[m].get(site, {}).get(key)):>20}"
                                                   for m in METHODS if m in results))
    return "\n".join(lines)


def simulate(overrides: Sequence[str], log: Callable[[str], None] = print, baselines: bool = True,
             prepare: bool = True) -> dict:
    """The whole demo; ``prepare=False`` uses the site caches as they are (tests)."""
    cfg = compose(overrides)
    sites, ext = [str(s) for s in cfg.federation.sites], str(cfg.synth.external_site)
    ray_address(cfg)  # wrong simulation options (an unreachable cluster) are refused before any work
    federation_config(cfg, len(sites))
    out = Path(cfg.paths.outputs) / "sim"
    shutil.rmtree(out, ignore_errors=True)  # each demo run starts fresh: its own state and checkpoints
    out.mkdir(parents=True)
    t_start = time.perf_counter()
    # One thread per training process, as each simulated site gets one CPU: on a busy 2-core machine
    # multi-threaded 3D convolutions in the baselines were 2x slower than single-threaded ones.
    torch.set_num_threads(1)
    if prepare:
        ensure_sites(cfg, log)
        log("preparing sites (cached work is skipped) ...")
        prepare_sites(overrides, [*sites, ext], log)

    def fed_overrides(name: str, *extra: str) -> list[str]:
        # synthetic sites hold ~10 test patients: their policy's minimum cohort is the hard floor (5), so the
        # demo's federated rows are not withheld (a user override still wins)
        return ["site.policy.min_cohort=5", *overrides, f"paths.outputs={out}", f"federation.run_name={name}",
                f"paths.state_root={out / name / 'state'}", *extra]

    report: dict[str, Any] = {"sites": sites, "external": ext, "seconds": {}}
    results: dict[str, dict[str, dict]] = {}
    report["seconds"]["osteofl"] = run_federated(fed_overrides("osteofl"), len(sites), "OsteoFL", log)
    final = json.loads((out / "osteofl" / "final_metrics.json").read_text())
    history = json.loads((out / "osteofl" / "history.json").read_text())
    results["osteofl"] = final["sites"]
    report["payload"] = {"shared_bytes": final["payload_bytes"], "whole_model_bytes": final["whole_model_bytes"],
                         "upload_bytes_per_round": next((r["upload_bytes"] for r in reversed(history) if r["upload_bytes"]), {})}
    report["missed_rounds"] = missed_rounds(history)
    secs = [r["seconds"] for r in history]
    report["round_seconds_flower"] = list(np.diff([0.0, *secs]))
    if baselines:
        report["seconds"]["fedavg_whole"] = run_federated(
            fed_overrides("fedavg_whole", "federation.share_all=true", "site.policy.allow_share_all=true"), len(sites), "FedAvg whole model", log)
        results["fedavg_whole"] = json.loads((out / "fedavg_whole" / "final_metrics.json").read_text())["sites"]
        runs = {"local_only": fed_overrides("local"), "central": list(overrides)}
        for name, (metrics, rounds, seconds, lines) in run_baselines(runs).items():
            results[name], report["seconds"][name] = metrics, seconds
            for line in lines:
                log(line)
            if name == "local_only":
                report["round_seconds_no_flower"] = rounds
    shared = load_latest(out / "osteofl" / "checkpoints").arrays
    before, after, n_rows = onboard(cfg, ext, shared)
    report["external"] = {"site": ext, "before_onboarding": before, "after_onboarding": after,
                          "onboarding_labeled_vertebrae": n_rows}
    report["results"] = results
    report["seconds"]["total"] = time.perf_counter() - t_start
    text = render(report, sites)
    (out / "report.md").write_text(text + "\n")
    write_json(out / "report.json", report)
    log(text)
    log(f"\nreport: {out / 'report.md'} (JSON: report.json); per-round history and plot: {out / 'osteofl'}")
    return report


def missed_rounds(history: Sequence[dict]) -> dict[str, list[str]]:
    """Per site, the rounds it did not train in and why (failed, withheld, rejected), rounds grouped by
    reason: a site whose DP budget ran out, say, is not in the later rounds' model."""
    grouped: dict[tuple[str, str], list[int]] = defaultdict(list)
    for record in history:
        for entry in (*record.get("failed", []), *record.get("withheld", []), *record.get("rejected", [])):
            grouped[(entry["site"], entry["reason"])].append(int(record["round"]))
    out: dict[str, list[str]] = defaultdict(list)
    for (site, reason), rounds in grouped.items():
        out[site].append(f"round{'s' if len(rounds) > 1 else ''} {', '.join(map(str, rounds))}: {reason}")
    return dict(out)


def render(report: dict, sites: Sequence[str]) -> str:
    p = report["payload"]
    lines = [f"OsteoFL simulation: {len(sites)} sites + external {report['external']['site']}", DEMO_CAVEAT,
             table(report["results"], sites)]
    for site, why in report.get("missed_rounds", {}).items():  # OsteoFL's run: its model lacks these updates
        lines.append(f"{site} did not train in OsteoFL's " + "; ".join(why))
    ext = report["external"]
    lines.append(f"\nexternal site {ext['site']} (test split), shared weights of OsteoFL:")
    for key, name in COLUMNS:
        lines.append(f"  {name:<30} no local expert yet {_fmt(ext['before_onboarding'].get(key))}   "
                     f"after onboarding on {ext['onboarding_labeled_vertebrae']} labeled vertebrae "
                     f"{_fmt(ext['after_onboarding'].get(key))}")
    epoch = int(ext["after_onboarding"].get("selected_epoch", 0))
    kept = f"the fitted local parts of epoch {epoch}" if epoch else "the shared-only prediction"
    lines.append(f"  onboarding kept {kept} (selected on the external site's own validation patients)")
    per_site = ", ".join(f"{s} {b / 1e3:.1f} kB" for s, b in sorted(p["upload_bytes_per_round"].items())) or "none"
    lines.append(f"\nupload per site per round: {per_site}; whole model would be {p['whole_model_bytes'] / 1e3:.1f} kB "
                 f"({100 * p['shared_bytes'] / p['whole_model_bytes']:.1f} % sent)")
    flower = report["round_seconds_flower"]
    lines.append(f"wall time per simulated round (Flower, incl. evaluation): mean {np.mean(flower):.1f} s")
    if "round_seconds_no_flower" in report:
        lines.append(f"same local steps + evaluation without Flower: mean {np.mean(report['round_seconds_no_flower']):.1f} s")
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()))
    return "\n".join(lines)

