"""`appliance export`: journal records to stdout as NDJSON or CSV, a page at a time."""

from __future__ import annotations

import csv
from typing import TextIO

from sync import JournalReader

CSV_COLUMNS = (
    "seq",
    "ts",
    "source",
    "kind",
    "priority",
    "model",
    "appliance_id",
    "journal_id",
    "boot_id",
    "mono_ns",
    "payloads",
    "body",
)


def export_records(
    reader: JournalReader, out: TextIO, *, kind: str | None, since: str | None, fmt: str
) -> int:
    """Write matching records; return how many."""
    written = 0
    writer = csv.writer(out) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(CSV_COLUMNS)
    identity = reader.identity()
    for record in reader.iter_records(kind=kind, since=since):
        journal_id = None if identity is None else identity.shipped_as(record.seq)
        if writer is not None:
            writer.writerow(
                (
                    record.seq,
                    record.ts,
                    record.source,
                    record.kind,
                    record.priority.label,
                    record.model or "",
                    record.appliance_id,
                    journal_id or "",
                    record.boot_id,
                    record.mono_ns,
                    " ".join(record.payloads),
                    record.body_json,
                )
            )
        else:
            out.write(record.to_json_line(journal_id))
            out.write("\n")
        written += 1
    return written
