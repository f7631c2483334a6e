"""One message's worth of a site: its config, prepared data, model with the local state loaded.

Every message opens its session afresh, in the site worker or the ClientApp process alike: only the
composed config is cached; the data (memory-mapped, ~10 ms) and the model are opened per message, and
everything that must persist is read from the site's state folder (:mod:`state_store`) and written back
after training, so a worker that restarts loses nothing.
"""
from __future__ import annotations

import copy
import functools
import secrets
import shlex
from dataclasses import dataclass
from typing import Sequence

import torch
from flwr.app import Context
from hydra.errors import HydraException
from omegaconf import DictConfig

from osteo_model import dataset, model as osteo
from osteo_model.config import compose_site, resolve_device
from osteo_model.errors import ConfigError
from osteofl.client import policy
from osteofl.client.state_store import SiteState, StateStore
from osteofl.protocol import NODE_CACHE_DIR, NODE_SITE, NODE_SITE_DIR, NODE_STATE_DIR, OVERRIDES


def _overrides(config) -> list[str]:
    value = config.get(OVERRIDES)
    return shlex.split(str(value)) if value else []


def _simulated(node) -> bool:
    """A virtual node of Flower's simulation engine (it numbers them), not a hospital's SuperNode."""
    return "partition-id" in node


def new_shuffle_salt() -> str:
    """A hospital's site's secret in its batch order (SiteState.shuffle_salt): 128 random bits. Tests that
    play hospitals fix it (tests/federation_helpers.py), so that their runs are reproducible."""
    return secrets.token_hex(16)


@functools.lru_cache(maxsize=32)
def _compose(overrides: tuple[str, ...]) -> DictConfig:
    return compose_site(overrides)


def cached_compose(overrides: Sequence[str]) -> DictConfig:
    """Hydra composition costs ~0.4 s; simulation workers and tests handle many messages per process."""
    return copy.deepcopy(_compose(tuple(overrides)))


@functools.lru_cache(maxsize=32)
def _effective(run: tuple[str, ...], own: tuple[str, ...]) -> DictConfig:
    return policy.effective_config(_compose(run), _compose(own))


def _sides(context: Context, extra: Sequence[str]) -> tuple[str, list[str], list[str]]:
    """The site this node plays, the run's overrides and the site's own (each with the node's folders)."""
    node = context.node_config
    run = [*_overrides(context.run_config), *extra]
    own = [*(run if _simulated(node) else extra), *_overrides(node)]
    if NODE_SITE in node:
        site = str(node[NODE_SITE])
    elif _simulated(node):  # Flower's simulation engine numbers its virtual nodes
        sites = list(cached_compose(own).federation.sites)
        pid = int(node["partition-id"])
        if pid >= len(sites):
            raise ConfigError(None, f"simulation node {pid} has no site: federation.sites = {sites}")
        site = str(sites[pid])
    else:
        raise ConfigError(None, f"node config has no '{NODE_SITE}' (osteo-client --site X sets it)")
    folders = [f"site.name={site}"]
    if NODE_CACHE_DIR in node:
        folders.append(f"site.cache_dir={node[NODE_CACHE_DIR]}")
    if NODE_STATE_DIR in node:
        folders.append(f"site.state_dir={node[NODE_STATE_DIR]}")
    if NODE_SITE_DIR in node:  # where the hospital's site.yaml lives (its own settings)
        folders.append(f"site.dir={node[NODE_SITE_DIR]}")
    return site, run + folders, own + folders


def own_site_config(context: Context, extra: Sequence[str] = ()) -> tuple[str, DictConfig]:
    """The site and its own configuration alone (site.yaml and node overrides): where its state folder is,
    even when the run's request is refused (client/handlers.answer audits that refusal there)."""
    site, _, own = _sides(context, extra)
    return site, cached_compose(own)


def site_config(context: Context, extra: Sequence[str] = ()) -> tuple[str, DictConfig]:
    """The site this node plays and its effective config (client/policy.py): the run's request (run config
    overrides) made no looser than the site's own configuration, composed from its site.yaml and the
    node's overrides (``osteo-client --site X <overrides>``) alone. ``extra`` (the app's own overrides,
    tests) is code running at the site, so it counts on both sides; so does the run config of a node of
    Flower's simulation engine (``partition-id``): a simulated site has no hospital behind it, its
    operator is the simulation's. A request that does not compose (an unknown key, a value out of range:
    config.check_ranges) is refused naming the setting, once the site's own config has composed."""
    policy.check_run_overrides(_overrides(context.run_config))  # before anything composes, let alone resolves, them
    site, run, own = _sides(context, extra)
    _compose(tuple(own))  # the site's own config first: an error there is the hospital's to fix
    try:
        _compose(tuple(run))
    except (ConfigError, HydraException) as exc:
        reason = exc.reason if isinstance(exc, ConfigError) else str(exc).splitlines()[0]
        raise policy.PolicyRefusal(f"the run's config is refused: {reason}") from exc
    return site, copy.deepcopy(_effective(tuple(run), tuple(own)))


@dataclass
class SiteSession:
    site: str
    cfg: DictConfig
    data: dataset.SiteData
    model: torch.nn.Module
    store: StateStore
    state: SiteState
    device: str

    @classmethod
    def open(cls, context: Context, extra: Sequence[str] = ()) -> "SiteSession":
        """The site's session for one message. A hospital's site gets its shuffle salt
        (``SiteState.shuffle_salt``) here, at its first message since it had none, so that the order of its
        training batches is its own secret, not a function of the coordinator's seed (training.shuffle_seed).
        A node of Flower's simulation engine deliberately gets none: a simulated site has no hospital behind
        it, and osteo-sim's runs stay reproducible by seed, batch for batch, as osteo-evidence's and central
        training's are."""
        site, cfg = site_config(context, extra)
        policy.check_request(cfg)
        data = dataset.load_site_data(cfg.site.cache_dir, cfg, pin=dataset.pin_path(cfg), write_pin=True)
        device = resolve_device(cfg)
        model = osteo.build_model(cfg, data.cache.features.shape[1], data.manufacturer)
        policy.check_model(model, cfg)
        model = model.to(device)
        store = StateStore(cfg.site.state_dir, site)
        state = store.load()
        if state.local:  # a site that never trained keeps the fresh local expert (sensible default)
            osteo.load_local(model, state.local)
        else:  # before its first step: standardise the SSL targets on its own unlabeled rows (kept in state)
            osteo.standardise_on_site(model, data)
        if state.shuffle_salt is None and not _simulated(context.node_config):
            state.shuffle_salt = new_shuffle_salt()  # kept with the state the next time it is saved
        return cls(site, cfg, data, model, store, state, device)

    def start_local_afresh(self) -> None:
        """Local parts and optimiser as a site that never trained has them. A DP round starts from them when
        rounds without DP trained the kept ones: those, and Adam's moments of unclipped gradients, would
        carry what the training patients taught them into the DP update, outside epsilon."""
        fresh = osteo.build_model(self.cfg, self.data.cache.features.shape[1], self.data.manufacturer)
        osteo.standardise_on_site(fresh, self.data)
        osteo.load_local(self.model, osteo.local_state(fresh))
        self.state.optimizer, self.state.non_private_rounds = None, 0

    def save(self) -> None:
        self.state.local = osteo.local_state(self.model)
        self.store.save(self.state)
