"""Bounds on what one registered site can do to the global model, applied before Flower's strategy sees
the replies (pure numpy, so each bound is unit-testable).

Screening (:mod:`screening`) only catches malformed and non-finite updates; a site can still send a
finite update scaled by 1e20, a sign-flipped one, or claim a huge ``num-examples``. Here:

- every update's change (update - global) is measured against the round's *lower median* change (a
  minority cannot raise it: with 2 sites it is the smaller, with 3 the middle one; an update that changed
  nothing is no reference) and clipped to ``max_update_norm`` times it; a change larger than
  ``reject_update_norm`` times the global weights' own norm is not training at all and is rejected;
- aggregation weights are capped by the pool size the site reported at the handshake (or equal), and at
  ``max_weight_ratio`` times the round's lower-median weight: the handshake size is the site's own claim,
  so a site that reports a huge pool still weighs at most that multiple of a typical site;
- the two multiply, so each update's pull on the average (weight x change) is clipped to ``max_update_norm``
  times the round's lower-median pull as well (:func:`bound_pulls`);
- an aggregate that is non-finite or moved the global weights by more than ``max_global_change`` times
  their norm is refused, so it never reaches a checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from osteo_model.errors import ConfigError
from osteofl.protocol import non_finite

Arrays = Mapping[str, np.ndarray]
WEIGHT_MODES = ("capped", "equal")


@dataclass(frozen=True)
class RobustConfig:
    max_update_norm: float | None     # clip: multiple of the round's lower-median change (None = off)
    reject_update_norm: float | None  # reject: multiple of the global weights' norm (None = off)
    max_global_change: float | None   # refuse the aggregate: multiple of the global weights' norm (None = off)
    weights: str = "capped"           # "capped" by the handshake's pool size, or "equal"
    max_weight_ratio: float | None = None  # no weight above this multiple of the round's lower-median weight (None = off)

    @classmethod
    def from_cfg(cls, robust: Mapping[str, Any]) -> "RobustConfig":
        """From ``federation.robust``; a bound that is not a positive number is a ConfigError."""
        def bound(key: str) -> float | None:
            value = robust.get(key)
            if value is None:
                return None
            if not _positive(value):
                raise ConfigError(None, f"federation.robust.{key}={value!r}: a positive number or null (off)")
            return float(value)

        weights = str(robust.get("weights", "capped"))
        if weights not in WEIGHT_MODES:
            raise ConfigError(None, f"federation.robust.weights={weights!r}; choose one of {list(WEIGHT_MODES)}")
        return cls(bound("max_update_norm"), bound("reject_update_norm"), bound("max_global_change"), weights,
                   bound("max_weight_ratio"))


def norm(arrays: Arrays) -> float:
    """L2 norm over all arrays together (float64, so a 1e20-scaled float32 update does not overflow)."""
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64)))) for v in arrays.values()))


def change_norm(update: Arrays, base: Arrays) -> float:
    return norm({k: np.asarray(update[k], np.float64) - np.asarray(base[k], np.float64) for k in base})


def lower_median(values: list[float]) -> float:
    """The median that a minority cannot raise: the lower of the two middle values."""
    return sorted(values)[(len(values) - 1) // 2]


@dataclass
class Bounded:
    updates: dict[str, dict[str, np.ndarray]]  # site -> its (possibly clipped) arrays, rejected ones left out
    clipped: list[dict[str, Any]]              # {"site", "ratio" (change / bound's reference), "bound"}
    rejected: list[dict[str, Any]]             # {"site", "ratio" (change / global norm), "bound", "reason"}


def _clip_to_median(updates: Mapping[Any, Arrays], base: Arrays, size: Mapping[Any, float],
                    factor: float) -> tuple[dict[Any, dict[str, np.ndarray]], list[dict[str, Any]]]:
    """Scale each update's change so that its ``size`` is at most ``factor`` x the round's lower median size.
    A size of 0 (an update that changed nothing: a site that trained at lr 0, or a liar) is not a reference:
    with two sites it would be the lower median, and every other site would be clipped to nothing."""
    moved = [s for s in size.values() if s > 0]
    if not moved:
        return {site: dict(arrays) for site, arrays in updates.items()}, []
    reference = lower_median(moved)
    out, clipped = {}, []
    for site, arrays in updates.items():
        if size[site] > factor * reference:
            scale = factor * reference / size[site]
            arrays = {k: (base[k] + (np.asarray(v, np.float64) - base[k]) * scale).astype(v.dtype) for k, v in arrays.items()}
            clipped.append({"site": site, "ratio": size[site] / reference, "bound": factor})
        out[site] = arrays
    return out, clipped


def bound_updates(updates: Mapping[str, Arrays], base: Arrays, cfg: RobustConfig) -> Bounded:
    """Reject updates whose change exceeds the hard limit, then clip the rest to the median-relative bound."""
    base_norm = norm(base)
    changes = {site: change_norm(u, base) for site, u in updates.items()}
    out = Bounded({}, [], [])
    for site, change in changes.items():
        ratio = change / base_norm if base_norm > 0 else math.inf
        if cfg.reject_update_norm is not None and ratio > cfg.reject_update_norm:
            out.rejected.append({"site": site, "ratio": ratio, "bound": cfg.reject_update_norm,
                                 "reason": f"update changes the global weights by {ratio:.3g} x their norm "
                                           f"(> federation.robust.reject_update_norm={cfg.reject_update_norm:g})"})
        else:
            out.updates[site] = {k: np.asarray(v) for k, v in updates[site].items()}
    if cfg.max_update_norm is not None and out.updates:
        out.updates, out.clipped = _clip_to_median(out.updates, base, {s: changes[s] for s in out.updates},
                                                   cfg.max_update_norm)
    return out


def bound_pulls(updates: Mapping[Any, Arrays], base: Arrays, weights: Mapping[Any, float],
                cfg: RobustConfig) -> Bounded:
    """Clip each update so that its pull on the weighted average, weight x change, is at most
    ``max_update_norm`` x the round's lower-median pull. The change bound and the weight cap each allow a
    multiple of a typical site, and they multiply: one site of three that claimed a huge pool (weight capped
    at 3 x) and sent a sign-flipped change at 2.95 x (just under the clip) pulled 8.9 x as hard as a typical
    site and turned the global step against the honest sites' (cosine -0.37 to -0.46). With equal weights
    this is the change bound again and clips nothing more."""
    if cfg.max_update_norm is None or not updates:
        return Bounded({site: dict(arrays) for site, arrays in updates.items()}, [], [])
    pulls = {site: float(weights[site]) * change_norm(arrays, base) for site, arrays in updates.items()}
    bounded, clipped = _clip_to_median(updates, base, pulls, cfg.max_update_norm)
    return Bounded(bounded, clipped, [])


def aggregation_weights(claimed: Mapping[Any, float], caps: Mapping[Any, Any], mode: str,
                        max_ratio: float | None = None) -> dict[Any, float]:
    """Weights a site cannot inflate. ``equal``: 1 each. ``capped``: the claim, at most the pool size the
    site reported at the handshake; a site whose size is unknown (withheld for a small cohort, or never
    reported) gets at most the smallest known size of the round, and with no known size at all every site
    counts once. Then no weight exceeds ``max_ratio`` x the round's lower median weight, since the
    handshake size is self-reported too."""
    if mode == "equal" or not (known := [float(c) for s, c in caps.items() if s in claimed and _positive(c)]):
        return {site: 1.0 for site in claimed}
    floor = min(known)
    weights = {site: min(float(n), float(caps[site]) if _positive(caps.get(site)) else floor)
               for site, n in claimed.items()}
    if max_ratio is None or not weights:
        return weights
    limit = max_ratio * lower_median(list(weights.values()))
    return {site: min(w, limit) for site, w in weights.items()}


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def aggregate_problem(old: Arrays, new: Arrays, max_change: float | None) -> str | None:
    """Why an aggregate must not replace the global weights (non-finite, or an explosion), else None."""
    if non_finite(new):
        return "aggregate is non-finite"
    if max_change is None:
        return None
    base = norm(old)
    ratio = change_norm(new, old) / base if base > 0 else math.inf
    if ratio > max_change:
        return (f"aggregate changes the global weights by {ratio:.3g} x their norm "
                f"(> federation.robust.max_global_change={max_change:g})")
    return None
