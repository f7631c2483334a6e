"""The site's audit log: one JSON line per message the site sends, in ``<state_dir>/audit.jsonl``.

It records what left, not what the site computed: run id, round, kind, every array key with its shape,
dtype and size (split by the layout that travels with the packed arrays, osteofl.protocol.pack), metric
names and values (aggregates only, by policy), config fields, the serialised size of the message, the UTC
time, and whether the reply was withheld or refused. Lines are appended with one ``write`` on an
``O_APPEND`` descriptor and fsynced, so concurrent ClientApp processes never interleave or lose a line.
``osteo-audit`` (client/audit_cli.py) summarises it for a data-protection officer.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.common.serde import recorddict_to_proto

from osteo_model.errors import StateError
from osteo_model.model import LOCAL_PREFIXES
from osteofl.protocol import ERROR_POLICY_REFUSED, LAYOUT, SITE, SIZES_WITHHELD, payload_of, withheld_reason

AUDIT_FILE = "audit.jsonl"


def audit_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / AUDIT_FILE


def _scalar(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) or value is None else list(value)


def entry(reply: Message, *, site: str, kind: str, rnd: int | None) -> dict[str, Any]:
    """What ``reply`` carries, as one audit record."""
    out: dict[str, Any] = {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "site": site, "run_id": int(reply.metadata.run_id), "round": rnd, "kind": kind,
    }
    if reply.has_error():
        reason = str(reply.error.reason)
        return {**out, "error_code": int(reply.error.code), "error": reason,
                "refused": reason if reply.error.code == ERROR_POLICY_REFUSED else None,
                "withheld": None, "arrays": {}, "metrics": {}, "config": {}, "bytes": len(reason.encode())}
    content = reply.content
    name = next(iter(content.array_records), None)
    arrays = {f"{name}/{key}": {"shape": list(a.shape), "dtype": str(a.dtype), "bytes": int(a.nbytes)}
              for key, a in payload_of(content).items()} if name is not None else {}
    return {
        **out, "refused": None, "withheld": withheld_reason(reply) or _sizes_withheld(reply),
        "arrays": arrays,
        "metrics": {f"{n}/{k}": _scalar(v) for n, r in content.metric_records.items() for k, v in r.items()},
        "config": {f"{n}/{k}": _scalar(v) for n, r in content.config_records.items() if n != LAYOUT
                   for k, v in r.items()},  # the layout is in "arrays", key by key
        "bytes": int(recorddict_to_proto(content).ByteSize()),
    }


def _sizes_withheld(reply: Message) -> str | None:
    site = reply.content.config_records.get(SITE)
    return str(site[SIZES_WITHHELD]) if site is not None and SIZES_WITHHELD in site else None


def append(state_dir: str | Path, record: dict[str, Any]) -> None:
    """Append one line atomically (single write, O_APPEND) and make it durable before the reply leaves."""
    path = audit_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, allow_nan=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(state_dir: str | Path) -> list[dict[str, Any]]:
    """Every audit record; StateError naming the file and line when one is damaged."""
    path = audit_path(state_dir)
    if not path.is_file():
        raise StateError(path, "no audit log here (the site has sent nothing yet, or another state_dir)")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise StateError(path, f"line {i} is not JSON ({exc.msg})") from exc
    return out


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per run: messages by kind, bytes sent, every array key that ever left (and which of them are
    declared local: none, unless the site opted in to the share_all baseline), metric names and config
    fields, refusals and withheld replies, the last epsilon the site reported."""
    runs: dict[str, dict[str, Any]] = {}
    for r in records:
        run = runs.setdefault(str(r["run_id"]), {
            "messages": {}, "bytes": 0, "array_keys": set(), "metrics": set(), "config": set(),
            "refused": 0, "withheld": 0, "errors": 0, "epsilon": None, "first": r["time"], "last": r["time"]})
        run["messages"][r["kind"]] = run["messages"].get(r["kind"], 0) + 1
        run["bytes"] += int(r["bytes"])
        run["array_keys"] |= {k.split("/", 1)[1] for k in r["arrays"]}
        run["metrics"] |= {k.split("/", 1)[1] for k in r["metrics"]}
        run["config"] |= {k.split("/", 1)[1] for k in r["config"]}
        run["refused"] += r.get("refused") is not None
        run["withheld"] += r.get("withheld") is not None
        run["errors"] += "error_code" in r
        eps = next((v for k, v in r["metrics"].items() if k.endswith("/epsilon")), None)
        run["epsilon"] = eps if eps is not None else run["epsilon"]
        run["last"] = r["time"]
    for run in runs.values():
        run["local_keys"] = sorted(k for k in run["array_keys"] if k.startswith(LOCAL_PREFIXES))
        for name in ("array_keys", "metrics", "config"):
            run[name] = sorted(run[name])
    return runs
