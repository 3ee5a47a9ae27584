"""Journal identities end to end (docs/sync-protocol.md, "Journals"): appliances under one id
with different journals ship to the real receiver through `appliance sync --now`, and nothing is
lost, overwritten or silently dropped; conflicts are refused with 409; concurrent journals are
flagged on both sides; old receiver databases and journals migrate."""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import shutil
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from receiver import RECEIVER_DB
from sync import Journal, JournalReader, NewRecord, Priority
from sync.identity import (
    APPLIANCE_ID_FILE,
    JOURNAL_ID_KEY,
    LEGACY_HIGH_WATER_KEY,
    JournalIdentity,
)
from tests.helpers import (
    ROOT,
    cli_env,
    fast_sensor,
    log_events,
    run_cli,
    start_daemon,
    status_json,
    stop_daemon,
    wait_for,
    write_config,
)

APPLIANCE = "demo-01"
KINDS = (Priority.ALERT, Priority.EVENT, Priority.TELEMETRY)


@dataclass
class Receiver:
    url: str
    data: Path
    log: Path
    database: str | None = None  # the PostgreSQL store's DSN; None: receiver.db

    def summary(self, appliance_id: str = APPLIANCE) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/v1/appliances/{appliance_id}/summary") as answer:
            data: dict[str, Any] = json.loads(answer.read())
        return data

    def stored(self, appliance_id: str = APPLIANCE) -> dict[str, dict[int, dict[str, Any]]]:
        """journal id -> seq -> record, as the receiver holds them."""
        out: dict[str, dict[int, dict[str, Any]]] = {}
        for journal_id, seq, line in self._rows(appliance_id):
            record = json.loads(line)
            # A batch's journal travels in its Journal-Id header; `appliance export` writes
            # it into each record, so compare with that.
            if journal_id != "legacy":
                record.setdefault("journal_id", journal_id)
            out.setdefault(journal_id, {})[seq] = record
        return out

    def _rows(self, appliance_id: str) -> list[tuple[str, int, str]]:
        if self.database is None:
            with sqlite3.connect(self.data / RECEIVER_DB) as conn:
                return conn.execute(
                    "SELECT journal_id, seq, line FROM records WHERE appliance_id = ?",
                    (appliance_id,),
                ).fetchall()
        database = self.database

        async def fetch() -> list[tuple[str, int, str]]:
            conn = await asyncpg.connect(database)
            try:
                rows = await conn.fetch(
                    "SELECT journal_id, seq, COALESCE(line, record::text) FROM receiver.records "
                    "WHERE appliance_id = $1",
                    appliance_id,
                )
            finally:
                await conn.close()
            return [(row[0], int(row[1]), row[2]) for row in rows]

        return asyncio.run(fetch())


def start_receiver(
    tmp_path: Path, *args: str, database: str | None = None
) -> tuple[subprocess.Popen[bytes], Receiver]:
    if database is not None:
        (tmp_path / "database").write_text(database + "\n")
        args = (*args, "--database-file", str(tmp_path / "database"))
    data, log = tmp_path / "receiver-data", tmp_path / "receiver.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "appliance", "receiver"),
                *("--listen", "127.0.0.1:0", "--data", str(data), *args),
            ],
            stdout=out,
            stderr=out,
            env=cli_env(),
            cwd=ROOT,
        )
    line = wait_for(
        lambda: next((x for x in log.read_text().splitlines() if "listening on" in x), None),
        30,
        "the receiver to print its address",
    )
    return proc, Receiver(line.rsplit(" ", 1)[1], data, log, database)


@pytest.fixture
def receiver(tmp_path: Path, database: str | None) -> Iterator[Receiver]:
    """A receiver process on each store (conftest's `database`): #8's rules hold on both."""
    proc, found = start_receiver(tmp_path, database=database)
    try:
        yield found
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def appliance_config(path: Path, data_dir: Path, url: str, appliance_id: str | None) -> Path:
    """A config shipping to the receiver over `http` (no sources: the tests journal records)."""
    appliance: dict[str, Any] = {"data_dir": str(data_dir)}
    if appliance_id is not None:
        appliance["id"] = appliance_id
    doc = {
        "appliance": appliance,
        "status": {"listen": "127.0.0.1:0"},
        "sync": {"destinations": [{"name": "shore", "type": "http", "url": url}]},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def journal_records(data_dir: Path, appliance_id: str, tag: str, count: int) -> str:
    """Append `count` records (alert, event and telemetry in turn) whose bodies name `tag`;
    the journal's id."""

    async def write() -> str:
        async with await Journal.open(data_dir, appliance_id=appliance_id) as journal:
            for i in range(count):
                await journal.append(
                    NewRecord("deck", "detection", KINDS[i % len(KINDS)], {"box": tag, "i": i})
                )
            return journal.journal_id

    return asyncio.run(write())


def sync_now(config: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("sync", "--now", "-c", str(config), "--timeout", "60")


def exported(config: Path, kind: str | None = None) -> list[dict[str, Any]]:
    args = ["export", "-c", str(config)] + (["--kind", kind] if kind else [])
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


# --------------------------------------------------------------------- the hidden loss, fixed


def test_two_boxes_under_one_id_both_arrive_whole(tmp_path: Path, receiver: Receiver) -> None:
    # The case of the issue: two data directories with the same id ship to one receiver. Before
    # journal identities the second one's records were dropped upstream as "duplicates" while
    # `sync --now` said drained.
    configs, journals = [], []
    for box in ("a", "b"):
        data_dir = tmp_path / f"box-{box}"
        config = appliance_config(tmp_path / f"{box}.yaml", data_dir, receiver.url, APPLIANCE)
        journals.append(journal_records(data_dir, APPLIANCE, box, 40))
        configs.append(config)
    for config in configs:
        result = sync_now(config)
        assert result.returncode == 0, result.stderr
        assert "drained" in result.stderr

    stored = receiver.stored()
    assert set(stored) == set(journals)
    for config, journal_id in zip(configs, journals, strict=True):
        records = exported(config)
        assert all(r["journal_id"] == journal_id for r in records)
        # Every record of each box, exactly as journalled, once.
        assert stored[journal_id] == {r["seq"]: r for r in records}
    summary = receiver.summary()
    assert summary["records"] == 80
    assert sorted((j["journal_id"], j["records"], j["max_seq"]) for j in summary["journals"]) == (
        sorted((j, 40, 40) for j in journals)
    )
    # One after the other, as a replaced box would: epochs, not a collision.
    assert summary["concurrent_journals"] == []


def test_recreated_data_directory_ships_everything_again(
    tmp_path: Path, receiver: Receiver
) -> None:
    data_dir = tmp_path / "data"
    config = appliance_config(tmp_path / "a.yaml", data_dir, receiver.url, APPLIANCE)
    first = journal_records(data_dir, APPLIANCE, "old disk", 30)
    assert sync_now(config).returncode == 0
    old_records = exported(config)
    shutil.rmtree(data_dir)  # a new SSD, a reflashed box: seqs start at 1 again
    second = journal_records(data_dir, APPLIANCE, "new disk", 20)
    assert second != first
    result = sync_now(config)
    assert result.returncode == 0, result.stderr
    stored = receiver.stored()
    assert stored[first] == {r["seq"]: r for r in old_records}
    assert stored[second] == {r["seq"]: r for r in exported(config)}
    assert sorted(stored[second]) == list(range(1, 21))
    summary = receiver.summary()
    assert summary["records"] == 50
    assert [j["journal_id"] for j in summary["journals"]] == [first, second]
    assert summary["concurrent_journals"] == []


def test_a_restored_backup_reusing_shipped_seqs_is_refused_with_409(
    tmp_path: Path, receiver: Receiver
) -> None:
    data_dir = tmp_path / "data"
    config = appliance_config(tmp_path / "a.yaml", data_dir, receiver.url, APPLIANCE)
    journal_id = journal_records(data_dir, APPLIANCE, "before backup", 6)
    backup = tmp_path / "backup"
    shutil.copytree(data_dir, backup)  # taken before anything shipped
    journal_records(data_dir, APPLIANCE, "after backup", 6)
    assert sync_now(config).returncode == 0
    before = receiver.summary()
    assert before["records"] == 12

    # The box is restored from the backup: the same journal, its seqs 7.. handed out again.
    shutil.rmtree(data_dir)
    shutil.copytree(backup, data_dir)
    journal_records(data_dir, APPLIANCE, "after restore", 6)
    result = sync_now(config)
    assert result.returncode == 1, result.stderr
    assert "409" in result.stderr and "conflicting records" in result.stderr
    assert "seqs 7, 10" in result.stderr or "seqs 7" in result.stderr
    assert journal_id in result.stderr
    # Nothing of a refused batch is stored: upstream still holds exactly what it held.
    after = receiver.summary()
    assert after["records"] == before["records"]
    assert receiver.stored()[journal_id][7]["body"]["box"] == "after backup"
    assert after["journals"][0]["conflicts_refused"] > 0
    # The refusal is an alert in the journal (it ships upstream once the conflict is resolved).
    refusals = exported(config, "sync_refused")
    assert refusals and refusals[0]["priority"] == "alert"
    assert "409" in refusals[0]["body"]["error"]
    refused_log = [e for e in log_events(receiver.log) if e["msg"].startswith("batch refused")]
    assert refused_log and refused_log[0]["journal_id"] == journal_id
    # The daemon is stopped: `journal fork` after the last seq upstream and the backup share.
    fork = run_cli("journal", "fork", "-c", str(config), "--after", "6")
    assert fork.returncode == 0, fork.stderr
    forked = fork.stdout.split()[-1]
    assert f"up to seq 6 ship as {journal_id}" in fork.stdout
    result = sync_now(config)
    assert result.returncode == 0, result.stderr
    stored = receiver.stored()
    # What upstream had is untouched; what the restored box wrote arrived under the new id.
    assert [stored[journal_id][seq]["body"]["box"] for seq in range(7, 13)] == ["after backup"] * 6
    assert {r["body"]["box"] for seq, r in stored[forked].items() if seq <= 12} == {"after restore"}
    records = {r["seq"]: r for r in exported(config)}
    assert stored[forked] == {seq: r for seq, r in records.items() if seq > 6}
    summary = receiver.summary()
    journal = {j["journal_id"]: j for j in summary["journals"]}
    assert journal[forked]["follows"] == journal_id
    # One box's history, shipped in one drain: not two boxes.
    assert summary["concurrent_journals"] == []


def test_a_directory_destination_never_overwrites_a_reused_seq(tmp_path: Path) -> None:
    # A `directory` destination names batch files by their seqs: a restored backup reusing seqs
    # is refused rather than overwriting what the disk holds, and a fork resolves it.
    data_dir, outbox = tmp_path / "data", tmp_path / "usb"
    outbox.mkdir()
    config = tmp_path / "a.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "appliance": {"id": APPLIANCE, "data_dir": str(data_dir)},
                "sync": {
                    "destinations": [{"name": "usb", "type": "directory", "path": str(outbox)}]
                },
            }
        )
    )
    journal_id = journal_records(data_dir, APPLIANCE, "before backup", 6)
    backup = tmp_path / "backup"
    shutil.copytree(data_dir, backup)
    journal_records(data_dir, APPLIANCE, "after backup", 6)
    assert sync_now(config).returncode == 0
    shipped = sorted(p.relative_to(outbox) for p in outbox.rglob("*.ndjson.gz"))

    shutil.rmtree(data_dir)
    shutil.copytree(backup, data_dir)
    # Without the fork the same seqs would name the same files with other records: refused.
    journal_records(data_dir, APPLIANCE, "after restore", 6)
    refused = sync_now(config)
    assert refused.returncode == 1
    assert "conflicts" in refused.stderr and "nothing was overwritten" in refused.stderr
    assert sorted(p.relative_to(outbox) for p in outbox.rglob("*.ndjson.gz")) == shipped

    assert run_cli("journal", "fork", "-c", str(config), "--after", "6").returncode == 0
    assert sync_now(config).returncode == 0
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for path in outbox.rglob("*.ndjson.gz"):
        # records/APPLIANCE/JOURNAL/PRIORITY/FIRST-LAST.ndjson.gz
        journal_of_file = path.relative_to(outbox).parts[2]
        for line in gzip.decompress(path.read_bytes()).splitlines():
            record = json.loads(line)
            key = (journal_of_file, record["seq"])
            assert found.setdefault(key, record) == record  # a resend may repeat, never differ
    by_journal: dict[str, dict[int, str]] = {}
    for (journal, seq), record in found.items():
        if record["source"] == "deck":  # beside them: the refusal alert, the fork record
            by_journal.setdefault(journal, {})[seq] = record["body"]["box"]
    forked = next(j for j in by_journal if j != journal_id)
    assert by_journal[journal_id] == {
        **{seq: "before backup" for seq in range(1, 7)},
        **{seq: "after backup" for seq in range(7, 13)},
    }
    assert by_journal[forked] == {seq: "after restore" for seq in range(7, 13)}
    assert not (outbox / "records" / APPLIANCE / "concurrent-journals.json").exists()


# -------------------------------------------------------------- two live boxes under one id


def test_interleaved_journals_are_flagged_on_both_sides(tmp_path: Path, receiver: Receiver) -> None:
    configs = {
        box: appliance_config(tmp_path / f"{box}.yaml", tmp_path / box, receiver.url, APPLIANCE)
        for box in ("a", "b")
    }
    journals = {box: journal_records(tmp_path / box, APPLIANCE, box, 5) for box in configs}
    outputs = []
    for box in ("a", "b", "a", "b"):  # both keep shipping: two live boxes
        journal_records(tmp_path / box, APPLIANCE, box, 5)
        result = sync_now(configs[box])
        assert result.returncode == 0, result.stderr  # nothing refused: both are kept
        outputs.append(result.stderr)
    summary = receiver.summary()
    assert summary["concurrent_journals"] == sorted(journals.values())
    stored = receiver.stored()
    for box, config in configs.items():
        # Every record of each box exactly once, the alerts about the collision included once
        # they shipped: what upstream holds is each journal's own export, seq for seq.
        shipped = stored[journals[box]]
        assert {
            seq: r for seq, r in ((r["seq"], r) for r in exported(config)) if seq in shipped
        } == (shipped)
        assert len([r for r in shipped.values() if r["source"] == "deck"]) == 15
    # The receiver logs it, and says it to both boxes.
    flagged = [e for e in log_events(receiver.log) if e["msg"].startswith("concurrent journals")]
    assert flagged and flagged[0]["journals"] == sorted(journals.values())
    assert "two boxes share one id" in outputs[2] and "two boxes share one id" in outputs[3]
    for box, config in configs.items():
        alerts = exported(config, "journal_collision")
        assert alerts and alerts[-1]["priority"] == "alert"
        assert set(alerts[-1]["body"]["journals"]) == set(journals.values())
        assert alerts[-1]["body"]["journal_id"] == journals[box]


def test_running_daemons_show_a_collision_until_it_clears(tmp_path: Path) -> None:
    # A short quiet period, so the test sees the flag clear once one box is switched off.
    proc, receiver = start_receiver(tmp_path, "--concurrent-quiet", "2s")
    daemons: dict[str, subprocess.Popen[bytes]] = {}
    try:
        configs = {}
        for box in ("a", "b"):
            configs[box] = write_config(
                tmp_path / f"{box}.yaml",
                tmp_path / box,
                [fast_sensor("vib")],
                appliance={"id": APPLIANCE},
                sync={
                    "interval": "500ms",
                    "destinations": [{"name": "shore", "type": "http", "url": receiver.url}],
                },
            )
            daemons[box] = start_daemon(configs[box], tmp_path / f"{box}.log")

        def collision(box: str) -> dict[str, Any] | None:
            result = run_cli("status", "-c", str(configs[box]), "--json")
            if result.returncode != 0:  # the daemon has not created its journal yet
                return None
            found: dict[str, Any] | None = json.loads(result.stdout)["destinations"]["shore"][
                "collision"
            ]
            return found

        for box in ("a", "b"):
            seen = wait_for(
                functools.partial(collision, box), 60, f"box {box} to see the collision"
            )
            assert len(seen["journals"]) == 2
            report = status_json(configs[box])
            assert "journal_collision:shore" in report["daemon"]["reasons"]
            with JournalReader.open(tmp_path / box) as reader:
                url = (reader.meta("status_url") or "").rstrip("/")
            assert url
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(f"{url}/healthz")
            assert caught.value.code == 503
            assert "journal_collision:shore" in json.loads(caught.value.read())["reasons"]
            with urllib.request.urlopen(f"{url}/") as page:
                assert "Another journal ships under this appliance id" in page.read().decode()
            with urllib.request.urlopen(f"{url}/metrics") as metrics:
                text = metrics.read().decode()
            assert 'appliance_sync_journal_collision{destination="shore"} 1.0' in text
            assert 'appliance_sync_refused{destination="shore"} 0.0' in text
            human = run_cli("status", "-c", str(configs[box]))
            assert "JOURNAL COLLISION" in human.stdout
        assert len(receiver.summary()["concurrent_journals"]) == 2

        # Resolved: box b is switched off (or given its own id); once it has been quiet for
        # --concurrent-quiet, a keeps shipping alone and the flag clears on both sides.
        assert stop_daemon(daemons.pop("b")) == 0
        wait_for(lambda: collision("a") is None, 60, "the collision to clear on box a")
        assert receiver.summary()["concurrent_journals"] == []
        cleared = exported(configs["a"], "journal_collision")
        assert cleared[-1]["body"]["event"] == "cleared"
    finally:
        for daemon in daemons.values():
            stop_daemon(daemon)
        proc.terminate()
        proc.wait(timeout=20)


# ------------------------------------------------------------------------- default identities


def test_a_config_without_an_id_gets_one_per_data_directory(
    tmp_path: Path, receiver: Receiver
) -> None:
    ids = []
    for box in ("a", "b"):
        data_dir = tmp_path / box
        config = appliance_config(tmp_path / f"{box}.yaml", data_dir, receiver.url, None)
        result = sync_now(config)  # nothing journalled yet: it opens the journal and drains
        assert result.returncode == 0, result.stderr
        made = (data_dir / APPLIANCE_ID_FILE).read_text().strip()
        assert made.startswith("appliance-")
        assert status_json(config)["appliance_id"] == made
        assert sync_now(config).returncode == 0  # a second start keeps it
        assert (data_dir / APPLIANCE_ID_FILE).read_text().strip() == made
        ids.append(made)
    assert ids[0] != ids[1]


# ------------------------------------------------------------------------------ migrations


def test_receiver_database_of_the_previous_version_migrates(tmp_path: Path) -> None:
    data = tmp_path / "receiver-data"
    data.mkdir()
    dump = (ROOT / "tests" / "data" / "receiver-before-journals.sql").read_text()
    with sqlite3.connect(data / RECEIVER_DB) as conn:
        conn.executescript(dump)
    with sqlite3.connect(data / RECEIVER_DB) as conn:
        old_lines = dict(
            conn.execute("SELECT seq, line FROM records WHERE appliance_id = 'ship-1'").fetchall()
        )
    proc, receiver = start_receiver(tmp_path)
    try:
        summary = receiver.summary("ship-1")
        assert (summary["records"], summary["max_seq"], summary["duplicates_ignored"]) == (9, 9, 3)
        (legacy,) = summary["journals"]
        assert legacy["journal_id"] == "legacy"
        assert (legacy["records"], legacy["max_seq"], legacy["batches"]) == (9, 9, 3)
        assert (legacy["payloads"], legacy["payload_bytes"]) == (1, 330)
        assert receiver.stored("ship-1")["legacy"] == {
            seq: json.loads(line) for seq, line in old_lines.items()
        }
        # An appliance of the old version resends a batch: recognised, as before.
        lines = [json.loads(old_lines[seq]) for seq in (3, 4, 5)]
        assert put_batch(receiver.url, "ship-1", "event-3-5", lines) == (
            200,
            {"batch_id": "event-3-5", "journal_id": "legacy", "stored": 0, "duplicates": 3},
        )
        # An upgraded (or new) journal of the same appliance is a new epoch beside it.
        journal_id = "0123456789abcdef0123456789abcdef"
        new = [{**line, "journal_id": journal_id, "body": {"new": True}} for line in lines]
        status, answer = put_batch(receiver.url, "ship-1", "event-3-5", new, journal_id)
        assert (status, answer["stored"]) == (200, 3)
        summary = receiver.summary("ship-1")
        assert [j["journal_id"] for j in summary["journals"]] == ["legacy", journal_id]
        assert summary["records"] == 12
        # ship-2 is untouched.
        assert receiver.summary("ship-2")["journals"][0]["records"] == 3
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    with sqlite3.connect(data / RECEIVER_DB) as conn:
        applied = [r[0] for r in conn.execute("SELECT name FROM migrations ORDER BY name")]
        assert applied == [
            "0001_initial",
            "0002_model_packages",
            "0003_journals",
            "0004_tokens",
            "0005_arrival",
            "0006_fleet_view",
        ]
        # Every record, old ones included, has its place in the consumers' cursor order.
        arrivals = conn.execute(
            "SELECT COUNT(DISTINCT arrival), MIN(arrival), MAX(arrival) FROM records"
        ).fetchone()
        assert arrivals == (15, 1, 15)
        # Queryable by other tools: one row per (appliance, journal, seq).
        keys = conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT appliance_id || '/' || journal_id || '/' || seq) "
            "FROM records"
        ).fetchone()
        assert keys == (15, 15)


def put_batch(
    url: str,
    appliance_id: str,
    batch_id: str,
    lines: list[dict[str, Any]],
    journal_id: str | None = None,
) -> tuple[int, dict[str, Any]]:
    body = gzip.compress(("\n".join(json.dumps(line) for line in lines) + "\n").encode())
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/x-ndjson"}
    if journal_id is not None:
        headers["Journal-Id"] = journal_id
    request = urllib.request.Request(
        f"{url}/v1/appliances/{appliance_id}/batches/{batch_id}",
        data=body,
        headers=headers,
        method="PUT",
    )
    try:
        with urllib.request.urlopen(request) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_journal_of_the_previous_version_keeps_shipping_its_records_as_before(
    tmp_path: Path, receiver: Receiver
) -> None:
    data_dir = tmp_path / "data"
    config = appliance_config(tmp_path / "a.yaml", data_dir, receiver.url, APPLIANCE)
    journal_records(data_dir, APPLIANCE, "old version", 9)
    # As the previous version left it: no identity, no migration 0003.
    with sqlite3.connect(data_dir / "journal.db") as conn:
        conn.execute(
            "DELETE FROM meta WHERE key IN (?, ?)", (JOURNAL_ID_KEY, LEGACY_HIGH_WATER_KEY)
        )
        conn.execute("DELETE FROM _migrations WHERE name = '0003_journal_identity'")
    old_lines = {r["seq"]: r for r in exported(config)}
    assert all("journal_id" not in r for r in old_lines.values())
    # The previous version had shipped the alerts already (its in-flight batch included).
    alerts = [r for r in old_lines.values() if r["priority"] == "alert"]
    first, last = alerts[0]["seq"], alerts[-1]["seq"]
    assert put_batch(receiver.url, APPLIANCE, f"alert-{first}-{last}", alerts)[0] == 200

    journal_id = journal_records(data_dir, APPLIANCE, "new version", 6)  # upgraded: 0003 runs
    with JournalReader.open(data_dir) as reader:
        identity = reader.identity()
    assert identity is not None and identity.journal_id == journal_id
    assert identity.legacy_high_water == 9
    result = sync_now(config)
    assert result.returncode == 0, result.stderr
    stored = receiver.stored()
    # Records journalled before the upgrade went where the old ones are, exactly as they were
    # (the alerts shipped before were recognised as duplicates); the rest under the journal.
    assert stored["legacy"] == old_lines
    assert sorted(stored[journal_id]) == list(range(10, 16))
    assert all(r["journal_id"] == journal_id for r in stored[journal_id].values())
    summary = receiver.summary()
    legacy = next(j for j in summary["journals"] if j["journal_id"] == "legacy")
    assert legacy["duplicates_ignored"] == len(alerts)
    assert summary["concurrent_journals"] == []


def test_identity_epochs_and_forks() -> None:
    identity = JournalIdentity("a" * 32, legacy_high_water=5)
    assert [identity.shipped_as(seq) for seq in (1, 5, 6)] == [None, None, "a" * 32]
    assert (identity.epoch_end(3), identity.epoch_end(6)) == (5, None)
    assert identity.follows("a" * 32) == "legacy"
    forked = identity.forked(9, "b" * 32)
    assert [forked.shipped_as(seq) for seq in (5, 6, 9, 10)] == [None, "a" * 32, "a" * 32, "b" * 32]
    assert (forked.epoch_end(7), forked.epoch_end(10)) == (9, None)
    assert forked.follows("b" * 32) == "a" * 32
    assert forked.follows(None) is None
    with pytest.raises(ValueError, match="fork after it"):
        forked.forked(8, "c" * 32)
    # Forked again at the same seq: the empty identity in between is dropped.
    again = forked.forked(9, "c" * 32)
    assert again.earlier == ((9, "a" * 32),)
    assert again.follows("c" * 32) == "a" * 32
