"""Sources: what sensors yield (sample windows, frames, quality reports, health) and the source kinds."""

from __future__ import annotations

from config.models import CsvSensor, SimulatedSensor
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


def open_source(cfg: SimulatedSensor | CsvSensor) -> Source:
    """The source for one `sensors:` entry (not entered yet: the caller owns its lifetime)."""
    if isinstance(cfg, SimulatedSensor):
        return SimulatedSource(cfg)
    return CsvSource(cfg)


__all__ = [
    "CameraHealth",
    "CameraSource",
    "CsvSource",
    "Frame",
    "QualityIssue",
    "QualityReport",
    "Reading",
    "SampleWindow",
    "SimulatedSource",
    "Source",
    "SourceError",
    "SourceHealth",
    "SourceState",
    "mono_ns",
    "open_source",
    "utc_now",
]
