"""What every config model shares: the `Strict` base and the unit-parsing field types."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from config.names import NAME_PATTERN
from config.units import (
    DURATION_HELP,
    RATE_HELP,
    SIZE_HELP,
    parse_duration,
    parse_rate,
    parse_size,
    parse_window,
)

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema({"type": "string", "description": DURATION_HELP, "examples": ["30s", "5m"]}),
]
"""Seconds, written in YAML as `500ms`, `30s`, `5m`, `7d`."""

ByteSize = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema({"type": "string", "description": SIZE_HELP, "examples": ["64MiB", "20GiB"]}),
]
"""Bytes, written in YAML as `512KiB`, `20GiB`."""

Rate = Annotated[
    float,
    BeforeValidator(parse_rate),
    WithJsonSchema({"type": "string", "description": RATE_HELP, "examples": ["256KiB/s"]}),
]
"""Bytes per second, written in YAML as `256KiB/s`."""

TimeWindow = Annotated[
    str,
    AfterValidator(lambda v: (parse_window(v), v)[1]),
    WithJsonSchema(
        {"type": "string", "pattern": r"^\d\d:\d\d-\d\d:\d\d$", "examples": ["02:00-05:00"]}
    ),
]

Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
