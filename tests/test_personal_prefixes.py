"""FedPer-style baseline (federation.personal_prefixes): which arrays travel, what a site keeps, and that a
real site refuses it (its state file keeps only the declared local parts)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model_helpers import tiny_cfg
from osteo_model import model as osteo
from osteo_model.errors import ConfigError
from osteofl import protocol
from osteofl.client import policy


def _model(cfg):
    torch.manual_seed(0)
    return osteo.build_model(cfg, 6, "hologic")


def test_personal_heads_neither_travel_nor_get_overwritten(tmp_path):
    cfg = tiny_cfg(tmp_path, "federation.personal_prefixes=[heads.]")
    model = _model(cfg)
    keys = protocol.payload_keys(model, cfg)
    heads = [k for k in osteo.shared_keys(model) if k.startswith("heads.")]
    assert heads and not set(heads) & set(keys)
    assert set(keys) | set(heads) == set(osteo.shared_keys(model))
    own = {k: v.clone() for k, v in model.state_dict().items() if k in heads}
    # a server that sends the heads anyway does not change them; the body it sends is loaded
    sent = {k: np.full(tuple(v.shape), 0.5, dtype=np.float32) for k, v in model.state_dict().items()
            if k in keys or k in heads}
    protocol.load_payload(model, cfg, sent)
    state = model.state_dict()
    assert all(torch.equal(state[k], own[k]) for k in heads)
    assert all(torch.all(state[k] == 0.5) for k in keys if state[k].is_floating_point())


def test_a_payload_missing_a_body_array_is_refused(tmp_path):
    from osteo_model.errors import StateError

    cfg = tiny_cfg(tmp_path, "federation.personal_prefixes=[heads.]")
    model = _model(cfg)
    keys = protocol.payload_keys(model, cfg)
    partial = {k: model.state_dict()[k].numpy() for k in keys[1:]}
    with pytest.raises(StateError, match="missing"):
        protocol.load_payload(model, cfg, partial)


def test_personal_prefix_must_be_a_declared_shared_prefix(tmp_path):
    cfg = tiny_cfg(tmp_path, "federation.personal_prefixes=[calibration.]")
    with pytest.raises(ConfigError, match="not among the shared prefixes"):
        protocol.payload_keys(_model(cfg), cfg)


def test_without_personal_prefixes_the_payload_is_the_shared_set(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = _model(cfg)
    assert protocol.payload_keys(model, cfg) == osteo.shared_keys(model)


def test_a_real_site_refuses_a_personalised_run(tmp_path):
    cfg = tiny_cfg(tmp_path, "federation.personal_prefixes=[heads.]")
    with pytest.raises(policy.PolicyRefusal, match="personal_prefixes"):
        policy.check_request(cfg)
