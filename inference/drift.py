"""Owns drift detection: a model's reference distribution per monitored quantity (bins cut at the
reference sample's quantiles), sliding windows of recent values, the population stability index
(PSI, plus a binned Kolmogorov-Smirnov statistic for the record) of each window against its
reference, drift started/ended events with hysteresis, and the reference files on disk.

Time is data time (the timestamps the caller gives: footage time for video files, window times for
sensors), so a replay in minutes behaves like the hours it stands for. numpy and the standard
library only: the pipelines call it per frame and per window.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from array import array
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from config.analysis import DriftSettings

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
Observed = float | np.number[Any] | Iterable[float | np.number[Any]]
"""One value or a batch of them (a list, a numpy array): what `observe` takes."""
EventKind = Literal["started", "ended"]
QuantityState = Literal["reference", "ok", "drift"]

REFERENCE_FORMAT = 1
"""Version of the reference file (and of `Reference.as_dict`, the form a model package carries)."""
PSI_EPSILON = 1e-4
"""Stands in for an empty bin's share: PSI takes log(window / reference) of every bin."""
MAX_REFERENCE_VALUES = 50_000
"""A longer reference period keeps a uniform random sample of this many values per quantity."""
MAX_WINDOW_VALUES = 200_000
"""Most values a sliding window holds whatever its span (oldest dropped first, counted)."""

_REFERENCE_KEYS = frozenset({"quantity", "edges", "proportions", "n"})


class DriftError(ValueError):
    """A reference that cannot be used; the message names the field and what is wrong with it."""


# ------------------------------------------------------------------------------ references


@dataclass(frozen=True, slots=True)
class Reference:
    """One quantity's reference distribution: `edges` cut the line into len(edges) + 1 bins,
    open at both ends (bin i holds edges[i-1] <= x < edges[i]), with the reference sample's
    share in each bin and the sample's size."""

    quantity: str
    edges: tuple[float, ...]
    proportions: tuple[float, ...]
    n: int

    @classmethod
    def fit(cls, quantity: str, values: Sequence[float] | FloatArray, bins: int = 10) -> Reference:
        """Bins at the quantiles 1/bins .. (bins-1)/bins of `values` (finite values only).

        Tied quantiles (a count that is mostly 0, a constant) merge into one edge; when the
        largest value sits on the last edge, an edge just above it is added so that a shift
        upwards leaves the reference's top bin instead of hiding in it."""
        sample = np.asarray(values, dtype=np.float64)
        sample = sample[np.isfinite(sample)]
        if sample.size == 0:
            raise DriftError(f"reference of {quantity!r}: no finite value to fit")
        if bins < 2:
            raise DriftError(f"reference of {quantity!r}: bins must be >= 2, not {bins}")
        cuts = np.unique(np.quantile(sample, np.arange(1, bins) / bins))
        top = float(sample.max())
        above = float(np.nextafter(top, math.inf))
        if top <= cuts[-1] and math.isfinite(above):
            cuts = np.append(cuts, above)
        edges = tuple(float(e) for e in cuts)
        counts = np.bincount(np.searchsorted(cuts, sample, side="right"), minlength=len(edges) + 1)
        proportions = tuple(float(c) for c in counts / sample.size)
        return cls(quantity, edges, proportions, int(sample.size))

    def bin_counts(self, values: FloatArray) -> npt.NDArray[np.int64]:
        """How many of `values` fall in each bin."""
        index = np.searchsorted(np.asarray(self.edges), values, side="right")
        return np.bincount(index, minlength=len(self.edges) + 1).astype(np.int64)

    def compare(self, values: FloatArray) -> tuple[float, float]:
        """(PSI, binned KS) of `values` against this reference.

        PSI = sum over bins of (w - r) * ln(w / r), an empty bin's share taken as PSI_EPSILON;
        KS is the largest gap between the two cumulative shares at the bin edges (a lower bound
        of the two-sample KS statistic, computable from the bins alone)."""
        counts = self.bin_counts(values)
        window = counts / max(int(counts.sum()), 1)
        reference = np.asarray(self.proportions)
        w = np.maximum(window, PSI_EPSILON)
        r = np.maximum(reference, PSI_EPSILON)
        psi = float(np.sum((w - r) * np.log(w / r)))
        ks = float(np.max(np.abs(np.cumsum(window) - np.cumsum(reference))))
        return psi, ks

    def as_dict(self) -> dict[str, Any]:
        return {
            "quantity": self.quantity,
            "edges": list(self.edges),
            "proportions": list(self.proportions),
            "n": self.n,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reference:
        """The inverse of `as_dict`, checked: DriftError naming the field that is wrong."""
        if not isinstance(data, Mapping):
            raise DriftError(f"a reference must be an object, not {type(data).__name__}")
        quantity = data.get("quantity")
        if not isinstance(quantity, str) or not quantity:
            raise DriftError(f"reference: `quantity` must be a non-empty string, not {quantity!r}")
        where = f"reference of {quantity!r}"
        unknown = sorted(set(data) - _REFERENCE_KEYS)
        if unknown:
            raise DriftError(f"{where}: unknown keys {unknown}")
        edges = _numbers(data.get("edges"), f"{where}: `edges`")
        if not edges:
            raise DriftError(f"{where}: `edges` needs at least one edge")
        if any(b <= a for a, b in itertools.pairwise(edges)):
            raise DriftError(f"{where}: `edges` must be strictly increasing")
        proportions = _numbers(data.get("proportions"), f"{where}: `proportions`")
        if len(proportions) != len(edges) + 1:
            raise DriftError(
                f"{where}: `proportions` needs len(edges) + 1 = {len(edges) + 1} shares, "
                f"not {len(proportions)}"
            )
        if any(p < 0 for p in proportions) or not math.isclose(sum(proportions), 1.0, abs_tol=1e-6):
            raise DriftError(f"{where}: `proportions` must be >= 0 and sum to 1")
        n = data.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise DriftError(f"{where}: `n` must be a positive integer, not {n!r}")
        return cls(quantity, tuple(edges), tuple(proportions), n)


def _numbers(value: Any, what: str) -> list[float]:
    if not isinstance(value, list):
        raise DriftError(f"{what} must be a list of numbers, not {type(value).__name__}")
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item):
            raise DriftError(f"{what} must hold finite numbers only, not {item!r}")
        out.append(float(item))
    return out


# ----------------------------------------------------------------------------- the files


def reference_path(data_dir: Path, model: str, source: str) -> Path:
    """DATA_DIR/models/drift/<MODEL@VERSION>/<SOURCE>.json: a new model version starts afresh."""
    return data_dir / "models" / "drift" / model / f"{source}.json"


def save_references(
    path: Path, references: Iterable[Reference], *, model: str, source: str
) -> None:
    """Write the file atomically: a power cut leaves the old file or the new one."""
    doc = {
        "format": REFERENCE_FORMAT,
        "model": model,
        "source": source,
        "saved": datetime.now(UTC).isoformat(),
        "references": [r.as_dict() for r in sorted(references, key=lambda r: r.quantity)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", encoding="utf-8") as handle:
        json.dump(doc, handle)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load_references(path: Path) -> list[Reference]:
    """The references in `path`: [] when there is no file; DriftError naming the file when it
    cannot be read or any reference in it is wrong."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise DriftError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != REFERENCE_FORMAT:
        raise DriftError(f"{path}: not a drift reference file of format {REFERENCE_FORMAT}")
    items = doc.get("references")
    if not isinstance(items, list):
        raise DriftError(f"{path}: `references` must be a list")
    try:
        return [Reference.from_dict(item) for item in items]
    except DriftError as exc:
        raise DriftError(f"{path}: {exc}") from None


# ------------------------------------------------------------------------------- monitoring


@dataclass(frozen=True, slots=True)
class DriftEvent:
    """A quantity started or stopped drifting at data time `ts`."""

    kind: EventKind
    quantity: str
    psi: float
    ks: float
    window_n: int
    reference_n: int
    ts: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "quantity": self.quantity,
            "psi": round(self.psi, 4),
            "ks": round(self.ks, 4),
            "window_n": self.window_n,
            "reference_n": self.reference_n,
        }


@dataclass
class _Quantity:
    name: str
    reference: Reference | None = None
    collected: array[float] = field(default_factory=lambda: array("d"))
    collected_seen: int = 0  # values offered to the reference sample (it keeps at most MAX_...)
    collect_start: float | None = None
    times: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_WINDOW_VALUES))
    values: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_WINDOW_VALUES))
    state: QuantityState = "reference"
    over: int = 0  # consecutive checks at or above psi_start
    since: float | None = None
    psi: float | None = None
    ks: float | None = None
    window_n: int = 0
    non_finite: int = 0
    overflow: int = 0


class DriftMonitor:
    """The drift state of one model on one source, over named quantities.

    `observe(name, values, ts)` adds values (non-finite ones are counted and skipped); when
    `due()`, `check()` fits the references whose period is over and compares every window that
    holds `min_count` values with its reference, returning the events. A quantity drifts after
    `consecutive` checks with PSI >= psi_start and stops at the first check with PSI < psi_end.
    References given to the constructor (saved ones, or a model package's) are used as they are;
    a quantity without one collects its own for `reference` data time from its first value, then
    `unsaved` says the caller should save `references()`.
    """

    def __init__(self, settings: DriftSettings, references: Iterable[Reference] = ()) -> None:
        self.settings = settings
        self._quantities: dict[str, _Quantity] = {}
        for reference in references:
            self._quantities[reference.quantity] = _Quantity(
                reference.quantity, reference=reference, state="ok"
            )
        self._now: float | None = None
        self._next_check: float | None = None
        self._rng = np.random.default_rng(0)
        self.checks = 0
        self.clock_steps = 0
        self.unsaved = False

    # ---------------------------------------------------------------------------- input

    def observe(self, name: str, values: Observed, ts: datetime) -> None:
        quantity = self._quantities.get(name)
        if quantity is None:
            quantity = self._quantities[name] = _Quantity(name)
        t = self._advance(ts)
        batch = [values] if isinstance(values, int | float | np.number) else values
        for value in batch:
            v = float(value)
            if not math.isfinite(v):
                quantity.non_finite += 1
                continue
            if len(quantity.values) == MAX_WINDOW_VALUES:
                quantity.overflow += 1
            quantity.times.append(t)
            quantity.values.append(v)
            if quantity.reference is None:
                self._collect(quantity, v, t)

    def _advance(self, ts: datetime) -> float:
        if ts.tzinfo is None or ts.utcoffset() is None:
            raise ValueError(f"drift needs an aware timestamp, not the naive {ts.isoformat()}")
        t = ts.timestamp()
        if self._now is None:
            self._now = t
            self._next_check = t + self.settings.check_interval
        elif t > self._now:
            self._now = t
        elif t < self._now - self.settings.window:
            # The clock stepped back past a whole window (a ship syncing its clock): what the
            # windows hold can no longer be ordered against new values, so they start over.
            self.clock_steps += 1
            self._now = t
            self._next_check = t + self.settings.check_interval
            for quantity in self._quantities.values():
                quantity.times.clear()
                quantity.values.clear()
                if quantity.reference is None and quantity.collect_start is not None:
                    quantity.collect_start = t
        return t

    def _collect(self, quantity: _Quantity, value: float, t: float) -> None:
        if quantity.collect_start is None:
            quantity.collect_start = t
        quantity.collected_seen += 1
        if len(quantity.collected) < MAX_REFERENCE_VALUES:
            quantity.collected.append(value)
            return
        # Reservoir sampling: every value of the period has the same chance to be kept.
        slot = int(self._rng.integers(0, quantity.collected_seen))
        if slot < MAX_REFERENCE_VALUES:
            quantity.collected[slot] = value

    # ---------------------------------------------------------------------------- checks

    def due(self) -> bool:
        return (
            self._next_check is not None
            and self._now is not None
            and (self._now >= self._next_check)
        )

    def check(self) -> list[DriftEvent]:
        """Fit finished references, compare every full enough window; the events it caused."""
        if self._now is None:
            return []
        now = self._now
        self._next_check = now + self.settings.check_interval
        self.checks += 1
        events: list[DriftEvent] = []
        for quantity in self._quantities.values():
            self._prune(quantity, now)
            quantity.window_n = len(quantity.values)
            if quantity.reference is None:
                self._maybe_fit(quantity, now)
                continue
            if quantity.window_n < self.settings.min_count:
                quantity.psi = quantity.ks = None
                continue
            psi, ks = quantity.reference.compare(np.fromiter(quantity.values, np.float64))
            quantity.psi, quantity.ks = psi, ks
            event = self._step(quantity, psi, ks, now)
            if event is not None:
                events.append(event)
        return events

    def _prune(self, quantity: _Quantity, now: float) -> None:
        oldest = now - self.settings.window
        while quantity.times and quantity.times[0] < oldest:
            quantity.times.popleft()
            quantity.values.popleft()

    def _maybe_fit(self, quantity: _Quantity, now: float) -> None:
        start = quantity.collect_start
        if start is None or now - start < self.settings.reference:
            return
        if len(quantity.collected) < self.settings.min_count:
            return  # too few values yet (a rare output): the period goes on until there are
        quantity.reference = Reference.fit(
            quantity.name, np.frombuffer(quantity.collected, np.float64), self.settings.bins
        )
        quantity.collected = array("d")
        quantity.state = "ok"
        self.unsaved = True

    def _step(self, quantity: _Quantity, psi: float, ks: float, now: float) -> DriftEvent | None:
        assert quantity.reference is not None
        kind: EventKind | None = None
        if quantity.state == "drift":
            if psi < self.settings.psi_end:
                quantity.state, quantity.since, kind = "ok", None, "ended"
        else:
            quantity.over = quantity.over + 1 if psi >= self.settings.psi_start else 0
            if quantity.over >= self.settings.consecutive:
                quantity.state, quantity.since, kind = "drift", now, "started"
        if kind is None:
            return None
        quantity.over = 0
        return DriftEvent(
            kind=kind,
            quantity=quantity.name,
            psi=psi,
            ks=ks,
            window_n=quantity.window_n,
            reference_n=quantity.reference.n,
            ts=datetime.fromtimestamp(now, UTC),
        )

    # ---------------------------------------------------------------------------- state

    @property
    def now(self) -> datetime | None:
        """The latest data time observed (None before the first value)."""
        return None if self._now is None else datetime.fromtimestamp(self._now, UTC)

    @property
    def active(self) -> bool:
        """Whether any quantity is drifting now."""
        return any(q.state == "drift" for q in self._quantities.values())

    def references(self) -> list[Reference]:
        """The references in use (given or fitted), for saving."""
        return [q.reference for q in self._quantities.values() if q.reference is not None]

    def status(self) -> dict[str, Any]:
        """For health and the status page: the overall state (`drift`, `ok`, or `reference`
        while no quantity has a reference yet), since when it drifts, and each quantity."""
        quantities = self._quantities.values()
        drifting = [q.since for q in quantities if q.state == "drift" and q.since is not None]
        if drifting:
            state = "drift"
        elif any(q.reference is not None for q in quantities):
            state = "ok"
        else:
            state = "reference"
        return {
            "state": state,
            "since": None
            if not drifting
            else datetime.fromtimestamp(min(drifting), UTC).isoformat(),
            "checks": self.checks,
            "clock_steps": self.clock_steps,
            "quantities": {
                q.name: {
                    "state": q.state,
                    "psi": None if q.psi is None else round(q.psi, 4),
                    "ks": None if q.ks is None else round(q.ks, 4),
                    "n": q.window_n,
                    "reference_n": None if q.reference is None else q.reference.n,
                    "collected": q.collected_seen if q.reference is None else None,
                    "non_finite": q.non_finite,
                    "dropped": q.overflow,
                }
                for q in sorted(quantities, key=lambda q: q.name)
            },
        }
