"""Owns the one pattern every identifier in the product follows: names of sources, cameras,
destinations, appliances, groups, channels and model packages, and versions of model packages.
Config validation, the sensors' channel names, the sync client and the receiver all check
against these, so a name one of them accepts is a name every other one accepts."""

from __future__ import annotations

import re

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""A name: a letter or digit, then up to 63 letters, digits, `.`, `_` or `-` (safe in a file
name, a URL path segment, an S3 key and a Prometheus label)."""
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
"""A model package's version: a name that may also carry `+` (semantic-version build metadata)."""

NAME_RE = re.compile(NAME_PATTERN)
VERSION_RE = re.compile(VERSION_PATTERN)

NAME_RULE = "a letter or digit, then up to 63 letters, digits, '.', '_' or '-'"


def is_name(text: object) -> bool:
    """Whether `text` is a string that follows NAME_PATTERN."""
    return isinstance(text, str) and NAME_RE.fullmatch(text) is not None


def is_version(text: object) -> bool:
    """Whether `text` is a string that follows VERSION_PATTERN."""
    return isinstance(text, str) and VERSION_RE.fullmatch(text) is not None


__all__ = [
    "NAME_PATTERN",
    "NAME_RE",
    "NAME_RULE",
    "VERSION_PATTERN",
    "VERSION_RE",
    "is_name",
    "is_version",
]
