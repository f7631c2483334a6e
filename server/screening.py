"""Check every reply before Flower's strategy sees it: a reply from a node that is not the site it claims
to be (``identity``) is refused, malformed or non-finite updates, metrics that are not numbers and
malformed handshakes are rejected (logged with the reason, never averaged), failed replies (a dropped
site, a site whose privacy budget is spent) are reported. Every text a site sent is cleaned
(:func:`site_text`) before it is logged or stored.

The strategy never gets the replies themselves but :func:`for_strategy`'s copies, under the protocol's
record names and trimmed to the metric keys all of them share (Flower's aggregation refuses replies whose
names or keys differ): one site naming its records its own way, or sending fewer keys, cannot erase the
other sites' aggregate or metrics from the history. Metric names are plain (:data:`METRIC_NAME`), at most
:data:`MAX_METRICS` of them, and each value a finite number or NaN.
"""
from __future__ import annotations

import copy
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from osteo_model.metrics import value_range
from osteofl.protocol import (ARRAYS, CAP_PREFIX, METRICS, NUM_EXAMPLES, SITE, SIZES_WITHHELD, SPLIT_SIZES, PayloadError, Spec,
                              non_finite, payload_of, put_payload, withheld_reason)
from osteofl.server.identity import Identities

SITE_TEXT_LIMIT = 300
"""Characters kept of a text a site sent (an error or withheld reason): what the sites' own sanitiser keeps."""
MAX_METRICS = 200
"""Metric keys one reply may carry (a site sends ~40): the history and every checkpoint hold them all, so
2,000 keys of 1,000 characters grew each checkpoint by 16 MB a round."""
METRIC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""A metric's name as osteo_model.metrics and the handlers make them (``bias_bmd_ge_lunar``, ``num-examples``):
nothing that could forge a log line or a CSV header (newlines, terminal escapes, commas, markup)."""

_SHA256 = re.compile(r"[0-9a-f]{64}")
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")  # a terminal escape sequence (colour, cursor, erase line)


@dataclass
class Screened:
    accepted: list[Message] = field(default_factory=list)  # as the sites sent them (per-site metrics are read off these)
    rejected: list[dict[str, str]] = field(default_factory=list)  # {"node", "site", "reason"}
    failed: list[dict[str, str]] = field(default_factory=list)    # error replies (dropped, budget spent)
    withheld: list[dict[str, str]] = field(default_factory=list)  # valid replies without aggregates (small cohort)
    updates: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # node -> its accepted update, unpacked
    silent: set[int] = field(default_factory=set)  # nodes asked that never answered themselves (Federation.screened)


def site_text(value: Any) -> str:
    """A text from a site, fit for the coordinator's log and history: control characters (newlines, ANSI
    escapes) become spaces and it is cut to SITE_TEXT_LIMIT characters, so that a site can neither forge
    log lines nor flood the log; the sites' own sanitiser is not something the coordinator can rely on."""
    raw = _ANSI.sub(" ", str(value)[:10 * SITE_TEXT_LIMIT])  # a megabyte of text is not read to keep 300 characters
    text = "".join(" " if unicodedata.category(c).startswith("C") else c for c in raw)
    text = " ".join(text.split())
    return text if len(text) <= SITE_TEXT_LIMIT else text[:SITE_TEXT_LIMIT - 3] + "..."


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: Any, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def handshake_problem(msg: Message) -> str | None:
    """Why a handshake reply cannot be used (None when it is fine): every field the server reads must have
    its type and range, so that one site's malformed reply is refused by name instead of stopping the run."""
    info = msg.content.config_records.get(SITE)
    if info is None:
        return f"no {SITE!r} record in the handshake"
    if not _count(info.get("n_features"), least=1):
        return f"'n_features' is not a whole number >= 1 ({info.get('n_features')!r})"
    for key in ("features_sha256", "payload_sha256"):
        if not (isinstance(info.get(key), str) and _SHA256.fullmatch(info[key])):
            return f"{key!r} is not a SHA-256 hex digest ({info.get(key)!r})"
    for key, value in info.items():
        if (key in SPLIT_SIZES or key.startswith(CAP_PREFIX)) and not _count(value):
            return f"{key!r} is not a whole number >= 0 ({value!r})"
    if SIZES_WITHHELD in info and not isinstance(info[SIZES_WITHHELD], str):
        return f"{SIZES_WITHHELD!r} is not a text"
    return None


def _problem(msg: Message, expected: Spec | None, handshake: bool) -> tuple[str | None, dict[str, np.ndarray]]:
    """Why a reply cannot be aggregated (None when it is fine), and its arrays as checked."""
    content = msg.content
    metrics = list(content.metric_records.values())
    if len(metrics) != 1:
        return f"expected one MetricRecord, got {len(metrics)}", {}
    n = metrics[0].get(NUM_EXAMPLES)
    if not _number(n) or not math.isfinite(n) or n <= 0:
        return f"'{NUM_EXAMPLES}' missing or not a positive number ({n!r})", {}
    if len(metrics[0]) > MAX_METRICS:
        return f"{len(metrics[0])} metrics, more than the {MAX_METRICS} a reply may carry", {}
    if bad := sorted(k for k in metrics[0] if not METRIC_NAME.fullmatch(k)):
        return f"a metric's name is not a plain name ({site_text(repr(bad[0]))[:80]})", {}
    # Flower's metric aggregation raises on a list, or on lists of different lengths: one number each. NaN is
    # one (a metric undefined at a site, e.g. an AUC over one class; the aggregate skips it), an infinity is not
    if bad := sorted(k for k, v in metrics[0].items() if not _number(v)):
        return f"metric {bad[0]!r} is not a number ({type(metrics[0][bad[0]]).__name__})", {}
    if bad := sorted(k for k, v in metrics[0].items() if math.isinf(v)):
        return f"metric {bad[0]!r} is not a finite number ({metrics[0][bad[0]]})", {}
    for key, value in sorted(metrics[0].items()):  # an AUC of 1e6 would set the aggregate row at any weight
        if (bounds := value_range(key)) is not None and not bounds[0] <= value <= bounds[1] and not math.isnan(value):
            return f"metric {key!r} = {value:g} is outside its range [{bounds[0]:g}, {bounds[1]:g}]", {}
    if handshake:
        return handshake_problem(msg), {}
    if expected is None:
        return None, {}
    try:
        arrays = payload_of(content, expected)
    except PayloadError as exc:
        return str(exc), {}
    if bad := non_finite(arrays):
        return f"array {bad[0]!r} holds non-finite values", {}
    return None, arrays


def screen(replies: Iterable[Message], expected: Spec | None, identities: Identities,
           handshake: bool = False) -> Screened:
    """Split replies into accepted / rejected / failed / withheld. ``expected`` = the payload's spec (key ->
    shape, dtype) for train replies (their packed arrays are unpacked and checked), None for evaluate and
    handshake replies (metrics only; ``handshake``: the site's facts too); an accepted train reply's arrays
    are kept in ``updates``, unpacked once. Sites are named by ``identities`` (their registered key), never
    by what a reply says."""
    out = Screened()
    replies = list(replies)
    refused = identities.check(replies)
    for msg in replies:
        node = msg.metadata.src_node_id
        who = {"node": str(node), "site": identities.name_of(node)}
        if node in refused:
            out.rejected.append({**who, "reason": site_text(f"identity: {refused[node]}")})
        elif msg.has_error():
            out.failed.append({**who, "reason": site_text(msg.error.reason)})
        elif (reason := withheld_reason(msg)) is not None and handshake:  # its sizes have a field of their own
            out.rejected.append({**who, "reason": "a handshake withholds nothing: its facts are checked (sizes "
                                                  f"may be withheld in {SIZES_WITHHELD!r})"})
        elif reason is not None:  # the site's minimum cohort: not a failure
            out.withheld.append({**who, "reason": site_text(reason)})
        elif (problem := _problem(msg, expected, handshake))[0] is not None:
            out.rejected.append({**who, "reason": site_text(problem[0])})
        else:
            out.accepted.append(msg)
            if expected is not None:
                out.updates[int(node)] = problem[1]
    return out


def for_strategy(replies: list[Message], weights: Mapping[int, float],
                 updates: Mapping[int, Mapping[str, np.ndarray]] | None = None) -> list[Message]:
    """Copies of accepted replies as the strategy aggregates them: the metrics every reply has, with the
    server's weight (node -> weight) as ``num-examples``, and for train replies (``updates``: node -> arrays)
    exactly the arrays screened and bounded, packed again, so Flower averages what was checked, in each
    slot's own dtype. The replies are left as the sites sent them (Flower's FedMedian even empties what it gets)."""
    if not replies:
        return []
    records = [next(iter(m.content.metric_records.values())) for m in replies]
    common = set.intersection(*(set(record) for record in records))
    out = []
    for msg, record in zip(replies, records, strict=True):
        node = int(msg.metadata.src_node_id)
        # the protocol's record names, whatever a reply used: Flower refuses a round whose replies name their
        # records differently, so one site renaming its own stalled every round
        content = RecordDict({METRICS: MetricRecord({**{k: record[k] for k in sorted(common)}, NUM_EXAMPLES: weights[node]})})
        if updates is not None:
            put_payload(content, updates[node], ARRAYS)
        out.append(Message(content=content, metadata=copy.copy(msg.metadata)))
    return out


def metrics_of(msg: Message) -> dict[str, float]:
    """A reply's scalar metrics (without the weighting key)."""
    record = next(iter(msg.content.metric_records.values()))
    return {k: float(v) for k, v in record.items() if k != NUM_EXAMPLES and _number(v)}


def site_info(msg: Message) -> ConfigRecord | None:
    """A reply's site record (the handshake's facts), None for an error reply or none sent."""
    return None if msg.has_error() else msg.content.config_records.get(SITE)
