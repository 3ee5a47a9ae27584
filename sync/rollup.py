"""Tiered telemetry: rolls readings (and health snapshots) older than a tier's age into aggregate
`rollup` records at the tier's resolution, in one transaction with the rows they replace.

Where a rollup goes in the queues is what keeps delivery exact. A rollup takes the seq of the
last record it replaces, so it sits in every destination's queue where its readings were; and
no rollup spans a destination's cursor. A destination whose cursor is past the readings already
has them and never reads the rollup (its seq is behind the cursor); one that has none of them
reads the rollup in their place. No destination receives a reading twice in two forms, and
nothing unacknowledged goes without its rollup taking its place. The records just past each
cursor (GUARD_BATCHES batches: the one in flight and the one read ahead) are never rolled up,
since a destination may hold them already without having acknowledged them; nor does a rollup
cross a boundary of the journal's identity (sync/identity.py), since each side ships under its
own id.

Only telemetry of ROLLED_KINDS is touched: alerts, events, anomaly records and their raw windows,
samples and data-quality records are never rolled up (they are not telemetry). A bucket with a
single record is left as it is (nothing to gain). The wire form is in docs/sync-protocol.md."""

from __future__ import annotations

import bisect
import functools
import json
import logging
import math
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from config import StorageSection
from sync.identity import read_identity
from sync.journal import Journal
from sync.records import RECORD_OVERHEAD_BYTES, NewRecord, Priority, format_ts, parse_ts

log = logging.getLogger(__name__)

ROLLUP_KIND = "rollup"
REPORT_KIND = "rollup_pass"
ROLLED_KINDS = ("reading", "health", ROLLUP_KIND)
# Records just past each destination's cursor that stay as they are: the batch in flight, the
# one read ahead while it is sent, and one more for a batch cut short by its byte limit.
GUARD_BATCHES = 3
# How often the tiers are walked (retention checks far more often; rolling up a few buckets at
# a time would journal a report every few seconds for nothing).
ROLLUP_INTERVAL_S = 3600.0
_CHUNK_ROWS = 5000
_MAX_CHUNK_ROWS = 400_000
_SIGNIFICANT = 7  # digits kept of an aggregate: float32's precision, what readings carry
_WATERMARK_KEY = "rollup_after:{resolution}"

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def _round(value: float) -> float:
    return float(f"{value:.{_SIGNIFICANT}g}")


@dataclass
class TierTally:
    """What one tier rolled up in one pass, or since the journal began (the `rollups` table)."""

    resolution_s: int
    of_kind: str
    records: int = 0
    rollups: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    first_seq: int = 0
    last_seq: int = 0

    def to_dict(self) -> dict[str, int | str]:
        return {
            "resolution_s": self.resolution_s,
            "of": self.of_kind,
            "records": self.records,
            "rollups": self.rollups,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
        }


@dataclass
class RollupReport:
    tallies: dict[tuple[int, str], TierTally] = field(default_factory=dict)

    @property
    def records(self) -> int:
        return sum(t.records for t in self.tallies.values())

    def add(self, tally: TierTally) -> None:
        mine = self.tallies.setdefault(
            (tally.resolution_s, tally.of_kind),
            TierTally(tally.resolution_s, tally.of_kind, first_seq=tally.first_seq),
        )
        mine.records += tally.records
        mine.rollups += tally.rollups
        mine.bytes_before += tally.bytes_before
        mine.bytes_after += tally.bytes_after
        mine.first_seq = min(mine.first_seq or tally.first_seq, tally.first_seq)
        mine.last_seq = max(mine.last_seq, tally.last_seq)

    def body(self) -> dict[str, Any]:
        return {"tiers": [t.to_dict() for _, t in sorted(self.tallies.items())]}


# ------------------------------------------------------------------------------ aggregation


@dataclass
class _Stat:
    total: float = 0.0
    low: float = math.inf
    high: float = -math.inf
    count: int = 0

    def add_value(self, value: Any) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            return
        self.total += value
        self.low = min(self.low, value)
        self.high = max(self.high, value)
        self.count += 1

    def add_stat(self, stat: Any) -> None:
        if not isinstance(stat, dict):
            return
        count = stat.get("count")
        mean, low, high = stat.get("mean"), stat.get("min"), stat.get("max")
        if not isinstance(count, int) or count <= 0:
            return
        if not all(isinstance(v, int | float) for v in (mean, low, high)):
            return
        self.total += float(mean) * count  # type: ignore[arg-type]
        self.low = min(self.low, float(low))  # type: ignore[arg-type]
        self.high = max(self.high, float(high))  # type: ignore[arg-type]
        self.count += count

    def to_dict(self) -> dict[str, Any]:
        if not self.count:
            return {"mean": None, "min": None, "max": None, "count": 0}
        return {
            "mean": _round(self.total / self.count),
            "min": _round(self.low),
            "max": _round(self.high),
            "count": self.count,
        }


@dataclass
class _Row:
    seq: int
    appliance_id: str
    boot_id: str
    ts: str
    mono_ns: int
    source: str
    kind: str
    model: str | None
    body: str
    size: int

    def replaces(self, body: dict[str, Any]) -> tuple[int, int, int]:
        """(records, first seq, last seq) this row stands for: itself, or a rollup's own."""
        if self.kind == ROLLUP_KIND:
            span = body.get("replaces") or {}
            return (
                int(span.get("records", 1)),
                int(span.get("first_seq", self.seq)),
                int(span.get("last_seq", self.seq)),
            )
        return 1, self.seq, self.seq


def _parse(text: str) -> dict[str, Any] | None:
    try:
        body = json.loads(text)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _rolled_kind(text: str) -> str | None:
    """What a rollup record rolled up (`of`), or None for a body that is not a rollup's."""
    body = _parse(text)
    return None if body is None else str(body.get("of", "reading"))


def aggregate(
    rows: Sequence[_Row],
    bodies: Sequence[dict[str, Any]],
    of_kind: str,
    start: datetime,
    resolution_s: int,
) -> dict[str, Any]:
    """The body of the rollup standing for `rows` (raw records or earlier rollups, seq order)."""
    records, first, last = 0, rows[0].seq, rows[-1].seq
    for row, body in zip(rows, bodies, strict=True):
        n, lo, hi = row.replaces(body)
        records += n
        first, last = min(first, lo), max(last, hi)
    out: dict[str, Any] = {
        "of": of_kind,
        "resolution_s": resolution_s,
        "from": format_ts(start),
        "to": format_ts(datetime.fromtimestamp(start.timestamp() + resolution_s, UTC)),
        "replaces": {"records": records, "first_seq": first, "last_seq": last},
    }
    if of_kind == "health":
        # A snapshot does not average: the newest one stands for its bucket.
        newest = bodies[-1]
        out["last"] = newest.get("last", newest) if rows[-1].kind == ROLLUP_KIND else newest
        return out
    channels: dict[str, dict[str, _Stat]] = {}
    score: float | None = None
    quality: set[str] = set()
    position: Any = None
    for row, body in zip(rows, bodies, strict=True):
        rolled = row.kind == ROLLUP_KIND
        for channel, features in (body.get("channels") or {}).items():
            if not isinstance(features, dict):
                continue
            stats = channels.setdefault(channel, {})
            for name, value in features.items():
                stat = stats.setdefault(name, _Stat())
                if rolled:
                    stat.add_stat(value)
                else:
                    stat.add_value(value)
        found = body.get("anomaly_score_max" if rolled else "anomaly_score")
        if isinstance(found, int | float) and math.isfinite(found):
            score = found if score is None else max(score, found)
        quality.update(str(q) for q in body.get("quality") or ())
        position = body.get("position", position)
    out["channels"] = {
        channel: {name: stat.to_dict() for name, stat in stats.items()}
        for channel, stats in channels.items()
    }
    if score is not None:
        out["anomaly_score_max"] = _round(score)
    if quality:
        out["quality"] = sorted(quality)
    if position is not None:
        out["position"] = position
    return out


# ------------------------------------------------------------------------------ one chunk


@dataclass(frozen=True)
class _ChunkResult:
    tallies: tuple[TierTally, ...]
    next_after: int
    done: bool  # reached the tier's age (or the end of the journal)
    progressed: bool


def protected_spans(
    conn: sqlite3.Connection, guard_records: int
) -> tuple[list[tuple[int, int]], list[int]]:
    """The spans of telemetry seqs no rollup may touch ((cursor, guard end] per registered
    destination) and the seqs no rollup may span (cursors, guard ends and the journal identity's
    boundaries)."""
    spans: list[tuple[int, int]] = []
    cuts: set[int] = set()
    for (cursor,) in conn.execute(
        "SELECT acked_seq FROM cursors WHERE priority = ?", (int(Priority.TELEMETRY),)
    ).fetchall():
        row = conn.execute(
            "SELECT seq FROM records WHERE priority = ? AND seq > ? ORDER BY seq LIMIT 1 OFFSET ?",
            (int(Priority.TELEMETRY), int(cursor), max(0, guard_records - 1)),
        ).fetchone()
        guard_end = int(row[0]) if row else 2**62
        spans.append((int(cursor), guard_end))
        cuts.update((int(cursor), guard_end))
    identity = read_identity(conn)
    if identity is not None:
        if identity.legacy_high_water:
            cuts.add(identity.legacy_high_water)
        cuts.update(last for last, _ in identity.earlier)
    return spans, sorted(cuts)


def _roll_chunk(
    conn: sqlite3.Connection,
    *,
    resolution_s: int,
    cutoff_ts: str,
    after_seq: int,
    limit: int,
    spans: Sequence[tuple[int, int]],
    cuts: Sequence[int],
) -> _ChunkResult:
    """Roll up one chunk of telemetry (seq order, after `after_seq`) older than `cutoff_ts`, in
    the caller's transaction. Buckets that may go on past the chunk wait for the next one."""
    found = conn.execute(
        "SELECT seq, appliance_id, boot_id, ts, mono_ns, source, kind, model, body, size "
        "FROM records WHERE priority = ? AND seq > ? ORDER BY seq LIMIT ?",
        (int(Priority.TELEMETRY), after_seq, limit),
    ).fetchall()
    rows: list[_Row] = []
    reached_age = len(found) < limit
    for values in found:
        row = _Row(*values)
        if row.ts >= cutoff_ts:
            reached_age = True
            break
        rows.append(row)
    if not rows:
        return _ChunkResult((), after_seq, True, False)
    # A bucket is complete when the chunk reaches past its end by a resolution (a long window
    # is journalled when it closes, after shorter ones that started later).
    horizon = (
        parse_ts(cutoff_ts).timestamp()
        if reached_age
        else parse_ts(rows[-1].ts).timestamp() - resolution_s
    )
    # Grouped before any body is parsed: most records of a slow source sit alone in their
    # bucket and are left as they are, so their JSON is never read.
    grouped: dict[tuple[str, str, int, int], list[_Row]] = {}
    deferred: list[int] = []
    for row in rows:
        if row.kind not in ROLLED_KINDS or any(lo < row.seq <= hi for lo, hi in spans):
            continue
        bucket = int(parse_ts(row.ts).timestamp() // resolution_s) * resolution_s
        if bucket + resolution_s > horizon:
            deferred.append(row.seq)
            continue
        rolled = _rolled_kind(row.body) if row.kind == ROLLUP_KIND else row.kind
        if rolled is None:  # a rollup whose body is not one: left as it is
            continue
        key = (row.source, rolled, bucket, bisect.bisect_left(cuts, row.seq))
        grouped.setdefault(key, []).append(row)
    groups: dict[tuple[str, str, int, int], list[tuple[_Row, dict[str, Any]]]] = {}
    for key, alike in grouped.items():
        if len(alike) > 1:
            groups[key] = [(row, body) for row in alike if (body := _parse(row.body)) is not None]
    tallies: dict[str, TierTally] = {}
    counts: dict[str, list[int]] = {}
    for (source, of_kind, bucket, _segment), members in groups.items():
        if len(members) < 2:
            continue
        group_rows = [m[0] for m in members]
        bodies = [m[1] for m in members]
        start = datetime.fromtimestamp(bucket, UTC)
        body_json = _encode(aggregate(group_rows, bodies, of_kind, start, resolution_s))
        last = group_rows[-1]
        size = len(body_json) + RECORD_OVERHEAD_BYTES
        conn.executemany("DELETE FROM records WHERE seq = ?", [(r.seq,) for r in group_rows])
        conn.execute(
            "INSERT INTO records (seq, appliance_id, boot_id, ts, mono_ns, source, kind, "
            "priority, model, body, payloads, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
            (
                last.seq,
                last.appliance_id,
                last.boot_id,
                format_ts(start),
                last.mono_ns,
                source,
                ROLLUP_KIND,
                int(Priority.TELEMETRY),
                last.model,
                body_json,
                size,
            ),
        )
        for row in group_rows:
            change = counts.setdefault(row.kind, [0, 0])
            change[0] -= 1
            change[1] -= row.size
        change = counts.setdefault(ROLLUP_KIND, [0, 0])
        change[0] += 1
        change[1] += size
        mine = tallies.setdefault(
            of_kind, TierTally(resolution_s, of_kind, first_seq=group_rows[0].seq)
        )
        mine.records += sum(r.replaces(b)[0] for r, b in members)
        mine.rollups += 1
        mine.bytes_before += sum(r.size for r in group_rows)
        mine.bytes_after += size
        mine.first_seq = min(mine.first_seq, group_rows[0].seq)
        mine.last_seq = max(mine.last_seq, last.seq)
    for kind, (records, size_change) in counts.items():
        conn.execute(
            "INSERT INTO counts (priority, kind, records, bytes) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(priority, kind) DO UPDATE SET records = records + excluded.records, "
            "bytes = bytes + excluded.bytes",
            (int(Priority.TELEMETRY), kind, records, size_change),
        )
    for tally in tallies.values():
        conn.execute(
            "INSERT INTO rollups (resolution_s, of_kind, records, rollups, bytes_before, "
            "bytes_after) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(resolution_s, of_kind) DO UPDATE "
            "SET records = records + excluded.records, rollups = rollups + excluded.rollups, "
            "bytes_before = bytes_before + excluded.bytes_before, "
            "bytes_after = bytes_after + excluded.bytes_after",
            (
                resolution_s,
                tally.of_kind,
                tally.records,
                tally.rollups,
                tally.bytes_before,
                tally.bytes_after,
            ),
        )
    # The next chunk starts before the first bucket left for later; everything before it was
    # rolled up or is staying as it is.
    next_after = (min(deferred) - 1) if deferred else rows[-1].seq
    return _ChunkResult(
        tuple(tallies.values()),
        max(after_seq, next_after),
        reached_age and not deferred,
        next_after > after_seq or bool(tallies),
    )


# ------------------------------------------------------------------------------ the job


class TelemetryRollup:
    """Walks the tiers of `storage.tiers`, finest first, once per ROLLUP_INTERVAL_S (and when
    retention asks, before it evicts); journals a `rollup_pass` record per pass that did some."""

    def __init__(
        self,
        journal: Journal,
        settings: StorageSection,
        batch_records: int,
        interval_s: float = ROLLUP_INTERVAL_S,
    ) -> None:
        self.journal = journal
        self.tiers = [(t.after, int(t.resolution)) for t in settings.tiers]
        self.guard_records = GUARD_BATCHES * batch_records
        self.interval_s = interval_s
        self._next_due = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.tiers)

    def due(self) -> bool:
        return self.enabled and time.monotonic() >= self._next_due

    async def run_once(self, now: datetime | None = None) -> RollupReport:
        """One pass over every tier; `now` is the data time the ages count from (default:
        the clock)."""
        self._next_due = time.monotonic() + self.interval_s
        report = RollupReport()
        moment = now or datetime.now(UTC)
        for after, resolution in self.tiers:
            cutoff = datetime.fromtimestamp(
                (moment.timestamp() - after) // resolution * resolution, UTC
            )
            for tally in await self._roll_tier(resolution, format_ts(cutoff)):
                report.add(tally)
        if report.records:
            log.info(
                "rolled up telemetry",
                extra={
                    "fields": {
                        f"{t.of_kind}@{t.resolution_s}s": t.records for t in report.tallies.values()
                    }
                },
            )
            await self.journal.append(
                NewRecord(
                    source="retention",
                    kind=REPORT_KIND,
                    priority=Priority.EVENT,
                    body=report.body(),
                ),
                wait_for_space=False,
                force=True,
            )
        return report

    async def _roll_tier(self, resolution: int, cutoff_ts: str) -> list[TierTally]:
        key = _WATERMARK_KEY.format(resolution=resolution)
        after = int(await self.journal.read(lambda r: r.meta(key)) or 0)
        limit = _CHUNK_ROWS
        tallies: list[TierTally] = []
        while True:
            result = await self.journal.execute_write(
                functools.partial(
                    self._chunk,
                    resolution=resolution,
                    cutoff_ts=cutoff_ts,
                    after=after,
                    limit=limit,
                    key=key,
                ),
                transaction=False,
            )
            tallies.extend(result.tallies)
            if result.done:
                break
            if not result.progressed:
                if limit >= _MAX_CHUNK_ROWS:
                    break
                limit = min(_MAX_CHUNK_ROWS, limit * 4)  # a bucket wider than the chunk
                continue
            after = result.next_after
        return tallies

    def _chunk(
        self,
        conn: sqlite3.Connection,
        resolution: int,
        cutoff_ts: str,
        after: int,
        limit: int,
        key: str,
    ) -> _ChunkResult:
        conn.execute("BEGIN IMMEDIATE")
        try:
            spans, cuts = protected_spans(conn, self.guard_records)
            result = _roll_chunk(
                conn,
                resolution_s=resolution,
                cutoff_ts=cutoff_ts,
                after_seq=after,
                limit=limit,
                spans=spans,
                cuts=cuts,
            )
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, str(result.next_after)),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return result


def rollup_totals(rows: Iterable[tuple[int, str, int, int, int, int]]) -> list[TierTally]:
    """`JournalReader.rollups()` rows as tallies (for status)."""
    return [TierTally(r, k, n, m, b, a) for r, k, n, m, b, a in rows]
