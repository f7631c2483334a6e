"""Tiny model configs and fake site caches for fast model tests."""
from __future__ import annotations

from pathlib import Path

import torch

from osteo_model.config import compose

from cache_factory import make_site_cache

TINY = ["model.channels=[4,8,8,8]", "model.embed_dim=16", "model.expert_hidden=8", "train.batch_size=8",
        "model.dropout=0.0"]
SITES = {"site_a": ("hologic", 0.0), "site_b": ("ge_lunar", 0.06), "site_ext": ("norland", -0.05)}


def run(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``model`` on crops ``x`` taken as L1 vertebrae of patients of unknown sex."""
    return model(x, torch.zeros(len(x), dtype=torch.long), torch.full((len(x),), 2, dtype=torch.long))


def tiny_cfg(root: Path, *extra: str):
    return compose([f"paths.root={root}", "train.sites=[site_a,site_b]", "synth.external_site=site_ext", *TINY, *extra])


def make_caches(root: Path, n_patients: int = 16) -> Path:
    """Fake caches for SITES under ``root/data/cache``; returns the cache root."""
    for i, (site, (manufacturer, bias)) in enumerate(SITES.items()):
        make_site_cache(root / "data" / "cache" / site, site=site, manufacturer=manufacturer, device_bias=bias,
                        n_patients=n_patients, seed=i)
    return root / "data" / "cache"
