"""Shared fixtures: a real journal (SQLite file in tmp_path) with its payload store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from config import JournalSection
from sync import Journal, PayloadStore

APPLIANCE_ID = "test-appliance"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """The appliance data directory: journal.db, journal.seq and payloads/ live here."""
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def payload_store(data_dir: Path) -> PayloadStore:
    return PayloadStore(data_dir / "payloads")


@pytest.fixture
def journal_settings() -> JournalSection:
    """Override in a test module to open the `journal` fixture with other settings."""
    return JournalSection()


@pytest.fixture
async def journal(
    data_dir: Path, payload_store: PayloadStore, journal_settings: JournalSection
) -> AsyncIterator[Journal]:
    """An open journal on a fresh data directory, closed (and so flushed) after the test."""
    opened = await Journal.open(
        data_dir, appliance_id=APPLIANCE_ID, settings=journal_settings, payloads=payload_store
    )
    try:
        yield opened
    finally:
        await opened.close()
