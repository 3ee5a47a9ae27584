"""The status page and its API: against the real daemon in a subprocess, and in-process over a
real journal for image payloads, the token rules beyond loopback, the outage grace period, the
24-hour history (its series, its file across a restart, a corrupt file) and the event stream."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import itertools
import json
import logging
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import TypeAdapter

from appliance.status.health import HealthMonitor
from appliance.status.history import HISTORY_FILE, WINDOW_S, Figures, History
from appliance.status.schema import StatusFigures, StatusReport
from appliance.status.web import (
    SECURITY_HEADERS,
    STREAM_INTERVAL_S,
    StatusServer,
    read_status_token,
    server_sent_event,
)
from config import ApplianceConfig
from sensors.base import SourceHealth
from sync import Journal, NewRecord, PayloadStore, Priority, StorageGuard
from sync.engine import SyncEngine
from sync.records import parse_ts
from sync.targets import make_target
from tests.helpers import (
    fast_sensor,
    log_events,
    run_cli,
    start_daemon,
    status_json,
    stop_daemon,
    wait_for,
    write_config,
)

TOKEN = "status-token-for-tests-0123456789"
METRIC_NAMES = {
    "appliance_records_journalled_total",
    "appliance_records_acknowledged_total",
    "appliance_journal_records",
    "appliance_sync_backlog_records",
    "appliance_sync_backlog_bytes",
    "appliance_sync_oldest_unsynced_seconds",
    "appliance_evictions_total",
    "appliance_rollup_records_replaced_total",
    "appliance_rollups_written_total",
    "appliance_rollup_saved_bytes_total",
    "appliance_data_quality_total",
    "appliance_source_up",
    "appliance_source_reconnects_total",
    "appliance_disk_used_bytes",
    "appliance_disk_budget_bytes",
    "appliance_uptime_seconds",
    "appliance_info",
}


def fetch(
    url: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request: (status, headers, body), whatever the status."""
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def get_json(url: str) -> Any:
    status, _, body = fetch(url)
    assert status == 200, body
    return json.loads(body)


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics answer by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def status_url(log: Path) -> str:
    def announced() -> str | None:
        try:
            events = log_events(log)
        except json.JSONDecodeError:  # a line still being written
            return None
        urls = [e["url"] for e in events if e["msg"] == "status page listening"]
        return urls[-1].rstrip("/") if urls else None

    return wait_for(announced, 30, "the status page to listen")


def assert_secure(headers: dict[str, str]) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert headers.get(name) == value, name
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert "unsafe-inline" not in headers["Content-Security-Policy"]


def journal_count(data: Path, sql: str) -> int:
    conn = sqlite3.connect(f"{(data / 'journal.db').as_uri()}?mode=ro", uri=True)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


def test_the_running_daemon_serves_status_events_metrics_and_sync(tmp_path: Path) -> None:
    data = tmp_path / "data"
    token_file = tmp_path / "status.token"
    token_file.write_text(TOKEN + "\n")
    config = write_config(
        tmp_path / "c.yaml",
        data,
        # A finite source: once it has finished the journal stops changing, so the page's
        # figures can be compared with `appliance status` exactly.
        [fast_sensor("a", duration="1500ms", sample_raw_every=5)],
        appliance={"health_interval": "1h"},
        sync={
            "interval": "1h",
            "destinations": [{"name": "usb", "type": "directory", "path": "outbox"}],
        },
        status={"token_file": str(token_file)},
    )
    log = tmp_path / "daemon.log"
    proc = start_daemon(config, log)
    try:
        base = status_url(log)
        assert base.startswith("http://127.0.0.1:") and not base.endswith(":0")
        wait_for(
            lambda: (
                get_json(f"{base}/api/status")["daemon"]["components"]
                .get("source:a", {})
                .get("state")
                == "finished"
            ),
            30,
            "the finite source to finish",
            interval=0.3,
        )

        status, headers, body = fetch(f"{base}/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        assert_secure(headers)

        # The same figures as `appliance status --json` (cached for up to 2 s: wait past it).
        cli = status_json(config)
        api = wait_for(
            lambda: (
                (r := get_json(f"{base}/api/status"))["records"]["by_priority"]
                == cli["records"]["by_priority"]
                and r
            ),
            5,
            "the page's figures to match status --json",
            interval=0.5,
        )
        assert api["records"]["total"] == cli["records"]["total"] > 0
        assert api["state"] == "ok" and api["reasons"] == []
        # Both answers have the shape the page, /metrics and mypy rely on (appliance/status/schema.py).
        TypeAdapter(StatusReport).validate_python(api, strict=True)
        TypeAdapter(StatusFigures).validate_python(cli, strict=True)
        assert api["status_url"].rstrip("/") == base
        assert api["daemon"]["sources"]["a"]["state"] == "finished"
        usb = api["destinations"]["usb"]
        assert usb["backlog_records"] == cli["destinations"]["usb"]["backlog_records"] > 0

        # Events: newest first, alerts and events only, limit honoured, bad limits named.
        events = get_json(f"{base}/api/events?limit=500")["events"]
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == len(seqs)
        assert {e["priority"] for e in events} <= {"alert", "event"}
        assert len(events) == journal_count(
            data, "SELECT COUNT(*) FROM records WHERE priority IN (1, 2)"
        )
        assert any(e["kind"] == "lifecycle" for e in events)
        assert any(e["priority"] == "alert" for e in events)  # the peak limit toggles
        assert {"seq", "ts", "source", "kind", "priority", "model", "body", "payloads"} <= set(
            events[0]
        )
        assert get_json(f"{base}/api/events?limit=3")["events"] == events[:3]
        assert len(get_json(f"{base}/api/events")["events"]) == min(50, len(events))
        for bad in ("0", "501", "ten", "-1"):
            status, _, body = fetch(f"{base}/api/events?limit={bad}")
            assert status == 400 and b"limit" in body

        # Metrics: Prometheus text with the conventional names and values that agree.
        status, headers, body = fetch(f"{base}/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert_secure(headers)
        text = body.decode()
        assert "# HELP appliance_journal_records " in text
        families = list(text_string_to_metric_families(text))
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in families
            for s in family.samples
        }
        # A counter family without samples yet (no evictions) still declares its name.
        declared = {f.name + ("_total" if f.type == "counter" else "") for f in families}
        assert declared >= METRIC_NAMES
        records = sum(v for (n, _), v in samples.items() if n == "appliance_journal_records")
        assert records == api["records"]["total"]
        # Nothing evicted yet: every seq taken is a record still in the journal.
        assert samples[("appliance_records_journalled_total", ())] == api["last_seq"] == records
        backlog = sum(
            v
            for (n, labels), v in samples.items()
            if n == "appliance_sync_backlog_records" and ("destination", "usb") in labels
        )
        assert backlog == usb["backlog_records"]
        assert samples[("appliance_source_up", (("source", "a"),))] == 0.0  # finished
        assert samples[("appliance_disk_budget_bytes", ())] == 20 * 1024**3
        assert samples[("appliance_disk_used_bytes", ())] > 0
        assert samples[("appliance_uptime_seconds", ())] > 0
        assert samples[("appliance_sync_oldest_unsynced_seconds", ())] > 0
        info = [labels for n, labels in samples if n == "appliance_info"]
        assert info and ("appliance_id", "test-01") in info[0]

        # The page itself: escaped, phone-friendly, its script and style from this server.
        status, headers, body = fetch(f"{base}/")
        page = body.decode()
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert_secure(headers)
        assert 'name="viewport"' in page and "test-01" in page and "Sync now" in page
        assert '<script src="/app.js"' in page and "<script>" not in page
        status, headers, body = fetch(f"{base}/app.js")
        assert status == 200 and b"/api/status" not in body and b"/partial" in body
        status, _, body = fetch(f"{base}/partial")
        assert status == 200 and b"usb" in body

        # Sync: the token is always needed; the request does not wait for the drain.
        assert fetch(f"{base}/api/sync", method="POST")[0] == 401
        wrong = {"Authorization": "Bearer not-the-token-at-all-0000"}
        assert fetch(f"{base}/api/sync", method="POST", headers=wrong)[0] == 401
        right = {"Authorization": f"Bearer {TOKEN}"}
        status, _, body = fetch(f"{base}/api/sync?destination=nope", method="POST", headers=right)
        assert status == 400 and b"nope" in body and b"usb" in body
        status, _, body = fetch(f"{base}/api/sync", method="POST", headers=right)
        assert status == 202 and json.loads(body)["started"] == ["usb"]
        wait_for(
            lambda: get_json(f"{base}/api/status")["destinations"]["usb"]["backlog_records"] == 0,
            20,
            "the requested sync to drain the backlog",
            interval=0.5,
        )
        shipped = list((data / "outbox").glob("records/test-01/*/*/*.ndjson.gz"))
        assert shipped

        # The counters agree: with nothing waiting, every record journalled was acknowledged
        # (all by this run of the daemon, which the acknowledged counter counts from).
        def drained_metrics() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            found = metric_samples(fetch(f"{base}/metrics")[2].decode())
            age = found[("appliance_sync_backlog_age_seconds", (("destination", "usb"),))]
            return found if age == 0.0 else None

        drained = wait_for(
            drained_metrics,
            5,
            "/metrics to show the drained backlog",
            interval=0.5,
        )
        acked = drained[("appliance_records_acknowledged_total", (("destination", "usb"),))]
        assert acked == drained[("appliance_records_journalled_total", ())] > 0
        assert drained[("appliance_sync_sent_bytes_total", (("destination", "usb"),))] > 0

        # Payloads: names are sha256 hex only; nothing else reaches the file system.
        for bad in ("abc", "A" * 64, "..%2Fjournal.db", "%2E%2E%2Fjournal.db", "g" * 64):
            status, headers, body = fetch(f"{base}/payloads/{bad}")
            assert status in (400, 404), bad
            assert b"SQLite" not in body
            assert_secure(headers)
        assert fetch(f"{base}/payloads/../journal.db")[0] == 404
        status, headers, _ = fetch(f"{base}/no-such-page")
        assert status == 404
        assert_secure(headers)  # errors from the router carry the headers too
        assert fetch(f"{base}/payloads/{'0' * 64}")[0] == 404
        # A stored payload that is no image (a raw sample window) is not served either.
        sample = journal_count(data, "SELECT COUNT(*) FROM payloads WHERE state = 'present'")
        assert sample > 0
        conn = sqlite3.connect(f"{(data / 'journal.db').as_uri()}?mode=ro", uri=True)
        try:
            sha, media = conn.execute("SELECT sha256, media_type FROM payloads LIMIT 1").fetchone()
        finally:
            conn.close()
        assert not str(media).startswith("image/")
        assert fetch(f"{base}/payloads/{sha}")[0] == 404
    finally:
        assert stop_daemon(proc) == 0


def test_a_dead_source_makes_healthz_503_and_sync_without_a_token_is_refused(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "c.yaml",
        data,
        [
            {"name": "vanished", "type": "csv", "path": str(tmp_path / "not-there.csv")},
            fast_sensor("ok"),
        ],
        appliance={"restart_budget": 1, "restart_window": "1m"},
        sync={
            "interval": "1h",
            "destinations": [{"name": "usb", "type": "directory", "path": "o"}],
        },
    )
    log = tmp_path / "daemon.log"
    proc = start_daemon(config, log)
    try:
        base = status_url(log)

        def degraded() -> dict[str, Any] | None:
            status, headers, body = fetch(f"{base}/healthz")
            assert status in (200, 503)
            assert_secure(headers)
            return json.loads(body) if status == 503 else None

        answer = wait_for(degraded, 30, "healthz to report the dead source", interval=0.3)
        assert answer["status"] == "degraded"
        assert "component_degraded:source:vanished" in answer["reasons"]
        api = get_json(f"{base}/api/status")
        assert api["state"] == "degraded" and api["daemon"]["sources"]["ok"]["state"] == "running"
        status, _, body = fetch(
            f"{base}/api/sync", method="POST", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert status == 403 and b"status.token_file" in body
    finally:
        assert stop_daemon(proc) == 0


def test_a_network_address_without_a_token_refuses_to_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "c.yaml", data, [fast_sensor("a")], status={"listen": "0.0.0.0:0"}
    )
    result = run_cli("run", "-c", str(config))
    assert result.returncode == 2, result.stderr
    assert "status.listen" in result.stderr and "status.token_file" in result.stderr
    assert not (data / "journal.db").exists()  # refused before anything opened

    short = tmp_path / "short.token"
    short.write_text("abc\n")
    config = write_config(
        tmp_path / "c2.yaml",
        data,
        [fast_sensor("a")],
        status={"listen": "0.0.0.0:0", "token_file": str(short)},
    )
    result = run_cli("run", "-c", str(config))
    assert result.returncode == 2 and "status.token_file" in result.stderr


# ------------------------------------------------------------------------------ in-process


class Appliance:
    """The parts the status server reads, real ones over a journal in tmp_path."""

    def __init__(self, server: StatusServer, journal: Journal, monitor: HealthMonitor) -> None:
        self.server = server
        self.journal = journal
        self.monitor = monitor
        assert server.url is not None
        self.base = server.url.replace("0.0.0.0", "127.0.0.1").rstrip("/")


@asynccontextmanager
async def serve(
    tmp_path: Path,
    *,
    destination: bool = False,
    history_interval_s: float = 60.0,
    stream_interval_s: float = STREAM_INTERVAL_S,
) -> AsyncIterator[Appliance]:
    """A status server beyond loopback (so every route needs the token) over a real journal in
    tmp_path, with a real directory destination and its sync engine when `destination`. Entered
    again on the same tmp_path, it is the same appliance restarted."""
    token_file = tmp_path / "status.token"
    token_file.write_text(TOKEN)
    data = tmp_path / "data"
    sync: dict[str, Any] = {"interval": "1h", "destinations": []}
    if destination:
        sync["destinations"] = [{"name": "usb", "type": "directory", "path": "outbox"}]
    cfg = ApplianceConfig.model_validate(
        {
            "appliance": {"id": "web-01", "data_dir": str(data)},
            "status": {"listen": "0.0.0.0:0", "token_file": str(token_file)},
            "sync": sync,
        }
    )
    store = PayloadStore(data / "payloads")
    journal = await Journal.open(data, appliance_id="web-01", payloads=store)
    try:
        async with AsyncExitStack() as stack:
            guard = await stack.enter_async_context(StorageGuard(journal, store, cfg.storage))
            cameras = [camera.name for camera in cfg.cameras]
            monitor = HealthMonitor(journal, guard, mode="run", camera_names=cameras, grace_s=0.3)
            engines = []
            for dest in cfg.sync.destinations:  # wired as the daemon wires them
                target = await stack.enter_async_context(
                    make_target(dest, cfg.appliance.id, data, cfg.sync.chunk_size)
                )
                engine = SyncEngine(journal, store, target, dest, cfg.sync)
                monitor.destinations[dest.name] = engine.state
                engines.append(engine)
            history = History(
                data / HISTORY_FILE, appliance_id="web-01", interval_s=history_interval_s
            )
            server = await stack.enter_async_context(
                StatusServer(
                    cfg,
                    journal,
                    store,
                    monitor,
                    engines,
                    token=read_status_token(cfg.status),
                    history=history,
                    stream_interval_s=stream_interval_s,
                )
            )
            yield Appliance(server, journal, monitor)
    finally:
        await journal.close()


@pytest.fixture
async def appliance(tmp_path: Path) -> AsyncIterator[Appliance]:
    async with serve(tmp_path) as running:
        yield running


async def test_beyond_loopback_every_route_needs_the_token(appliance: Appliance) -> None:
    base = appliance.base
    jar = aiohttp.CookieJar(unsafe=True)  # the page is reached by IP address
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        for path in (
            "/",
            "/partial",
            "/healthz",
            "/api/status",
            "/api/events",
            "/api/history",
            "/api/stream",
            "/metrics",
            "/app.js",
        ):
            async with session.get(f"{base}{path}") as response:
                assert response.status == 401, path
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
                assert_secure(dict(response.headers))
        async with session.get(f"{base}/healthz?token=wrong-token-0123456789") as response:
            assert response.status == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        async with session.get(f"{base}/healthz", headers=bearer) as response:
            assert response.status == 200 and await response.json() == {"status": "ok"}

        # A browser opens /?token= once: an HttpOnly, SameSite=Strict cookie, the token dropped.
        async with session.get(f"{base}/?token={TOKEN}", allow_redirects=False) as response:
            assert response.status == 303 and response.headers["Location"] == "/"
            cookie = response.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
        async with session.get(f"{base}/api/status") as response:
            assert response.status == 200
            assert (await response.json())["appliance_id"] == "web-01"
        async with session.get(f"{base}/") as response:
            assert response.status == 200 and "web-01" in await response.text()
        # The cookie opens the pages, never POST /api/sync: that needs the header.
        async with session.post(f"{base}/api/sync") as response:
            assert response.status == 401
        async with session.post(f"{base}/api/sync", headers=bearer) as response:
            assert response.status == 409 and "sync.destinations" in await response.text()


async def test_image_payloads_are_served_by_sha256_and_nothing_else(appliance: Appliance) -> None:
    image = b"\xff\xd8\xff\xe0 not really a jpeg, the server never decodes it \xff\xd9"
    store = appliance.server.store
    snapshot = await store.put(image, "image/jpeg")
    raw = await store.put(b"raw window bytes", "application/octet-stream")
    svg = await store.put(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml")
    for index, refs in enumerate(((snapshot, raw), (svg,))):
        await appliance.journal.append(
            NewRecord(
                source="cam",
                kind="zone_entry",
                priority=Priority.ALERT,
                body={"zone": "door", "n": index},
                payloads=refs,
            )
        )
    await appliance.journal.append(
        NewRecord(source="a", kind="reading", priority=Priority.TELEMETRY, body={"v": 1})
    )
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(f"{appliance.base}/api/events?limit=10") as response:
            events = (await response.json())["events"]
        assert [e["body"]["n"] for e in events] == [1, 0]  # newest first, no telemetry
        first = {p["sha256"]: p for p in events[1]["payloads"]}
        assert first[snapshot.sha256]["url"] == f"/payloads/{snapshot.sha256}"
        assert first[raw.sha256]["url"] is None
        assert events[0]["payloads"][0]["url"] is None  # SVG: a document, not served

        async with session.get(f"{appliance.base}/payloads/{snapshot.sha256}") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "image/jpeg"
            assert await response.read() == image
            assert_secure(dict(response.headers))
        for ref in (raw, svg):
            async with session.get(f"{appliance.base}/payloads/{ref.sha256}") as response:
                assert response.status == 404
        missing = hashlib.sha256(b"never stored").hexdigest()
        async with session.get(f"{appliance.base}/payloads/{missing}") as response:
            assert response.status == 404
        async with session.get(f"{appliance.base}/payloads/{snapshot.sha256.upper()}") as resp:
            assert resp.status == 400

        async with session.get(f"{appliance.base}/") as response:
            page = await response.text()
        assert f'<img src="/payloads/{snapshot.sha256}"' in page
        assert "zone_entry" in page


async def test_a_source_down_past_the_grace_period_makes_healthz_503(
    appliance: Appliance,
) -> None:
    health = SourceHealth(state="running")
    appliance.monitor.sources["plc"] = health  # as the daemon registers a source's health
    headers = {"Authorization": f"Bearer {TOKEN}"}
    url = f"{appliance.base}/healthz"
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(url) as response:
            assert response.status == 200
        health.state = "reconnecting"
        async with session.get(url) as response:
            assert response.status == 200  # a short outage is normal
        await asyncio.sleep(0.4)
        async with session.get(url) as response:
            assert response.status == 503
            assert await response.json() == {
                "status": "degraded",
                "reasons": ["source_reconnecting:plc"],
            }
        # One judge: the journalled health record says what /healthz says.
        await appliance.monitor.record()
        health_records = await appliance.journal.read(lambda r: list(r.iter_records(kind="health")))
        assert health_records[-1].body["state"] == "degraded"
        assert health_records[-1].body["reasons"] == ["source_reconnecting:plc"]
        async with session.get(f"{appliance.base}/metrics") as response:
            text = await response.text()
        up = {
            s.labels["source"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "appliance_source_up"
        }
        assert up == {"plc": 0.0}
        health.state = "running"
        async with session.get(url) as response:
            assert response.status == 200


# ------------------------------------------------------------------------ history and stream

BEARER = {"Authorization": f"Bearer {TOKEN}"}


async def eventually(check: Callable[[], Any], within: float, what: str) -> Any:
    """Call `check` (awaiting what it returns, if awaitable) until it answers something
    truthy; fail naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


async def history_of(
    session: aiohttp.ClientSession, base: str, *, samples: int = 1
) -> dict[str, Any]:
    """GET /api/history once it holds `samples` samples (the first is taken just after the
    server starts listening)."""

    async def enough() -> dict[str, Any] | None:
        async with session.get(f"{base}/api/history") as response:
            assert response.status == 200
            assert_secure(dict(response.headers))
            doc: dict[str, Any] = await response.json()
            return doc if len(doc["samples"]) >= samples else None

    found: dict[str, Any] = await eventually(enough, 10, f"{samples} history samples")
    return found


def carried(samples: list[dict[str, Any]], rate: Callable[[dict[str, Any]], float | None]) -> float:
    """Records a per-minute series adds up to: each rate times the time since the sample before."""
    total = 0.0
    for before, sample in itertools.pairwise(samples):
        value = rate(sample)
        if value is not None:
            total += value * (sample["t"] - before["t"]) / 60.0
    return total


async def test_history_samples_backlog_and_throughput_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    records = 40
    async with (
        serve(tmp_path, destination=True, history_interval_s=0.2) as running,
        aiohttp.ClientSession(headers=BEARER) as session,
    ):

        async def history() -> dict[str, Any]:
            return await history_of(session, running.base)

        first = await history()
        assert {k: first[k] for k in ("format", "version", "appliance_id", "destinations")} == {
            "format": "appliance-status-history",
            "version": 1,
            "appliance_id": "web-01",
            "destinations": ["usb"],
        }
        assert first["interval_s"] == 0.2 and first["window_s"] == WINDOW_S
        start = first["samples"][0]  # taken as the server started: what waited then
        assert start["journalled_per_min"] is None  # no earlier total to make a rate from
        assert start["destinations"] == {
            "usb": {"backlog_records": 0, "backlog_bytes": 0, "acked_per_min": None}
        }
        assert abs(parse_ts(start["ts"]).timestamp() - start["t"]) < 0.001

        await running.journal.append_many(
            [
                NewRecord(source="a", kind="reading", priority=Priority.TELEMETRY, body={"i": i})
                for i in range(records)
            ]
        )

        async def backlog_is(wanted: int) -> dict[str, Any] | None:
            doc = await history()
            usb = doc["samples"][-1]["destinations"]["usb"]
            return doc if usb["backlog_records"] == wanted else None

        waiting = await eventually(lambda: backlog_is(records), 10, "the backlog in a sample")
        assert waiting["samples"][-1]["destinations"]["usb"]["backlog_bytes"] > 0
        async with session.post(f"{running.base}/api/sync") as response:
            assert response.status == 202
        doc = await eventually(lambda: backlog_is(0), 15, "the drained backlog in a sample")
        samples = doc["samples"]
        times = [s["t"] for s in samples]
        assert all(a < b for a, b in itertools.pairwise(times))
        # One a slot on a fixed grid: a slow read delays a sample, never the ones after it.
        assert 0.15 < (times[-1] - times[0]) / (len(times) - 1) < 0.3
        # The rates are per minute over each interval: added up they give back the records.
        assert carried(samples, lambda s: s["journalled_per_min"]) == pytest.approx(records, abs=1)
        acked = carried(samples, lambda s: s["destinations"]["usb"]["acked_per_min"])
        assert acked == pytest.approx(records, abs=1)
        async with session.get(f"{running.base}/") as response:
            page = await response.text()
        assert 'data-name="backlog"' in page and 'data-name="throughput"' in page
        assert page.count("<svg viewBox=") == 2 and 'role="img"' in page

    path = tmp_path / "data" / HISTORY_FILE
    saved = json.loads(path.read_text())
    assert saved["samples"][: len(samples)] == samples  # the stop wrote what was served
    assert not list(path.parent.glob(f".{HISTORY_FILE}.*"))  # no temporary file left

    async with (
        serve(tmp_path, destination=True, history_interval_s=0.2) as again,
        aiohttp.ClientSession(headers=BEARER) as session,
    ):
        old = len(saved["samples"])
        restarted = (await history_of(session, again.base, samples=old + 1))["samples"]
        assert restarted[:old] == saved["samples"]
        new = restarted[old]
        assert new["t"] > saved["samples"][-1]["t"] and new["journalled_per_min"] is None
        assert new["destinations"]["usb"]["backlog_records"] == 0
        async with session.get(f"{again.base}/partial") as response:
            fragment = await response.text()
        assert 'class="line s0" fill="none" d="M' in fragment


async def test_a_corrupt_history_file_is_set_aside_and_the_page_starts_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    garbage = b'{"format": "appliance-status-history", "samp\x00'
    (data / HISTORY_FILE).write_bytes(garbage)
    started = time.time()
    with caplog.at_level(logging.WARNING, logger="appliance.status.history"):
        async with (
            serve(tmp_path, history_interval_s=0.2) as running,
            aiohttp.ClientSession(headers=BEARER) as session,
        ):
            samples = (await history_of(session, running.base))["samples"]
            assert all(s["t"] >= started for s in samples)
            async with session.get(f"{running.base}/") as response:
                assert response.status == 200
    warnings = [r for r in caplog.records if r.getMessage().startswith("status history file")]
    assert len(warnings) == 1 and "not JSON" in warnings[0].fields["reason"]  # type: ignore[attr-defined]
    assert (data / f"{HISTORY_FILE}.bad").read_bytes() == garbage  # kept for a look
    assert json.loads((data / HISTORY_FILE).read_text())["format"] == "appliance-status-history"


def history_doc(**changes: Any) -> dict[str, Any]:
    sample = {
        "t": time.time() - 60,
        "journalled_per_min": 3.0,
        "destinations": {"usb": {"backlog_records": 5, "backlog_bytes": 500, "acked_per_min": 1.5}},
    }
    doc: dict[str, Any] = {
        "format": "appliance-status-history",
        "version": 1,
        "appliance_id": "web-01",
        "samples": [sample],
    }
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ({"samples": []}, "not a status history"),
        (history_doc(appliance_id="other-07"), "written by appliance 'other-07'"),
        (history_doc(version=9), "version 9"),
        (history_doc(samples={"t": 1}), "`samples` is not a list"),
        (history_doc(samples=[{"t": "yesterday", "destinations": {}}]), "sample 0: t"),
        (
            history_doc(
                samples=[
                    {"t": 1.0, "destinations": {"usb": {"backlog_records": -3, "backlog_bytes": 0}}}
                ]
            ),
            "backlog_records is -3",
        ),
    ],
)
def test_a_foreign_or_malformed_history_file_is_named_and_started_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, doc: dict[str, Any], reason: str
) -> None:
    path = tmp_path / HISTORY_FILE
    path.write_text(json.dumps(doc))
    history = History(path, appliance_id="web-01")
    with caplog.at_level(logging.WARNING, logger="appliance.status.history"):
        history.load()
    assert history.samples() == []
    (record,) = caplog.records
    assert reason in record.fields["reason"]  # type: ignore[attr-defined]
    assert not path.exists() and path.with_name(f"{HISTORY_FILE}.bad").exists()


def test_samples_older_than_a_day_or_from_the_future_are_dropped_on_load(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    path = tmp_path / HISTORY_FILE
    figures = Figures(journalled_total=0, backlog={"usb": (1, 10)}, acked_total={"usb": 0})
    writer = History(path, appliance_id="web-01", clock=lambda: now)
    for age in (25 * 3600, 23 * 3600, 3600, 60):
        writer.record(figures, now=now - age)
    writer.save()
    assert len(json.loads(path.read_text())["samples"]) == 3  # the ring keeps 24 h too
    future = json.loads(path.read_text())
    future["samples"].append({**future["samples"][-1], "t": now + 3600})
    path.write_text(json.dumps(future))
    reader = History(path, appliance_id="web-01", clock=lambda: now)
    reader.load()
    assert [now - s.t for s in reader.samples()] == [23 * 3600, 3600, 60]


class EventStream:
    """Reads a `text/event-stream` response block by block (an event, a comment, a retry)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def next(self, within: float = 10.0) -> dict[str, str]:
        fields: dict[str, str] = {}
        async with asyncio.timeout(within):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    raise EOFError("the stream ended")
                line = raw.decode().removesuffix("\n")
                if not line:
                    if fields:
                        return fields
                    continue
                name, _, value = line.partition(":")
                name = name or "comment"
                value = value.removeprefix(" ")
                fields[name] = f"{fields[name]}\n{value}" if name in fields else value


def test_an_event_carries_every_line_of_the_fragment_as_data() -> None:
    assert server_sent_event("live", "<p>a</p>\n\n<p>b</p>\r\n") == (
        b"event: live\ndata: <p>a</p>\ndata: \ndata: <p>b</p>\n\n"
    )


async def test_the_stream_sends_the_fragment_every_interval_with_comments_between(
    tmp_path: Path,
) -> None:
    async with (
        serve(tmp_path, history_interval_s=0.2, stream_interval_s=0.3) as running,
        aiohttp.ClientSession(headers=BEARER) as session,
        session.get(f"{running.base}/api/stream") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert_secure(dict(response.headers))
        stream = EventStream(response)
        assert await stream.next() == {"retry": "3000"}
        lives: list[str] = []
        comments = 0
        while len(lives) < 3:
            block = await stream.next(within=5)
            if "comment" in block:
                comments += 1
            else:
                assert block["event"] == "live"
                lives.append(block["data"])
        # Renders are shared for a second; the ticks between them say "unchanged".
        assert comments >= 1 and len(set(lives)) == 3
        assert "<h2>Sources</h2>" in lives[-1] and "<svg" in lives[-1]


async def test_the_stream_sends_an_alert_at_once_and_ends_when_the_server_stops(
    tmp_path: Path,
) -> None:
    # A long interval: any event after the first can only come from news, not from the tick.
    server = serve(tmp_path, stream_interval_s=30.0)
    running = await server.__aenter__()
    stopped = False
    try:
        async with aiohttp.ClientSession(headers=BEARER) as session:
            response = await session.get(f"{running.base}/api/stream")
            stream = EventStream(response)
            assert await stream.next() == {"retry": "3000"}
            first = await stream.next()
            assert first["event"] == "live" and "no events yet" in first["data"]

            leaving = await session.get(f"{running.base}/api/stream")
            assert (await EventStream(leaving).next())["retry"] == "3000"
            await eventually(lambda: running.server.open_streams == 2, 5, "two streams")
            leaving.close()  # a browser tab closed

            journalled = time.monotonic()
            await running.journal.append(
                NewRecord(
                    source="door", kind="door_forced", priority=Priority.ALERT, body={"zone": "b"}
                )
            )
            news = await stream.next(within=5)
            latency = time.monotonic() - journalled
            assert news["event"] == "live" and "door_forced" in news["data"]
            assert latency < 3.0, latency
            # The news woke the stream whose browser left: it ended without a word.
            await eventually(lambda: running.server.open_streams == 1, 5, "one stream")

            stopping = time.monotonic()
            stopped = True
            await server.__aexit__(None, None, None)
            # Well under the runner's 2 s shutdown timeout: the stream ended, it was not cut.
            assert time.monotonic() - stopping < 1.5
            rest = await response.content.read()  # a clean end of the chunked body, no error
            assert response.content.at_eof() and b"event: live" not in rest
            response.release()
    finally:
        if not stopped:
            await server.__aexit__(None, None, None)
