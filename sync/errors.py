"""The sync package's exceptions: retryable (space, a busy link) versus permanent (corruption, misuse)."""

from __future__ import annotations


class SyncError(Exception):
    """Base of the store-and-forward errors. `retryable` tells callers whether to try again."""

    retryable = False


class JournalClosed(SyncError):
    """The journal was closed; nothing more can be appended."""


class JournalLocked(SyncError):
    """Another process holds the journal for writing (the daemon, a replay, a sync --now)."""

    def __init__(self, path: str, holder: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(f"the journal in {path} is open for writing by {holder}")


class JournalMissing(SyncError):
    """No journal exists in the data directory (the appliance has not run there)."""

    def __init__(self, path: str, detail: str | None = None) -> None:
        self.path = path
        super().__init__(
            detail or f"no journal at {path}; has the appliance run with this data directory?"
        )


class JournalTooNew(SyncError):
    """The journal was written by a newer version of the appliance (a downgrade): this version
    does not know some of its schema migrations and will not touch it."""


class StorageFull(SyncError):
    """The disk (or the disk budget) has no room for a record of this priority right now.

    Retryable: retention frees space and the appliance recovers by itself when it returns.
    """

    retryable = True

    def __init__(self, priority: str | None, reason: str = "disk_full") -> None:
        self.priority = priority
        self.reason = reason
        what = f"{priority} records" if priority else "payloads"
        super().__init__(f"storage full ({reason}): {what} are not being accepted right now")


class PayloadError(SyncError):
    """A payload that cannot be stored or read (bad name, wrong size, unreadable file)."""
