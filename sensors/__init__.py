"""Sources: what sensors yield (sample windows, frames, quality reports, health) and the source kinds."""

from __future__ import annotations

from config.sensors import (
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
from sensors.simulated import SimulatedSource

SensorConfig = SimulatedSensor | CsvSensor | MqttSensor | ModbusSensor | OpcUaSensor | NmeaSensor


def open_source(cfg: SensorConfig, *, appliance_id: str | None = None) -> Source:
    """The source for one `sensors:` entry (not entered yet: the caller owns its lifetime).
    `appliance_id` names the MQTT client, so its QoS 1 session survives restarts."""
    if isinstance(cfg, SimulatedSensor):
        return SimulatedSource(cfg)
    if isinstance(cfg, CsvSensor):
        return CsvSource(cfg)
    # The live sources' libraries (asyncua alone takes a third of a second) load only when a
    # config uses them.
    if isinstance(cfg, MqttSensor):
        from sensors.mqtt import MqttSource

        return MqttSource(cfg, appliance_id=appliance_id)
    if isinstance(cfg, ModbusSensor):
        from sensors.modbus import ModbusSource

        return ModbusSource(cfg)
    if isinstance(cfg, OpcUaSensor):
        from sensors.opcua import OpcUaSource

        return OpcUaSource(cfg)
    from sensors.nmea import NmeaSource

    return NmeaSource(cfg, xdr_transducers=cfg.xdr)


__all__ = [
    "CameraHealth",
    "CameraSource",
    "CsvSource",
    "Frame",
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
