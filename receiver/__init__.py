"""The shore side: the reference receiver that a fleet's appliances ship to (docs/sync-protocol.md)
and the model feed that publishes model packages to them. Embedded on SQLite and local files, or
on PostgreSQL and an S3 bucket for a fleet (docs/fleet.md).

Rooms: `protocol` (limits, identifiers, tokens files, refusals), `batches` (reading and decoding
batch bodies), `backend` (what every store does), `store` (receiver.db), `postgres` (the fleet
store), `objects` (payload and package bytes: folder or bucket), `uploads` (payload files),
`app` (the aiohttp handlers and serving), `model_feed` (model packages), `fleet`,
`fleet_page`, `fleet_store` (the fleet view), `metrics` (`/metrics`), `commands` and `cli`
(`appliance receiver`: its options, and running it). Imports `sync` for its identities and file
helpers; only the CLI, tests and benchmarks import this package (tests/test_layering.py)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from receiver.app import (
        RECEIVER_KEY,
        build_receiver_app,
        run_receiver,
        serve_receiver,
        server_tls_context,
    )
    from receiver.protocol import (
        PARTIAL_DIR,
        PAYLOADS_DIR,
        RECEIVER_DB,
        parse_admin_tokens_file,
        parse_listen,
        parse_tokens_file,
    )

# Loaded on first use: `appliance --help` builds the receiver's options (receiver/commands.py)
# without loading aiohttp or a database driver.
_ON_FIRST_USE = {
    "RECEIVER_KEY": "receiver.app",
    "build_receiver_app": "receiver.app",
    "run_receiver": "receiver.app",
    "serve_receiver": "receiver.app",
    "server_tls_context": "receiver.app",
    "PARTIAL_DIR": "receiver.protocol",
    "PAYLOADS_DIR": "receiver.protocol",
    "RECEIVER_DB": "receiver.protocol",
    "parse_admin_tokens_file": "receiver.protocol",
    "parse_listen": "receiver.protocol",
    "parse_tokens_file": "receiver.protocol",
}


def __getattr__(name: str) -> Any:
    module = _ON_FIRST_USE.get(name)
    if module is None:
        raise AttributeError(f"module 'receiver' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "PARTIAL_DIR",
    "PAYLOADS_DIR",
    "RECEIVER_DB",
    "RECEIVER_KEY",
    "build_receiver_app",
    "parse_admin_tokens_file",
    "parse_listen",
    "parse_tokens_file",
    "run_receiver",
    "serve_receiver",
    "server_tls_context",
]
