"""`appliance sync --now`: drain the backlog with a progress bar, through the running daemon when
there is one (never a second writer), or with an engine of its own when there is not."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any, TextIO

from appliance.runtime.control import CONTROL_SOCKET, ask_daemon, drain_engines
from config import ApplianceConfig, ConfigError
from config.units import format_duration, format_size
from sync import Journal, PayloadStore
from sync.destination import DestinationError
from sync.engine import SyncEngine
from sync.journal_open import writer_lock_holder
from sync.targets import make_target


class ProgressBar:
    """One line per destination on a terminal (redrawn), or a line every few seconds into a log
    or pipe. It shows records and payloads against the estimate made before the drain (records
    with their bytes in the journal, payloads with their sizes), the bytes per second actually
    sent (compressed batches and payloads) and an ETA; the last line of a destination that was
    drained reads 100%."""

    WIDTH = 20

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._last = 0.0
        self._destination: str | None = None

    def show(self, p: dict[str, Any], *, final: bool = False, complete: bool = False) -> None:
        """`final`: the destination's last line; `complete`: its drain finished, so whatever
        the estimate said, everything there was is shipped."""
        now = time.monotonic()
        first = p.get("destination") != self._destination  # its estimate: always shown
        if not (final or first or self.tty) and now - self._last < 2.0:
            return
        self._last, self._destination = now, p.get("destination")
        line = progress_line(p, complete=complete)
        if self.tty:
            # Redrawn in place: padded so that a shorter line hides the end of a longer one.
            self.out.write("\r" + line.ljust(110) + ("\n" if final else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()


def progress_line(p: dict[str, Any], *, complete: bool = False) -> str:
    """`shore: [##########          ]  50% 331/663 records, 50/100 payloads (54.1 KiB of
    ~108.3 KiB), 120.5 KiB/s, ETA 2s` from a progress line of `drain_engines`."""
    records, payloads = p.get("records", 0), p.get("payloads", 0)
    payload_bytes = p.get("payload_bytes", 0)
    # Records that arrived during the drain ship too: a total never reads less than what is done.
    records_total = max(p.get("records_total", 0), records)
    payloads_total = max(p.get("payloads_total", 0), payloads)
    payload_bytes_total = max(p.get("payload_bytes_total", 0), payload_bytes)
    record_bytes_total = p.get("record_bytes_total", 0)
    if complete:
        records_total, payloads_total, payload_bytes_total = records, payloads, payload_bytes
        share = 1.0
    else:
        # Bytes of the estimate done: records weigh what they take in the journal.
        done = payload_bytes + (
            record_bytes_total * records / records_total if records_total else 0
        )
        total = record_bytes_total + payload_bytes_total
        share = min(1.0, done / total) if total else 0.0
    elapsed = p.get("elapsed_s", 0.0)
    if complete:
        eta = f"took {format_duration(elapsed)}"
    elif 0 < share < 1:
        eta = f"ETA {format_duration(elapsed * (1 - share) / share)}"
    else:
        eta = "ETA -"
    estimate = "" if complete else "~"
    bar = "#" * int(share * ProgressBar.WIDTH)
    return (
        f"{p.get('destination', '')}: [{bar:<{ProgressBar.WIDTH}}] {share:4.0%} "
        f"{records}/{records_total} records, {payloads}/{payloads_total} payloads "
        f"({format_size(payload_bytes)} of {estimate}{format_size(payload_bytes_total)}), "
        f"{format_size(p.get('rate_bytes_per_s', 0.0))}/s, {eta}"
    )


async def sync_now(
    cfg: ApplianceConfig,
    destination: str | None,
    time_limit: float | None,
    out: TextIO = sys.stderr,
) -> tuple[bool, str | None]:
    """Drain; returns (drained, reason it could not finish)."""
    names = [d.name for d in cfg.sync.destinations]
    if not names:
        raise ConfigError(
            "no destinations are configured under sync.destinations",
            key="sync.destinations",
            line=None,
        )
    if destination is not None and destination not in names:
        raise ConfigError(
            f"no destination named {destination!r}; configured: {', '.join(names)}",
            key="--destination",
            line=None,
        )
    data_dir = cfg.appliance.data_dir
    bar = ProgressBar(out)
    holder = writer_lock_holder(data_dir) if data_dir.exists() else None
    if holder is not None:
        if not (data_dir / CONTROL_SOCKET).exists():
            return (
                False,
                f"the journal is held by {holder}, which takes no sync requests (a replay?)",
            )
        lines = ask_daemon(data_dir, destination, time_limit)
        return await _follow(lines, bar)
    async with AsyncExitStack() as stack:
        store = await asyncio.to_thread(PayloadStore, data_dir / "payloads")
        journal = await Journal.open(
            data_dir, appliance_id=cfg.appliance.id, settings=cfg.journal, payloads=store
        )
        stack.push_async_callback(journal.close)
        engines = []
        for dest in cfg.sync.destinations:
            if destination in (None, dest.name):
                target = await stack.enter_async_context(
                    make_target(dest, cfg.appliance.id, data_dir, cfg.sync.chunk_size)
                )
                engines.append(SyncEngine(journal, store, target, dest, cfg.sync))
        return await _follow(drain_engines(engines, time_limit), bar)


async def _follow(
    lines: AsyncIterator[dict[str, Any]], bar: ProgressBar
) -> tuple[bool, str | None]:
    last: dict[str, Any] = {}
    try:
        async for line in lines:
            if line.get("done"):
                if last:
                    bar.show(last, final=True, complete=bool(line["drained"]))
                for warning in line.get("warnings") or []:
                    bar.out.write(f"warning: {warning}\n")
                return bool(line["drained"]), line.get("reason")
            if last and line.get("destination") != last.get("destination"):
                # Destinations drain one after another: the next starts only once the one
                # before has shipped everything.
                bar.show(last, final=True, complete=True)
            last = line
            bar.show(line)
    except DestinationError as exc:
        return False, str(exc)
    with contextlib.suppress(Exception):
        bar.show(last, final=True)
    return False, "the daemon stopped answering before the drain finished"
