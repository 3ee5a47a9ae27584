"""Keeping and shipping data: storage retention, the journal and the sync destinations."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from config.base import ByteSize, Duration, Name, Problem, Rate, Strict, TimeWindow, raise_problems
from config.checks import repeated
from config.words import HTTP_URL_PATTERN


class Tier(Strict):
    """One step of tiered telemetry: readings older than `after` are kept as aggregates of
    `resolution` (mean, min, max and count per channel and feature) instead of one by one."""

    after: Duration = Field(
        gt=0, description="Telemetry older than this is rolled up to this tier's resolution."
    )
    resolution: Duration = Field(
        ge=1,
        le=86400,
        description="The length of one aggregate (e.g. 1m, 10m); whole seconds, dividing a day.",
    )


class StorageSection(Strict):
    disk_budget: ByteSize = Field(
        default=20 * 1024**3,
        gt=0,
        description="Most bytes the journal and payloads may use together; retention evicts "
        "beyond it.",
    )
    keep_synced: Duration = Field(
        default=7 * 86400.0,
        ge=0,
        description="Records acknowledged by every destination are deleted after this age.",
    )
    min_free: ByteSize = Field(
        default=256 * 1024**2,
        ge=0,
        description="Free space to keep on the data directory's file system; below it the "
        "appliance is under disk pressure: it evicts, sheds the lowest priorities and reports "
        "itself degraded until space returns.",
    )
    reserve: ByteSize = Field(
        default=16 * 1024**2,
        ge=0,
        description="Size of a ballast file kept in the data directory and released when the "
        "disk is really full, so eviction itself has room to run.",
    )
    check_interval: Duration = Field(
        default=10.0, gt=0, description="How often retention checks the budget and free space."
    )
    tiers: list[Tier] = Field(
        default_factory=list,
        description="Tiered telemetry, oldest resolution last: e.g. [{after: 30d, resolution: "
        "1m}, {after: 180d, resolution: 10m}] keeps readings one by one for 30 days, 1-minute "
        "aggregates to 180 days and 10-minute aggregates beyond. Alerts, events, anomaly "
        "windows, samples and data-quality records are never rolled up. Empty: no rollups.",
    )

    @model_validator(mode="after")
    def _tiers_grow_coarser(self) -> StorageSection:
        problems: list[Problem] = []
        for index, tier in enumerate(self.tiers):
            key = ("tiers", index)
            if tier.resolution != int(tier.resolution) or 86400 % int(tier.resolution):
                problems.append(
                    (
                        (*key, "resolution"),
                        "a tier's resolution is whole seconds that divide a day (e.g. 1m, 10m, 1h)",
                    )
                )
            if index == 0:
                continue
            before = self.tiers[index - 1]
            if tier.after <= before.after:
                problems.append(
                    ((*key, "after"), "tiers are listed youngest first: each after is later")
                )
            if tier.resolution <= before.resolution or tier.resolution % before.resolution:
                problems.append(
                    (
                        (*key, "resolution"),
                        "each tier's resolution is coarser than the one before and a multiple "
                        "of it",
                    )
                )
        raise_problems(problems)
        return self


class JournalSection(Strict):
    commit_records: int = Field(
        default=512, ge=1, le=100_000, description="A group commit closes at this many records."
    )
    commit_delay: Duration = Field(
        default=0.02,
        ge=0,
        le=5,
        description="...or this long after its first record, whichever comes first.",
    )
    max_pending: int = Field(
        default=20_000,
        ge=1,
        description="Bound on append calls waiting for the writer; producers wait "
        "(backpressure) when it is reached, so memory stays bounded.",
    )
    checkpoint_interval: Duration = Field(
        default=300.0, gt=0, description="How often the WAL is checkpointed and truncated."
    )
    full_check_limit: ByteSize = Field(
        default=64 * 1024**2,
        ge=0,
        description="A journal up to this size is checked in full at every start, before the "
        "first record (PRAGMA integrity_check, and its payload files against their rows). A "
        "larger one opens at once after a clean stop; after an unclean stop (a crash, a power "
        "cut) its payload files are reconciled at start and its pages checked in the background "
        "while sources journal.",
    )


class DestinationCommon(Strict):
    name: Name = Field(description="Destination name, used in status, logs and records.")
    bandwidth: Rate | None = Field(
        default=None, gt=0, description="Most bytes per second sent to it; null means no cap."
    )
    daily_payload_budget: ByteSize | None = Field(
        default=None,
        gt=0,
        description="Most payload bytes sent to it per UTC day; records still flow past it. "
        "Null means no budget.",
    )
    windows: list[TimeWindow] = Field(
        default_factory=list,
        description="UTC time windows (HH:MM-HH:MM, may wrap midnight) in which it may be used, "
        "for metered links; empty means any time.",
    )


class HttpDestination(DestinationCommon):
    type: Literal["http"] = Field(description="The reference receiver (`appliance receiver`).")
    url: str = Field(
        pattern=HTTP_URL_PATTERN, description="Base URL of the receiver, http:// or https://."
    )
    token_file: Path | None = Field(
        default=None, description="File holding this appliance's bearer token (one line)."
    )
    ca_file: Path | None = Field(
        default=None, description="CA bundle to verify an https receiver with; null: system CAs."
    )
    client_cert: Path | None = Field(
        default=None,
        description="Client certificate chain (PEM) presented to an https receiver that asks for "
        "one; null: none.",
    )
    client_key: Path | None = Field(
        default=None,
        description="Private key of client_cert (PEM); null: the key is in client_cert.",
    )
    timeout: Duration = Field(default=30.0, gt=0, description="Timeout of one request.")
    models: bool = Field(
        default=False,
        description="Also pull model packages addressed to this appliance or its group from the "
        "receiver, every model_packages.pull_interval and after each drain (docs/sync-protocol.md, "
        "Model packages).",
    )

    @model_validator(mode="after")
    def _tls_files_fit_the_url(self) -> HttpDestination:
        problems: list[Problem] = []
        if self.client_key is not None and self.client_cert is None:
            problems.append((("client_key",), "client_key needs client_cert"))
        if self.url.startswith("http://"):
            problems += [
                ((name,), "ca_file and client_cert are for https:// urls; this url is http://")
                for name in ("ca_file", "client_cert")
                if getattr(self, name) is not None
            ]
        raise_problems(problems)
        return self


class DirectoryDestination(DestinationCommon):
    type: Literal["directory"] = Field(
        description="A directory such as a mounted USB disk or NAS share."
    )
    path: Path = Field(
        description="Directory the records and payloads are written under; a relative path is "
        "relative to appliance.data_dir."
    )
    require_mount: bool = Field(
        default=False,
        description="Only write when `path` is a mount point (so an unplugged USB disk never "
        "fills the root file system).",
    )


class S3Destination(DestinationCommon):
    type: Literal["s3"] = Field(
        description="An S3-compatible bucket (AWS S3, MinIO, SeaweedFS, ...)."
    )
    endpoint_url: str = Field(
        pattern=HTTP_URL_PATTERN,
        description="Endpoint of the S3 API, http:// or https:// (for AWS: "
        "https://s3.REGION.amazonaws.com).",
    )
    bucket: str = Field(
        min_length=3, max_length=63, description="Bucket the objects are written to; must exist."
    )
    prefix: str = Field(
        default="",
        description='Prepended to every object key (for example "site-a/"); empty: none.',
    )
    region: str = Field(default="us-east-1", min_length=1, description="Region to sign for.")
    access_key_file: Path = Field(description="File holding the access key id (one line).")
    secret_key_file: Path = Field(description="File holding the secret access key (one line).")
    timeout: Duration = Field(
        default=30.0, gt=0, description="Connect and read timeout of one request."
    )
    models: bool = Field(
        default=False,
        description="Also pull model packages from PREFIXmodels/ in the bucket (appliances/ID/, "
        "groups/GROUP/, all/), every model_packages.pull_interval and after each drain.",
    )


Destination = Annotated[
    HttpDestination | DirectoryDestination | S3Destination, Field(discriminator="type")
]


class SyncSection(Strict):
    interval: Duration = Field(
        default=300.0, gt=0, description="How often the backlog is shipped while a link is up."
    )
    batch_records: int = Field(
        default=1000, ge=1, le=100_000, description="Most records in one batch."
    )
    batch_bytes: ByteSize = Field(
        default=1024**2, ge=1024, description="Most record bytes (uncompressed) in one batch."
    )
    chunk_size: ByteSize = Field(
        default=4 * 1024**2,
        ge=64 * 1024,
        description="Payload upload chunk; a cut upload re-sends at most one chunk.",
    )
    retry_max: Duration = Field(
        default=300.0,
        gt=0,
        description="Longest pause between attempts after failures while the destination "
        "answers (errors, cut transfers).",
    )
    probe_interval: Duration = Field(
        default=10.0,
        gt=0,
        description="How often an unreachable destination is probed; a link that returns is "
        "drained at once.",
    )
    destinations: list[Destination] = Field(
        default_factory=list, description="Where records and payloads go; `type` picks the kind."
    )

    @model_validator(mode="after")
    def _unique_destination_names(self) -> SyncSection:
        named = ((("destinations", i, "name"), d.name) for i, d in enumerate(self.destinations))
        raise_problems(repeated(named, "destinations"))
        return self
