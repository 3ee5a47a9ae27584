"""The sync engine against the in-memory fake and the real directory destination."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

import sync.directory as directory_module
from appliance.status.health import HealthMonitor, live_destination
from appliance.status.page import destination_alarms as render_alarms
from config.shipping import DirectoryDestination, StorageSection, SyncSection
from config.units import in_windows
from sync import Journal, NewRecord, PayloadRef, PayloadStore, Priority, StorageGuard
from sync.destination import Batch, DestinationError, MemoryDestination, RateLimiter
from sync.directory import DirectoryTarget
from sync.engine import SyncEngine, inflight_key
from tests.helpers import wait_until


def dest_cfg(tmp: Path, **extra: object) -> DirectoryDestination:
    return DirectoryDestination.model_validate(
        {"name": "usb", "type": "directory", "path": str(tmp), **extra}
    )


async def fill(journal: Journal, store: PayloadStore, per_priority: int = 30) -> dict[str, bytes]:
    """Records of every priority, interleaved; every fifth sample and alert carries a payload."""
    blobs: dict[str, bytes] = {}
    for i in range(per_priority * 4):
        priority = Priority(1 + i % 4)
        refs: tuple[PayloadRef, ...] = ()
        if priority in (Priority.ALERT, Priority.SAMPLE) and i % 5 == 0:
            data = f"payload {i} ".encode() * (200 + i)
            ref = await store.put(data)
            blobs[ref.sha256] = data
            refs = (ref,)
        await journal.append(NewRecord("src", "reading", priority, {"i": i}, payloads=refs))
    return blobs


def settings(**extra: object) -> SyncSection:
    return SyncSection.model_validate({"batch_records": 7, "chunk_size": "64KiB", **extra})


async def test_drain_ships_everything_once_in_priority_order(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    blobs = await fill(journal, payload_store)
    memory = MemoryDestination(name="usb")
    engine = SyncEngine(journal, payload_store, memory, dest_cfg(tmp_path), settings())
    assert await engine.drain() is True
    assert sorted(memory.records) == list(range(1, 121))
    assert memory.payloads == blobs
    assert all(b.records <= 7 for b in memory.batches.values())
    # Order: every alert batch, then alert payloads, then events, ... telemetry last.
    kinds = [
        (kind, memory.batches[i].priority if kind == "batch" else None)
        for kind, i in memory.arrivals
    ]
    batch_priorities = [p for kind, p in kinds if kind == "batch" and p is not None]
    assert batch_priorities == sorted(batch_priorities)
    first_event = next(n for n, (k, p) in enumerate(kinds) if p == Priority.EVENT)
    alert_payloads = [n for n, (k, _) in enumerate(kinds) if k == "payload"][
        : len([s for s in blobs if s])
    ]
    assert any(n < first_event for n in alert_payloads)
    cursors = await journal.read(lambda r: {p: r.cursor("usb", p) for p in Priority})
    assert cursors[Priority.TELEMETRY] == 120 and cursors[Priority.ALERT] == 117
    # A second drain sends nothing new.
    before = len(memory.arrivals)
    assert await engine.drain() is True
    assert len(memory.arrivals) == before


async def test_failures_never_move_the_cursor_and_resends_keep_their_identity(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    await fill(journal, payload_store, per_priority=10)
    memory = MemoryDestination(name="usb")
    engine = SyncEngine(journal, payload_store, memory, dest_cfg(tmp_path), settings())
    sent_ids: list[str] = []
    original = memory.send_batch

    async def flaky(batch: Batch, limiter: RateLimiter) -> None:
        sent_ids.append(batch.batch_id)
        if len(sent_ids) % 3 == 0:
            raise DestinationError("usb", "cut", retryable=True)
        await original(batch, limiter)

    memory.send_batch = flaky  # type: ignore[method-assign]
    for _ in range(20):
        try:
            await engine.drain()
            break
        except DestinationError:
            continue
    assert sorted(memory.records) == list(range(1, 41))
    # Every failed batch was sent again with the same identity.
    failed = sent_ids[2::3]
    assert all(sent_ids.count(batch_id) >= 2 for batch_id in failed)


async def test_daily_payload_budget_holds_payloads_not_records(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    blobs = await fill(journal, payload_store)
    memory = MemoryDestination(name="usb")
    smallest = min(len(b) for b in blobs.values())
    engine = SyncEngine(
        journal,
        payload_store,
        memory,
        dest_cfg(tmp_path, daily_payload_budget=smallest + 10),
        settings(),
    )
    assert await engine.drain() is False
    assert sorted(memory.records) == list(range(1, 121))
    assert len(memory.payloads) == 1
    waiting = await journal.read(lambda r: r.payload_outbox("usb", Priority.SAMPLE, 100))
    assert waiting


async def test_evicted_payloads_are_skipped_and_counted(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    blobs = await fill(journal, payload_store, per_priority=10)
    gone = next(iter(blobs))
    payload_store.delete(gone)
    memory = MemoryDestination(name="usb")
    engine = SyncEngine(journal, payload_store, memory, dest_cfg(tmp_path), settings())
    assert await engine.drain() is True
    assert gone not in memory.payloads and engine.state.payloads_skipped == 1


def test_time_windows() -> None:
    def at(hour: int, minute: int) -> datetime:
        return datetime(2026, 1, 1, hour, minute, tzinfo=UTC)

    assert in_windows([], at(12, 0))
    assert in_windows(["02:00-05:00"], at(2, 0)) and not in_windows(["02:00-05:00"], at(5, 0))
    assert in_windows(["22:00-02:00"], at(23, 30)) and in_windows(["22:00-02:00"], at(1, 59))
    assert not in_windows(["22:00-02:00"], at(12, 0))


async def test_bandwidth_cap_is_respected(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    for i in range(40):
        await journal.append(
            NewRecord("s", "reading", Priority.TELEMETRY, {"pad": "x" * 2000, "i": i})
        )
    memory = MemoryDestination(name="usb")
    engine = SyncEngine(
        journal,
        payload_store,
        memory,
        dest_cfg(tmp_path, bandwidth="8KiB/s"),
        settings(batch_records=5),
    )
    started = asyncio.get_running_loop().time()
    await engine.drain()
    elapsed = asyncio.get_running_loop().time() - started
    wire = sum(len(b.body) for b in memory.batches.values())
    # The first second's burst is free; everything after it is paced at the cap.
    assert elapsed >= (wire - 8192) / 8192 * 0.9


async def test_run_loop_drains_when_the_link_returns(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    await fill(journal, payload_store, per_priority=5)
    memory = MemoryDestination(name="usb", up=False)
    engine = SyncEngine(
        journal,
        payload_store,
        memory,
        dest_cfg(tmp_path),
        settings(retry_max="1s", probe_interval="200ms"),
    )
    task = asyncio.create_task(engine.run())
    try:
        await wait_until(lambda: engine.state.consecutive_failures >= 1, "a failed attempt")
        assert not memory.records
        memory.up = True
        # The drain ends after the last record's payloads: wait for it, not for the records.
        await wait_until(lambda: engine.state.last_success is not None, "the drain to end")
        assert sorted(memory.records) == list(range(1, 21))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# ------------------------------------------------------------------- directory destination


def check_directory(root: Path, blobs: dict[str, bytes], seqs: int, journal_id: str) -> None:
    """Everything complete is consistent; nothing partial is visible as complete. The layout is
    records/APPLIANCE/JOURNAL/PRIORITY/... and payloads/APPLIANCE/JOURNAL/AB/SHA256."""
    seen: set[int] = set()
    for manifest_path in root.glob(f"records/test-appliance/{journal_id}/*/*.manifest.json"):
        manifest = json.loads(manifest_path.read_text())
        data = (manifest_path.parent / manifest["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == manifest["sha256"]
        for line in gzip.decompress(data).splitlines():
            seen.add(json.loads(line)["seq"])
    assert seen == set(range(1, seqs + 1))
    for sha, data in blobs.items():
        path = root / "payloads" / "test-appliance" / journal_id / sha[:2] / sha
        assert path.read_bytes() == data


async def test_directory_destination_end_to_end(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    blobs = await fill(journal, payload_store)
    target_dir = tmp_path / "usb"
    target_dir.mkdir()
    cfg = dest_cfg(target_dir)
    target = DirectoryTarget(cfg, journal.appliance_id, chunk_size=4096)
    engine = SyncEngine(journal, payload_store, target, cfg, settings())
    assert await engine.drain() is True
    check_directory(target_dir, blobs, 120, journal.journal_id)


async def test_directory_vanishing_mid_write_leaves_nothing_partial_complete(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    blobs = await fill(journal, payload_store)
    target_dir = tmp_path / "usb"
    target_dir.mkdir()
    cfg = dest_cfg(target_dir)
    target = DirectoryTarget(cfg, journal.appliance_id, chunk_size=1024)
    engine = SyncEngine(journal, payload_store, target, cfg, settings())
    original = target._write_batch
    writes = 0

    def unplug_sometimes(batch: Batch) -> None:
        nonlocal writes
        writes += 1
        if writes == 4:
            shutil.rmtree(target_dir)  # the disk is pulled while the engine works
        original(batch)

    target._write_batch = unplug_sometimes  # type: ignore[method-assign]
    with pytest.raises(DestinationError) as caught:
        await engine.drain()
    assert caught.value.retryable
    assert not await target.reachable()
    target_dir.mkdir()  # plugged back in (an empty disk: everything goes again)

    def rewind(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE cursors SET acked_seq = 0 WHERE destination = 'usb'")
        conn.execute("DELETE FROM payload_outbox WHERE destination = 'usb'")

    await journal.execute_write(rewind)
    assert await engine.drain() is True
    check_directory(target_dir, blobs, 120, journal.journal_id)
    assert not list(target_dir.rglob("*.tmp"))


async def test_payload_copy_resumes_after_a_cut(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    data = bytes(range(256)) * 400  # 100 KiB
    ref = await payload_store.put(data)
    target_dir = tmp_path / "usb"
    target_dir.mkdir()
    target = DirectoryTarget(dest_cfg(target_dir), "test-appliance", chunk_size=10_000)
    limiter = RateLimiter(None)
    calls = 0
    real_append = directory_module._append_chunk

    def cut_after_three(partial: Path, offset: int, chunk: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise OSError(5, "link cut", str(partial))
        real_append(partial, offset, chunk)

    directory_module._append_chunk = cut_after_three
    try:
        with pytest.raises(DestinationError):
            await target.send_payload(
                ref.sha256, ref.size, "", payload_store.path_for(ref.sha256), limiter
            )
        sent = await target.send_payload(
            ref.sha256, ref.size, "", payload_store.path_for(ref.sha256), limiter
        )
    finally:
        directory_module._append_chunk = real_append
    assert sent == len(data) - 30_000  # resumed from the three chunks already written
    assert (
        target_dir / "payloads" / "test-appliance" / ref.sha256[:2] / ref.sha256
    ).read_bytes() == data


async def test_a_returning_link_is_drained_at_once_not_after_the_backoff(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    await fill(journal, payload_store, per_priority=5)
    memory = MemoryDestination(name="usb", up=False)
    engine = SyncEngine(
        journal,
        payload_store,
        memory,
        dest_cfg(tmp_path),
        settings(retry_max="1h", probe_interval="200ms"),
    )
    task = asyncio.create_task(engine.run())
    try:
        # Down for a while: a failed drain, then probes failing every probe_interval.
        await wait_until(lambda: engine.state.consecutive_failures >= 1, "a failed attempt")
        probes = memory.probes
        await wait_until(lambda: memory.probes >= probes + 2, "two more failed probes")
        assert not memory.records
        memory.up = True
        # retry_max is an hour: a drain within the bound means the probe started it.
        await wait_until(lambda: len(memory.records) == 20, "the drain after the link returned")
        assert sorted(memory.records) == list(range(1, 21))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_an_interrupted_batch_is_resent_with_the_same_bounds_when_more_has_arrived(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    for i in range(5):
        await journal.append(NewRecord("src", "reading", Priority.EVENT, {"i": i}))
    memory = MemoryDestination(name="usb")
    engine = SyncEngine(journal, payload_store, memory, dest_cfg(tmp_path), settings())
    sent: list[tuple[str, int, int]] = []
    original = memory.send_batch

    async def lands_then_fails_once(batch: Batch, limiter: RateLimiter) -> None:
        sent.append((batch.batch_id, batch.first_seq, batch.last_seq))
        await original(batch, limiter)  # it reached the destination...
        if len(sent) == 1:
            raise DestinationError("usb", "cut before the answer", retryable=True)  # ...unsaid

    memory.send_batch = lands_then_fails_once  # type: ignore[method-assign]
    with pytest.raises(DestinationError):
        await engine.drain()
    for i in range(5, 20):  # more events arrive before the retry
        await journal.append(NewRecord("src", "reading", Priority.EVENT, {"i": i}))
    assert await engine.drain() is True
    # The retry resent exactly the interrupted batch, then went on from its end: no record is
    # in two different batches (a directory destination would otherwise keep both files).
    assert sent[1] == sent[0]
    covered = [seq for _, first, last in dict.fromkeys(sent) for seq in range(first, last + 1)]
    assert sorted(covered) == sorted(set(covered)) == list(range(1, 21))


async def test_a_stop_while_an_acknowledgement_commits_still_records_the_next_one(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(21):
        await journal.append(NewRecord("src", "reading", Priority.EVENT, {"i": i}))
    memory = MemoryDestination(name="usb")
    engine = SyncEngine(journal, payload_store, memory, dest_cfg(tmp_path), settings())
    acknowledge = journal.acknowledge
    second_sent = asyncio.Event()
    original = memory.send_batch

    async def slow_acknowledge(*args: object, **kwargs: object) -> None:
        await asyncio.sleep(0.2)  # a slow fsync: the next batch is sent meanwhile
        await acknowledge(*args, **kwargs)  # type: ignore[arg-type]

    async def counting(batch: Batch, limiter: RateLimiter) -> None:
        await original(batch, limiter)
        if len(memory.batches) == 2:
            second_sent.set()

    monkeypatch.setattr(journal, "acknowledge", slow_acknowledge)
    memory.send_batch = counting  # type: ignore[method-assign]
    drain = asyncio.create_task(engine.drain())
    await second_sent.wait()
    await asyncio.sleep(0)  # the drain now waits on the first batch's commit
    drain.cancel()
    with pytest.raises(asyncio.CancelledError):
        await drain
    # Both batches reached the destination, so both acknowledgements are in the journal.
    cursor = await journal.read(lambda r: r.cursor("usb", Priority.EVENT))
    assert cursor == 14


async def test_a_batch_landed_unacknowledged_before_a_crash_is_resent_with_the_same_bounds(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    """A directory destination names batch files by their bounds: after a crash between the
    file landing and its acknowledgement, a resend with other bounds would store records twice.
    The engine that crashed is simply dropped; a new one (nothing in memory) takes over."""
    for i in range(5):
        await journal.append(NewRecord("src", "reading", Priority.EVENT, {"i": i}))
    target_dir = tmp_path / "usb"
    target_dir.mkdir()
    cfg = dest_cfg(target_dir)
    crashing = DirectoryTarget(cfg, journal.appliance_id, chunk_size=4096)
    original = crashing.send_batch

    async def lands_then_dies(batch: Batch, limiter: RateLimiter) -> None:
        await original(batch, limiter)  # the files are complete at the destination...
        raise DestinationError("usb", "process killed", retryable=True)  # ...never acknowledged

    crashing.send_batch = lands_then_dies  # type: ignore[method-assign]
    with pytest.raises(DestinationError):
        await SyncEngine(journal, payload_store, crashing, cfg, settings()).drain()
    for i in range(5, 20):  # more events arrive before the restart
        await journal.append(NewRecord("src", "reading", Priority.EVENT, {"i": i}))

    target = DirectoryTarget(cfg, journal.appliance_id, chunk_size=4096)
    assert await SyncEngine(journal, payload_store, target, cfg, settings()).drain() is True
    names = sorted(p.name for p in target_dir.glob("records/*/*/*/*.manifest.json"))
    bounds = [tuple(int(n) for n in name.split(".")[0].split("-")) for name in names]
    assert bounds[0] == (1, 5)  # the landed batch, overwritten by its identical resend
    covered = [seq for first, last in bounds for seq in range(first, last + 1)]
    assert sorted(covered) == sorted(set(covered)) == list(range(1, 21))


async def test_a_receiver_that_dedups_by_sequence_costs_no_journal_write_per_batch(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    for i in range(20):
        await journal.append(NewRecord("src", "reading", Priority.EVENT, {"i": i}))
    memory = MemoryDestination(name="usb", dedups_records=True)
    engine = SyncEngine(journal, payload_store, memory, dest_cfg(tmp_path), settings())
    assert await engine.drain() is True
    key = inflight_key("usb", Priority.EVENT)
    assert await journal.read(lambda r: r.meta(key)) is None
    # And one that does not: the last batch's bounds are in the journal.
    other = MemoryDestination(name="usb2")
    second = SyncEngine(journal, payload_store, other, dest_cfg(tmp_path, name="usb2"), settings())
    assert await second.drain() is True
    assert await journal.read(lambda r: r.meta(inflight_key("usb2", Priority.EVENT))) == "15-20"


async def test_a_permanent_refusal_holds_the_cursor_alerts_once_and_degrades_health(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path
) -> None:
    await fill(journal, payload_store, per_priority=3)
    memory = MemoryDestination(name="usb")
    delivered = memory.send_batch

    async def refuse(batch: Batch, limiter: RateLimiter) -> None:
        raise DestinationError("usb", "batch alert-1-9 refused with 409: conflict", retryable=False)

    memory.send_batch = refuse  # type: ignore[method-assign]
    engine = SyncEngine(journal, payload_store, memory, dest_cfg(tmp_path), settings())
    async with StorageGuard(journal, payload_store, StorageSection()) as guard:
        monitor = HealthMonitor(journal, guard, mode="run")
        monitor.destinations["usb"] = engine.state
        for _ in range(2):  # retried: one alert for one refusal, not one per attempt
            with pytest.raises(DestinationError, match="409"):
                await engine.drain()
        assert engine.state.refused is not None and "409" in engine.state.refused
        assert "sync_refused:usb" in monitor.reasons()
        cursors = await journal.read(lambda r: {p: r.cursor("usb", p) for p in Priority})
        assert set(cursors.values()) == {0}
        alerts = await journal.read(lambda r: list(r.iter_records(kind="sync_refused")))
        assert [(a.priority, a.body["destination"]) for a in alerts] == [(Priority.ALERT, "usb")]
        page = render_alarms({"usb": live_destination(engine.state)})
        assert "usb refuses the backlog" in page and "409" in page
        # Resolved upstream: the next drain ships everything and health recovers.
        memory.send_batch = delivered  # type: ignore[method-assign]
        assert await engine.drain() is True
        assert engine.state.refused is None
        assert "sync_refused:usb" not in monitor.reasons()
        assert render_alarms({"usb": live_destination(engine.state)}) == ""
