"""The federation's wire protocol, shared by the ClientApp and the ServerApp (neither imports the other).

What lives here is everything both sides must agree on: record and config keys of every message, the
run/node config keys our commands set, the phase schedule, where a site's keys live, and which arrays
travel (derived from the model's one ownership declaration, ``osteo_model.model.SHARED_PREFIXES``).
``federation.share_all`` exists for the "FedAvg of the whole model" baseline only; it makes the payload
every key of the state dict (a site's own policy decides whether it agrees to send that).

It imports neither torch nor the science library at module level: the ClientApp process that Flower
starts for every message imports this module, and with a warm site worker (client/worker.py) it needs
nothing heavier (issue 11: ~3 s of imports per message otherwise).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from omegaconf import DictConfig, OmegaConf

from osteo_model.errors import ConfigError

if TYPE_CHECKING:
    import torch


def _osteo():
    """The model's ownership declaration (imports torch), loaded only by the functions that select arrays."""
    from osteo_model import model

    return model

# --- record names in a message's RecordDict ------------------------------------------------------------
ARRAYS = "arrays"    # ArrayRecord: global arrays (server -> site) or the site's update (site -> server)
CONFIG = "config"    # ConfigRecord: instructions of the server (phase, round, split, ...)
METRICS = "metrics"  # MetricRecord: aggregate metrics of a site
SITE = "site"        # ConfigRecord: the site's declared identity and handshake facts
LAYOUT = "layout"    # ConfigRecord beside a packed ARRAYS record: the keys, shapes and dtypes it holds

# --- keys of the server's CONFIG record --------------------------------------------------------------
PHASE = "phase"              # "handshake" | "ssl" | "task"
ROUND = "round"              # global round number (1-based)
RUN_ID = "run-id"            # Flower run id
N_SITES = "n-sites"          # sites taking part in the run
SPLIT = "split"              # evaluation split
HELD_OUT_SPLITS = ("val", "test")
"""The splits a site reports metrics on: patients it never trains on (client/policy.check_eval_split).
Metrics on the training or self-supervision rows would describe the very patients DP protects, outside
what epsilon covers; the server refuses a config asking for others at start."""
PROXIMAL_MU = "proximal-mu"  # FedProx: Flower's key

NUM_EXAMPLES = "num-examples"  # weighting key of Flower's strategies (in METRICS)
SITE_MODEL_ROUND = "site_model_round"  # METRICS of an evaluation off "val": the round of the site model judged
ERROR_BUDGET_SPENT = 901       # Error.code of a site that trains no more: its epsilon or compute budget is spent
ERROR_POLICY_REFUSED = 902     # the site's own policy refuses what the run asks (e.g. federation.share_all)
ERROR_SITE_FAILED = 903        # anything else that failed at the site (reason stripped of paths and ids)
WITHHELD = "withheld"          # SITE ConfigRecord field: why a reply carries no aggregate (cohort too small)
SIZES_WITHHELD = "sizes-withheld"  # SITE field of a handshake: split sizes left out (cohort too small)
SPLIT_SIZES = ("n_train", "n_val", "n_test", "n_unlabeled")  # SITE fields of a handshake: rounded split sizes
CAP_PREFIX = "cap-"             # SITE fields of a handshake: the site's compute caps (site.policy.compute), by name
COMPUTE_CAPS = {
    "max_local_steps": ("federation.local_steps",),
    "max_batch_size": ("train.batch_size", "train.eval_batch_size"),
    "max_refit_epochs": ("train.final_refit_epochs",),
}
"""A site's compute caps (``site.policy.compute``) and the run settings each one cuts (client/policy.py);
``max_parameters`` is a cap too, but a network cannot be cut to fit: a larger one is refused."""

# --- run_config (flower-server -> every app) and node_config (osteo-client -> its SuperNode) ------------
OVERRIDES = "overrides"    # extra Hydra overrides as one shell-quoted string (run and node config)
RESUME = "resume"          # run_config: true = carry on from the last checkpoint
NODE_SITE = "site"         # node_config keys set by `osteo-client --site X`
NODE_CACHE_DIR = "cache-dir"
NODE_STATE_DIR = "state-dir"
NODE_SITE_DIR = "site-dir"
NODE_WORKER = "worker"     # node_config: the site worker's local socket (osteo-client sets it; client/worker.py)


def cut_by_caps(request: DictConfig, caps: Mapping[str, int]) -> dict[str, tuple[int | None, int]]:
    """The run settings a site's compute caps cut: key -> (what the run asks, what the site allows). A
    round of one pass (``federation.local_steps`` null) is cut too, where the pass is longer than the cap."""
    cut = {}
    for name, cap in caps.items():
        for key in COMPUTE_CAPS.get(name, ()):
            asked = OmegaConf.select(request, key)
            if asked is None or int(asked) > cap:
                cut[key] = (None if asked is None else int(asked), cap)
    return cut


def phase_of(rnd: int, cfg: DictConfig) -> str:
    """Phase schedule: federated self-supervision for ``ssl_rounds`` rounds, then multi-task training."""
    return "ssl" if rnd <= int(cfg.federation.ssl_rounds) else "task"


def site_key_paths(folder: str | Path, site: str) -> tuple[Path, Path]:
    """(private, public) authentication key files of ``site`` inside ``folder``."""
    return Path(folder) / f"{site}_key", Path(folder) / f"{site}_key.pub"


def site_key_dir(state_dir: str | Path) -> Path:
    """Where a hospital keeps its own key pair (``osteo-keygen``, ``osteo-client``'s default): its state folder."""
    return Path(state_dir) / "keys"


def registered_key_path(pki: str | Path, site: str) -> Path:
    """Where the coordinator keeps the PUBLIC key a site sent (``osteo-provision --site-key``)."""
    return site_key_paths(Path(pki) / "sites" / site, site)[1]


# --- payload: which arrays travel -------------------------------------------------------------------------
def personal_prefixes(cfg: DictConfig) -> tuple[str, ...]:
    """``federation.personal_prefixes``: shared modules a personalised baseline (FedPer-style: shared body,
    local heads) keeps at each site; each must be one of the declared SHARED_PREFIXES."""
    prefixes = tuple(str(p) for p in (OmegaConf.select(cfg, "federation.personal_prefixes") or ()))
    osteo = _osteo()
    unknown = [p for p in prefixes if p not in osteo.SHARED_PREFIXES]
    if unknown:
        raise ConfigError(None, f"federation.personal_prefixes {unknown}: not among the shared prefixes "
                                f"{list(osteo.SHARED_PREFIXES)}")
    return prefixes


def payload_keys(model: torch.nn.Module, cfg: DictConfig) -> list[str]:
    """Keys that travel: the shared ones less any personal prefixes (or, for the whole-model baseline, all)."""
    if cfg.federation.share_all:
        return list(model.state_dict().keys())
    personal = personal_prefixes(cfg)
    return [k for k in _osteo().shared_keys(model) if not (personal and k.startswith(personal))]


def payload_arrays(model: torch.nn.Module, cfg: DictConfig) -> dict[str, np.ndarray]:
    """The model's payload arrays (numpy copies, CPU)."""
    state = model.state_dict()
    return {k: state[k].detach().cpu().numpy().copy() for k in payload_keys(model, cfg)}


def non_finite(arrays: Mapping[str, "np.ndarray | torch.Tensor"]) -> list[str]:
    """Names of the arrays (numpy, or torch tensors on any device) holding a NaN or an infinity, sorted."""
    return sorted(k for k, v in arrays.items()
                  if not np.all(np.isfinite(v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))))


# --- payload on the wire: packed, one Array per dtype ----------------------------------------------------
Spec = dict[str, tuple[tuple[int, ...], str]]
"""What a receiver expects: array key -> (shape, numpy dtype name)."""


class PayloadError(ValueError):
    """A packed payload that does not hold what the receiver expects (the reason is safe to log and send)."""


def spec_of(arrays: Mapping[str, np.ndarray]) -> Spec:
    return {k: (tuple(int(d) for d in np.shape(v)), np.asarray(v).dtype.name) for k, v in arrays.items()}


def payload_spec(model: torch.nn.Module, cfg: DictConfig) -> Spec:
    """The payload this model's site expects to receive and send (read off the state dict, nothing copied)."""
    state = model.state_dict()
    return {k: (tuple(state[k].shape), str(state[k].dtype).removeprefix("torch.")) for k in payload_keys(model, cfg)}


def pack(arrays: Mapping[str, np.ndarray]) -> tuple[ArrayRecord, ConfigRecord]:
    """The arrays as one flat Array per dtype (keys in sorted order) plus the layout that names them.

    Flower 1.42 moves every Array of a message as objects of their own, one request per object and hop, so
    the 52 shared arrays cost ~300 requests per site and round (issue 11 §3); packed, they are one. Flower's
    strategies aggregate element-wise, so averaging, trimming or a median of the packed arrays is the same
    as per key."""
    keys = sorted(arrays)
    groups: dict[str, list[np.ndarray]] = {}
    shapes, dtypes = [], []
    for k in keys:
        value = np.asarray(arrays[k])
        groups.setdefault(value.dtype.name, []).append(value.ravel())
        shapes.append(",".join(map(str, value.shape)))
        dtypes.append(value.dtype.name)
    record = ArrayRecord({name: Array(np.concatenate(parts)) for name, parts in groups.items()})
    return record, ConfigRecord({"keys": keys, "shapes": shapes, "dtypes": dtypes})


def packed_shapes(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The shape of each flat array ``pack`` makes of ``arrays`` (one per dtype), without packing them."""
    sizes: dict[str, int] = {}
    for value in arrays.values():
        value = np.asarray(value)
        sizes[value.dtype.name] = sizes.get(value.dtype.name, 0) + int(value.size)
    return {name: (n,) for name, n in sizes.items()}


def put_payload(content: RecordDict, arrays: Mapping[str, np.ndarray], name: str = ARRAYS) -> None:
    """Put packed ``arrays`` and their layout into a message's content (``name``: its ArrayRecord's name)."""
    content[name], content[LAYOUT] = pack(arrays)


def _layout_spec(content: RecordDict) -> Spec:
    layout = content.config_records.get(LAYOUT)
    if layout is None:
        raise PayloadError("arrays come without their layout")
    try:
        keys, shapes, dtypes = (list(layout[f]) for f in ("keys", "shapes", "dtypes"))
        if not len(keys) == len(shapes) == len(dtypes):
            raise ValueError("fields of different lengths")
        return {str(k): (tuple(int(d) for d in str(s).split(",") if d), np.dtype(str(t)).name)
                for k, s, t in zip(keys, shapes, dtypes, strict=True)}
    except (KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"malformed array layout ({exc})") from None


def _differs(sent: Spec, expected: Spec) -> str | None:
    if set(sent) != set(expected):
        extra, missing = sorted(set(sent) - set(expected)), sorted(set(expected) - set(sent))
        return f"array keys differ from the shared set (unexpected {extra[:3]}, missing {missing[:3]})"
    for key in sorted(expected):
        if sent[key] != expected[key]:
            return f"array {key!r} has shape/dtype {sent[key]}, expected {expected[key]}"
    return None


def payload_of(content: RecordDict, expected: Spec | None = None) -> dict[str, np.ndarray]:
    """The arrays of a message, split by the layout it carries, which must equal the receiver's own
    ``expected`` spec (None: trust the layout, for audits and tests). PayloadError says what does not fit."""
    records = list(content.array_records.values())
    if len(records) != 1:
        raise PayloadError(f"expected one ArrayRecord, got {len(records)}")
    spec = _layout_spec(content)
    if expected is not None and (problem := _differs(spec, expected)):
        raise PayloadError(problem)
    return unpack(records[0], spec)


def unpack(record: ArrayRecord, spec: Spec, cast: bool = False) -> dict[str, np.ndarray]:
    """Split a packed record by ``spec``. What a peer sent must hold each slot's data in exactly its dtype
    (float16 in a float32 slot would be averaged, or trained on, at float16 precision); ``cast`` is for the
    server's own aggregate of packed records only, where Flower's average of an integer array comes back as float."""
    sizes: dict[str, int] = {}
    for shape, dtype in spec.values():
        sizes[dtype] = sizes.get(dtype, 0) + math.prod(shape)
    if set(record) != set(sizes):
        raise PayloadError(f"packed arrays {sorted(record)} do not match the layout's dtypes {sorted(sizes)}")
    flat: dict[str, np.ndarray] = {}
    for dtype, size in sizes.items():
        try:
            value = record[dtype].numpy()
        except Exception as exc:  # noqa: BLE001 - undecodable bytes
            raise PayloadError(f"packed {dtype} arrays cannot be decoded ({type(exc).__name__})") from None
        if value.ndim != 1 or value.size != size or not np.issubdtype(value.dtype, np.number):
            raise PayloadError(f"packed {dtype} arrays hold {value.size} {value.dtype} values in {value.ndim} "
                               f"dimensions, the layout says {size}")
        if not cast and value.dtype != np.dtype(dtype):
            raise PayloadError(f"packed {dtype} arrays hold {value.dtype} data")
        flat[dtype] = value
    out, offsets = {}, dict.fromkeys(sizes, 0)
    for key in sorted(spec):
        shape, dtype = spec[key]
        start, offsets[dtype] = offsets[dtype], offsets[dtype] + math.prod(shape)
        out[key] = flat[dtype][start:offsets[dtype]].reshape(shape).astype(dtype, copy=False)
    return out


def load_payload(model: torch.nn.Module, cfg: DictConfig, arrays: Mapping[str, np.ndarray]) -> None:
    """Load received arrays; ``load_shared`` raises if the key set is not exactly the shared set."""
    osteo = _osteo()
    if cfg.federation.share_all:
        local = set(osteo.local_keys(model))
        osteo.load_shared(model, {k: v for k, v in arrays.items() if k not in local})
        osteo.load_local(model, {k: v for k, v in arrays.items() if k in local})
    else:  # a personalised baseline's own modules stay as they are; anything else sent is refused
        personal = personal_prefixes(cfg)
        own = {k: v for k, v in osteo.shared_state(model).items() if personal and k.startswith(personal)}
        osteo.load_shared(model, {**arrays, **own})


def payload_fingerprint(model: torch.nn.Module, cfg: DictConfig) -> str:
    """SHA-256 of the payload's key names, shapes and dtypes: sites whose code or config builds a
    different network are caught at the handshake instead of failing mid-round."""
    spec = "\n".join(f"{k}:{shape}:{dtype}" for k, (shape, dtype) in payload_spec(model, cfg).items())
    return hashlib.sha256(spec.encode()).hexdigest()


def withheld_reason(msg: Message) -> str | None:
    """Why a site withheld this reply's aggregates (a valid answer, not a failure), or None."""
    if msg.has_error() or SITE not in msg.content.config_records:
        return None
    reason = msg.content.config_records[SITE].get(WITHHELD)
    return None if reason is None else str(reason)


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of array data in a record (what a site uploads, before transport framing)."""
    return int(sum(len(a.data) for a in record.values()))
