"""The root model, ApplianceConfig, with its own sections; re-exports every section's models."""

from __future__ import annotations

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
    Name,
    Rate,
    Strict,
    TimeWindow,
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
        pattern=r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):\d{1,5}$",
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
    def _unique_source_names(self) -> ApplianceConfig:
        seen: set[str] = set()
        for source in [*self.sensors, *self.cameras]:
            if source.name in seen:
                raise ValueError(f"two sources are named {source.name!r}; names must be unique")
            seen.add(source.name)
        return self

    @model_validator(mode="after")
    def _cameras_name_models(self) -> ApplianceConfig:
        for camera in self.cameras:
            if camera.model not in self.models and camera.model != "detector":
                raise ValueError(
                    f"camera {camera.name!r} uses model {camera.model!r}, which is not one of "
                    f"{sorted(self.models) or 'the configured models (none)'}"
                )
        return self

    def detector_for(self, camera: Camera) -> DetectorModel:
        """The model config a camera runs (the built-in default for an unconfigured `detector`)."""
        return self.models.get(camera.model) or DetectorModel()
