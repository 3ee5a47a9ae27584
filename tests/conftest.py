"""Shared fixtures: a real journal (SQLite file in tmp_path) with its payload store, a real
PostgreSQL server for the receiver's fleet store (one per test session, a fresh database per
test), and a real S3-compatible server (SeaweedFS, one per session)."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, async_playwright

from config import JournalSection
from sync import Journal, PayloadStore
from tests.helpers import component_missing
from tests.postgres import PostgresServer, create_database
from tests.seaweed import S3Server, run_seaweedfs

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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the session. Its folder is under /tmp itself, not pytest's
    per-user temp folder: as root the server runs as nobody, who must reach it."""
    folder = Path(tempfile.mkdtemp(prefix="appliance-postgres-"))
    folder.chmod(0o755)
    server = PostgresServer(folder / "cluster")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    return create_database(postgres_server, f"test_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> str | None:
    """Each store the receiver has: receiver.db (None), and PostgreSQL (its DSN)."""
    if request.param == "sqlite":
        return None
    dsn: str = request.getfixturevalue("postgres_dsn")
    return dsn


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS server for the session (tests/seaweed.py); tests keep apart by key prefix."""
    yield from run_seaweedfs(tmp_path_factory)


CHROMIUM = Path("/usr/bin/chromium")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium (never a downloaded one), one per test module."""
    if not CHROMIUM.exists():  # noqa: ASYNC240 -- one stat before anything runs
        component_missing("chromium (Debian package chromium)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            yield launched
        finally:
            await launched.close()
