"""Start-up at any journal size (sync/recovery.py, `open_checked`; sync/journal.py): a clean stop
marks the journal, and a large journal with the mark opens after a few reads, no scan; after an
unclean stop (SIGKILL) it opens at once and the full check runs in a niced child process while
records flow, its result journalled and shown; damage it finds is an alarm, and the next start
salvages. Small journals are checked in full at every start, as `journal.full_check_limit` says.

Every journal here is small: `full_check_limit: 0` makes it count as large."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

from appliance.status.health import HealthMonitor
from config import JournalSection, StorageSection
from sync import Journal, JournalReader, NewRecord, PayloadStore, Priority, StorageGuard
from sync.recovery import CLEAN_STOP_KEY, DAMAGE_FILE, QUARANTINE_DIR, run_check_process
from tests.conftest import APPLIANCE_ID
from tests.helpers import (
    ROOT,
    fast_sensor,
    log_events,
    run_cli,
    start_daemon,
    stop_daemon,
    wait_for,
    write_config,
)

LARGE = JournalSection(full_check_limit=0)
RECORDS = 3000


async def open_journal(data_dir: Path, settings: JournalSection = LARGE) -> Journal:
    store = PayloadStore(data_dir / "payloads")
    return await Journal.open(
        data_dir, appliance_id=APPLIANCE_ID, settings=settings, payloads=store
    )


def reading(i: int) -> NewRecord:
    return NewRecord(
        source="gearbox",
        kind="reading",
        priority=Priority(1 + i % 4),
        body={"i": i, "pad": "x" * 80},
    )


async def write_records(data_dir: Path, n: int = RECORDS) -> None:
    async with await open_journal(data_dir) as journal:
        for start in range(0, n, 500):
            await journal.append_many([reading(i) for i in range(start, min(n, start + 500))])


def meta(data_dir: Path, key: str) -> str | None:
    with JournalReader.open(data_dir) as reader:
        return reader.meta(key)


def kill_a_writer(data_dir: Path) -> None:
    """An unclean stop: a child process opens the journal, journals a record and is SIGKILLed
    while it holds the journal open."""
    code = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from config import JournalSection\n"
        "from sync import Journal, NewRecord, Priority\n"
        "async def main():\n"
        f"    j = await Journal.open(Path({str(data_dir)!r}), appliance_id={APPLIANCE_ID!r},\n"
        "        settings=JournalSection(full_check_limit=0))\n"
        "    await j.append(NewRecord(source='s', kind='reading', priority=Priority.EVENT, body={}))\n"
        "    print('ready', flush=True)\n"
        "    await asyncio.sleep(120)\n"
        "asyncio.run(main())\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)


def damage_pages(data_dir: Path) -> None:
    """Garbage over three pages in the middle of the file (the records' leaves, away from
    the edges the sanity reads look at)."""
    db = data_dir / "journal.db"
    with closing(sqlite3.connect(db)) as conn:
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    with db.open("r+b") as handle:
        handle.seek((pages // 2) * page_size)
        handle.write(random.Random(7).randbytes(3 * page_size))


def check_children() -> list[int]:
    """This process's children running the background check (Linux: /proc)."""
    found = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"check_child" in cmdline:
                found.append(int(pid))
    return found


async def test_a_clean_stop_lets_a_large_journal_open_without_a_scan(data_dir: Path) -> None:
    await write_records(data_dir)
    assert json.loads(meta(data_dir, CLEAN_STOP_KEY) or "{}")["boots"] == 1
    journal = await open_journal(data_dir)
    async with journal:
        assert journal.recovery.check == "sanity"  # schema, meta, first and last record only
        assert journal.integrity.last_stop == "clean"
        assert journal.integrity.state == "skipped"
        assert journal.recovery.payloads is None  # nor a walk through the payload files
        assert journal.start_integrity_check() is None
        assert await journal.append(reading(RECORDS)) == RECORDS + 1
        # Cleared before this run's first record: a crash from here on is an unclean stop.
        assert meta(data_dir, CLEAN_STOP_KEY) is None
    assert meta(data_dir, CLEAN_STOP_KEY) is not None


async def test_a_small_journal_is_checked_in_full_at_every_start(data_dir: Path) -> None:
    await write_records(data_dir, 200)
    journal = await open_journal(data_dir, JournalSection())
    async with journal:
        assert journal.recovery.check == "integrity_check"
        assert journal.integrity.last_stop == "clean"
        assert journal.integrity.state == "ok"
        assert journal.integrity.checked_at is not None


async def test_after_a_sigkill_the_check_runs_in_the_background_and_is_journalled(
    data_dir: Path,
) -> None:
    await write_records(data_dir)
    kill_a_writer(data_dir)
    journal = await open_journal(data_dir)
    async with journal:
        assert journal.recovery.check == "sanity"
        assert journal.integrity.last_stop == "unclean"
        assert journal.integrity.state == "pending"
        assert journal.recovery.payloads is not None  # a crash can leave half-written files
        # Records flow before the check and while it runs.
        await journal.append(reading(0))
        task = journal.start_integrity_check()
        assert task is not None
        assert journal.integrity.state == "running"
        await journal.append(reading(1))
        await task
        state = journal.integrity
        assert (state.state, state.check, state.detail) == ("ok", "integrity_check", "ok")
        assert state.started_at is not None and state.checked_at is not None
        [record] = await journal.read(lambda r: list(r.iter_records(kind="integrity_check")))
        assert record.priority is Priority.EVENT
        assert record.body["state"] == "ok" and record.body["last_stop"] == "unclean"
    # Checked and closed: the next start is a clean one.
    async with await open_journal(data_dir) as journal:
        assert journal.integrity.last_stop == "clean"
        assert journal.integrity.state == "skipped"


async def test_a_check_stopped_by_close_stays_owed_and_leaves_no_process(data_dir: Path) -> None:
    await write_records(data_dir, 500)
    kill_a_writer(data_dir)
    journal = await open_journal(data_dir)
    async with journal:
        assert journal.start_integrity_check() is not None
        await asyncio.to_thread(wait_for, check_children, 30, "the check's child process")
    assert journal.integrity.state == "pending"
    assert "runs again at the next start" in journal.integrity.detail
    assert check_children() == []
    # Not checked, so not marked clean: the next start owes the check still.
    assert meta(data_dir, CLEAN_STOP_KEY) is None
    async with await open_journal(data_dir) as journal:
        assert journal.integrity.last_stop == "unclean"
        assert journal.integrity.state == "pending"


async def test_damage_found_in_the_background_is_an_alarm_and_the_next_start_salvages(
    data_dir: Path,
) -> None:
    await write_records(data_dir)
    kill_a_writer(data_dir)
    damage_pages(data_dir)
    journal = await open_journal(data_dir)
    async with journal:
        assert journal.recovery.salvaged is None  # the damage is away from what start reads
        task = journal.start_integrity_check()
        assert task is not None
        await task
        assert journal.integrity.state == "failed"
        assert (data_dir / DAMAGE_FILE).exists()
        guard = StorageGuard(journal, PayloadStore(data_dir / "payloads"), StorageSection())
        snapshot = HealthMonitor(journal, guard, mode="run").snapshot()
        assert snapshot["journal"]["last_stop"] == "unclean"
        assert snapshot["journal"]["integrity"]["state"] == "failed"
        [alarm] = [a for a in snapshot["alarms"] if a["id"] == "journal:damaged"]
        assert alarm["severity"] == "critical" and alarm["kind"] == "journal"
        assert alarm["what"].startswith("journal damaged: restart to salvage")
        # The newest record (a scan would meet the damaged pages).
        record = await journal.read(lambda r: r.get(r.max_seq()))
        assert record is not None and record.kind == "integrity_check"
        assert record.priority is Priority.ALERT and record.body["state"] == "failed"
    assert meta(data_dir, CLEAN_STOP_KEY) is None
    # The next start runs the full check before anything else, and salvages.
    async with await open_journal(data_dir) as journal:
        salvaged = journal.recovery.salvaged
        assert salvaged is not None and salvaged.records_salvaged > 0.9 * RECORDS
        assert journal.recovery.check == "integrity_check"
        assert journal.integrity.state == "salvaged"
        assert not (data_dir / DAMAGE_FILE).exists()
        guard = StorageGuard(journal, PayloadStore(data_dir / "payloads"), StorageSection())
        alarms = HealthMonitor(journal, guard, mode="run").snapshot()["alarms"]
        assert [a for a in alarms if a["kind"] == "journal"] == []
    assert len(list((data_dir / QUARANTINE_DIR).glob("*/journal.db"))) == 1


async def test_a_damage_flag_the_full_check_does_not_confirm_is_cleared(data_dir: Path) -> None:
    await write_records(data_dir, 500)
    (data_dir / DAMAGE_FILE).write_text(
        json.dumps({"check": "quick_check", "detail": "a read error", "at": ""})
    )
    async with await open_journal(data_dir) as journal:
        assert journal.recovery.check == "quick_check"
        assert journal.recovery.salvaged is None
        assert journal.integrity.state == "ok"
        assert "not found again" in journal.integrity.detail
    assert not (data_dir / DAMAGE_FILE).exists()


async def test_a_journal_that_lost_its_tail_is_checked_at_start(data_dir: Path) -> None:
    await write_records(data_dir)
    db = data_dir / "journal.db"
    os.truncate(db, db.stat().st_size - 8 * 4096)
    async with await open_journal(data_dir) as journal:
        # The reads at start meet the missing pages (or see a file shorter than its pages and
        # run the full check): quarantined and salvaged before the first record.
        assert journal.recovery.check in ("sanity", "quick_check")
        assert journal.recovery.salvaged is not None
        assert journal.integrity.state == "salvaged"


async def test_checkpoints_do_not_wait_for_the_background_checks_snapshot(data_dir: Path) -> None:
    await write_records(data_dir, 500)
    async with await open_journal(data_dir) as journal:
        with closing(
            sqlite3.connect(f"{(data_dir / 'journal.db').as_uri()}?mode=ro", uri=True)
        ) as r:
            r.execute("BEGIN")
            r.execute("SELECT COUNT(*) FROM records").fetchone()  # holds a snapshot, as the check
            await journal.append(reading(0))
            journal.integrity.state = "running"
            started = time.monotonic()
            # TRUNCATE would wait out the 30 s busy timeout for the reader; PASSIVE does not.
            busy, _, _ = await asyncio.wait_for(journal.checkpoint(), 20)
            assert busy == 0 and time.monotonic() - started < 10
            journal.integrity.state = "ok"


async def test_a_check_of_a_file_that_is_not_a_journal_fails(tmp_path: Path) -> None:
    garbage = tmp_path / "journal.db"
    garbage.write_bytes(random.Random(1).randbytes(64 * 1024))
    outcome = await run_check_process(garbage, "quick_check")
    assert outcome.state == "failed"
    assert "not a database" in outcome.detail


def checks_of(path: Path) -> list[int]:
    """Every process on the machine running the background check over `path` (Linux: /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"check_child" in part for part in cmdline) and str(path).encode() in cmdline:
            found.append(int(proc.name))
    return found


def test_a_check_whose_daemon_is_killed_ends_by_itself(tmp_path: Path) -> None:
    """A SIGKILLed daemon leaves no check reading the disk: the child ends when its stdin (the
    daemon's end of the pipe) closes. The check here waits on a lock another connection holds,
    so it is still running when its parent dies."""
    db = tmp_path / "locked.db"
    with closing(sqlite3.connect(db, isolation_level=None)) as holder:
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN EXCLUSIVE")  # the check's read waits (busy timeout 30 s)
        code = (
            "import asyncio\n"
            "from pathlib import Path\n"
            "from sync.recovery import run_check_process\n"
            f"asyncio.run(run_check_process(Path({str(db)!r}), 'quick_check'))\n"
        )
        with subprocess.Popen([sys.executable, "-c", code], cwd=ROOT) as parent:
            try:
                [child] = wait_for(lambda: checks_of(db), 30, "the check's child process")
            finally:
                parent.send_signal(signal.SIGKILL)
                parent.wait(timeout=10)
        wait_for(lambda: not checks_of(db), 20, f"the orphaned check {child} to end")
        holder.execute("ROLLBACK")


def test_the_daemon_reports_an_unclean_stop_and_its_check(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "c.yaml", data, [fast_sensor("a")], journal={"full_check_limit": "0"}
    )
    log = tmp_path / "daemon.log"

    def said(message: str) -> bool:
        return any(e.get("msg") == message for e in log_events(log))

    proc = start_daemon(config, log)
    try:
        wait_for(lambda: said("started"), 60, "the first start")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    log.write_text("")
    proc = start_daemon(config, log)
    try:
        wait_for(lambda: said("journal check ended"), 60, "the background check")
    finally:
        assert stop_daemon(proc) == 0
    status = json.loads(run_cli("status", "-c", str(config), "--json").stdout)
    journal = status["daemon"]["journal"]
    assert journal["last_stop"] == "unclean"
    assert journal["integrity"]["state"] == "ok"
    assert journal["integrity"]["check"] == "integrity_check"
    text = run_cli("status", "-c", str(config)).stdout
    assert "last stop not clean: integrity_check passed" in text
    exported = run_cli("export", "-c", str(config), "--kind", "integrity_check").stdout
    [record] = [json.loads(line) for line in exported.splitlines()]
    assert record["body"]["state"] == "ok"
