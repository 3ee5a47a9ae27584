"""Sources: what sensors yield (sample windows, frames, quality reports, health) and the source kinds."""

from __future__ import annotations

from config.models import (
    CsvSensor,
    ModbusSensor,
    MqttSensor,
    NmeaSensor,
    OpcUaSensor,
    SimulatedSensor,
)
from sensors.base import (
    Frame,
    QualityIssue,
    QualityReport,
    Reading,
    SampleWindow,
    Source,
    SourceError,
    SourceHealth,
    SourceState,
    mono_ns,
    utc_now,
)
from sensors.camera import CameraHealth, CameraSource
from sensors.csv_replay import CsvSource
from sensors.live import LiveSource
from sensors.modbus import ModbusSource
from sensors.mqtt import MqttSource
from sensors.nmea import NmeaSource, Position
from sensors.opcua import OpcUaSource
from sensors.simulated import SimulatedSource

SensorConfig = SimulatedSensor | CsvSensor | MqttSensor | ModbusSensor | OpcUaSensor | NmeaSensor


def open_source(cfg: SensorConfig, *, appliance_id: str | None = None) -> Source:
    """The source for one `sensors:` entry (not entered yet: the caller owns its lifetime).
    `appliance_id` names the MQTT client, so its QoS 1 session survives restarts."""
    if isinstance(cfg, SimulatedSensor):
        return SimulatedSource(cfg)
    if isinstance(cfg, CsvSensor):
        return CsvSource(cfg)
    if isinstance(cfg, MqttSensor):
        return MqttSource(cfg, appliance_id=appliance_id)
    if isinstance(cfg, ModbusSensor):
        return ModbusSource(cfg)
    if isinstance(cfg, OpcUaSensor):
        return OpcUaSource(cfg)
    return NmeaSource(cfg, xdr_transducers=cfg.xdr)


__all__ = [
    "CameraHealth",
    "CameraSource",
    "CsvSource",
    "Frame",
    "LiveSource",
    "ModbusSource",
    "MqttSource",
    "NmeaSource",
    "OpcUaSource",
    "Position",
    "QualityIssue",
    "QualityReport",
    "Reading",
    "SampleWindow",
    "SensorConfig",
    "SimulatedSource",
    "Source",
    "SourceError",
    "SourceHealth",
    "SourceState",
    "mono_ns",
    "open_source",
    "utc_now",
]
