"""Configuration: pydantic models, the YAML loader and the shipped profiles. Imports nothing of ours."""

from config.errors import ConfigError, ConfigErrors
from config.loader import (
    PROFILES,
    config_schema,
    format_key,
    load_config,
    parse_config,
    profile_text,
)
from config.models import (
    ApplianceConfig,
    ApplianceSection,
    CsvSensor,
    DirectoryDestination,
    Fault,
    HttpDestination,
    JournalSection,
    Limit,
    S3Destination,
    Sensor,
    SimulatedChannel,
    SimulatedSensor,
    StorageSection,
    SyncSection,
)

__all__ = [
    "PROFILES",
    "ApplianceConfig",
    "ApplianceSection",
    "ConfigError",
    "ConfigErrors",
    "CsvSensor",
    "DirectoryDestination",
    "Fault",
    "HttpDestination",
    "JournalSection",
    "Limit",
    "S3Destination",
    "Sensor",
    "SimulatedChannel",
    "SimulatedSensor",
    "StorageSection",
    "SyncSection",
    "config_schema",
    "format_key",
    "load_config",
    "parse_config",
    "profile_text",
]
