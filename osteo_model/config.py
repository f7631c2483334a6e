"""Compose the one Hydra config that every entry point uses."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from osteo_model.errors import ConfigError

CONFIG_MODULE = "osteofl.configs"


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with Hydra command-line style overrides; a training setting out
    of its range is refused (:func:`check_ranges`)."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    check_ranges(cfg)
    return cfg


WHOLE_RANGES: dict[str, int] = {
    "seed": 0, "train.batch_size": 1, "train.eval_batch_size": 1, "train.final_refit_epochs": 0,
    "train.personalise_steps": 0, "federation.local_steps": 1, "federation.ssl_rounds": 0,
    "federation.task_rounds": 0,
}
"""Whole-number settings and the least value each may take (null stays allowed where the config has it).
``federation.local_steps`` below 1 would still take one step (training.train_steps stops after a step), which a
site's DP pre-check would have costed at none: the run's step count must be what the site accounts."""
POSITIVE = ("privacy.max_grad_norm", "privacy.delta", "privacy.epsilon_budget")
"""DP settings that must be > 0 (delta also < 1): a site's floor takes the smaller of its own and the run's, so
a run's clipping norm of -1 would otherwise reach Opacus, whatever the site set."""


def _number(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(None, f"{key}={value!r}: not a number")
    return float(value)


def check_ranges(cfg: DictConfig) -> None:
    """Refuse a training setting out of its range, naming the key. Loss weights, learning rates and their
    factors must be >= 0: a negative weight would maximise its loss and a negative rate climb the gradient,
    while a code path that reads "> 0" as "on" would quietly turn it off instead (train.loss.local_prior=-8
    trained as 0). Zero is allowed: a weight of 0 turns a term off, and a learning rate of 0 freezes training
    (the DP tests use it). Whole numbers (:data:`WHOLE_RANGES`) and DP settings (:data:`POSITIVE`) too: a site
    composes the coordinator's request through here, so a lying run gets a sentence, not a library's error."""
    train = cfg.get("train")
    least: dict[str, float] = {}
    if train is not None:
        least.update({f"train.loss.{k}": 0 for k in (train.get("loss") or {})})
        least.update({f"train.{k}": 0 for k in ("lr", "local_lr_factor", "fit_local_shared_lr_factor")})
    for key, floor in {**least, **WHOLE_RANGES, "privacy.noise_multiplier": 0}.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if key in WHOLE_RANGES and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(None, f"{key}={value!r}: not a whole number")
        if _number(key, value) < floor:
            raise ConfigError(None, f"{key}={value!r}: must be >= {floor}")
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not 0 < _number(key, value) < (1 if key == "privacy.delta" else math.inf):
            raise ConfigError(None, f"{key}={value!r}: must be > 0{' and < 1' if key == 'privacy.delta' else ''}")


def compose_site(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose the config of one site: defaults < the site's own ``site.yaml`` < command-line overrides.

    ``<site dir>/site.yaml`` holds a hospital's settings beside its data (label preset, pairing window);
    an explicit ``site.*`` override on the command line still wins over it.
    """
    cfg = compose(overrides)
    site_file = Path(cfg.site.dir) / "site.yaml"
    if not site_file.is_file():
        return cfg
    try:
        site_settings = OmegaConf.load(site_file)
    except Exception as exc:  # yaml errors come in several types; all mean the same to the user
        raise ConfigError(site_file, f"not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(site_settings, DictConfig):
        raise ConfigError(site_file, "must be a mapping of site settings (configs/site/default.yaml), not a list")
    try:  # the site group is a struct: a mistyped key is refused, never silently ignored
        merged = OmegaConf.merge(cfg.site, site_settings)
    except ConfigKeyError as exc:
        parent, _, key = str(exc.full_key).rpartition(".")
        raise ConfigError(site_file, f"{exc.full_key} is not a site setting, so the file's {key!r} would be "
                                     f"ignored (a typo? settings here: {', '.join(OmegaConf.select(cfg, parent))})") from exc
    if emptied := _emptied(cfg.site, merged, "site"):
        raise ConfigError(site_file, f"{emptied} is empty: give its settings indented below it, or leave it out "
                                     "for the defaults")
    cfg.site = merged
    OmegaConf.set_struct(cfg, False)
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.key_or_group.startswith("site.") and not override.is_delete():
            OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False)
    OmegaConf.set_struct(cfg, True)
    return cfg


def _emptied(defaults: DictConfig, merged: DictConfig, prefix: str) -> str | None:
    """The first group of settings (a mapping in the defaults) that a site file set to nothing, e.g. a
    ``policy:`` line whose settings lost their indentation."""
    for key, value in defaults.items_ex(resolve=False):
        if isinstance(value, DictConfig):
            got = merged[key]
            if got is None:
                return f"{prefix}.{key}"
            if found := _emptied(value, got, f"{prefix}.{key}"):
                return found
    return None


def resolve_device(cfg: DictConfig) -> str:
    """``device: auto`` means CUDA when present, else CPU."""
    if cfg.device != "auto":
        return str(cfg.device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
