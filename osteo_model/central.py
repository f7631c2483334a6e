"""Central (pooled) training: the centralised baseline the federation is measured against.

All training sites' caches are pooled: one set of shared modules, one local expert and calibration head
per site (model.build_site_models), batches interleaved across sites. Self-supervision first, then the
multi-task phase; a checkpoint after every epoch (atomic) from which ``train.resume=true`` carries on.
``train.pretrained=<checkpoint>`` starts from another run's self-supervised encoder and SSL head (e.g.
train.ssl_epochs=0 to go straight to the supervised phase). Each site's model standardises its SSL
targets on that site's own unlabeled rows (model.site_feature_stats), exactly as a federated site does.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Mapping

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from osteo_model.checkpoints import VAL_PATIENTS, features_sha256, load_model_state, save_model_state
from osteo_model.config import resolve_device
from osteo_model.dataset import SiteData, load_site_data, patients_sha256
from osteo_model.errors import ConfigError, StateError
from osteo_model.model import (
    OsteoNet, build_site_models, load_local, load_pretrained, load_shared, local_state, shared_state, standardise_on_site,
)
from osteo_model.training import Recipe, evaluate, phase_lengths, train_pooled

CHECKPOINT = "checkpoint.pt"


def load_sites(cfg, sites) -> dict[str, SiteData]:
    """SiteData of each named site's cache under ``paths.cache_root``."""
    return {str(s): load_site_data(Path(cfg.paths.cache_root) / str(s), cfg) for s in sites}


def _feature_names(datas: Mapping[str, SiteData]) -> list[str]:
    names = {tuple(d.cache.feature_names) for d in datas.values()}
    if len(names) != 1:
        raise ConfigError(None, "site caches have different radiomic feature sets: re-run osteo-prepare with one radiomics config")
    return list(names.pop())


def _crop_settings(datas: Mapping[str, SiteData]) -> dict | None:
    """The crop settings the caches were prepared with (recorded in the checkpoint so that a model is
    never applied to crops of another size or field of view); None when no cache records them."""
    crops = {json.dumps(d.cache.manifest.get("crop"), sort_keys=True) for d in datas.values()}
    if len(crops) != 1:
        raise ConfigError(None, "site caches were prepared with different crop settings: re-run osteo-prepare with one crop config")
    return json.loads(crops.pop())


def _plan(cfg) -> list[tuple[str, int]]:
    return [("ssl", i) for i in range(int(cfg.train.ssl_epochs))] + [("task", i) for i in range(int(cfg.train.task_epochs))]


def checkpoint_payload(models: Mapping[str, OsteoNet], cfg, feature_names: list[str], crop: dict | None, **extra) -> dict:
    """The central checkpoint (format: osteo_model.checkpoints); ``extra`` = training state for resuming."""
    first = next(iter(models.values()))
    return {
        "kind": "central",
        "shared": shared_state(first),
        "local": {s: local_state(m) for s, m in models.items()},
        "manufacturers": {s: m.manufacturer for s, m in models.items()},
        "feature_names": feature_names,
        "features_sha256": features_sha256(feature_names),
        "model_cfg": OmegaConf.to_container(cfg.model, resolve=True),
        "crop": crop,
        **extra,
    }


def models_from_checkpoint(state: dict, cfg, new_sites: Mapping[str, str] | None = None) -> dict[str, OsteoNet]:
    """Rebuild the per-site models of a loaded state (osteo_model.checkpoints.load_model_state, with its
    model config); ``new_sites`` (site -> manufacturer) get the shared weights and an untrained local
    expert and calibration. A model config this version cannot build, or weights that do not fit it, are a
    StateError naming the model file (a tampered file, or one from another version)."""
    manufacturers = {**state["manufacturers"], **(new_sites or {})}
    if not manufacturers:
        raise ConfigError(None, "no site to build the model for: a federated checkpoint needs at least one site to evaluate on")
    file = state.get("file")
    try:
        cfg = OmegaConf.merge(cfg, {"model": state["model_cfg"]})
        models = build_site_models(cfg, int(state["n_features"]), manufacturers)
    except (OmegaConfBaseException, TypeError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise StateError(file, f"model_cfg has settings this version cannot build a model from ({first})") from exc
    try:
        load_shared(next(iter(models.values())), state["shared"])
        for site, local in state["local"].items():
            load_local(models[site], local)
    except StateError as exc:  # it names the weights, not the file they came from
        raise StateError(exc.path or file, exc.reason) from exc
    return models


def train_central(cfg, datas: Mapping[str, SiteData], out_dir: str | Path, log: Callable[[str], None] = print) -> tuple[dict[str, OsteoNet], list[dict]]:
    """SSL then multi-task training on the pooled sites; returns the per-site models and the history."""
    out_dir = Path(out_dir)
    device = resolve_device(cfg)
    names, crop = _feature_names(datas), _crop_settings(datas)
    models = build_site_models(cfg, len(names), {s: d.manufacturer for s, d in datas.items()})
    for model in models.values():  # before any state is loaded: a restored optimizer state lands beside the parameters
        model.to(device)
    first = next(iter(models.values()))
    pretrained = OmegaConf.select(cfg, "train.pretrained")
    if pretrained:
        state = load_model_state(pretrained)
        if state["features_sha256"] != features_sha256(names):
            raise StateError(Path(pretrained), "pretrained with another radiomic feature set")
        load_pretrained(first, state["shared"])
        log(f"self-supervised weights from {pretrained}")
    for site, model in models.items():
        standardise_on_site(model, datas[site])
    recipe = Recipe(models, cfg, phase_lengths(cfg, federated=False), datas)
    plan, done, history = _plan(cfg), 0, []
    ckpt = out_dir / CHECKPOINT
    if bool(cfg.train.resume) and ckpt.is_file():
        state = load_model_state(ckpt)
        if state.get("plan") != [list(p) for p in plan]:
            raise StateError(ckpt, "checkpoint was written with other ssl_epochs/task_epochs: resume with the same settings")
        restored = models_from_checkpoint(state, cfg)
        for site, model in models.items():
            model.load_state_dict(restored[site].state_dict())
        if not recipe.restore(state["optimizer"]):
            raise StateError(ckpt, "optimizer state does not fit this model/config")
        done, history = int(state["done"]), list(state["history"])
        log(f"resumed from {ckpt} after {done}/{len(plan)} epochs")
    for k in range(done, len(plan)):
        phase, epoch = plan[k]
        recipe.begin(phase, epoch)
        t0 = time.perf_counter()
        record = {"phase": phase, "epoch": epoch,
                  **train_pooled(models, datas, cfg, phase, recipe.optimizer, device, pass_index=k)}
        if phase == "task":
            for site, m in models.items():
                val = evaluate(m, datas[site], cfg, "val", device)
                record.update({f"val_{site}_{key}": val.get(key, float("nan")) for key in ("auc", "mae_bmd")})
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        log(f"[{k + 1}/{len(plan)}] {phase} epoch {epoch}: loss {record.get('loss', float('nan')):.4f} "
            f"({record['num_examples']:.0f} crops, {record['seconds']:.1f} s)")
        save_model_state(ckpt, checkpoint_payload(
            models, cfg, names, crop, optimizer=recipe.optimizer.state_dict(), done=k + 1, plan=[list(p) for p in plan], history=history,
            card={VAL_PATIENTS: {site: patients_sha256(data, "val") for site, data in datas.items()}},
        ))
    return models, history
