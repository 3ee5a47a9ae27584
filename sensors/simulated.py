"""The simulated source: vibration and temperature channels with injectable faults, as windows."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import numpy as np
import numpy.typing as npt

from config.sensors import Fault, SimulatedChannel, SimulatedSensor
from sensors.base import (
    QualityReport,
    Reading,
    SampleWindow,
    SourceHealth,
    SourceLifecycle,
    utc_now,
)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

# Outer-race ball-pass frequency of a typical rolling bearing, as a multiple of shaft speed.
BEARING_RATE = 3.57
# Impacts excite a structural resonance well above shaft speed; capped so it stays below Nyquist.
RING_HZ = 3000.0
# Applied in this order whatever the config order, so `stuck` freezes the faulty signal and
# `dropout` can punch holes into a stuck channel too.
_ADDITIVE = ("imbalance", "bearing", "drift")


class SimulatedSource(SourceLifecycle):
    """A simulated machine. Signal time starts at 0 for each `readings()` call.

    Every window holds n = max(1, round(window * sample_rate)) samples per channel and spans
    n / sample_rate seconds of signal time (equal to `window` whenever window * sample_rate is a
    whole number; `duration_s` reports the span actually covered). With `duration` set the source
    yields ceil(duration / span) windows and the last one is full, so it may run up to one window
    past `duration`: whole windows keep features comparable from one window to the next.
    """

    def __init__(self, cfg: SimulatedSensor) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.finite = cfg.duration is not None
        self.health = SourceHealth()
        self._n = max(1, round(cfg.window * cfg.sample_rate))
        self._span = self._n / cfg.sample_rate
        self._windows: int | None = None
        if cfg.duration is not None:
            # Rounded first so that 1.1 / 0.1 == 11.000000000000002 still means 11 windows.
            self._windows = max(1, math.ceil(round(cfg.duration / self._span, 9)))
        self._rng = np.random.default_rng(cfg.seed)
        self._stuck_at: dict[int, float] = {}

    async def readings(self) -> AsyncIterator[Reading]:
        self._rng = np.random.default_rng(self.cfg.seed)
        self._stuck_at = {}
        self.health.state = "running"
        wall_start = utc_now()
        mono_start = time.monotonic()
        k = 0
        while self._windows is None or k < self._windows:
            values = self.window_values(k)
            if self.cfg.pace == "realtime":
                # An absolute schedule: a late wake-up shortens the next sleep instead of drifting.
                delay = mono_start + (k + 1) * self._span - time.monotonic()
                await asyncio.sleep(max(0.0, delay))
            elif k:
                await asyncio.sleep(0)
            now_ns = time.monotonic_ns()
            # Health first: a consumer may stop at this window and never resume the generator.
            self.health.windows += 1
            self.health.last_reading_mono_ns = now_ns
            missing = int(np.count_nonzero(np.isnan(values)))
            self.health.bad_values += missing
            yield SampleWindow(
                source=self.name,
                channels=tuple(channel.name for channel in self.cfg.channels),
                values=values,
                ts=wall_start + timedelta(seconds=k * self._span),
                mono_ns=now_ns,
                duration_s=self._span,
                sample_rate=self.cfg.sample_rate,
                quality=("missing",) if missing else (),
            )
            if missing:
                yield QualityReport(
                    source=self.name,
                    ts=wall_start + timedelta(seconds=k * self._span),
                    mono_ns=time.monotonic_ns(),
                    counts={"missing": missing},
                )
            k += 1
        self.health.state = "finished"

    def window_values(self, k: int) -> FloatArray:
        """Samples of window k, shape (channels, n). Windows must be asked for in order."""
        first = k * self._n
        t = np.arange(first, first + self._n, dtype=np.float64) / self.cfg.sample_rate
        rows = [self._channel(channel, t) for channel in self.cfg.channels]
        return np.vstack(rows)

    def _channel(self, channel: SimulatedChannel, t: FloatArray) -> FloatArray:
        noise = self._rng.normal(0.0, channel.noise, t.shape[0])
        if channel.signal == "vibration":
            w = 2.0 * np.pi * channel.frequency * t
            x = channel.base + channel.amplitude * (np.sin(w) + 0.3 * np.sin(2.0 * w)) + noise
        else:
            x = channel.base + channel.amplitude * np.sin(2.0 * np.pi * t / 3600.0) + noise
        faults = [
            (index, fault)
            for index, fault in enumerate(self.cfg.faults)
            if fault.channel == channel.name
        ]
        ordered = sorted(faults, key=lambda item: _order(item[1]))
        for index, fault in ordered:
            active = _active(fault, t)
            if not active.any():
                continue
            if fault.kind == "imbalance":
                x[active] += fault.magnitude * np.sin(2.0 * np.pi * channel.frequency * t[active])
            elif fault.kind == "bearing":
                x[active] += self._impulses(fault, channel, t[active])
            elif fault.kind == "drift":
                x[active] += fault.magnitude * (t[active] - fault.start) / 60.0
            elif fault.kind == "stuck":
                if index not in self._stuck_at:
                    self._stuck_at[index] = float(x[int(np.argmax(active))])
                x[active] = self._stuck_at[index]
            else:
                share = min(fault.magnitude, 1.0)
                lost = active & (self._rng.random(t.shape[0]) < share)
                x[lost] = np.nan
        return x

    def _impulses(self, fault: Fault, channel: SimulatedChannel, t: FloatArray) -> FloatArray:
        period = 1.0 / (BEARING_RATE * channel.frequency)
        ring = min(RING_HZ, 0.25 * self.cfg.sample_rate)
        # Each impact dies out well before the next one, but lasts a few samples to be seen.
        decay = max(min(period / 6.0, 0.005), 2.0 / self.cfg.sample_rate)
        since = np.mod(t - fault.start, period)
        result: FloatArray = (
            fault.magnitude * np.exp(-since / decay) * np.cos(2.0 * np.pi * ring * since)
        )
        return result


def _order(fault: Fault) -> int:
    if fault.kind in _ADDITIVE:
        return 0
    return 1 if fault.kind == "stuck" else 2


def _active(fault: Fault, t: FloatArray) -> BoolArray:
    if fault.duration is None:
        return t >= fault.start
    return (t >= fault.start) & (t < fault.start + fault.duration)
