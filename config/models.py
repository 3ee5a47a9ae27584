"""The root model, ApplianceConfig, with its own sections; re-exports every section's models."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, model_validator

from config.analysis import (
    AnomalySettings,
    DriftSettings,
    FeatureName,
    FeatureSettings,
    Limit,
    RefitSettings,
)
from config.base import (
    ByteSize,
    Duration,
    KeyPath,
    Name,
    Problem,
    Rate,
    Strict,
    TimeWindow,
    raise_problems,
)
from config.cameras import (
    BUILTIN_DETECTOR,
    Camera,
    CanarySettings,
    ClipSettings,
    DetectorModel,
    ModelPackagesSection,
    MotionSettings,
    SamplingSettings,
    SnapshotSettings,
    TrackingSettings,
    Zone,
)
from config.checks import repeated
from config.sensors import (
    CsvSensor,
    Fault,
    LiveSensorCommon,
    ModbusRegister,
    ModbusSensor,
    MqttSensor,
    MqttTopic,
    NmeaSensor,
    OpcUaNode,
    OpcUaSensor,
    Sensor,
    SensorCommon,
    SimulatedChannel,
    SimulatedSensor,
)
from config.shipping import (
    Destination,
    DestinationCommon,
    DirectoryDestination,
    HttpDestination,
    JournalSection,
    S3Destination,
    StorageSection,
    SyncSection,
)
from config.words import LISTEN_PATTERN, did_you_mean, listing

__all__ = [
    "AUTO_APPLIANCE_ID",
    "BUILTIN_DETECTOR",
    "AnomalySettings",
    "ApplianceConfig",
    "ApplianceSection",
    "ByteSize",
    "Camera",
    "CanarySettings",
    "ClipSettings",
    "CsvSensor",
    "Destination",
    "DestinationCommon",
    "DetectorModel",
    "DirectoryDestination",
    "DriftSettings",
    "Duration",
    "Fault",
    "FeatureName",
    "FeatureSettings",
    "HttpDestination",
    "JournalSection",
    "Limit",
    "LiveSensorCommon",
    "ModbusRegister",
    "ModbusSensor",
    "ModelPackagesSection",
    "MotionSettings",
    "MqttSensor",
    "MqttTopic",
    "Name",
    "NmeaSensor",
    "OpcUaNode",
    "OpcUaSensor",
    "Rate",
    "RefitSettings",
    "S3Destination",
    "SamplingSettings",
    "Sensor",
    "SensorCommon",
    "SimulatedChannel",
    "SimulatedSensor",
    "SnapshotSettings",
    "StatusSection",
    "StorageSection",
    "Strict",
    "SyncSection",
    "TimeWindow",
    "TrackingSettings",
    "Zone",
]

# `appliance.id` left out: the appliance makes one unique to its data directory at first start.
AUTO_APPLIANCE_ID = "auto"
STATUS_TOKEN_MIN_CHARS = 16
"""Shortest status page token (appliance/status/web.py refuses shorter ones at start)."""


def is_loopback_host(host: str) -> bool:
    """Whether only this machine can reach `host`. A host name other than `localhost` may
    resolve to anything, so it counts as reachable from the network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


class ApplianceSection(Strict):
    id: Name = Field(
        default=AUTO_APPLIANCE_ID,
        description="Identity of this appliance, stamped on every record; give every box of a "
        "fleet its own. Left out (or `auto`): made once per data directory as `appliance-` and "
        "8 random hex digits, kept in DATA_DIR/appliance-id, so two fresh installs never "
        "collide upstream.",
    )
    data_dir: Path = Field(
        description="Directory holding journal.db, payloads/ and models/. "
        "Overridden by --data-dir or APPLIANCE_DATA_DIR."
    )
    health_interval: Duration = Field(
        default=60.0, gt=0, description="How often a `health` telemetry record is journalled."
    )
    shutdown_timeout: Duration = Field(
        default=10.0,
        gt=0,
        description="Upper bound on a graceful stop (SIGTERM/SIGINT) before the daemon gives up "
        "waiting for its components; the journal is flushed either way.",
    )
    restart_budget: int = Field(
        default=5,
        ge=0,
        description="Restarts a crashing component gets within restart_window before it is "
        "marked degraded and left stopped.",
    )
    restart_window: Duration = Field(
        default=600.0, gt=0, description="Sliding window over which restart_budget is counted."
    )


class StatusSection(Strict):
    listen: str = Field(
        default="127.0.0.1:8080",
        pattern=LISTEN_PATTERN,
        description="HOST:PORT the local status page and its API listen on; any address other "
        "than a loopback one needs `token_file`. Port 0 picks a free port.",
    )
    token_file: Path | None = Field(
        default=None,
        description="File holding the bearer token that `POST /api/sync` (and, on a non-loopback "
        "address, every page and API) requires.",
    )
    enabled: bool = Field(default=True, description="Serve the status page at all.")
    history_interval: Duration = Field(
        default=60.0,
        ge=0.1,
        le=3600,
        description="How often the page samples backlog and throughput for its 24-hour charts "
        "(kept in DATA_DIR/status-history.json; at most 1440 samples).",
    )

    @model_validator(mode="after")
    def _network_needs_a_token(self) -> StatusSection:
        host, _, port = self.listen.rpartition(":")
        problems: list[Problem] = []
        if int(port) > 65535:
            problems.append((("listen",), f"port must be 0-65535, not {int(port)}"))
        elif self.enabled and self.token_file is None and not is_loopback_host(host):
            problems.append(
                (
                    ("listen",),
                    f"the status page would listen on {self.listen}, which is not a loopback "
                    "address, without a token: set status.token_file to a file holding one, or "
                    "set status.listen to 127.0.0.1:PORT",
                )
            )
        raise_problems(problems)
        return self


class ApplianceConfig(Strict):
    """The whole configuration file."""

    appliance: ApplianceSection = Field(description="Identity, data directory and daemon policy.")
    storage: StorageSection = Field(
        default_factory=StorageSection, description="Disk budget and retention."
    )
    journal: JournalSection = Field(
        default_factory=JournalSection, description="The SQLite journal's commit policy."
    )
    sensors: list[Sensor] = Field(
        default_factory=list, description="Sensor sources; `type` picks the kind."
    )
    models: dict[Name, DetectorModel] = Field(
        default_factory=dict,
        description="Detectors by name; cameras refer to them. A camera naming `detector` "
        "when none is configured gets the built-in default.",
    )
    model_packages: ModelPackagesSection = Field(
        default_factory=ModelPackagesSection,
        description="Signed model packages (`package:NAME` models): trusted keys, this "
        "appliance's group, versions kept.",
    )
    cameras: list[Camera] = Field(
        default_factory=list, description="Camera sources and what to do with their frames."
    )
    sync: SyncSection = Field(
        default_factory=SyncSection, description="Shipping records and payloads upstream."
    )
    status: StatusSection = Field(
        default_factory=StatusSection, description="The local web status page and its API."
    )

    @model_validator(mode="after")
    def _names_refer_to_something(self) -> ApplianceConfig:
        sources: list[tuple[KeyPath, str]] = [
            (("sensors", i, "name"), sensor.name) for i, sensor in enumerate(self.sensors)
        ]
        sources += [(("cameras", i, "name"), camera.name) for i, camera in enumerate(self.cameras)]
        problems = repeated(sources, "sources")
        for index, camera in enumerate(self.cameras):
            if camera.model not in self.models and camera.model != "detector":
                problems.append(
                    (
                        ("cameras", index, "model"),
                        f"camera {camera.name!r} uses model {camera.model!r}, which is not "
                        f"under `models` ({listing(sorted(self.models), last='and') or 'none'})"
                        f"{did_you_mean(camera.model, self.models)}; leave `model` out for the "
                        "built-in detector",
                    )
                )
                continue
            labels = self.detector_for(camera).known_labels()
            problems += [
                (("cameras", index, *path), message)
                for path, message in camera.class_problems(labels)
            ]
        raise_problems(problems)
        return self

    def warnings(self) -> list[str]:
        """What works but likely does less than meant, one line each (`config check`)."""
        warnings: list[str] = []
        if not self.sync.destinations:
            warnings.append(
                "records are journalled but forwarded nowhere: `sync.destinations` is empty, so "
                "the backlog only grows until retention evicts it; add an http, s3 or directory "
                "destination (docs/configuration.md, Destinations)"
            )
        return warnings

    def detector_for(self, camera: Camera) -> DetectorModel:
        """The model config a camera runs (the built-in default for an unconfigured `detector`)."""
        return self.models.get(camera.model) or DetectorModel()
