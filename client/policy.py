"""The hospital's own policy, enforced at the site before anything is sent.

Two configurations meet at a site. The *site-owned* one is composed from the hospital's ``site.yaml`` and
the overrides it gives ``osteo-client`` (the node config), never from anything the coordinator sends. The
*run* one is the coordinator's request (the run config). :func:`effective_config` makes the request no
looser than the site's policy: the server may ask for more privacy, never for less.

- payload: shared keys only. A run asking for the whole model (``federation.share_all``) is refused unless
  the site opted in itself (``site.policy.allow_share_all``, the simulation's baseline only), and never
  under DP.
- privacy floor: DP is on when either side turns it on; noise is the larger, clipping norm, delta and
  epsilon budget the smaller of the two. The site's accountant (its state file) is the ledger that counts.
- minimum cohort: no aggregate over fewer than ``site.policy.min_cohort`` patients leaves (never below
  :data:`HARD_MIN_COHORT`); the reply says "withheld" instead, and a per-device figure over fewer is left
  out (:func:`without_small_subgroups`); without DP a training batch is no smaller (:func:`check_train_batch`).
- the request itself: no interpolation in the run's overrides (:func:`check_run_overrides`), and the
  message's instructions of the types the protocol gives them (:func:`check_config`).
- the patient split: the site's own (``data``: split fractions, label fraction, split seed, loader
  workers), never the run's. A run with another ``seed`` or ``data.split`` would otherwise move patients
  the site holds out for its validation and test into training: its model selection, its reported test
  metrics and osteo-predict's intervals (from validation residuals) would judge patients it trained on.
- learning rate: no parameter group faster than ``site.policy.max_lr`` (the local parts the site keeps).
- compute: the run's local steps, batch sizes and refit epochs are cut to ``site.policy.compute``'s caps
  (the server may ask for less of the site's hardware, never for more); a network larger than
  ``max_parameters`` is refused, after ``max_rounds`` train rounds of a run the site only evaluates, and
  after ``max_evaluations`` evaluations of a run it refuses them.
  The handshake announces the caps, so the coordinator's log says where.
- error texts that leave the site pass through :func:`sanitise` (no paths, no patient or study ids).
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from osteo_model import dataset, model as osteo
from osteo_model.dataset import SiteData
from osteo_model.errors import ConfigError, OsteoError
from osteofl import protocol

HARD_MIN_COHORT = 5
"""No site can set ``site.policy.min_cohort`` lower: aggregates over fewer patients come close to
per-patient values (small-cell suppression in health statistics uses thresholds of 5 to 11)."""
COUNT_QUANTUM = 10
"""Every count that leaves a site - split sizes in the handshake, a reply's aggregation weight, the patient
count of its metrics (COUNT_METRICS) - is rounded up to a multiple of this (up, so that the server's cap
on a site's aggregation weight never cuts an honest site), so one new study rarely changes any of them."""
COUNT_METRICS = ("patient_n",)
"""Metrics (osteo_model.metrics) that are counts of patients, rounded like the split sizes."""
REASON_MAX_CHARS = 300


class PolicyRefusal(OsteoError):
    """The run asks for something the site's policy does not allow."""

    def __init__(self, reason: str) -> None:
        super().__init__(None, reason)


# --- config ------------------------------------------------------------------------------------------------
def _privacy_floor(site: dict, run: dict) -> dict:
    """DP settings no looser than either side's: on if either turns it on, then the stricter of each value."""
    if not site.get("enabled"):
        return run
    if not run.get("enabled"):
        return site
    return {
        **run, **site, "enabled": True,
        "noise_multiplier": max(float(site["noise_multiplier"]), float(run["noise_multiplier"])),
        "max_grad_norm": min(float(site["max_grad_norm"]), float(run["max_grad_norm"])),
        "delta": min(float(site["delta"]), float(run["delta"])),
        "epsilon_budget": min(float(site["epsilon_budget"]), float(run["epsilon_budget"])),
    }


DP_KEYS = ("noise_multiplier", "max_grad_norm", "delta", "epsilon_budget")


def _site_yaml_privacy(floor: dict | None) -> dict:
    """The DP floor a hospital writes in its site.yaml (``policy.privacy``): complete, or refused."""
    if not floor:
        return {}
    if unknown := sorted(set(floor) - {"enabled", *DP_KEYS}):
        raise ConfigError(None, f"site.policy.privacy.{unknown[0]} is not a DP setting, so the site's floor would not "
                                f"be what it says (settings: enabled, {', '.join(DP_KEYS)})")
    missing = [k for k in DP_KEYS if floor.get("enabled") and k not in floor]
    if missing:
        raise ConfigError(None, f"site.policy.privacy turns DP on but lacks {', '.join(missing)}: give all of "
                                f"enabled, {', '.join(DP_KEYS)} (the site's floor must not depend on the run)")
    for key in DP_KEYS:
        value = floor.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        if key in floor and not (ok and (key != "delta" or value < 1)):
            raise ConfigError(None, f"site.policy.privacy.{key}={value!r} must be a number > 0"
                                    f"{' and < 1' if key == 'delta' else ''}")
    return floor


CAP_NAMES = (*protocol.COMPUTE_CAPS, "max_parameters", "max_rounds", "max_evaluations")
LEAST_CAP = {"max_refit_epochs": 0}
"""The smallest value a cap may take (1 unless named: a site may forbid the refit, not training)."""


def compute_caps(site_policy: Mapping) -> dict[str, int]:
    """The compute caps a site's policy sets (``site.policy.compute``), each a whole number, or refused."""
    caps = {}
    for name, value in dict(site_policy.get("compute") or {}).items():
        if value is None:
            continue
        least = LEAST_CAP.get(name, 1)
        if name not in CAP_NAMES:
            raise ConfigError(None, f"site.policy.compute.{name} is not a compute cap (caps: {', '.join(CAP_NAMES)})")
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(None, f"site.policy.compute.{name}={value!r} must be a whole number >= {least}, or null")
        caps[name] = value
    return caps


def effective_config(run: DictConfig, site: DictConfig) -> DictConfig:
    """The run's config with the site's own folders, device, policy and patient split, the privacy
    floor and the compute caps applied.
    ``site`` is composed from the hospital's configuration only (site.yaml + node overrides)."""
    own = OmegaConf.to_container(site, resolve=True)
    min_cohort = int(own["site"]["policy"]["min_cohort"])
    if min_cohort < HARD_MIN_COHORT:
        raise ConfigError(None, f"site.policy.min_cohort={min_cohort} is below the hard floor {HARD_MIN_COHORT}")
    max_lr = own["site"]["policy"]["max_lr"]
    if isinstance(max_lr, bool) or not isinstance(max_lr, (int, float)) or not max_lr > 0:
        raise ConfigError(None, f"site.policy.max_lr={max_lr!r} must be a number > 0")
    requested = OmegaConf.to_container(run, resolve=True)
    own_privacy = {**own["privacy"], **_site_yaml_privacy(own["site"]["policy"].get("privacy"))}
    cfg = OmegaConf.create({
        **requested, "paths": own["paths"], "site": own["site"], "device": own["device"],
        "data": {**own["data"], "split_seed": dataset.split_seed(site)},
        "privacy": _privacy_floor(own_privacy, requested["privacy"]),
    })
    for key, (asked, cap) in protocol.cut_by_caps(cfg, compute_caps(own["site"]["policy"])).items():
        if asked is not None:  # a one-pass round is cut where it runs (local_steps)
            OmegaConf.update(cfg, key, cap)
    OmegaConf.set_struct(cfg, True)
    return cfg


def check_request(cfg: DictConfig) -> None:
    """Refuse a run that asks for the whole model when the site has not opted in to that baseline (and
    under DP in any case), a learning rate above the site's ``max_lr``, or to keep shared modules at the
    site."""
    if cfg.federation.share_all and not cfg.site.policy.allow_share_all:
        raise PolicyRefusal("the run asks for the whole model (federation.share_all=true); this site's "
                            "policy sends shared parameters only (site.policy.allow_share_all=false)")
    if cfg.federation.share_all and cfg.privacy.enabled:
        raise PolicyRefusal("the run asks for the whole model under DP: it would send the site's feature "
                            "standardisation (its patients' exact feature moments), outside epsilon")
    cap, lr = cfg.site.policy.max_lr, float(cfg.train.lr)
    if (fastest := lr * max(1.0, float(cfg.train.local_lr_factor))) > cap:
        raise PolicyRefusal(f"the run trains a parameter group at a learning rate of {fastest:g} (train.lr={lr:g} x "
                            f"train.local_lr_factor={float(cfg.train.local_lr_factor):g}); this site allows at most "
                            f"{cap:g} (site.policy.max_lr): its local parts would be thrown far in one round")
    if OmegaConf.select(cfg, "federation.personal_prefixes"):
        raise PolicyRefusal("the run asks to keep shared modules at the site (federation.personal_prefixes): a "
                            "benchmark baseline of osteo-evidence; a site's state file keeps only its local parts")


def check_run_overrides(overrides: Sequence[str]) -> None:
    """Refuse a run whose overrides hold an OmegaConf interpolation (``${...}``), before anything composes or
    resolves them: ``${oc.env:NAME}`` would read the site worker's environment into the config, and the
    value would come back to the coordinator in an error text (e.g. "model.encoder='<the value>': expected
    ..."). A coordinator has plain values to ask with; the site's own interpolations (its config files, its
    node overrides) are not the run's and stay as they are."""
    for override in overrides:
        if "${" in override:
            raise PolicyRefusal(f"the run's override of {override.split('=', 1)[0]!r} holds an interpolation ('${{'); "
                                "this site takes plain values only from a coordinator")


CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    protocol.ROUND: (int,), protocol.N_SITES: (int,), protocol.PHASE: (str,), protocol.SPLIT: (str,),
    protocol.RUN_ID: (str,), protocol.PROXIMAL_MU: (int, float),
}
"""The types of the coordinator's instructions (the message's CONFIG record) that the handlers read."""


REQUIRED_CONFIG: dict[str, tuple[str, ...]] = {"train": (protocol.PHASE, protocol.ROUND), "evaluate": ()}
"""The instructions a message of each kind must carry (a train round is nothing without its phase and round);
a kind named here must carry the CONFIG record at all."""


def check_config(config: Mapping[str, Any] | None, kind: str) -> None:
    """Refuse a message whose instructions are missing (:data:`REQUIRED_CONFIG`) or not of the protocol's
    types (:data:`CONFIG_TYPES`; a bool is not a number here) before a handler reads them: a round of ``"x"``
    or ``[1, 2]`` failed after the reply was made, outside the handler's vetting, so the message went
    unaudited and unanswered, and a missing one failed as a bare KeyError."""
    if kind in REQUIRED_CONFIG and config is None:
        raise PolicyRefusal(f"the {kind} message carries no {protocol.CONFIG!r} record: refused, nothing computed")
    if missing := [key for key in REQUIRED_CONFIG.get(kind, ()) if (config or {}).get(key) is None]:
        raise PolicyRefusal(f"the {kind} message does not say its {' or '.join(map(repr, missing))}: refused, "
                            "nothing computed")
    for key, kinds in CONFIG_TYPES.items():
        value = (config or {}).get(key)
        if value is not None and (type(value) is bool or not isinstance(value, kinds)):
            raise PolicyRefusal(f"the message's {key!r} is a {type(value).__name__}, not "
                                f"{' or '.join(k.__name__ for k in kinds)}: refused, nothing computed")


def check_train_batch(cfg: DictConfig) -> None:
    """Refuse, without DP, a train request whose batches hold fewer crops than ``site.policy.min_cohort``.

    A round's update and ``train_*`` losses are computed from its batches only: with one crop per batch and
    one local step, a global model whose sBMD head is a constant c makes the reply's sBMD loss one
    vertebra's ((c - sBMD)/scale)^2, and two rounds give that sBMD exactly. The floor counts rows (crops,
    the unit of ``train.batch_size`` and of the loader), not patients: a patient has up to four vertebrae,
    so a batch certain to hold ``min_cohort`` patients would need four times as many crops (40 at the
    default cohort of 10, against the default batch of 16), and counting the patients each batch happens
    to draw would refuse rounds at random, which says how the batches fell. What makes rows enough is that
    the coordinator does not know which rows share a batch: a deployed site shuffles with a secret of its
    own, and trains on full batches only (training.make_loader). Under DP the batch is one of Poisson-sampled patients and epsilon bounds
    what any batch size releases."""
    need = int(cfg.site.policy.min_cohort)
    if cfg.privacy.enabled or int(cfg.train.batch_size) >= need:
        return
    cap = compute_caps(cfg.site.policy).get("max_batch_size")
    own = f" (this site's cap site.policy.compute.max_batch_size={cap} is below it)" if cap is not None and cap < need else ""
    raise PolicyRefusal(f"train.batch_size={cfg.train.batch_size} is below this site's floor for training without DP: "
                        f"batches of site.policy.min_cohort={need} crops{own}")


def check_payload(model, cfg: DictConfig, keys: Iterable[str]) -> None:
    """Refuse to send any key outside the declared shared set (unless the site opted in to share_all)."""
    allowed = set(osteo.shared_keys(model))
    if cfg.site.policy.allow_share_all:
        allowed |= set(osteo.local_keys(model))
    outside = sorted(set(keys) - allowed)
    if outside:
        raise PolicyRefusal(f"payload holds {len(outside)} key(s) outside the shared set, e.g. {outside[0]}")


def check_eval_split(split: str) -> None:
    """Refuse an evaluation on anything but the site's held-out patients (protocol.HELD_OUT_SPLITS)."""
    if split not in protocol.HELD_OUT_SPLITS:
        raise PolicyRefusal(f"the run asks for metrics on the {split!r} split; this site reports metrics on its "
                            f"held-out patients only ({', '.join(protocol.HELD_OUT_SPLITS)})")


def check_model(model, cfg: DictConfig) -> None:
    """Refuse a network larger than the site's ``max_parameters`` (it cannot be cut to fit)."""
    cap = compute_caps(cfg.site.policy).get("max_parameters")
    if cap is not None and (n := sum(p.numel() for p in model.parameters())) > cap:
        raise PolicyRefusal(f"the run's network has {n:,} parameters; this site's policy allows at most {cap:,} "
                            "(site.policy.compute.max_parameters)")


def rounds_spent(cfg: DictConfig, rounds_done: int) -> str | None:
    """Why this site trains no more rounds of the run (``site.policy.compute.max_rounds`` reached), or None."""
    cap = compute_caps(cfg.site.policy).get("max_rounds")
    if cap is None or rounds_done < cap:
        return None
    return (f"this run's compute budget at this site is spent (site.policy.compute.max_rounds={cap} train "
            f"rounds); not training any more in it")


def evaluations_spent(cfg: DictConfig, done: int) -> str | None:
    """Why this site answers no more evaluations of the run (``site.policy.compute.max_evaluations``), or
    None. Each answer is an aggregate over its held-out patients of a model the coordinator chose: a
    coordinator sending crafted models can trace their values from enough of them."""
    cap = compute_caps(cfg.site.policy).get("max_evaluations")
    if cap is None or done < cap:
        return None
    return (f"this run has had the {cap} evaluations this site answers per run "
            f"(site.policy.compute.max_evaluations); not evaluating any more in it")


def local_steps(cfg: DictConfig, steps_per_pass: int) -> int | None:
    """Optimiser steps this site takes in a round: the run's ``federation.local_steps`` (effective_config
    has cut it to the site's cap), or where the run asks for one pass (None), that pass cut to
    ``site.policy.compute.max_local_steps``."""
    if cfg.federation.local_steps is not None:
        return int(cfg.federation.local_steps)
    cap = compute_caps(cfg.site.policy).get("max_local_steps")
    return cap if cap is not None and steps_per_pass > cap else None


# --- minimum cohort ------------------------------------------------------------------------------------------
def withheld(data: SiteData, split: str, cfg: DictConfig) -> str | None:
    """Why aggregates over ``split`` may not leave (fewer patients than the site's minimum), or None."""
    need = int(cfg.site.policy.min_cohort)
    if data.patients(split) < need:
        return f"{split}: fewer than {need} patients (site.policy.min_cohort)"
    return None


def without_small_subgroups(metrics: Mapping[str, float], data: SiteData, split: str,
                            cfg: DictConfig) -> dict[str, float]:
    """``metrics`` without the per-device figures (``*_bmd_<device>``, osteo_model.metrics) of a DXA device
    on which fewer labeled patients of ``split`` than the site's minimum cohort were measured: one patient
    on a second device would otherwise send that patient's own prediction error, and the key its device."""
    table = data.cache.table.iloc[data.splits.get(split, np.array([], dtype=int))]
    table = table[np.isfinite(table["bmd"].to_numpy(float))]
    counts = table.groupby(table["dxa_manufacturer"].astype(str))["patient_id"].nunique()
    small = tuple(f"_bmd_{device}" for device, n in counts.items() if n < int(cfg.site.policy.min_cohort))
    return {k: v for k, v in metrics.items() if not (small and k.endswith(small))}


def rounded_count(n: int) -> int:
    return -(-int(n) // COUNT_QUANTUM) * COUNT_QUANTUM


# --- error texts ---------------------------------------------------------------------------------------------
_PATH = re.compile(r"""(?:file://)?(?:[A-Za-z]:[\\/]|\\\\|~[\\/]|/|\.{1,2}[\\/])[^\s'"<>|]*|[\w.-]+(?:[\\/][\w.-]+)+""")
_ID_FIELD = re.compile(r"""(?i)\b(patient|study|subject|accession|mrn)([ _-]?(?:id|uid|number))?\b(\s*[:=]?\s*)['"]?[\w.-]+['"]?""")


def sanitise(text: str, identifiers: Iterable[str] = ()) -> str:
    """An error text fit to leave the site: file paths become ``<path>``, the site's patient/study ids
    and any value labelled as one (``patient P0007``, ``study_id=...``) become ``<id>``; capped length."""
    out = _PATH.sub("<path>", str(text))
    for ident in sorted({str(i) for i in identifiers if len(str(i)) >= 3}, key=len, reverse=True):
        out = re.sub(rf"(?<![\w]){re.escape(ident)}(?![\w])", "<id>", out)
    out = _ID_FIELD.sub(lambda m: f"{m.group(1)}{m.group(2) or ''}{m.group(3) or ' '}<id>", out)
    return out if len(out) <= REASON_MAX_CHARS else out[: REASON_MAX_CHARS - 1] + "…"
