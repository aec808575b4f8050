"""The site's egress log: one JSON line for every message the site sends.

Hospital IT must be able to see exactly what left the site. :func:`egress_mod` is a Flower
ClientApp mod; it wraps the site's train / evaluate / query handlers and, for every reply,
appends one line to a site-local file (``egress-log`` in the SuperNode's ``--node-config``,
default ``<data-dir>/egress.jsonl``) with:

- ``time`` (UTC, ISO 8601), ``run-id``, ``server-round``, ``message-type``;
- ``bytes``: the size of everything Flower pushes for the reply (the deflated message and
  every record, array and chunk object it is made of);
- ``sha256``: the SHA-256 of the reply's serialised content (Flower's object id of the
  content, a hash tree over every record and array) and ``message-id``, the SHA-256 that
  Flower itself uses as the reply's id on the SuperNode and the SuperLink;
- ``records``: for each record, its kind, bytes, SHA-256 and a description in words (array
  names, shapes and dtypes, all of them listed under ``arrays``; metric and config keys with
  their types) - never a value.

A reply that is an error (the handler raised) is logged with the exact reason text Flower
sends. If the line cannot be written, the reply is not sent: the site fails closed.

The mod must be the FIRST in ``ClientApp(mods=[...])`` so that it sees the message exactly as
it leaves, after any masking mod.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.app.message.arraychunk import ArrayChunk
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.inflatable.inflatable_object import (
    add_header_to_object_body,
    get_all_nested_objects,
    no_object_id_recompute,
)

from fedrad.common.arrays import LAYOUT, PACKED, unpack_record
from fedrad.common.errors import FedradError

__all__ = [
    "EGRESS_LOG_KEY",
    "DEFAULT_EGRESS_FILE",
    "EgressEntry",
    "egress_mod",
    "egress_log_path",
    "log_reply",
    "describe_reply",
    "read_egress_log",
    "flower_error_reason",
]

log = logging.getLogger(__name__)

EGRESS_LOG_KEY = "egress-log"
DEFAULT_EGRESS_FILE = "egress.jsonl"
_DATA_DIR_KEY = "data-dir"
_MAX_LISTED = 12  # arrays / keys listed by name in a description; the rest are counted


@dataclass(frozen=True)
class EgressEntry:
    """One line of the egress log."""

    time: str
    run_id: int
    server_round: int | None
    message_type: str
    kind: str  # "reply" or "error"
    bytes: int
    sha256: str | None
    message_id: str | None
    records: list[dict[str, Any]]
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps({
            "time": self.time, "run-id": self.run_id, "server-round": self.server_round,
            "message-type": self.message_type, "kind": self.kind, "bytes": self.bytes,
            "sha256": self.sha256, "message-id": self.message_id, "records": self.records,
            "error": self.error,
        }, sort_keys=False)

    @classmethod
    def from_json(cls, line: str) -> EgressEntry:
        d = json.loads(line)
        return cls(time=d["time"], run_id=int(d["run-id"]), server_round=d["server-round"],
                   message_type=d["message-type"], kind=d["kind"], bytes=int(d["bytes"]),
                   sha256=d["sha256"], message_id=d["message-id"], records=d["records"],
                   error=d.get("error"))


def egress_log_path(node_config: Mapping[str, Any]) -> Path | None:
    """Where this site's egress log lives, or ``None`` for a simulated site.

    ``egress-log`` in the node config wins; otherwise ``<data-dir>/egress.jsonl``.
    Simulated sites (no ``data-dir``) run on the researcher's own machine and keep no log.
    """
    if node_config.get(EGRESS_LOG_KEY):
        return Path(str(node_config[EGRESS_LOG_KEY]))
    if node_config.get(_DATA_DIR_KEY):
        return Path(str(node_config[_DATA_DIR_KEY])) / DEFAULT_EGRESS_FILE
    return None


def flower_error_reason(err: BaseException) -> str:
    """The reason text Flower 1.42's ``flwr-clientapp`` sends when a handler raises.

    Mirrors ``flwr.supernode.runtime.run_clientapp``: ``str(type(ex)) + ":<'" + str(ex) + "'>"``.
    """
    return str(type(err)) + ":<'" + str(err) + "'>"


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _describe_arrays(record: ArrayRecord) -> str:
    total = 0
    groups: dict[str, int] = {}
    parts: list[str] = []
    for name, array in record.items():
        shape = tuple(int(s) for s in array.shape)
        count = int(np.prod(shape)) if shape else 1
        total += count
        groups[array.dtype] = groups.get(array.dtype, 0) + count
        parts.append(f"{name} {array.dtype}{list(shape)}")
    dtypes = ", ".join(f"{n} {d}" for d, n in sorted(groups.items()))
    head = f"{len(parts)} arrays, {total} numbers ({dtypes})"
    if len(parts) == 1 and len(tuple(next(iter(record.values())).shape)) == 1:
        only = next(iter(record.values()))
        return f"vector of {total} {only.dtype} ({parts[0].split(' ')[0]})"
    return f"{head}: {_names(parts)}"


def _value_type(value: Any) -> str:
    if isinstance(value, list):
        inner = type(value[0]).__name__ if value else "values"
        return f"list of {len(value)} {inner}"
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    return type(value).__name__


def _describe_keys(record: Mapping[str, Any], what: str) -> str:
    parts = [f"{k} ({_value_type(v)})" for k, v in record.items()]
    return f"{len(parts)} {what}: {_names(parts)}" if parts else f"no {what}"


def _deflated_size(obj: Any) -> int:
    """Length of ``obj.deflate()``; for an array chunk without copying its data."""
    if isinstance(obj, ArrayChunk):  # header (it ends with the body's length) + the data
        size = len(obj.data)
        return len(add_header_to_object_body(b"", obj)) - 1 + len(str(size)) + size
    return len(obj.deflate())


def _object_bytes(obj: Any) -> int:
    """Bytes of every object ``obj`` is sent as (itself and all its nested objects)."""
    return sum(_deflated_size(o) for o in get_all_nested_objects(obj).values())


def describe_record(name: str, record: Any, layout: ConfigRecord | None = None
                    ) -> dict[str, Any]:
    """Kind, size, SHA-256 and a description in words of one record; never its values.

    A model packed into one Array (``layout``: its :data:`~fedrad.common.arrays.LAYOUT`
    record) is described tensor by tensor, as the layout names them; ``bytes`` and
    ``sha256`` are those of the packed record as sent.
    """
    extra: dict[str, Any] = {}
    if isinstance(record, ArrayRecord):
        shown = record
        if layout is not None and list(record.keys()) == [PACKED]:
            shown = unpack_record(record, layout)
        kind, words = "arrays", _describe_arrays(shown)
        extra["arrays"] = [[name, a.dtype, [int(s) for s in a.shape]]
                           for name, a in shown.items()]
    elif isinstance(record, MetricRecord):
        kind, words = "metrics", _describe_keys(record, "metric keys")
    elif isinstance(record, ConfigRecord):
        kind, words = "config", _describe_keys(record, "config keys")
    else:  # a record type added by a later Flower
        kind, words = type(record).__name__, "record of an unknown kind"
    return {"name": name, "kind": kind, "bytes": _object_bytes(record),
            "sha256": record.object_id, "contents": words, **extra}


def _server_round(msg: Message) -> int | None:
    try:
        if msg.has_content() and "config" in msg.content:
            value = msg.content["config"].get("server-round")
            if value is not None:
                return int(value)
    except (TypeError, ValueError, KeyError):
        log.debug("incoming message has no usable server-round")
    group = msg.metadata.group_id
    return int(group) if group and group.isdigit() else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def describe_reply(reply: Message, incoming: Message) -> EgressEntry:
    """The egress-log entry for ``reply``, the answer to ``incoming``.

    Object IDs (SHA-256 of each object's content) are computed once per object here,
    not once per parent that names them: a ResNet-18 reply costs one pass over its 45 MB.
    """
    with no_object_id_recompute():
        return _describe_reply(reply, incoming)


def _describe_reply(reply: Message, incoming: Message) -> EgressEntry:
    meta = incoming.metadata
    common = {"time": _now(), "run_id": int(meta.run_id),
              "server_round": _server_round(incoming), "message_type": meta.message_type}
    message_bytes = _object_bytes(reply)
    if reply.has_error():
        return EgressEntry(**common, kind="error", bytes=message_bytes, sha256=None,
                           message_id=reply.object_id, records=[],
                           error=reply.error.reason)
    content = reply.content
    layout = content.config_records.get(LAYOUT)
    records = [describe_record(name, record, layout) for name, record in content.items()]
    return EgressEntry(**common, kind="reply", bytes=message_bytes, sha256=content.object_id,
                       message_id=reply.object_id, records=records)


def _append(path: Path, line: str, site_label: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, (line + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise FedradError(
            "egress-log-unwritable",
            f"site {site_label} could not write its egress log, so it sent nothing; "
            "site IT: check the egress-log location (disk space, permissions)",
            local_detail=f"{path}: {err}",
        ) from err


def log_reply(node_config: Mapping[str, Any], reply: Message, incoming: Message) -> EgressEntry:
    """Append the entry for ``reply`` to the site's egress log; raise if it cannot be written.

    For code that sends a reply outside the ClientApp (the site's app-approval refusal).
    """
    path = egress_log_path(node_config)
    entry = describe_reply(reply, incoming)
    if path is not None:
        _append(path, entry.to_json(), str(node_config.get("site-id", "unnamed-site")))
    return entry


def egress_mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: log every reply this site sends (see the module docstring)."""
    path = egress_log_path(ctx.node_config)
    if path is None:
        return call_next(msg, ctx)
    site_label = str(ctx.node_config.get("site-id", "unnamed-site"))
    try:
        reply = call_next(msg, ctx)
    except Exception as err:
        meta = msg.metadata
        reason = flower_error_reason(err)
        entry = EgressEntry(time=_now(), run_id=int(meta.run_id),
                            server_round=_server_round(msg), message_type=meta.message_type,
                            # the reason text is what the error reply carries
                            kind="error", bytes=len(reason.encode("utf-8")), sha256=None,
                            message_id=None, records=[], error=reason)
        try:
            _append(path, entry.to_json(), site_label)
        except FedradError as log_err:
            log.error("site %s: %s (%s)", site_label, log_err, log_err.local_detail)
            raise FedradError(log_err.code, log_err.message) from None
        raise
    entry = describe_reply(reply, msg)
    try:
        _append(path, entry.to_json(), site_label)
    except FedradError as err:
        log.error("site %s: %s (%s)", site_label, err, err.local_detail)
        raise FedradError(err.code, err.message) from None
    log.info("site %s: sent %s reply, %d bytes, sha256 %s (egress log updated)",
             site_label, entry.message_type, entry.bytes, entry.sha256 or "-")
    return reply


def read_egress_log(path: Path) -> Iterator[EgressEntry]:
    """Read an egress log; a damaged line is an error naming its line number."""
    try:
        handle = path.open(encoding="utf-8")
    except OSError as err:
        raise FedradError("egress-log-unreadable",
                          f"cannot open the egress log {path}: {err.strerror}; pass the "
                          "file the site's node config names (egress-log=..., default "
                          "<data-dir>/egress.jsonl)") from err
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield EgressEntry.from_json(line)
            except (ValueError, KeyError, TypeError) as err:
                raise FedradError("egress-log-damaged",
                                  f"line {number} of {path} is not an egress-log entry "
                                  f"({type(err).__name__}: {err}); the file was edited or "
                                  "truncated") from err

