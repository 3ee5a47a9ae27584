"""What every config model shares: the `Strict` base, the unit-parsing field types and the
located problems a model's checks raise (each at the key it is about, not at the model)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

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
from config.words import TIME_WINDOW_PATTERN

KeyPath = tuple[str | int, ...]
"""Where a value is in the file: `("sensors", 0, "window")` is `sensors[0].window`."""


def format_key(path: KeyPath) -> str:
    """`("sensors", 0, "window")` -> `sensors[0].window`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


Problem = tuple[KeyPath, str]
"""A problem found by a model's checks: the key path (relative to the model) and the message."""

PROBLEM_TYPE = "config_problem"
"""The error type the loader recognises as a located problem (its message is used as is)."""

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
    WithJsonSchema({"type": "string", "pattern": TIME_WINDOW_PATTERN, "examples": ["02:00-05:00"]}),
]

Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def raise_problems(problems: Sequence[Problem]) -> None:
    """Raise every problem at once, each at its own key path. Raised from a model validator,
    pydantic prefixes the model's own location, so the loader reports each at its own line
    (a plain ValueError would land on the line where the model starts)."""
    if not problems:
        return
    raise ValidationError.from_exception_data(
        "config",
        [
            InitErrorDetails(
                # The message goes in through the context: a brace in it is not a placeholder.
                type=PydanticCustomError(PROBLEM_TYPE, "{message}", {"message": message}),
                loc=path,
                input=None,
            )
            for path, message in problems
        ],
    )
