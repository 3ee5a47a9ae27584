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
    Fault,
    JournalSection,
    Limit,
    Sensor,
    SimulatedChannel,
    SimulatedSensor,
    StorageSection,
)

__all__ = [
    "PROFILES",
    "ApplianceConfig",
    "ApplianceSection",
    "ConfigError",
    "ConfigErrors",
    "CsvSensor",
    "Fault",
    "JournalSection",
    "Limit",
    "Sensor",
    "SimulatedChannel",
    "SimulatedSensor",
    "StorageSection",
    "config_schema",
    "format_key",
    "load_config",
    "parse_config",
    "profile_text",
]
