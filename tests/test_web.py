"""The status page and its API: against the real daemon in a subprocess, and in-process over a
real journal for image payloads, the token rules beyond loopback and the outage grace period."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.health import HealthMonitor
from appliance.web import SECURITY_HEADERS, StatusServer, read_status_token
from config import ApplianceConfig
from sensors.base import SourceHealth
from sync import Journal, NewRecord, PayloadStore, Priority, StorageGuard
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
    "appliance_records_total",
    "appliance_sync_backlog_records",
    "appliance_sync_backlog_bytes",
    "appliance_sync_oldest_unsynced_seconds",
    "appliance_evictions_total",
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
        assert "# HELP appliance_records_total" in text
        families = list(text_string_to_metric_families(text))
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in families
            for s in family.samples
        }
        # A counter family without samples yet (no evictions) still declares its name.
        declared = {f.name + ("_total" if f.type == "counter" else "") for f in families}
        assert declared >= METRIC_NAMES
        records = sum(v for (n, _), v in samples.items() if n == "appliance_records_total")
        assert records == api["records"]["total"]
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
        shipped = list((data / "outbox").glob("records/test-01/*/*.ndjson.gz"))
        assert shipped

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


@pytest.fixture
async def appliance(tmp_path: Path) -> AsyncIterator[Appliance]:
    token_file = tmp_path / "status.token"
    token_file.write_text(TOKEN)
    cfg = ApplianceConfig.model_validate(
        {
            "appliance": {"id": "web-01", "data_dir": str(tmp_path / "data")},
            "status": {"listen": "0.0.0.0:0", "token_file": str(token_file)},
        }
    )
    store = PayloadStore(cfg.appliance.data_dir / "payloads")
    journal = await Journal.open(cfg.appliance.data_dir, appliance_id="web-01", payloads=store)
    try:
        async with StorageGuard(journal, store, cfg.storage) as guard:
            monitor = HealthMonitor(journal, guard, mode="run")
            token = read_status_token(cfg.status)
            async with StatusServer(
                cfg, journal, store, monitor, [], token=token, grace_s=0.3
            ) as server:
                yield Appliance(server, journal, monitor)
    finally:
        await journal.close()


async def test_beyond_loopback_every_route_needs_the_token(appliance: Appliance) -> None:
    base = appliance.base
    jar = aiohttp.CookieJar(unsafe=True)  # the page is reached by IP address
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        for path in ("/", "/healthz", "/api/status", "/api/events", "/metrics", "/app.js"):
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
