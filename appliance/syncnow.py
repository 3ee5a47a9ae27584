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
    """One line on a terminal (redrawn), or a line every few seconds into a log or pipe."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._last = 0.0

    def show(self, p: dict[str, Any], *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and not self.tty and now - self._last < 2.0:
            return
        self._last = now
        done, total = p.get("bytes", 0), max(p.get("bytes_total", 0), 1)
        rate = p.get("rate_bytes_per_s", 0.0)
        share = min(1.0, done / total)
        bar = "#" * int(share * 24)
        eta = format_duration((total - done) / rate) if rate > 0 and done < total else "-"
        line = (
            f"{p.get('destination', '')}: [{bar:<24}] {p.get('records', 0)}/{p.get('records_total', 0)} "
            f"records, {format_size(done)} of ~{format_size(total)}, {format_size(rate)}/s, ETA {eta}"
        )
        if self.tty:
            self.out.write("\r" + line.ljust(100) + ("\n" if final else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()


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
                    bar.show(last, final=True)
                for warning in line.get("warnings") or []:
                    bar.out.write(f"warning: {warning}\n")
                return bool(line["drained"]), line.get("reason")
            last = line
            bar.show(line)
    except DestinationError as exc:
        return False, str(exc)
    with contextlib.suppress(Exception):
        bar.show(last, final=True)
    return False, "the daemon stopped answering before the drain finished"
