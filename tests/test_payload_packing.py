"""The payload travels packed, one Array per dtype with a layout beside it (osteofl.protocol.pack; issue 11
§3): it must come back bit for bit, aggregate exactly as per-key arrays would, and refuse every layout or
packed array that does not hold what the receiver expects."""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian
from flwr.supercore.task_identity import TaskIdentity

from osteofl import protocol
from osteofl.protocol import LAYOUT, PayloadError


def _arrays(scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(int(abs(scale) * 10))
    return {"b.weight": (rng.normal(size=(3, 2, 2)) * scale).astype(np.float32),
            "a.bias": (rng.normal(size=4) * scale).astype(np.float32),
            "a.scale": np.float32(scale).reshape(()),
            "bn.num_batches_tracked": np.array(int(7 * abs(scale)), np.int64)}


def _content(arrays: dict[str, np.ndarray]) -> RecordDict:
    content = RecordDict({"metrics": MetricRecord({"num-examples": 1})})
    protocol.put_payload(content, arrays)
    return content


def test_pack_round_trip_is_exact_with_one_array_per_dtype() -> None:
    arrays = _arrays()
    content = _content(arrays)
    (record,) = content.array_records.values()
    assert set(record) == {"float32", "int64"}
    assert record["float32"].numpy().size == 3 * 2 * 2 + 4 + 1
    back = protocol.payload_of(content, protocol.spec_of(arrays))
    assert set(back) == set(arrays)
    for key, value in arrays.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        np.testing.assert_array_equal(back[key], value)


def _reply(node: int, arrays: dict[str, np.ndarray], n: int) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    msg = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({"metrics": MetricRecord({"num-examples": n})})
    protocol.put_payload(content, arrays)
    return Message(content, reply_to=msg)


@pytest.mark.parametrize("strategy", [FedAvg(), FedMedian()])
def test_flowers_aggregate_of_packed_arrays_equals_the_per_key_aggregate(strategy) -> None:
    sites = [(_arrays(s), n) for s, n in ((1.0, 10), (2.0, 30), (-0.5, 20))]
    agg, _ = strategy.aggregate_train(1, [_reply(i + 1, a, n) for i, (a, n) in enumerate(sites)])
    spec = protocol.spec_of(sites[0][0])
    got = protocol.unpack(agg, spec, cast=True)  # the server's own aggregate: an averaged int64 comes back float
    for key in spec:
        stack = np.stack([a[key].astype(np.float64) for a, _ in sites])
        if isinstance(strategy, FedMedian):
            want = np.median(stack, axis=0)
        else:
            w = np.array([n for _, n in sites], np.float64)
            want = np.tensordot(w / w.sum(), stack, axes=1)
        np.testing.assert_allclose(got[key], want.astype(spec[key][1]), rtol=1e-6, atol=1e-6)
        assert got[key].dtype == np.dtype(spec[key][1])  # an averaged int64 buffer comes back as int64


def _lie(content: RecordDict, how: str) -> None:
    (name,) = content.array_records
    record, layout = content[name], content[LAYOUT]
    if how == "no layout":
        del content[LAYOUT]
    elif how == "extra key":  # e.g. a local expert's weight sent or asked for
        content[LAYOUT] = ConfigRecord({"keys": [*layout["keys"], "local_expert.0.weight"],
                                        "shapes": [*layout["shapes"], "1"], "dtypes": [*layout["dtypes"], "float32"]})
    elif how == "other shape":
        content[LAYOUT] = ConfigRecord({**dict(layout), "shapes": ["3,4", *layout["shapes"][1:]]})
    elif how == "ragged layout":
        content[LAYOUT] = ConfigRecord({**dict(layout), "shapes": layout["shapes"][1:]})
    elif how == "truncated":
        content[name] = ArrayRecord({"float32": Array(record["float32"].numpy()[:-1]), "int64": record["int64"]})
    elif how == "renamed dtype":
        content[name] = ArrayRecord({"float64": record["float32"], "int64": record["int64"]})
    elif how == "two records":
        content["more"] = ArrayRecord({"float32": record["float32"]})
    elif how in ("float16 data", "big-endian data"):  # right slot and size, another dtype: was cast silently
        data = record["float32"].numpy().astype(np.float16 if how == "float16 data" else ">f4")
        content[name] = ArrayRecord({"float32": Array(data), "int64": record["int64"]})


@pytest.mark.parametrize("how,reason", [
    ("no layout", "without their layout"),
    ("extra key", "unexpected ['local_expert.0.weight']"),
    ("other shape", "expected ((4,), 'float32')"),
    ("ragged layout", "malformed array layout"),
    ("truncated", "the layout says 17"),
    ("renamed dtype", "do not match the layout's dtypes"),
    ("two records", "expected one ArrayRecord, got 2"),
    ("float16 data", "packed float32 arrays hold float16 data"),
    ("big-endian data", "packed float32 arrays hold >f4 data"),
])
def test_a_payload_that_lies_about_what_it_holds_is_refused_with_its_reason(how: str, reason: str) -> None:
    arrays = _arrays()
    content = _content(arrays)
    _lie(content, how)
    with pytest.raises(PayloadError) as err:
        protocol.payload_of(content, protocol.spec_of(arrays))
    assert reason in str(err.value)


def test_a_sites_own_spec_matches_what_it_packs() -> None:
    """payload_spec (read off the state dict, what a site expects) equals the spec of the arrays it sends."""
    from osteo_model import model as osteo
    from osteo_model.config import compose

    cfg = compose([])
    model = osteo.build_model(cfg, 6, "Hologic")
    arrays = protocol.payload_arrays(model, cfg)
    assert protocol.payload_spec(model, cfg) == protocol.spec_of(arrays)
    assert protocol.payload_of(_content(arrays), protocol.payload_spec(model, cfg)).keys() == arrays.keys()
