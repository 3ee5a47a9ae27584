"""The store-and-forward core: the SQLite journal, the payload store and retention. Imports only config."""

from sync.errors import (
    JournalClosed,
    JournalLocked,
    JournalMissing,
    PayloadError,
    StorageFull,
    SyncError,
)
from sync.journal import Journal
from sync.payloads import PayloadStore
from sync.reader import JOURNAL_FILE, JournalReader
from sync.records import NewRecord, PayloadRef, Priority, StoredRecord
from sync.retention import StorageGuard, Usage

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
    "Usage",
]
