"""Parsing of the human units used in config files: durations, byte sizes and rates."""

from __future__ import annotations

import re
from datetime import datetime

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}
_NUMBER = r"(\d+(?:\.\d+)?)"
_DURATION_RE = re.compile(rf"^{_NUMBER}\s*(ms|s|m|h|d|w)?$")
_SIZE_RE = re.compile(rf"^{_NUMBER}\s*([KMGT]i?B|B)?$", re.IGNORECASE)

DURATION_HELP = "a duration such as 500ms, 30s, 5m, 2h, 7d"
SIZE_HELP = "a size such as 512KiB, 64MiB, 20GiB (or a plain number of bytes)"


def parse_duration(value: object) -> float:
    """Return seconds for `500ms`, `30s`, `5m`, `2h`, `7d`, `1w` (or a bare number of seconds)."""
    if isinstance(value, bool):
        raise ValueError(f"expected {DURATION_HELP}, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected {DURATION_HELP}, got {value!r}")
    match = _DURATION_RE.match(value.strip())
    if match is None:
        raise ValueError(f"invalid duration {value!r}: expected {DURATION_HELP}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def parse_size(value: object) -> int:
    """Return bytes for `512KiB`, `20GiB`, `10MB` (or a bare number of bytes)."""
    if isinstance(value, bool):
        raise ValueError(f"expected {SIZE_HELP}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected {SIZE_HELP}, got {value!r}")
    match = _SIZE_RE.match(value.strip())
    if match is None:
        raise ValueError(f"invalid size {value!r}: expected {SIZE_HELP}")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").upper()])


RATE_HELP = "a rate such as 256KiB/s or 2MiB/s"


def parse_rate(value: object) -> float:
    """Return bytes per second for `256KiB/s`, `2MB/s` (or a bare number of bytes/s)."""
    if isinstance(value, str) and value.strip().endswith("/s"):
        return float(parse_size(value.strip()[:-2]))
    try:
        return float(parse_size(value))
    except ValueError:
        raise ValueError(f"invalid rate {value!r}: expected {RATE_HELP}") from None


def parse_window(value: object) -> tuple[int, int]:
    """`02:00-05:00` (UTC) -> (start, end) in minutes of the day; may wrap past midnight."""
    if not isinstance(value, str) or not _WINDOW_RE.match(value.strip()):
        raise ValueError(f"invalid time window {value!r}: expected HH:MM-HH:MM such as 02:00-05:00")
    start, end = value.strip().split("-")
    minutes = [int(t[:2]) * 60 + int(t[3:]) for t in (start, end)]
    if any(m >= 24 * 60 for m in minutes) or minutes[0] == minutes[1]:
        raise ValueError(f"invalid time window {value!r}: hours 00-23, minutes 00-59, start != end")
    return minutes[0], minutes[1]


def in_windows(windows: list[str], now: datetime) -> bool:
    """Whether `now` (UTC) falls in any HH:MM-HH:MM window; no windows means always. Used by
    both sides of a window setting: the sync engine, baseline refits, model package pulls."""
    if not windows:
        return True
    minute = now.hour * 60 + now.minute
    for text in windows:
        start, end = parse_window(text)
        if (start <= minute < end) if start < end else (minute >= start or minute < end):
            return True
    return False


_WINDOW_RE = re.compile(r"^\d\d:[0-5]\d-\d\d:[0-5]\d$")


def format_size(num_bytes: float) -> str:
    """Render bytes for humans with binary units (1.5 GiB)."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """Render seconds for humans (3d 4h, 12m 5s, 800ms)."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"
