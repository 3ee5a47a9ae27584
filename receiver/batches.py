"""Batch bodies: read under the receiver's limits (gzip inflated with a cap: no bombs), then
decoded and checked line by line against the batch's identity (CPU work, run off the loop)."""

from __future__ import annotations

import asyncio
import json
import zlib
from dataclasses import dataclass
from typing import Any, NoReturn, cast

from aiohttp import web

from receiver.protocol import DECOMPRESSED_FACTOR, READ_CHUNK, Refusal
from sync.identity import LEGACY_JOURNAL


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """One validated NDJSON line of a batch; `line` is kept verbatim."""

    seq: int
    kind: str
    ts: str
    line: str


@dataclass(frozen=True, slots=True)
class IncomingBatch:
    """A decoded batch with its identity: (appliance, journal, priority, seq range)."""

    appliance_id: str
    journal_id: str
    batch_id: str
    priority: str
    first_seq: int
    last_seq: int
    records: list[BatchRecord]
    follows: str | None = None  # the journal whose history this one continues (Journal-Follows)


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def decode_batch(
    body: bytes | bytearray,
    appliance_id: str,
    priority: str,
    first_seq: int,
    last_seq: int,
    journal_id: str = LEGACY_JOURNAL,
) -> list[BatchRecord]:
    """Parse and check an NDJSON batch (CPU work: run it off the loop). Raises Refusal.

    A record may carry `journal_id` (as `appliance export` writes it): then it must be the
    header's, and none for a legacy batch (no Journal-Id)."""
    expected_journal = None if journal_id == LEGACY_JOURNAL else journal_id
    records: list[BatchRecord] = []
    # bytearray lines behave as bytes here; the cast spares a copy of up to 64 MiB.
    for number, raw in enumerate(cast("list[bytes]", body.split(b"\n")), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8").rstrip("\r")
            value = json.loads(line, parse_constant=_reject_constant)
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise Refusal(400, "bad json", f"line {number}: {exc}") from None
        except RecursionError:
            raise Refusal(400, "bad json", f"line {number}: nested too deeply") from None
        if not isinstance(value, dict):
            raise Refusal(422, "bad record", f"line {number}: a record is a JSON object")
        seq = value.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise Refusal(422, "bad record", f"line {number}: seq must be an integer")
        if value.get("appliance_id") != appliance_id:
            raise Refusal(
                422,
                "wrong appliance_id",
                f"line {number} (seq {seq}): appliance_id {value.get('appliance_id')!r} "
                f"is not the path's {appliance_id!r}",
            )
        if "journal_id" in value and value["journal_id"] != expected_journal:
            raise Refusal(
                422,
                "wrong journal_id",
                f"line {number} (seq {seq}): journal_id {value.get('journal_id')!r} is not the "
                f"Journal-Id header's {expected_journal!r}",
            )
        if value.get("priority") != priority:
            raise Refusal(
                422,
                "wrong priority",
                f"line {number} (seq {seq}): priority {value.get('priority')!r} "
                f"is not the batch's {priority!r}",
            )
        if not first_seq <= seq <= last_seq:
            raise Refusal(
                422,
                "seq outside batch",
                f"line {number}: seq {seq} is outside the batch's range {first_seq}-{last_seq}",
            )
        kind, ts = value.get("kind"), value.get("ts")
        if not isinstance(kind, str) or not isinstance(ts, str):
            raise Refusal(
                422, "bad record", f"line {number} (seq {seq}): kind and ts must be strings"
            )
        records.append(BatchRecord(seq=seq, kind=kind, ts=ts, line=line))
    if not records:
        raise Refusal(422, "empty batch", "a batch holds at least one NDJSON record")
    return records


def _gunzip() -> Any:
    return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)


def too_large(what: str, limit: int) -> Refusal:
    return Refusal(413, "body too large", f"the {what} body is over the limit of {limit} bytes")


async def read_batch_body(request: web.Request, max_bytes: int) -> bytearray:
    """The decompressed body: at most `max_bytes` on the wire and 4x that inflated. The wire
    bytes are read on the event loop, the inflating is done in a worker thread: a replica
    inflating hundreds of batches must still answer its load balancer's health checks."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip"):
        raise Refusal(
            415, "unsupported content-encoding", f"use gzip or identity, not {encoding!r}"
        )
    if getattr(request.content, "total_compressed_bytes", None) is not None:
        # aiohttp already inflated the body, with no limit of ours: serve with serve_receiver().
        raise RuntimeError("receiver served with auto_decompress=True; use serve_receiver()")
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large("compressed", max_bytes)
    wire = bytearray()
    async for chunk in request.content.iter_chunked(READ_CHUNK):
        wire += chunk
        if len(wire) > max_bytes:
            raise too_large("compressed", max_bytes)
    if encoding == "identity":
        return wire
    return await asyncio.to_thread(inflate, wire, max_bytes * DECOMPRESSED_FACTOR)


def inflate(wire: bytearray, limit: int) -> bytearray:
    """A gzip body (one member or several) inflated, refused past `limit` bytes (a bomb stops
    at limit + 1) or when it is not whole gzip."""
    inflater = _gunzip()
    out = bytearray()
    for start in range(0, len(wire), READ_CHUNK):
        data = bytes(wire[start : start + READ_CHUNK])
        while data:
            if inflater.eof:  # the next member of a multi-member gzip stream
                inflater = _gunzip()
            try:
                # max_length caps what one call may inflate: a bomb stops at limit + 1 bytes.
                piece = inflater.decompress(data, limit - len(out) + 1)
            except zlib.error as exc:
                raise Refusal(400, "bad gzip", f"the body is not valid gzip: {exc}") from None
            out += piece
            if len(out) > limit:
                raise too_large("decompressed", limit)
            data = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
    if not inflater.eof:
        raise Refusal(400, "bad gzip", "the gzip stream is empty or truncated")
    return out
