"""The receiver's config file (`appliance receiver -c receiver.yaml`): where it listens, where it
keeps records (receiver.db or PostgreSQL) and payload bytes (a folder or an S3 bucket), its tokens,
TLS and limits. The same YAML loader as the appliance's: `${VAR}`, `${file:PATH}`, errors that name
the key and the line (docs/fleet.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from config.base import Duration, Strict
from config.words import HTTP_URL_PATTERN, LISTEN_PATTERN

# Batches and payload chunks a receiver takes at once; the next one is answered 503 before its
# body is read, so memory stays bounded however many appliances come back together.
DEFAULT_MAX_INFLIGHT = 32


class SqliteStore(Strict):
    type: Literal["sqlite"] = Field(
        description="receiver.db in the data folder: one receiver, no server to run."
    )


class PostgresStore(Strict):
    type: Literal["postgres"] = Field(
        description="PostgreSQL, shared by every receiver replica (schema `receiver`)."
    )
    database_file: Path = Field(
        description="File holding one URL, postgresql://USER:PASSWORD@HOST:PORT/DATABASE "
        "(a secret: kept in a file, never in this one)."
    )
    max_connections: int = Field(
        default=10, ge=1, le=500, description="Most connections this receiver opens."
    )


Store = Annotated[SqliteStore | PostgresStore, Field(discriminator="type")]


class DirectoryObjects(Strict):
    type: Literal["directory"] = Field(
        description="Payload bytes under the data folder (payloads/, partial/)."
    )


class S3Objects(Strict):
    type: Literal["s3"] = Field(
        description="Payload bytes in an S3-compatible bucket every replica shares."
    )
    endpoint_url: str = Field(
        pattern=HTTP_URL_PATTERN,
        description="Endpoint of the S3 API, http:// or https://.",
    )
    bucket: str = Field(min_length=3, max_length=63, description="The bucket; must exist.")
    prefix: str = Field(default="", description='Prepended to every key (e.g. "shore/").')
    region: str = Field(default="us-east-1", min_length=1, description="Region to sign for.")
    access_key_file: Path = Field(description="File holding the access key id (one line).")
    secret_key_file: Path = Field(description="File holding the secret access key (one line).")
    timeout: Duration = Field(default=30.0, gt=0, description="Connect and read timeout.")


Objects = Annotated[DirectoryObjects | S3Objects, Field(discriminator="type")]


class TlsSection(Strict):
    cert: Path = Field(description="Certificate chain (PEM) to serve HTTPS with.")
    key: Path | None = Field(default=None, description="Its private key, when not in `cert`.")
    client_ca: Path | None = Field(
        default=None, description="Require client certificates signed by this CA (PEM)."
    )


class ReceiverConfig(Strict):
    listen: str = Field(
        pattern=LISTEN_PATTERN,
        description="HOST:PORT to serve on ([::1]:8443 for IPv6; port 0: any free one).",
    )
    data: Path = Field(
        description="The receiver's own folder: receiver.db (store sqlite), payload files "
        "(objects directory), model packages."
    )
    store: Store = Field(default_factory=lambda: SqliteStore(type="sqlite"))
    objects: Objects = Field(default_factory=lambda: DirectoryObjects(type="directory"))
    tokens_file: Path | None = Field(
        default=None,
        description="'APPLIANCE_ID TOKEN' a line; none: every appliance accepted without a "
        "token (local tests only).",
    )
    admin_tokens_file: Path | None = Field(
        default=None, description="Tokens that may publish model packages; none: publishing off."
    )
    tls: TlsSection | None = Field(default=None, description="Serve HTTPS; none: plain HTTP.")
    partial_ttl: Duration = Field(
        default=30 * 86400.0,
        ge=3600.0,
        description="Delete uploads nobody resumed for this long (at least 1h).",
    )
    concurrent_quiet: Duration = Field(
        default=86400.0,
        gt=0,
        description="Two journals of one appliance id shipping within this long of each other "
        "are flagged as two boxes sharing the id.",
    )
    max_inflight: int = Field(
        default=DEFAULT_MAX_INFLIGHT,
        ge=1,
        le=100_000,
        description="Batches and payload chunks taken at once; the next is answered 503 (the "
        "appliance sends it again), so memory stays bounded when a fleet comes back at once.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"


__all__ = [
    "DEFAULT_MAX_INFLIGHT",
    "DirectoryObjects",
    "PostgresStore",
    "ReceiverConfig",
    "S3Objects",
    "SqliteStore",
    "TlsSection",
]
