"""The store-and-forward core: the SQLite journal, the payload store and retention. Imports only config.

The writer's side (`Journal`, `StorageGuard`: SQLite migrations through sqlite-utils) is loaded on
first use, so a command that only reads the journal (`appliance status`, `export`) starts without it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sync.errors import (
    JournalClosed,
    JournalLocked,
    JournalMissing,
    PayloadError,
    StorageFull,
    SyncError,
)
from sync.payloads import PayloadStore
from sync.reader import JOURNAL_FILE, JournalReader
from sync.records import NewRecord, PayloadRef, Priority, StoredRecord

if TYPE_CHECKING:
    from sync.journal import Journal
    from sync.retention import StorageGuard, Usage
    from sync.rollup import TelemetryRollup

_ON_FIRST_USE = {
    "Journal": "sync.journal",
    "StorageGuard": "sync.retention",
    "Usage": "sync.retention",
    "TelemetryRollup": "sync.rollup",
}


def __getattr__(name: str) -> Any:
    module = _ON_FIRST_USE.get(name)
    if module is None:
        raise AttributeError(f"module 'sync' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "JOURNAL_FILE",
    "Journal",
    "JournalClosed",
    "JournalLocked",
    "JournalMissing",
    "JournalReader",
    "NewRecord",
    "PayloadError",
    "PayloadRef",
    "PayloadStore",
    "Priority",
    "StorageFull",
    "StorageGuard",
    "StoredRecord",
    "SyncError",
    "TelemetryRollup",
    "Usage",
]
