"""The receiver's fleet view (receiver/fleet.py) on both stores: `GET /v1/fleet` and
`/v1/fleet/ID` after real-looking batches (health records with their backlog, alerts, a
snapshot uploaded and a clip not yet), the admin-token rules, unknown appliances, `/metrics`
parsed by prometheus_client, payload bytes from the data folder and from a bucket, the pages in
headless Chromium (links, an image that loaded, no CSP violation), and the appliance's side:
its journalled `health` record carries the backlog."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np
import pytest
from playwright.async_api import ConsoleMessage, async_playwright, expect
from prometheus_client.parser import text_string_to_metric_families
from pydantic import TypeAdapter

from appliance.status.health import HealthMonitor
from appliance.status.schema import HealthRecord
from config import StorageSection
from receiver import build_receiver_app, serve_receiver
from receiver.fleet import CONTENT_SECURITY_POLICY, COOKIE_NAME, sniff_media_type
from receiver.objects import BucketSettings
from sync import Journal, NewRecord, PayloadStore, Priority, StorageGuard
from sync.engine import DestinationState
from tests.helpers import component_missing
from tests.seaweed import BUCKET, S3Server

TOKENS = {"ship-1": "token-one", "ship-2": "token-two"}
ADMIN = "admin-token-0123456789"
JOURNAL = "0123456789abcdef0123456789abcdef"
CHROMIUM = Path("/usr/bin/chromium")


def ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def jpeg(width: int = 64, height: int = 48) -> bytes:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, :, 1] = 180
    ok, encoded = cv2.imencode(".jpg", image)
    assert ok
    return bytes(encoded.tobytes())


SNAPSHOT = jpeg()
CLIP = b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 40  # never uploaded in these tests
HEALTH_BACKLOG = {
    "shore": {
        "records": 120,
        "bytes": 48_000,
        "payloads": 2,
        "payload_bytes": 9_000,
        "oldest": "2026-11-01T05:00:00.000000Z",
    },
    "usb": {"records": 3, "bytes": 900, "payloads": 0, "payload_bytes": 0, "oldest": None},
}


def line(seq: int, priority: str, kind: str, when: datetime, **extra: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "seq": seq,
        "appliance_id": "ship-1",
        "boot_id": "b0",
        "ts": ts(when),
        "mono_ns": seq,
        "source": "cam-bow",
        "kind": kind,
        "priority": priority,
        "model": None,
        "body": {"n": seq},
        "payloads": [],
    }
    record.update(extra)
    return record


def health_body(state: str, reasons: list[str]) -> dict[str, Any]:
    """The parts of a `HealthRecord` the fleet view reads, as the appliance writes them."""
    return {
        "state": state,
        "reasons": reasons,
        "mode": "run",
        "version": "1.4.0",
        "started": "2026-11-01T00:00:00.000000Z",
        "cameras": {"cam-bow": {"state": "running", "model": "yolov3-tiny@builtin"}},
        "models": {"packages": {"cars": {"active": "1.2.0", "previous": "1.1.0"}}},
        "backlog": HEALTH_BACKLOG,
        "journal": {"records": 5000},
    }


@dataclass
class Shore:
    base: str
    session: aiohttp.ClientSession

    async def put(self, appliance_id: str, records: list[dict[str, Any]]) -> dict[str, Any]:
        priority = records[0]["priority"]
        # Compact, as the appliance writes its lines.
        lines = (json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
        body = gzip.compress(b"".join(lines))
        seqs = [r["seq"] for r in records]
        async with self.session.put(
            f"{self.base}/v1/appliances/{appliance_id}/batches/{priority}-{min(seqs)}-{max(seqs)}",
            data=body,
            headers={
                "Authorization": f"Bearer {TOKENS[appliance_id]}",
                "Content-Encoding": "gzip",
                "Journal-Id": JOURNAL,
            },
        ) as response:
            assert response.status == 200, await response.text()
            answer: dict[str, Any] = await response.json()
            return answer

    async def upload(self, appliance_id: str, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        async with self.session.patch(
            f"{self.base}/v1/appliances/{appliance_id}/payloads/{sha256}",
            data=data,
            headers={
                "Authorization": f"Bearer {TOKENS[appliance_id]}",
                "Upload-Offset": "0",
                "Upload-Length": str(len(data)),
                "Journal-Id": JOURNAL,
            },
        ) as response:
            assert response.status == 204, await response.text()
        return sha256

    async def get(self, path: str, token: str | None = ADMIN, **headers: str) -> tuple[int, Any]:
        sent = dict(headers)
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        async with self.session.get(f"{self.base}{path}", headers=sent) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.read()


@contextlib.asynccontextmanager
async def shore(
    data_dir: Path,
    database: str | None,
    *,
    admin_tokens: tuple[str, ...] = (ADMIN,),
    bucket: BucketSettings | None = None,
) -> AsyncIterator[Shore]:
    app = build_receiver_app(
        data_dir, TOKENS, admin_tokens=admin_tokens, database=database, bucket=bucket
    )
    async with (
        serve_receiver(app, "127.0.0.1", 0) as addresses,
        # unsafe: keep cookies from 127.0.0.1, as a browser does.
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session,
    ):
        host, port = addresses[0]
        yield Shore(f"http://{host}:{port}", session)


@dataclass(frozen=True)
class Seeded:
    snapshot_sha: str
    clip_sha: str
    health_ts: str
    stored: dict[str, int]  # records stored per appliance
    ship2: list[dict[str, Any]]  # ship-2's batch, to send again


async def seed(client: Shore) -> Seeded:
    """What two appliances ship: ship-1 a day of real-looking records, ship-2 telemetry only."""
    now = datetime.now(UTC)
    snapshot = await client.upload("ship-1", SNAPSHOT)
    clip = hashlib.sha256(CLIP).hexdigest()
    alerts = [
        line(1, "alert", "limit", now - timedelta(days=2), source="gearbox"),
        line(2, "alert", "limit", now - timedelta(hours=3), source="gearbox"),
        line(
            3,
            "alert",
            "zone_entry",
            now - timedelta(minutes=5),
            body={"zone": "bow", "label": "person", "score": 0.91},
            payloads=[snapshot],
        ),
    ]
    events = [
        line(4, "event", "clip", now - timedelta(minutes=4), payloads=[clip]),
        line(5, "event", "object", now - timedelta(minutes=3)),
    ]
    older = now - timedelta(minutes=10)
    newest = now - timedelta(seconds=30)
    telemetry = [
        line(6, "telemetry", "health", older, source="appliance", body=health_body("ok", [])),
        line(
            7,
            "telemetry",
            "health",
            newest,
            source="appliance",
            body=health_body("degraded", ["sync_refused:shore"]),
        ),
        line(8, "telemetry", "window", newest, source="gearbox"),
    ]
    for batch in (alerts, events, telemetry):
        await client.put("ship-1", batch)
    other = [{**line(seq, "telemetry", "window", now), "appliance_id": "ship-2"} for seq in (1, 2)]
    await client.put("ship-2", other)
    return Seeded(snapshot, clip, ts(newest), {"ship-1": 8, "ship-2": 2}, other)


# ----------------------------------------------------------------------------------- JSON


async def test_the_fleet_shows_every_appliance_as_it_last_reported(
    data_dir: Path, database: str | None
) -> None:
    async with shore(data_dir, database) as client:
        seeded = await seed(client)
        status, answer = await client.get("/v1/fleet")
    assert status == 200, answer
    one, two = answer["appliances"]
    assert (one["appliance_id"], two["appliance_id"]) == ("ship-1", "ship-2")
    assert one["state"] == "degraded" and one["reasons"] == ["sync_refused:shore"]
    assert one["health_ts"] == seeded.health_ts  # the newest of its two health records
    assert 0 <= one["health_age_s"] < 120
    assert (one["version"], one["mode"]) == ("1.4.0", "run")
    assert one["models"] == ["cars@1.2.0", "yolov3-tiny@builtin"]
    assert one["backlog"] == HEALTH_BACKLOG
    assert (one["backlog_records"], one["backlog_bytes"]) == (123, 48_000 + 9_000 + 900)
    assert one["today"] == {"records": 8, "payloads": 1, "payload_bytes": len(SNAPSHOT)}
    assert one["alerts_24h"] == 2  # the alert of two days ago is not counted
    assert one["totals"] == {"records": 8, "payloads": 1, "payload_bytes": len(SNAPSHOT)}
    assert 0 <= one["last_seen_age_s"] < 120
    # ship-2 never sent a health record: nothing is made up for it.
    assert (two["state"], two["reasons"], two["version"], two["models"]) == (
        "unknown",
        [],
        None,
        [],
    )
    assert (two["backlog"], two["backlog_records"], two["health_ts"]) == (None, None, None)
    assert (two["today"]["records"], two["alerts_24h"]) == (2, 0)


async def test_one_appliance_with_its_alerts_snapshots_and_clips(
    data_dir: Path, database: str | None
) -> None:
    async with shore(data_dir, database) as client:
        seeded = await seed(client)
        status, answer = await client.get("/v1/fleet/ship-1")
        assert status == 200, answer
        assert answer["state"] == "degraded" and answer["alerts_24h"] == 2
        # Newest first, by the records' own time.
        assert [a["seq"] for a in answer["alerts"]] == [3, 2, 1]
        newest = answer["alerts"][0]
        assert (newest["kind"], newest["body"]["label"], newest["journal_id"]) == (
            "zone_entry",
            "person",
            JOURNAL,
        )
        url = f"/fleet/ship-1/payloads/{seeded.snapshot_sha}"
        snapshot_ref = {
            "sha256": seeded.snapshot_sha,
            "size": len(SNAPSHOT),
            "stored": True,
            "media_type": "image/jpeg",
            "url": url,
        }
        assert newest["payloads"] == [snapshot_ref]
        assert [(m["seq"], m["kind"]) for m in answer["media"]] == [(4, "clip"), (3, "zone_entry")]
        clip = answer["media"][0]["payloads"]
        assert clip == [
            {
                "sha256": seeded.clip_sha,
                "size": None,
                "stored": False,
                "media_type": None,
                "url": None,
            }
        ]
        status, limited = await client.get("/v1/fleet/ship-1?limit=1")
        assert [a["seq"] for a in limited["alerts"]] == [3]
        assert (await client.get("/v1/fleet/ship-1?limit=0"))[0] == 400

        # The snapshot's bytes, whole and by range, with the page's security headers.
        async with client.session.get(
            client.base + url, headers={"Authorization": f"Bearer {ADMIN}"}
        ) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "image/jpeg"
            assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
            assert await response.read() == SNAPSHOT
        status, part = await client.get(url, Range="bytes=2-9")
        assert (status, part) == (206, SNAPSHOT[2:10])
        # Only that appliance's payloads: the same sha256 under ship-2 is not there.
        status, body = await client.get(f"/fleet/ship-2/payloads/{seeded.snapshot_sha}")
        assert (status, body["error"]) == (404, "unknown payload")
        status, body = await client.get(f"/fleet/ship-1/payloads/{seeded.clip_sha}")
        assert (status, body["error"]) == (404, "unknown payload")


async def test_the_fleet_view_needs_an_admin_token(data_dir: Path, database: str | None) -> None:
    async with shore(data_dir, database) as client:
        await seed(client)
        for path in ("/v1/fleet", "/v1/fleet/ship-1", "/metrics"):
            status, body = await client.get(path, token=None)
            assert (status, body["error"]) == (401, "missing token"), path
            status, body = await client.get(path, token="guess")
            assert (status, body["error"]) == (401, "unknown admin token"), path
            status, body = await client.get(path, token=TOKENS["ship-1"])
            assert (status, body["error"]) == (403, "not an admin token"), path
        # A page: an HTML answer saying what to do, then ?token= once and a cookie after.
        async with client.session.get(client.base + "/fleet") as response:
            assert response.status == 401 and response.content_type == "text/html"
            assert "/fleet?token=ADMIN_TOKEN" in await response.text()
        async with client.session.get(
            client.base + f"/fleet/ship-1?token={ADMIN}", allow_redirects=False
        ) as response:
            assert response.status == 303 and response.headers["Location"] == "/fleet/ship-1"
            cookie = response.cookies[COOKIE_NAME]
            assert cookie["httponly"] and cookie["samesite"] == "Strict"
            assert ADMIN not in cookie.value
        async with client.session.get(client.base + "/fleet/ship-1") as response:
            assert response.status == 200, await response.text()
            assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        async with client.session.get(client.base + "/fleet/ship-1?token=guess") as response:
            assert response.status == 200  # the cookie still opens it
        # Unknown appliances, in product words, as JSON and as a page.
        status, body = await client.get("/v1/fleet/ship-9")
        assert (status, body["error"]) == (404, "unknown appliance")
        assert "ship-9" in body["detail"]
        status, body = await client.get("/v1/fleet/..")
        assert status in (400, 404)
        async with client.session.get(client.base + "/fleet/ship-9") as response:
            assert response.status == 404 and "Unknown appliance" in await response.text()
    async with shore(data_dir, database, admin_tokens=()) as client:
        status, body = await client.get("/v1/fleet", token="anything")
        assert (status, body["error"]) == (403, "fleet view disabled")


async def test_metrics_count_traffic_and_show_each_appliance(
    data_dir: Path, database: str | None
) -> None:
    async with shore(data_dir, database) as client:
        seeded = await seed(client)
        assert (await client.put("ship-2", seeded.ship2))["duplicates"] == 2
        assert (await client.get("/v1/fleet", token=None))[0] == 401
        status, text = await client.get("/metrics")
    assert status == 200
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("receiver_records_received_total", ())] == sum(seeded.stored.values())
    assert samples[("receiver_records_duplicate_total", ())] == 2
    assert samples[("receiver_batches_total", ())] == 5
    assert samples[("receiver_payload_received_bytes_total", ())] == len(SNAPSHOT)
    assert samples[("receiver_payloads_completed_total", ())] == 1
    assert samples[("receiver_refusals_total", (("code", "401"), ("reason", "missing token")))] == 1
    assert samples[("receiver_appliances", ())] == 2
    now = datetime.now(UTC).timestamp()
    for appliance in ("ship-1", "ship-2"):
        seen = samples[
            ("receiver_appliance_last_seen_timestamp_seconds", (("appliance", appliance),))
        ]
        assert now - 120 < seen <= now + 5
    lag = samples[("receiver_appliance_lag_seconds", (("appliance", "ship-1"),))]
    assert 25 <= lag < 150  # its newest health record is 30 s old
    assert ("receiver_appliance_lag_seconds", (("appliance", "ship-2"),)) not in samples
    ship1 = (("appliance", "ship-1"),)
    assert samples[("receiver_appliance_backlog_records", ship1)] == 123
    assert samples[("receiver_appliance_backlog_bytes", ship1)] == 57_900
    assert samples[("receiver_appliance_healthy", ship1)] == 0
    assert samples[("receiver_appliance_alerts_24h", ship1)] == 2


async def test_payloads_in_a_bucket_are_served_too(
    data_dir: Path, postgres_dsn: str, s3_server: S3Server
) -> None:
    bucket = BucketSettings(
        endpoint_url=s3_server.endpoint_url,
        bucket=BUCKET,
        access_key_file=s3_server.access_key_file,
        secret_key_file=s3_server.secret_key_file,
        prefix=f"fleet-{hashlib.sha256(str(data_dir).encode()).hexdigest()[:8]}/",
        timeout_s=5.0,
    )
    async with shore(data_dir, postgres_dsn, bucket=bucket) as client:
        seeded = await seed(client)
        status, answer = await client.get("/v1/fleet/ship-1")
        assert answer["media"][1]["payloads"][0]["media_type"] == "image/jpeg"
        status, body = await client.get(f"/fleet/ship-1/payloads/{seeded.snapshot_sha}")
        assert (status, body) == (200, SNAPSHOT)
        status, body = await client.get(
            f"/fleet/ship-1/payloads/{seeded.snapshot_sha}", Range="bytes=10-"
        )
        assert (status, body) == (206, SNAPSHOT[10:])


def test_payload_media_types_come_from_their_bytes() -> None:
    assert sniff_media_type(SNAPSHOT[:16]) == "image/jpeg"
    assert sniff_media_type(CLIP[:16]) == "video/mp4"
    assert sniff_media_type(b"PK\x03\x04rest") == "application/zip"
    assert sniff_media_type(b"<svg onload=x>") == "application/octet-stream"


# ------------------------------------------------------------------------------- the browser


@pytest.mark.browser
async def test_the_fleet_pages_in_chromium(data_dir: Path) -> None:
    if not CHROMIUM.exists():  # noqa: ASYNC240 -- one stat before anything runs
        component_missing("chromium (Debian package chromium)")
    violations: list[str] = []

    def note_csp_violation(message: ConsoleMessage) -> None:
        # A style, image or clip the Content-Security-Policy blocks shows only in the console.
        if "Content Security Policy" in message.text:
            violations.append(message.text)

    async with shore(data_dir, None) as client, async_playwright() as playwright:
        await seed(client)
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", note_csp_violation)
            await page.goto(f"{client.base}/fleet?token={ADMIN}")
            assert page.url == f"{client.base}/fleet"  # the token left the address bar
            rows = page.locator('table[data-name="appliances"] tr[data-appliance]')
            await expect(rows).to_have_count(2)
            ship1 = page.locator('tr[data-appliance="ship-1"]')
            await expect(ship1).to_contain_text("degraded")
            await expect(ship1).to_contain_text("123 records")
            await expect(ship1).to_contain_text("cars@1.2.0")
            await expect(page.locator('tr[data-appliance="ship-2"]')).to_contain_text("unknown")

            await page.get_by_role("link", name="ship-1", exact=True).click()
            await expect(page.locator("h1")).to_have_text("ship-1")
            alert = page.locator('table[data-name="alerts"] tr[data-seq="3"]')
            await expect(alert).to_contain_text("zone_entry")
            await expect(alert).to_contain_text("person")
            image = page.locator('figure[data-kind="zone_entry"] img')
            await expect(image).to_be_visible()
            loaded = await image.evaluate("(img) => img.complete && img.naturalWidth")
            assert loaded == 64
            await expect(page.locator('figure[data-kind="clip"]')).to_contain_text(
                "not received yet"
            )
            style = await page.evaluate(
                "getComputedStyle(document.querySelector('.state')).fontWeight"
            )
            assert style == "600"  # the style sheet loaded under the CSP
        finally:
            await browser.close()
    assert violations == []


# ------------------------------------------------------------------------- the appliance side


async def test_the_journalled_health_record_carries_the_backlog(
    journal: Journal, payload_store: PayloadStore
) -> None:
    for n in range(5):
        await journal.append(
            NewRecord(source="gearbox", kind="window", priority=Priority.TELEMETRY, body={"n": n})
        )
    await journal.append(
        NewRecord(source="gearbox", kind="limit", priority=Priority.ALERT, body={"v": 99})
    )
    async with StorageGuard(journal, payload_store, StorageSection()) as guard:
        monitor = HealthMonitor(journal, guard, mode="run")
        monitor.destinations["shore"] = DestinationState("shore")
        await monitor.record()
    (record,) = await journal.read(lambda r: list(r.iter_records(kind="health")))
    body = record.body
    TypeAdapter(HealthRecord).validate_python(body, strict=True)
    backlog = body["backlog"]["shore"]
    assert backlog["records"] == 6
    assert backlog["bytes"] > 0 and backlog["payloads"] == 0
    assert backlog["oldest"] is not None and backlog["oldest"] <= record.ts
