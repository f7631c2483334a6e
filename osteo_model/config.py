"""Compose the one Hydra config that every entry point uses."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from omegaconf import DictConfig, OmegaConf

CONFIG_MODULE = "osteofl.configs"


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with Hydra command-line style overrides."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def merge_site_file(cfg: DictConfig) -> DictConfig:
    """Merge ``<site dir>/site.yaml`` (a hospital's own settings) over the ``site`` group, if present."""
    site_file = Path(cfg.site.dir) / "site.yaml"
    if site_file.is_file():
        OmegaConf.set_struct(cfg, False)
        cfg.site = OmegaConf.merge(cfg.site, OmegaConf.load(site_file))
        OmegaConf.set_struct(cfg, True)
    return cfg


def resolve_device(cfg: DictConfig) -> str:
    """``device: auto`` means CUDA when present, else CPU."""
    if cfg.device != "auto":
        return str(cfg.device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
