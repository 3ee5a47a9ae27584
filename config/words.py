"""The product's words for what is wrong with a value: lists of allowed values, the patterns
config values follow told in plain terms, and "did you mean" for a misspelt key or name."""

from __future__ import annotations

from collections.abc import Iterable
from difflib import get_close_matches

from config.names import NAME_PATTERN, NAME_RULE, VERSION_PATTERN

HTTP_URL_PATTERN = r"^https?://[^\s/]+"
LISTEN_PATTERN = r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):\d{1,5}$"
OPC_URL_PATTERN = r"^opc\.tcp://"
TIME_WINDOW_PATTERN = r"^\d\d:\d\d-\d\d:\d\d$"
BAND_FEATURE_PATTERN = r"^band_[0-9p]+_[0-9p]+$"

PATTERN_WORDS: dict[str, str] = {
    NAME_PATTERN: f"a name: {NAME_RULE}",
    VERSION_PATTERN: "a version: a letter or digit, then up to 63 letters, digits, '.', '_', "
    "'-' or '+' (e.g. 1.4.0 or 2024-05-01)",
    HTTP_URL_PATTERN: "a URL that starts with http:// or https:// and a host name "
    "(e.g. https://shore.example.com)",
    LISTEN_PATTERN: "HOST:PORT, e.g. 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080",
    OPC_URL_PATTERN: "an endpoint that starts with opc.tcp:// (e.g. opc.tcp://10.0.0.7:4840/server)",
    TIME_WINDOW_PATTERN: "a UTC time window HH:MM-HH:MM (e.g. 02:00-05:00)",
    BAND_FEATURE_PATTERN: "a band energy band_<low>_<high> in Hz, with p for a decimal point "
    "(e.g. band_0_625 or band_312p5_625)",
}
"""Every `pattern` a config model declares, as the error message says it (a test checks that
each pattern in the JSON schemas is here)."""


def listing(values: Iterable[object], *, last: str = "or") -> str:
    """`a, b or c`: values as the product writes them in a sentence."""
    items = [str(value) for value in values]
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} {last} {items[-1]}"


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """` (did you mean 'x'?)` when a choice is close to `word`, else an empty string."""
    options = list(choices)
    if not isinstance(word, str) or not word or word in options:
        return ""
    close = get_close_matches(word, options, n=1, cutoff=0.6)
    if not close:
        # A case slip (`Peak`) is a slip whatever the length.
        lowered = {choice.lower(): choice for choice in options}
        if word.lower() in lowered:
            close = [lowered[word.lower()]]
    return f" (did you mean {close[0]!r}?)" if close else ""


def pattern_words(pattern: str) -> str:
    """The pattern in plain terms (the pattern itself for one nobody described)."""
    return PATTERN_WORDS.get(pattern, f"text matching {pattern}")


__all__ = [
    "BAND_FEATURE_PATTERN",
    "HTTP_URL_PATTERN",
    "LISTEN_PATTERN",
    "OPC_URL_PATTERN",
    "PATTERN_WORDS",
    "TIME_WINDOW_PATTERN",
    "did_you_mean",
    "listing",
    "pattern_words",
]
