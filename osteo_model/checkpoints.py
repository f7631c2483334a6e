"""The one reader of every model file: central checkpoints, federated server checkpoints and site models.

Three formats, told apart by content (never by file name):

- central ``checkpoint.pt`` (osteo-train): a torch file (zip with ``data.pkl``) holding the state dict
  of :func:`osteo_model.central.checkpoint_payload` - shared weights, every training site's local parts;
- federated ``round-NNNN.npz`` (the ServerApp): a numpy zip with ``__meta__.npy`` (JSON) and
  ``arrays/<key>`` (shared weights only) + ``strategy/<key>``; read without pickle;
- site model ``<state_dir>/site_model.pt`` (the ClientApp): a torch file like the central one, with the
  global shared weights of the round the site kept (:func:`replaces_kept`) and that one site's local
  parts, plus its ``model_card.json`` beside it.

:func:`load_model_state` returns the same dict for all three (see ``STATE_KEYS``); torch files are read
with ``weights_only=True``, so a model file handed to a hospital cannot run code when loaded.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from osteo_model.atomic import atomic_file, replace
from osteo_model.errors import ConfigError, StateError

SITE_MODEL_FILE = "site_model.pt"
MODEL_CARD_FILE = "model_card.json"
PREVIOUS_SITE_MODEL_FILE = "site_model.previous.pt"
PREVIOUS_MODEL_CARD_FILE = "model_card.previous.json"
"""The model (and card) another run kept, set aside when a new run keeps its first (set_aside_other_run);
the better of two judged ones (worth_more)."""
STATE_KEYS = ("kind", "shared", "local", "manufacturers", "feature_names", "n_features", "features_sha256",
              "model_cfg", "crop", "card", "file")
"""What every loaded state holds. ``feature_names`` is None for a federated checkpoint (the server only
ever sees the feature count and the SHA-256 of the names), ``crop`` None for checkpoints older than it;
``file`` is the file it was read from, so that a later failure to rebuild the model can name it."""
RESEARCH_USE = "research use only: not a medical device, not for diagnosis"

NPZ_FORMAT_VERSION = 1
NPZ_META = "__meta__"
NPZ_ARRAYS = "arrays/"
NPZ_STRATEGY = "strategy/"

CROP_MODEL_KEYS = ("size", "fov_mm", "trabecular_erosion_mm")
"""Crop settings that change what the network sees (voxels, physical scale, radiomics core); the others
only decide which vertebrae are excluded."""


def features_sha256(names: Iterable[str]) -> str:
    """Fingerprint of a radiomic feature set (names in order), as sites report it at the handshake."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def model_meta(cfg, n_features: int, features_sha: str) -> dict[str, Any]:
    """What a checkpoint of shared weights only (the server's) needs besides the arrays to rebuild and
    check the model: the run's model config and crop settings, the sites' feature count and hash."""
    return {"model_cfg": OmegaConf.to_container(cfg.model, resolve=True), "n_features": int(n_features),
            "features_sha256": str(features_sha), "crop": OmegaConf.to_container(cfg.crop, resolve=True)}


# --- federated server checkpoints (numpy, no pickle) ------------------------------------------------
def write_npz(path: str | Path, arrays: Mapping[str, np.ndarray], strategy_state: Mapping[str, np.ndarray],
              meta: Mapping[str, Any]) -> Path:
    """Write a federated checkpoint atomically (numeric arrays and one JSON string only)."""
    path = Path(path)
    entries: dict[str, np.ndarray] = {
        NPZ_META: np.array(json.dumps({**meta, "format_version": NPZ_FORMAT_VERSION}, allow_nan=True))}
    entries.update({NPZ_ARRAYS + k: np.asarray(v) for k, v in arrays.items()})
    entries.update({NPZ_STRATEGY + k: np.asarray(v) for k, v in strategy_state.items()})
    with atomic_file(path) as fh:
        np.savez(fh, **entries)
    return path


def read_npz(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """(shared arrays, strategy state, meta) of a federated checkpoint; StateError if damaged."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if NPZ_META not in data.files:
                raise StateError(path, f"not a federated checkpoint: no {NPZ_META} entry")
            meta = json.loads(str(data[NPZ_META]))
            arrays = {k[len(NPZ_ARRAYS):]: data[k] for k in data.files if k.startswith(NPZ_ARRAYS)}
            strategy = {k[len(NPZ_STRATEGY):]: data[k] for k in data.files if k.startswith(NPZ_STRATEGY)}
    except StateError:
        raise
    except Exception as exc:  # zipfile/numpy/json raise many types for a damaged file
        raise StateError(path, f"unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict) or meta.get("format_version") != NPZ_FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise StateError(path, f"checkpoint format {version!r} is not {NPZ_FORMAT_VERSION}")
    if not arrays:
        raise StateError(path, "checkpoint holds no arrays")
    return arrays, strategy, meta


def _from_npz(path: Path) -> dict[str, Any]:
    arrays, _, meta = read_npz(path)
    missing = [k for k in ("model_cfg", "n_features") if k not in meta]
    if missing:
        raise StateError(path, f"federated checkpoint lacks {missing} in its meta (written before osteofl "
                               "recorded them): it cannot rebuild a model")
    card = {k: meta[k] for k in ("run_id", "round", "phase", "strategy", "n_sites") if k in meta}
    state = {"kind": "federated", "shared": {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()},
             "local": {}, "manufacturers": {}, "feature_names": None, "n_features": meta["n_features"],
             "features_sha256": meta.get("features_sha256"), "model_cfg": meta["model_cfg"],
             "crop": meta.get("crop"), "card": card}
    _check_types(path, state, ("n_features", "model_cfg", "crop"))
    return state


# --- torch files (central checkpoints, site models) --------------------------------------------------
def _plain(value: Any) -> Any:
    """numpy scalars (e.g. metrics in a training history) as Python numbers: a weights-only load refuses them."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def save_model_state(path: str | Path, payload: Mapping[str, Any], private: bool = False) -> Path:
    """Atomic torch.save of tensors and plain data: a reader sees the old file or the new one, never half
    of one, and loads it without unpickling code. ``private``: readable by its owner only (a site's model)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, private=private) as fh:
        torch.save(_plain(dict(payload)), fh)
    return path


def _from_torch(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise StateError(path, "holds Python objects besides tensors and plain data; not loaded, since loading "
                               "them could run code") from exc
    except Exception as exc:  # truncated or garbled
        raise StateError(path, f"checkpoint unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    missing = [k for k in ("shared", "local", "manufacturers", "feature_names", "model_cfg")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise StateError(path, f"not a model checkpoint: lacks {missing}")
    kind = state.get("kind", "central")
    if kind not in ("central", "site"):
        raise StateError(path, f"unknown model kind {kind!r}")
    state = {**state, "kind": kind, "crop": state.get("crop"), "card": state.get("card") or {}}
    _check_types(path, state, ("shared", "local", "manufacturers", "feature_names", "model_cfg", "crop", "card"))
    names = list(state["feature_names"])
    return {**state, "n_features": len(names), "feature_names": names,
            "features_sha256": state.get("features_sha256") or features_sha256(names), "card": dict(state["card"])}


def _is_map(value: Any, item: type | tuple[type, ...] = object) -> bool:
    return isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, item) for k, v in value.items())


_FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "shared": (lambda v: _is_map(v, torch.Tensor), "a mapping of weight names to tensors"),
    "local": (lambda v: _is_map(v, Mapping) and all(_is_map(w, torch.Tensor) for w in v.values()),
              "a mapping of sites to their weights"),
    "manufacturers": (lambda v: _is_map(v, str), "a mapping of sites to DXA manufacturers"),
    "feature_names": (lambda v: isinstance(v, (list, tuple)) and all(isinstance(n, str) for n in v),
                      "a list of feature names"),
    "n_features": (lambda v: type(v) is int and v > 0, "a positive integer"),
    "model_cfg": (_is_map, "a mapping of model settings"),
    "crop": (lambda v: v is None or _is_map(v), "a mapping of crop settings"),
    "card": (_is_map, "a mapping"),
}
"""What each field of a model file must be before anything reads it (a tampered or foreign file otherwise
fails deep inside the rebuild with an error that names neither the file nor the field)."""


def _check_types(path: Path, state: Mapping[str, Any], keys: Iterable[str]) -> None:
    for key in keys:
        ok, what = _FIELD_TYPES[key]
        if not ok(state[key]):
            raise StateError(path, f"field {key!r} is {type(state[key]).__name__}, not {what}: damaged or tampered file")


def _check_finite(path: Path, state: Mapping[str, Any]) -> None:
    """A model with NaN or infinite weights (damaged, or training diverged) predicts NaN for every study:
    refused here, once for every format, rather than reported level by level as "not evaluable"."""
    weights = [*state["shared"].values(), *(w for local in state["local"].values() for w in local.values())]
    bad = sum(int((~torch.isfinite(w)).sum()) for w in weights)
    if bad:
        raise StateError(path, f"model holds {bad} non-finite weights (damaged or diverged)")


def load_model_state(path: str | Path) -> dict[str, Any]:
    """Any model file (or a site's state folder holding ``site_model.pt``) as one dict, see STATE_KEYS.

    A federated checkpoint has no local parts (``local`` is empty): every site it is evaluated on is a new
    site. A central checkpoint also keeps its training extras (optimizer, plan, history) for resuming.
    StateError naming the file for a damaged or foreign file, a field of the wrong type, or a weight that
    is not finite.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / SITE_MODEL_FILE).is_file():
            raise StateError(path, f"folder holds no {SITE_MODEL_FILE}: not a site's state folder after a federated run")
        path = path / SITE_MODEL_FILE
    if not path.is_file():
        raise StateError(path, "model file not found")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise StateError(path, f"not a model file (truncated or not a checkpoint: {exc})") from exc
    if any(n.endswith("data.pkl") for n in names):
        state = _from_torch(path)
    elif any(n.endswith(".npy") for n in names):
        state = _from_npz(path)
    else:
        raise StateError(path, "not a model file: neither a torch checkpoint nor a federated round-NNNN.npz")
    _check_finite(path, state)
    return {**state, "file": path}


# --- the site model -----------------------------------------------------------------------------------
VAL_PATIENTS = "val_patients_sha256"
"""Card field: fingerprint of the validation patients held out from training (dataset.patients_sha256): a
site model's card holds its site's (those it was selected on), a central checkpoint's each training site's."""
SPLIT_PIN = "split_pin"
"""Card field: the id of the pinned patient split a site model was trained on (dataset.SPLIT_FILE)."""


def site_card(kept: Mapping[str, Any] | None, *, run_id: str, rnd: int, n_sites: int | None,
              phases: Mapping[str, int], epsilon: float, metrics: Mapping[str, float], split: str,
              selection: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run's facts for the card of the site model being saved. Validation metrics are this
    evaluation's when it ran on the "val" split, else those on the card of the model the run kept so far
    (``kept``, :func:`kept_card`): the final evaluation is on the test split and must not be reported as
    validation. ``selection`` (metric and score, None where the model was not judged) is what
    :func:`replaces_kept` compares."""
    if split == "val":
        validation = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
    else:
        validation = (kept or {}).get("validation_metrics")
    return {"run_id": str(run_id), "round": int(rnd), "n_sites": None if n_sites is None else int(n_sites),
            "phases": {k: int(v) for k, v in phases.items()}, "epsilon_spent": float(epsilon),
            "validation_metrics": validation, "selection": dict(selection or {"score": None})}


def kept_card(state_dir: str | Path, run_id: str) -> dict[str, Any] | None:
    """The card of the site model kept in ``state_dir`` for run ``run_id``; None where that run keeps none
    (no model yet, another run's, or a model file that cannot be read). Read from the model file, whose
    card is the one written with it: a process killed between save_site_model's two writes leaves the
    readable copy (``model_card.json``) behind, and selection against its older score could replace a
    better model. Such a copy is rewritten here."""
    state_dir = Path(state_dir)
    if not (state_dir / SITE_MODEL_FILE).is_file():
        return None
    try:
        card = load_model_state(state_dir / SITE_MODEL_FILE)["card"]
    except StateError:
        return None
    try:
        copy = json.loads((state_dir / MODEL_CARD_FILE).read_text())
    except (OSError, ValueError):
        copy = None
    if copy != card:
        _write_card(state_dir, card)
    return card if card.get("run_id") == str(run_id) else None


def improves(score: float | None, best: float) -> bool:
    """Model selection's one rule (lower is better): a finite score strictly below ``best``. Kept models,
    Selector's rounds and fit_local's epochs are all chosen by it."""
    return score is not None and math.isfinite(score) and score < best


def replaces_kept(kept: Mapping[str, Any] | None, score: float | None) -> bool:
    """Whether a candidate site model whose validation ``score`` is given (lower is better; None: not
    judged, e.g. a self-supervised round or no labeled validation patient) replaces the kept one (its
    card; None where the run keeps none yet). Always where nothing judged is kept, else only a strictly
    better score: each site ends with the round its own validation patients predict best - the
    benchmark's model selection (simulation/evidence_methods.Selector) - whatever the server sends last."""
    best = ((kept or {}).get("selection") or {}).get("score")
    return best is None or improves(score, float(best))


def _container(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def save_site_model(state_dir: str | Path, model: torch.nn.Module, *, site: str, feature_names: list[str],
                    model_cfg: Mapping, crop: Mapping | None, card: Mapping[str, Any]) -> Path:
    """Write ``<state_dir>/site_model.pt`` (shared + this site's local parts, loadable on its own) and
    ``<state_dir>/model_card.json`` (``card`` plus feature-set hash, crop settings, date, intended use);
    both atomic. Returns the model file."""
    from osteo_model.model import local_state, shared_state, unwrap

    net, state_dir = unwrap(model), Path(state_dir)
    crop, sha = _container(crop), features_sha256(feature_names)
    card = {**card, "site": site, "features_sha256": sha, "crop": crop,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "use": RESEARCH_USE}
    payload = {
        "kind": "site", "shared": shared_state(net), "local": {site: local_state(net)},
        "manufacturers": {site: net.manufacturer}, "feature_names": list(feature_names), "features_sha256": sha,
        "model_cfg": _container(model_cfg), "crop": crop, "card": card,
    }
    state_dir.mkdir(parents=True, exist_ok=True)
    path = save_model_state(state_dir / SITE_MODEL_FILE, payload, private=True)
    _write_card(state_dir, card)
    return path


def _write_card(state_dir: Path, card: Mapping[str, Any]) -> None:
    """The site model's card as readable JSON beside it (atomic; the site's owner only, as the model)."""
    with atomic_file(state_dir / MODEL_CARD_FILE, "w", private=True) as fh:
        fh.write(json.dumps(card, indent=2, allow_nan=False))


def _card(path: Path) -> dict[str, Any] | None:
    """The card inside a model file; None where there is none or it cannot be read."""
    try:
        return load_model_state(path)["card"] if path.is_file() else None
    except StateError:
        return None


def worth_more(earlier: Mapping[str, Any], later: Mapping[str, Any]) -> bool:
    """Whether the site model set aside earlier (its card) is worth more to the hospital than the one a new
    run would set aside in its place (``later``): judged on validation where the later one is not, or judged
    no worse on the same validation patients (:data:`VAL_PATIENTS`). Scores on other patients do not compare:
    then the later model wins, as it would without a judgement."""
    score = (earlier.get("selection") or {}).get("score")
    later_score = (later.get("selection") or {}).get("score")
    if score is None:
        return False
    if later_score is None:
        return True
    return earlier.get(VAL_PATIENTS) == later.get(VAL_PATIENTS) and not improves(float(later_score), float(score))


def set_aside_other_run(state_dir: str | Path, run_id: str) -> str | None:
    """Before run ``run_id`` keeps its first site model, set aside the one another run kept: a new run starts
    its own selection, and its first model (unjudged, from a coordinator's first message) must not destroy the
    model the hospital went home with last time. One generation is kept (``site_model.previous.pt``), the one
    worth more (:func:`worth_more`): otherwise a coordinator that opened two runs and sent one unjudged
    model in each would push the hospital's validated model off the disk. Returns what was done, for the
    log; None where there was nothing to set aside (no model, this run's, or one that cannot be read: it is
    left to be replaced)."""
    state_dir = Path(state_dir)
    model, previous = state_dir / SITE_MODEL_FILE, state_dir / PREVIOUS_SITE_MODEL_FILE
    card = _card(model)
    if card is None or str(card.get("run_id")) == str(run_id):
        return None
    if (earlier := _card(previous)) is not None and worth_more(earlier, card):
        for path in (model, state_dir / MODEL_CARD_FILE):
            path.unlink(missing_ok=True)
        return (f"the model run {card.get('run_id')} kept is dropped: {PREVIOUS_SITE_MODEL_FILE} (run "
                f"{earlier.get('run_id')}) predicts the site's validation patients at least as well")
    if (state_dir / MODEL_CARD_FILE).is_file():
        replace(state_dir / MODEL_CARD_FILE, state_dir / PREVIOUS_MODEL_CARD_FILE)
    replace(model, previous)
    return f"the model run {card.get('run_id')} kept is now {PREVIOUS_SITE_MODEL_FILE}"


# --- compatibility --------------------------------------------------------------------------------------
def _crop_words(crop: Mapping) -> str:
    return f"{int(crop['size'])}^3 crops over {float(crop['fov_mm']):g} mm"


def check_compatible(state: Mapping[str, Any], crop_cfg: Mapping | None, feature_names: list[str] | None) -> None:
    """ConfigError unless data prepared with ``crop_cfg`` and ``feature_names`` fits the model ``state``.
    Settings a side does not record (older checkpoints, hand-made caches; ``feature_names`` None) are not
    compared."""
    trained, here = state.get("crop"), crop_cfg
    if trained is not None and here is not None:
        differ = [k for k in CROP_MODEL_KEYS if k in trained and k in here
                  and not math.isclose(float(trained[k]), float(here[k]), rel_tol=1e-6)]
        if differ:
            fix = " ".join(f"crop.{k}={trained[k]}" for k in CROP_MODEL_KEYS if k in trained)
            raise ConfigError(None, f"model was trained on {_crop_words(trained)}; this cache has {_crop_words(here)} "
                                    f"(differ: {', '.join(differ)}): re-run osteo-prepare with {fix} or use a "
                                    "matching model")
    if feature_names is None:
        return
    names = list(feature_names)
    if state.get("feature_names") is not None:
        same = list(state["feature_names"]) == names
    else:
        same = int(state["n_features"]) == len(names) and state.get("features_sha256") in (None, features_sha256(names))
    if not same:
        raise ConfigError(None, f"model was trained on another radiomic feature set ({state['n_features']} "
                                f"features, sha256 {str(state.get('features_sha256'))[:12]}); this cache has "
                                f"{len(names)} (sha256 {features_sha256(names)[:12]}): re-run osteo-prepare "
                                "with the model's radiomics config or use a matching model")
