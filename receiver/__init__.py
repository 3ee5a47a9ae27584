"""The shore side: the reference receiver that a fleet's appliances ship to (docs/sync-protocol.md)
and the model feed that publishes model packages to them. Embedded on SQLite and local files, or
on PostgreSQL and an S3 bucket for a fleet (docs/fleet.md).

Rooms: `protocol` (limits, identifiers, tokens files, refusals), `batches` (reading and decoding
batch bodies), `backend` (what every store does), `store` (receiver.db), `postgres` (the fleet
store), `objects` (payload and package bytes: folder or bucket), `uploads` (payload files),
`app` (the aiohttp handlers and serving), `model_feed` (model packages), `fleet`,
`fleet_page`, `fleet_store` (the fleet view), `metrics` (`/metrics`), `cli` (`appliance
receiver`). Imports `sync` for its identities and file helpers; only the CLI, tests and
benchmarks import this package (tests/test_layering.py)."""

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
