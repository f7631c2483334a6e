"""Check every reply before Flower's strategy sees it: a reply from a node that is not the site it claims
to be (``identity``) is refused, malformed or non-finite updates are rejected
(logged with the reason, never averaged), failed replies (a dropped site, a site whose privacy budget is
spent) are reported, and metric records are trimmed to the key set all valid replies share, because
Flower's aggregation refuses replies whose metric keys differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord

from osteofl.protocol import NUM_EXAMPLES, PayloadError, Spec, non_finite, payload_of, withheld_reason
from osteofl.server.identity import Identities


@dataclass
class Screened:
    accepted: list[Message] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)  # {"node", "site", "reason"}
    failed: list[dict[str, str]] = field(default_factory=list)    # error replies (dropped, budget spent)
    withheld: list[dict[str, str]] = field(default_factory=list)  # valid replies without aggregates (small cohort)
    updates: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # node -> its accepted update, unpacked
    silent: set[int] = field(default_factory=set)  # nodes asked that never answered themselves (Federation.screened)


def _problem(msg: Message, expected: Spec | None) -> tuple[str | None, dict[str, np.ndarray]]:
    """Why a reply cannot be aggregated (None when it is fine), and its arrays as checked."""
    content = msg.content
    metrics = list(content.metric_records.values())
    if len(metrics) != 1:
        return f"expected one MetricRecord, got {len(metrics)}", {}
    n = metrics[0].get(NUM_EXAMPLES)
    if not isinstance(n, (int, float)) or isinstance(n, bool) or not math.isfinite(n) or n <= 0:
        return f"'{NUM_EXAMPLES}' missing or not a positive number ({n!r})", {}
    if expected is None:
        return None, {}
    try:
        arrays = payload_of(content, expected)
    except PayloadError as exc:
        return str(exc), {}
    if bad := non_finite(arrays):
        return f"array {bad[0]!r} holds non-finite values", {}
    return None, arrays


def screen(replies: Iterable[Message], expected: Spec | None, identities: Identities) -> Screened:
    """Split replies into accepted / rejected / failed. ``expected`` = the payload's spec (key -> shape,
    dtype) for train replies (their packed arrays are unpacked and checked), None for evaluate replies
    (metrics only); an accepted train reply's arrays are kept in ``updates``, unpacked once. Sites are named
    by ``identities`` (their registered key), never by what a reply says."""
    out = Screened()
    replies = list(replies)
    refused = identities.check(replies)
    for msg in replies:
        node = msg.metadata.src_node_id
        who = {"node": str(node), "site": identities.name_of(node)}
        if node in refused:
            out.rejected.append({**who, "reason": f"identity: {refused[node]}"})
        elif msg.has_error():
            out.failed.append({**who, "reason": msg.error.reason})
        elif (reason := withheld_reason(msg)) is not None:  # the site's minimum cohort: not a failure
            out.withheld.append({**who, "reason": reason})
        elif (problem := _problem(msg, expected))[0] is not None:
            out.rejected.append({**who, "reason": problem[0]})
        else:
            out.accepted.append(msg)
            if expected is not None:
                out.updates[int(node)] = problem[1]
    out.accepted = _common_metric_keys(out.accepted)
    return out


def _common_metric_keys(replies: list[Message]) -> list[Message]:
    """Trim each reply's MetricRecord to the keys every reply has (values must be scalars or lists)."""
    if not replies:
        return replies
    keysets = [set(next(iter(m.content.metric_records.values())).keys()) for m in replies]
    common = set.intersection(*keysets)
    if all(k == common for k in keysets):
        return replies
    for msg in replies:
        name, record = next(iter(msg.content.metric_records.items()))
        msg.content[name] = MetricRecord({k: v for k, v in record.items() if k in common})
    return replies


def metrics_of(msg: Message) -> dict[str, float]:
    """A reply's scalar metrics (without the weighting key)."""
    record = next(iter(msg.content.metric_records.values()))
    return {k: float(v) for k, v in record.items() if k != NUM_EXAMPLES and isinstance(v, (int, float))}


def site_info(msg: Message) -> ConfigRecord | None:
    return next(iter(msg.content.config_records.values()), None) if not msg.has_error() else None

