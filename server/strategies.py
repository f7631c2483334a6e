"""Pick one of Flower's own strategies from config, and save/restore its server-side state.

Nothing here aggregates: FedAvg, FedProx, FedAdam, FedTrimmedAvg and FedMedian are Flower's classes, built
with ``federation.strategy_args.<name>``. The robust ones protect only when a round has enough updates to
leave the extreme ones out (FedTrimmedAvg trims ``int(beta * n)`` per end, so beta=0.2 trims nothing at 3
sites; a median of 2 is their mean): :func:`min_robust_replies` says how many, and a run configured for
fewer sites is refused at start instead of silently averaging; a round with fewer updates leaves the global
model as it is. Only FedOpt-family strategies (FedAdam) keep state between rounds (the server optimiser's
moments ``m_t``/``v_t``); it goes into the checkpoint so a resumed run carries on with the same moments.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Strategy
from omegaconf import DictConfig, OmegaConf

from osteo_model.errors import ConfigError

STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedtrimmedavg": FedTrimmedAvg,
    "fedmedian": FedMedian,
}
_STATEFUL_ATTRS = ("m_t", "v_t")  # FedOpt's server-optimiser moments (dict[str, ndarray] | None)


def mean_of_defined(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Each metric's weighted mean over the replies where it is defined (finite), the weights renormalised
    over those: a site's NaN (an AUC over one class at that site, sent so that every site sends the same
    keys) would otherwise make the federation's aggregate NaN for everyone; NaN only where no site has it."""
    rows = [next(iter(r.metric_records.values())) for r in records]
    out = MetricRecord()
    for key in sorted({k for row in rows for k in row} - {weighting_key}):
        pairs = [(float(row[weighting_key]), float(row[key])) for row in rows
                 if key in row and math.isfinite(float(row[key]))]
        total = sum(w for w, _ in pairs)
        out[key] = sum(w * v for w, v in pairs) / total if total > 0 else math.nan
    return out


def build_strategy(cfg: DictConfig) -> Strategy:
    """The configured Flower strategy; every connected site trains and evaluates each round."""
    fed = cfg.federation
    name = str(fed.strategy).lower()
    if name not in STRATEGIES:
        raise ConfigError(None, f"federation.strategy={fed.strategy!r}; choose one of {sorted(STRATEGIES)}")
    given = fed.strategy_args.get(name)
    args: dict[str, Any] = dict(OmegaConf.to_container(given, resolve=True)) if given is not None else {}  # type: ignore[arg-type]
    n = int(fed.min_available_nodes)
    strategy = STRATEGIES[name](
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=n,
        min_evaluate_nodes=n,
        min_available_nodes=n,
        train_metrics_aggr_fn=mean_of_defined,
        evaluate_metrics_aggr_fn=mean_of_defined,
        **args,
    )
    need = min_robust_replies(strategy)
    if need > n:
        raise ConfigError(None, f"federation.strategy={name} leaves no update out with {n} sites "
                                f"(federation.min_available_nodes) - it needs {need}: "
                                + ("raise strategy_args.fedtrimmedavg.beta so that int(beta * sites) >= 1, or use "
                                   "fedmedian" if name == "fedtrimmedavg" else "use fedavg with the robust bounds"))
    return strategy


def min_robust_replies(strategy: Strategy) -> float:
    """Fewest updates with which the strategy leaves at least one extreme update out (1: not a robust one)."""
    if isinstance(strategy, FedTrimmedAvg):  # int(beta * n) >= 1 from n = ceil(1 / beta); beta = 0 never trims
        return math.ceil(1 / strategy.beta - 1e-9) if strategy.beta > 0 else math.inf
    if isinstance(strategy, FedMedian):
        return 3
    return 1


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """Flat ``{"<attr>/<key>": array}`` of the strategy's cross-round state (empty for FedAvg)."""
    out: dict[str, np.ndarray] = {}
    for attr in _STATEFUL_ATTRS:
        value = getattr(strategy, attr, None)
        for key, arr in (value or {}).items():
            out[f"{attr}/{key}"] = np.asarray(arr)
    return out


def restore_strategy_state(strategy: Strategy, state: dict[str, np.ndarray],
                           packed: dict[str, tuple[int, ...]] | None = None, source: Path | None = None) -> None:
    """Set the strategy's cross-round state to ``state`` (an attribute absent there is reset to None: the
    state before the first aggregation, or before a refused one). ``packed``: the shapes of the payload's
    packed arrays (protocol.packed_shapes), which the moments of the checkpoint ``source`` must have to be resumed."""
    for attr in _STATEFUL_ATTRS:
        values = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{attr}/")}
        if not hasattr(strategy, attr):
            if values:
                raise ConfigError(None, f"checkpoint holds {attr} but strategy {type(strategy).__name__} has none")
            continue
        shapes = {k: tuple(np.shape(v)) for k, v in values.items()}
        if values and packed is not None and shapes != packed:
            raise ConfigError(source, f"checkpoint's {type(strategy).__name__} state {attr} is kept per "
                                    f"{sorted(shapes)[:3]}... , not per packed payload array {sorted(packed)}: it was "
                                    "made before osteofl packed its payload (or for another model); start a fresh run")
        setattr(strategy, attr, values or None)
