"""What crosses the wire: the shared arrays only, derived from the model's one ownership declaration.

Both sides use these helpers: the ClientApp to build its reply, the ServerApp to build the initial
global arrays and to check every reply against the same key set. ``federation.share_all`` exists for
the "FedAvg of the whole model" baseline only; it makes the payload every key of the state dict.
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from omegaconf import DictConfig

from osteo_model import model as osteo


def payload_keys(model: torch.nn.Module, cfg: DictConfig) -> list[str]:
    """Keys that travel: the shared ones (or, for the whole-model baseline, all of them)."""
    if cfg.federation.share_all:
        return list(model.state_dict().keys())
    return list(osteo.shared_keys(model))


def payload_record(model: torch.nn.Module, cfg: DictConfig) -> ArrayRecord:
    """The model's payload arrays as an ArrayRecord (numpy copies, CPU)."""
    state = model.state_dict()
    return ArrayRecord({k: Array(state[k].detach().cpu().numpy().copy()) for k in payload_keys(model, cfg)})


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def load_payload(model: torch.nn.Module, cfg: DictConfig, arrays: Mapping[str, np.ndarray]) -> None:
    """Load received arrays; ``load_shared`` raises if the key set is not exactly the shared set."""
    if cfg.federation.share_all:
        local = set(osteo.local_keys(model))
        osteo.load_shared(model, {k: v for k, v in arrays.items() if k not in local})
        osteo.load_local(model, {k: v for k, v in arrays.items() if k in local})
    else:
        osteo.load_shared(model, arrays)


def payload_fingerprint(model: torch.nn.Module, cfg: DictConfig) -> str:
    """SHA-256 of the payload's key names, shapes and dtypes: sites whose code or config builds a
    different network are caught at the handshake instead of failing mid-round."""
    state = model.state_dict()
    spec = "\n".join(f"{k}:{tuple(state[k].shape)}:{state[k].dtype}" for k in payload_keys(model, cfg))
    return hashlib.sha256(spec.encode()).hexdigest()


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of array data in a record (what a site uploads, before transport framing)."""
    return int(sum(len(a.data) for a in record.values()))
