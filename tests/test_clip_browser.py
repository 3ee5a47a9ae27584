"""A camera's clip on the status page, in a real browser (Debian's headless chromium driven by
playwright) against the real status server over a real journal in tmp_path: an H.264 clip
written by the appliance's own writer from real footage plays in place beside the snapshot of
the zone entry it covers, fetched by Range requests that the payload route answers with 206,
keeps playing while the live part of the page is replaced around it, and fits a 390 px phone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np
import pytest
from playwright.async_api import Browser, Page, Response, expect

from appliance.stages.recorder import Recorder
from appliance.status.health import HealthMonitor
from appliance.status.history import HISTORY_FILE, History
from appliance.status.web import CONTENT_SECURITY_POLICY, StatusServer
from config import ApplianceConfig, SnapshotSettings
from inference.clips import write_clip
from inference.media import encode_snapshot, fit_width
from sensors.camera import builtin_footage
from sync import Journal, NewRecord, PayloadStore, Priority, StorageGuard
from tests.helpers import component_missing

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]
H264 = 'video/mp4; codecs="avc1.640028"'  # High profile, what libx264 writes for yuv420p


@dataclass
class Served:
    server: StatusServer
    journal: Journal
    store: PayloadStore
    base: str


@asynccontextmanager
async def serve(tmp_path: Path) -> AsyncIterator[Served]:
    """The status server on loopback over a real journal, wired as the daemon wires it."""
    data = tmp_path / "data"
    cfg = ApplianceConfig.model_validate(
        {
            "appliance": {"id": "deck-01", "data_dir": str(data)},
            "status": {"listen": "127.0.0.1:0"},
            "sync": {"interval": "1h", "destinations": []},
        }
    )
    store = PayloadStore(data / "payloads")
    journal = await Journal.open(data, appliance_id="deck-01", payloads=store)
    try:
        async with AsyncExitStack() as stack:
            guard = await stack.enter_async_context(StorageGuard(journal, store, cfg.storage))
            monitor = HealthMonitor(journal, guard, mode="run", camera_names=["street"])
            history = History(data / HISTORY_FILE, appliance_id="deck-01", interval_s=60.0)
            server = await stack.enter_async_context(
                StatusServer(cfg, journal, store, monitor, [], token=None, history=history)
            )
            assert server.url is not None
            yield Served(server, journal, store, server.url.rstrip("/"))
    finally:
        await journal.close()


@dataclass
class Clip:
    sha256: str
    snapshot: str
    data: bytes


async def journal_zone_entry_with_clip(served: Served, tmp_path: Path) -> Clip:
    """What a camera journals for a person entering a zone: the zone entry with its snapshot,
    then the clip record with its MP4 (10 s of builtin:vtest at 5 fps, 640 px wide)."""
    try:
        path = builtin_footage("vtest")
    except ValueError as exc:
        component_missing(str(exc))
    capture = cv2.VideoCapture(str(path))
    frames = []
    try:
        for index in range(100):  # 10 fps footage: every other frame
            ok, image = capture.read()
            assert ok, f"{path} has fewer than 100 frames"
            if index % 2 == 0:
                small = fit_width(np.asarray(image, dtype=np.uint8), 640)
                frames.append((index * 100_000_000, small))
    finally:
        capture.release()
    info = write_clip(frames, None, tmp_path / "clip.mp4")
    assert info.fourcc == "avc1", "clips must be H.264 for a browser to play them"
    data = (tmp_path / "clip.mp4").read_bytes()
    recorder = Recorder("street", served.journal, served.store)
    jpeg = encode_snapshot(frames[25][1], SnapshotSettings(), None)
    snapshot = await recorder.store(jpeg, "image/jpeg", Priority.ALERT)
    assert snapshot is not None
    seq = await recorder.append_with_payloads(
        NewRecord(
            source="street",
            kind="zone_entry",
            priority=Priority.ALERT,
            body={"zone": "kerb", "track_id": 3, "label": "person", "score": 0.91},
            payloads=(snapshot,),
        )
    )
    ref = await recorder.store(data, "video/mp4", Priority.ALERT)
    assert ref is not None
    await recorder.append_with_payloads(
        NewRecord(
            source="street",
            kind="clip",
            priority=Priority.ALERT,
            body={
                "entries": [{"seq": seq, "zone": "kerb", "track_id": 3}],
                "frames": info.frames,
                "width": info.width,
                "height": info.height,
                "fps": info.fps,
                "duration_s": round(info.duration_s, 3),
                "codec": info.fourcc,
                "capped": False,
            },
            payloads=(ref,),
        )
    )
    return Clip(ref.sha256, snapshot.sha256, data)


async def show(page: Page, base: str) -> None:
    """Open the page and wait until the stream has replaced the live part once."""
    await page.goto(base + "/")
    await expect(page.locator("#live")).to_have_attribute("data-updates", "stream", timeout=10_000)


async def test_a_clip_plays_in_place_beside_its_snapshot_through_live_updates(
    browser: Browser, tmp_path: Path
) -> None:
    async with serve(tmp_path) as served:
        clip = await journal_zone_entry_with_clip(served, tmp_path)
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        page = await context.new_page()
        violations: list[str] = []
        page.on(
            "console",
            lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None,
        )
        fetched: list[tuple[str | None, int, str | None]] = []

        def record(response: Response) -> None:
            if response.url.endswith(f"/payloads/{clip.sha256}"):
                request = response.request.headers.get("range")
                fetched.append((request, response.status, response.headers.get("content-range")))

        page.on("response", record)
        try:
            # Debian's chromium plays H.264 (its FFmpeg has the decoder); a browser that could
            # not would fail here, naming why, rather than in a timeout below.
            can_play = await page.evaluate(f"document.createElement('video').canPlayType('{H264}')")
            assert can_play in {"probably", "maybe"}, f"this chromium cannot play {H264}"
            await show(page, served.base)
            video = page.locator(f'video[data-clip="{clip.sha256}"]')
            await expect(video).to_have_count(1)
            assert await video.get_attribute("src") == f"/payloads/{clip.sha256}"
            assert await video.get_attribute("preload") == "metadata"
            # Beside it, in the clip's row, the snapshot of the zone entry it covers (its poster).
            row = page.locator("tr", has=video)
            snapshot = f"/payloads/{clip.snapshot}"
            await expect(row.locator(f'a.thumb[href="{snapshot}"] img')).to_have_count(1)
            assert await video.get_attribute("poster") == snapshot

            handle = await video.element_handle()
            assert handle is not None
            await handle.evaluate("(v) => { v.muted = true; return v.play(); }")
            await page.wait_for_function("(v) => v.currentTime > 0.3", arg=handle)
            assert await handle.evaluate("(v) => v.duration") == pytest.approx(10.0, abs=0.25)

            # News on the page: the live part is replaced around the clip, which plays on.
            before = await handle.evaluate("(v) => v.currentTime")
            await Recorder("pump", served.journal, served.store).append(
                NewRecord(
                    source="pump",
                    kind="limit",
                    priority=Priority.ALERT,
                    body={"state": "violated", "channel": "temp", "feature": "mean", "value": 91},
                )
            )
            events = page.locator('#live table[data-name="events"]')
            await expect(events).to_contain_text("pump", timeout=10_000)
            assert await handle.evaluate("(v) => v.isConnected && !v.paused && !v.error")
            await page.wait_for_function("([v, t]) => v.currentTime > t", arg=[handle, before])
        finally:
            await context.close()
        assert violations == []
        # The browser fetched the clip by ranges, and the route answered them with 206.
        assert fetched, "the browser never fetched the clip"
        ranged = [f for f in fetched if f[0] is not None]
        assert ranged and all(status == 206 for _, status, _ in ranged), fetched
        assert all(str(f[2]).endswith(f"/{len(clip.data)}") for f in ranged), fetched


async def test_the_payload_route_answers_ranges_of_a_clip_and_it_fits_a_phone(
    browser: Browser, tmp_path: Path
) -> None:
    async with serve(tmp_path) as served:
        clip = await journal_zone_entry_with_clip(served, tmp_path)
        context = await browser.new_context(viewport={"width": 390, "height": 844})
        try:
            page = await context.new_page()
            await show(page, served.base)
            video = page.locator(f'video[data-clip="{clip.sha256}"]')
            box = await video.bounding_box()
            width = await page.evaluate("document.documentElement.clientWidth")
            assert box is not None and box["width"] > 200 and box["x"] + box["width"] <= width
        finally:
            await context.close()
        size = len(clip.data)
        url = f"{served.base}/payloads/{clip.sha256}"
        async with aiohttp.ClientSession() as session:

            async def get(headers: dict[str, str]) -> tuple[int, Any, bytes]:
                async with session.get(url, headers=headers) as response:
                    return response.status, response.headers, await response.read()

            status, headers, body = await get({})
            assert (status, body) == (200, clip.data)
            assert headers["Content-Type"] == "video/mp4"
            assert headers["Accept-Ranges"] == "bytes"
            # The page's security headers ride on file responses too; the CSP lets media in.
            assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
            assert "media-src 'self'" in CONTENT_SECURITY_POLICY
            assert headers["X-Content-Type-Options"] == "nosniff"

            status, headers, body = await get({"Range": "bytes=100-199"})
            assert (status, body) == (206, clip.data[100:200])
            assert headers["Content-Range"] == f"bytes 100-199/{size}"
            status, headers, body = await get({"Range": "bytes=-64"})
            assert (status, body) == (206, clip.data[-64:])

            status, headers, _ = await get({"Range": f"bytes={size}-"})
            assert status == 416 and headers["Content-Range"] == f"bytes */{size}"

            snapshot = f"{served.base}/payloads/{clip.snapshot}"
            async with session.get(snapshot) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == "image/jpeg"

            # A payload that is neither image nor clip (a raw sensor window) is not served.
            pump = Recorder("pump", served.journal, served.store)
            raw = await pump.store(b"\x93NUMPY raw window", "application/x-npy", Priority.ALERT)
            assert raw is not None
            await pump.append_with_payloads(
                NewRecord(
                    source="pump", kind="anomaly", priority=Priority.ALERT, body={}, payloads=(raw,)
                )
            )
            async with session.get(f"{served.base}/payloads/{raw.sha256}") as response:
                assert response.status == 404
                assert "no image or clip payload" in await response.text()
            # Evicted under the journal's feet: a 404 in words, not a server error.
            served.store.path_for(clip.sha256).unlink()
            status, _, body = await get({})
            assert status == 404 and b"no image or clip payload" in body
