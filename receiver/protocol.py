"""The sync protocol's vocabulary on the receiver's side (docs/sync-protocol.md): limits,
identifiers and their strict patterns, the tokens files, and refusals: `Refusal` and the
middleware that renders every error as `{"error", "detail"}` JSON."""

from __future__ import annotations

import errno
import logging
import re
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import ClientPayloadError, web

from config.names import NAME_RE
from sync.identity import LEGACY_JOURNAL, valid_journal_id

log = logging.getLogger(__name__)


MiB = 1024 * 1024
DEFAULT_MAX_BATCH_BYTES = 16 * MiB
DEFAULT_MAX_CHUNK_BYTES = 8 * MiB
# A batch may inflate to this many times the compressed limit; past it the body is a bomb or a bug.
DECOMPRESSED_FACTOR = 4
RECEIVER_DB = "receiver.db"
PAYLOADS_DIR = "payloads"
PARTIAL_DIR = "partial"
# Published model packages, by sha256 (receiver/model_feed.py): a folder, or a bucket prefix.
MODELS_DIR = "models"
PRIORITIES = ("alert", "event", "sample", "telemetry")
# An appliance may stay offline for weeks and still resume; only far older partials are dropped.
DEFAULT_PARTIAL_TTL_S = 30 * 86400.0

# fullmatch, not `$`: `$` also matches before a trailing newline ("a\n" from `a%0A`).
APPLIANCE_ID_RE = NAME_RE  # an appliance id is a name like any other (config.names)
# Decimal seqs without leading zeros: the batch id is an identity, so one range has one spelling.
_SEQ = r"(?:0|[1-9][0-9]{0,18})"
BATCH_ID_RE = re.compile(
    rf"(?P<priority>{'|'.join(PRIORITIES)})-(?P<first>{_SEQ})-(?P<last>{_SEQ})"
)
SHA256_RE = re.compile(r"[0-9a-f]{64}")
UINT_RE = re.compile(r"[0-9]{1,19}")
SQLITE_MAX_INT = 2**63 - 1
READ_CHUNK = 64 * 1024


def valid_appliance_id(value: str) -> bool:
    """APPLIANCE_ID of the protocol; the pattern alone already excludes `.` and `..`."""
    return APPLIANCE_ID_RE.fullmatch(value) is not None


def parse_batch_id(value: str) -> tuple[str, int, int] | None:
    """(priority, first_seq, last_seq) of a BATCH_ID, or None when it is not one."""
    match = BATCH_ID_RE.fullmatch(value)
    if match is None:
        return None
    first, last = int(match["first"]), int(match["last"])
    if first > last or last > SQLITE_MAX_INT:
        return None
    return match["priority"], first, last


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`; port 0 picks a free one) -> (host, port)."""
    host, sep, port_text = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"--listen must be HOST:PORT (e.g. 0.0.0.0:8443), not {listen!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"--listen port must be 0-65535, not {port}")
    return host, port


def parse_tokens_file(path: Path) -> dict[str, str]:
    """`APPLIANCE_ID TOKEN` a line; blank lines and lines starting with `#` are skipped.

    A line that is not exactly two fields, a bad appliance id, or an id or token given twice
    raises ValueError naming the file and line (tokens are never echoed)."""
    tokens: dict[str, str] = {}
    owners: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(
                f"{where}: expected 'APPLIANCE_ID TOKEN' (two fields), found {len(fields)}"
            )
        appliance_id, token = fields
        if not valid_appliance_id(appliance_id):
            raise ValueError(f"{where}: {appliance_id!r} is not a valid appliance id")
        if not token.isascii() or not token.isprintable():
            raise ValueError(f"{where}: the token must be printable ASCII")
        if appliance_id in tokens:
            raise ValueError(f"{where}: appliance {appliance_id!r} is listed twice")
        if token in owners:
            raise ValueError(
                f"{where}: appliance {appliance_id!r} reuses the token of {owners[token]!r}"
            )
        tokens[appliance_id] = token
        owners[token] = appliance_id
    return tokens


def parse_admin_tokens_file(path: Path) -> list[str]:
    """One admin token a line (they may publish model packages); blank lines and lines starting
    with `#` are skipped. A token with spaces or unprintable characters, or one given twice,
    raises ValueError naming the file and line (tokens are never echoed)."""
    tokens: list[str] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        token = raw.strip()
        if not token or token.startswith("#"):
            continue
        where = f"{path}:{number}"
        if len(token.split()) != 1 or not token.isascii() or not token.isprintable():
            raise ValueError(f"{where}: an admin token is one word of printable ASCII")
        if token in tokens:
            raise ValueError(f"{where}: this token is listed twice")
        tokens.append(token)
    if not tokens:
        raise ValueError(f"{path}: no admin token in it (one a line)")
    return tokens


# ----------------------------------------------------------------------------------- errors


class Refusal(Exception):
    """A request the receiver refuses: rendered as `{"error", "detail"}` with a 4xx status."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        headers: Mapping[str, str] | None = None,
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})  # more JSON fields of the answer


def _error_response(
    status: int,
    error: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> web.Response:
    return web.json_response(
        {"error": error, "detail": detail, **(extra or {})}, status=status, headers=headers
    )


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.Error) and "disk is full" in str(exc)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as JSON; unknown paths under /v1/appliances/ are 400 (bad identifiers)."""
    try:
        return await handler(request)
    except Refusal as refusal:
        return _error_response(
            refusal.status, refusal.error, refusal.detail, refusal.headers, refusal.extra
        )
    except web.HTTPException as exc:
        if exc.status == 404 and request.path.startswith("/v1/appliances/"):
            return _error_response(
                400,
                "bad path",
                "expected /v1/appliances/APPLIANCE_ID/(batches/BATCH_ID|payloads/SHA256|summary"
                "|models|models/SHA256)",
            )
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return _error_response(exc.status, exc.reason.lower(), exc.text or exc.reason, headers)
    except (ConnectionError, ClientPayloadError) as exc:
        # The client went away mid-body; nothing was stored, and nobody is left to answer.
        log.info(
            "request body incomplete", extra={"fields": {"path": request.path, "error": str(exc)}}
        )
        return _error_response(400, "incomplete body", "the request body was cut off; send again")
    except Exception as exc:
        if _is_disk_full(exc):
            log.error("receiver disk full", extra={"fields": {"path": request.path}})
            return _error_response(507, "receiver disk full", "try again later")
        log.exception("request failed", extra={"fields": {"path": request.path}})
        return _error_response(500, "internal error", "try again later")


@web.middleware
async def client_certificate_required(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With --client-ca the TLS layer verifies any certificate a client presents; one that
    presents none gets a clear 403 here (a handshake failure would reach the client as a bare
    disconnect, indistinguishable from a cut link)."""
    transport = request.transport
    if not (transport is not None and transport.get_extra_info("peercert")):
        raise Refusal(
            403,
            "client certificate required",
            "this receiver only accepts clients with a certificate signed by its client CA",
        )
    return await handler(request)


# ------------------------------------------------------------------ request headers

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def byte_range(request: web.Request, size: int, what: str) -> tuple[int, int, int]:
    """(start, end, status) of what to send of `size` bytes: all of it (200), or the part a
    `Range: bytes=N-` / `bytes=N-M` asks for (206; how a cut download resumes). A range past
    the end is `416` naming the size; a Range this does not read gets the whole."""
    wanted = request.headers.get("Range")
    if wanted is None or size == 0:
        return 0, size, 200
    match = _RANGE.fullmatch(wanted.strip())
    first = int(match[1]) if match else size
    last = int(match[2]) + 1 if match and match[2] else size
    if first >= size or last <= first:
        raise Refusal(
            416,
            "range not satisfiable",
            f"the {what} has {size} bytes; send Range: bytes=N- with N < {size}",
            {"Content-Range": f"bytes */{size}"},
        )
    return first, min(last, size), 206


def uint_header(request: web.Request, name: str) -> int:
    value = request.headers.get(name)
    if value is None:
        raise Refusal(400, f"missing {name}", f"send {name}: a non-negative integer")
    value = value.strip()
    if not UINT_RE.fullmatch(value) or int(value) > SQLITE_MAX_INT:
        raise Refusal(400, f"bad {name}", f"{name} must be a non-negative integer")
    return int(value)


def journal_of(request: web.Request) -> str:
    """The request's Journal-Id (400 when it is not 32 lowercase hex digits); LEGACY_JOURNAL
    when there is none (an appliance of a version before journal identities)."""
    value = request.headers.get("Journal-Id")
    if value is None:
        return LEGACY_JOURNAL
    value = value.strip()
    if not valid_journal_id(value):
        raise Refusal(400, "bad journal id", "Journal-Id must be 32 lowercase hex digits")
    return value


def follows_of(request: web.Request, journal_id: str) -> str | None:
    """Journal-Follows: the journal (or `legacy`) this one continues; only beside a Journal-Id."""
    value = request.headers.get("Journal-Follows")
    if value is None:
        return None
    value = value.strip()
    if journal_id == LEGACY_JOURNAL or value == journal_id:
        raise Refusal(
            400, "bad journal follows", "Journal-Follows needs a Journal-Id of another journal"
        )
    if value != LEGACY_JOURNAL and not valid_journal_id(value):
        raise Refusal(
            400, "bad journal follows", "Journal-Follows is 32 lowercase hex digits or legacy"
        )
    return value
