"""The local wire between a ClientApp process and its site's warm worker (client/worker.py).

A Unix-domain socket in a private folder (0700, created by ``osteo-client``) that only the hospital's
own user can open; one request and one reply per connection. A frame is a length-prefixed JSON header
and a body of Flower's own protobufs (the message with its metadata and the context; the reply's
RecordDict), so nothing is pickled and the worker rebuilds exactly the objects the ClientApp received.
"""
from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path
from typing import Any, Sequence

from flwr.app import Context, Error, Message
from flwr.common.serde import (
    context_from_proto, context_to_proto, message_from_proto, message_to_proto, recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext, Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from osteofl.protocol import ERROR_SITE_FAILED

_PREFIX = struct.Struct("!IQ")  # header bytes, body bytes


class WireError(OSError):
    """The other end closed or sent something that is not a frame."""


def send(sock: socket.socket, header: dict[str, Any], parts: Sequence[bytes] = ()) -> None:
    head = json.dumps({**header, "parts": [len(p) for p in parts]}).encode()
    body = b"".join(parts)
    sock.sendall(_PREFIX.pack(len(head), len(body)) + head)
    sock.sendall(body)


def _exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise WireError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[bytes]]:
    n_head, n_body = _PREFIX.unpack(_exactly(sock, _PREFIX.size))
    try:
        header = json.loads(_exactly(sock, n_head))
        sizes = [int(n) for n in header.pop("parts")]
    except (ValueError, KeyError, TypeError) as exc:
        raise WireError(f"malformed frame header ({type(exc).__name__})") from exc
    if sum(sizes) != n_body:
        raise WireError("frame parts do not add up to its body")
    body, parts, at = _exactly(sock, n_body), [], 0
    for n in sizes:
        parts.append(body[at:at + n])
        at += n
    return header, parts


def encode_request(kind: str, message: Message, context: Context) -> tuple[dict[str, Any], list[bytes]]:
    return {"kind": kind}, [message_to_proto(message).SerializeToString(), context_to_proto(context).SerializeToString()]


def decode_request(header: dict[str, Any], parts: Sequence[bytes]) -> tuple[str, Message, Context]:
    if len(parts) != 2 or not isinstance(header.get("kind"), str):
        raise WireError("a request is a kind, a message and a context")
    message, context = ProtoMessage(), ProtoContext()
    message.ParseFromString(parts[0])
    context.ParseFromString(parts[1])
    return header["kind"], message_from_proto(message), context_from_proto(context)


def encode_reply(reply: Message) -> tuple[dict[str, Any], list[bytes]]:
    if reply.has_error():
        return {"error": {"code": int(reply.error.code), "reason": str(reply.error.reason)}}, []
    return {}, [recorddict_to_proto(reply.content).SerializeToString()]


def decode_reply(header: dict[str, Any], parts: Sequence[bytes], message: Message) -> Message:
    """The worker's answer as the reply to ``message`` (this process's own object, so Flower links it)."""
    if "error" in header:
        return Message(Error(code=int(header["error"]["code"]), reason=str(header["error"]["reason"])), reply_to=message)
    if len(parts) != 1:
        raise WireError("a reply is one RecordDict or an error")
    content = ProtoRecordDict()
    content.ParseFromString(parts[0])
    return Message(recorddict_from_proto(content), reply_to=message)


def forward(path: str, kind: str, message: Message, context: Context) -> Message:
    """Hand ``message`` to the site worker listening at ``path`` and return its reply. A worker that is not
    there or dies mid-message gives an Error reply naming no path (the server sees it as a failed site)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            send(sock, *encode_request(kind, message, context))
            return decode_reply(*receive(sock), message)
    except OSError as exc:  # WireError included
        reason = f"the site worker did not answer ({type(exc).__name__}): is osteo-client still running?"
        return Message(Error(code=ERROR_SITE_FAILED, reason=reason), reply_to=message)


def listen(path: Path) -> socket.socket:
    """A listening Unix socket at ``path`` that only this user can open (the folder is 0700 as well)."""
    path.unlink(missing_ok=True)
    old = os.umask(0o177)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(8)
    return sock
