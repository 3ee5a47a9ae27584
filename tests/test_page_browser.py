"""The status page as an operator reads it, in a real browser (Debian's headless chromium driven
by playwright) against the real status server over a real journal in tmp_path: the active
alarms first with their count beside (and apart from) the appliance's health, the events'
"what" in words, short local times with UTC on hover, snapshots that open full size, no
sideways scroll on a 390 px phone, a backlog chart that agrees with the table beside it, and
"Sync now" explaining itself when there is no token."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import cv2
import numpy as np
import pytest
from playwright.async_api import Browser, BrowserContext, Page, Request, expect

from appliance.stages.recorder import Recorder
from appliance.status.health import HealthMonitor
from appliance.status.history import HISTORY_FILE, History
from appliance.status.web import StatusServer, read_status_token
from config import ApplianceConfig
from sensors.base import SourceHealth
from sync import Journal, NewRecord, PayloadStore, Priority, StorageGuard
from sync.engine import SyncEngine
from sync.targets import make_target
from tests.helpers import ROOT

ARTIFACTS = ROOT / "test-artifacts"
TOKEN = "page-test-token-0123456789"
ZONE = "Asia/Kathmandu"  # UTC+05:45: a local time that no UTC time can be mistaken for
PHONE = {"width": 390, "height": 844}
# One browser for the module; each test has its own appliance (an in-process server is cheap).
pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]


@dataclass
class Appliance:
    server: StatusServer
    journal: Journal
    store: PayloadStore
    monitor: HealthMonitor
    base: str

    def recorder(self, source: str) -> Recorder:
        """A stage's way into the journal, its records watched by the alarm board as the daemon
        wires it."""
        return Recorder(source, self.journal, self.store, watch=self.monitor.alarms.observe)


@asynccontextmanager
async def serve(
    tmp_path: Path, *, token: bool = True, destination: bool = True
) -> AsyncIterator[Appliance]:
    """The status server on loopback over a real journal, wired as the daemon wires it."""
    data = tmp_path / "data"
    status: dict[str, Any] = {"listen": "127.0.0.1:0"}
    if token:
        (tmp_path / "status.token").write_text(TOKEN)
        status["token_file"] = str(tmp_path / "status.token")
    destinations = [{"name": "usb", "type": "directory", "path": "outbox"}] if destination else []
    cfg = ApplianceConfig.model_validate(
        {
            "appliance": {"id": "deck-01", "data_dir": str(data)},
            "status": status,
            "sync": {"interval": "1h", "destinations": destinations},
        }
    )
    store = PayloadStore(data / "payloads")
    journal = await Journal.open(data, appliance_id="deck-01", payloads=store)
    try:
        async with AsyncExitStack() as stack:
            guard = await stack.enter_async_context(StorageGuard(journal, store, cfg.storage))
            monitor = HealthMonitor(journal, guard, mode="run", camera_names=["deck"])
            engines = []
            for dest in cfg.sync.destinations:
                target = await stack.enter_async_context(
                    make_target(dest, cfg.appliance.id, data, cfg.sync.chunk_size)
                )
                engine = SyncEngine(journal, store, target, dest, cfg.sync)
                monitor.destinations[dest.name] = engine.state
                engines.append(engine)
            history = History(data / HISTORY_FILE, appliance_id="deck-01", interval_s=60.0)
            server = await stack.enter_async_context(
                StatusServer(
                    cfg,
                    journal,
                    store,
                    monitor,
                    engines,
                    token=read_status_token(cfg.status),
                    history=history,
                )
            )
            assert server.url is not None
            yield Appliance(server, journal, store, monitor, server.url.rstrip("/"))
    finally:
        await journal.close()


@asynccontextmanager
async def opened(browser: Browser, **options: Any) -> AsyncIterator[tuple[BrowserContext, Page]]:
    context = await browser.new_context(**options)
    violations: list[str] = []
    page = await context.new_page()
    page.on(
        "console",
        lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None,
    )
    try:
        yield context, page
    finally:
        await context.close()
    assert violations == []


async def show(page: Page, base: str) -> None:
    """Open the page and wait until the stream has replaced the live part once: from then on
    the page shows what its script made of the server's fragment."""
    await page.goto(base + "/")
    await expect(page.locator("#live")).to_have_attribute("data-updates", "stream", timeout=10_000)


def jpeg(width: int, height: int) -> bytes:
    gradient = np.linspace(0, 255, width, dtype=np.uint8)
    image = np.dstack([np.tile(gradient, (height, 1))] * 3)
    ok, encoded = cv2.imencode(".jpg", image)
    assert ok
    return encoded.tobytes()


LIMIT_BODY = {
    "state": "violated",
    "channel": "vib_radial",
    "feature": "peak",
    "value": 3.5127,
    "above": 2.0,
    "below": None,
}
ZONE_BODY = {
    "zone": "cycle_lane",
    "track_id": 7,
    "label": "person",
    "score": 0.8712,
    "box": [10.0, 20.0, 110.0, 220.0],
    "frame": {"index": 42, "width": 1280, "height": 720},
    "detections": [{"label": "person", "score": 0.8712, "box": [10.0, 20.0, 110.0, 220.0]}],
}


async def journal_events(appliance: Appliance) -> str:
    """A camera's zone entry with its snapshot (1280 x 720) and a sensor's limit alarm, as the
    stages journal them; the snapshot's sha256."""
    deck = appliance.recorder("deck")
    snapshot = await deck.store(jpeg(1280, 720), "image/jpeg", Priority.ALERT)
    assert snapshot is not None
    await deck.append_with_payloads(
        NewRecord(
            source="deck",
            kind="zone_entry",
            priority=Priority.ALERT,
            body=ZONE_BODY,
            payloads=(snapshot,),
        )
    )
    await appliance.recorder("pump").append(
        NewRecord(source="pump", kind="limit", priority=Priority.ALERT, body=LIMIT_BODY)
    )
    return snapshot.sha256


ANOMALY_BODY = {
    "kind": "started",
    "priority": 2,
    "score": 7.2412,
    "threshold": 3.1,
    "ratio": 2.3359,
    "peak_ratio": 2.3359,
    "features": [{"name": "load.mean", "value": 5.1}],
    "windows_over": 3,
    "windows": 4,
    "baseline": "winch-1",
    "method": "robust_z",
}


async def raise_anomaly(appliance: Appliance) -> None:
    """An anomaly of the `event` priority: a warning alarm."""
    await appliance.recorder("winch").append(
        NewRecord(source="winch", kind="anomaly", priority=Priority.EVENT, body=ANOMALY_BODY)
    )


EVENTS = """() => Array.from(document.querySelectorAll('#live table[data-name="events"] tr'))
  .slice(1).map((tr) => ({
    source: tr.cells[2].textContent.trim(),
    what: tr.cells[4].textContent.trim(),
    time: tr.cells[0].querySelector("time") && {
      text: tr.cells[0].querySelector("time").textContent,
      datetime: tr.cells[0].querySelector("time").getAttribute("datetime"),
      title: tr.cells[0].querySelector("time").title,
      lines: tr.cells[0].querySelector("time").getClientRects().length,
    },
  }))"""


async def test_events_read_in_words_at_local_times_and_snapshots_open_full_size(
    browser: Browser, tmp_path: Path
) -> None:
    async with serve(tmp_path) as appliance:
        sha256 = await journal_events(appliance)
        async with opened(browser, timezone_id=ZONE, viewport={"width": 1280, "height": 900}) as (
            context,
            page,
        ):
            await show(page, appliance.base)
            rows = {row["source"]: row for row in await page.evaluate(EVENTS)}
            assert rows["pump"]["what"] == "vib_radial peak 3.51 over 2.0"
            assert rows["deck"]["what"] == "person entered cycle_lane, 0.87"
            assert not any("{" in row["what"] for row in rows.values())  # no raw JSON

            local_now = datetime.now(ZoneInfo(ZONE))
            for row in rows.values():
                shown = row["time"]
                assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", shown["datetime"])
                at = datetime.fromisoformat(shown["datetime"])
                assert shown["title"] == f"{at:%Y-%m-%d %H:%M:%S} UTC"  # UTC on hover
                local = at.astimezone(ZoneInfo(ZONE))
                if local.date() == local_now.date():
                    assert shown["text"] == f"{local:%H:%M:%S}"
                else:  # just past local midnight: the day and the minute
                    assert shown["text"].endswith(f"{local:%H:%M}")
                assert shown["lines"] == 1  # on one line, never wrapped

            thumbnail = page.locator(f'a.thumb[href="/payloads/{sha256}"] img')
            box = await thumbnail.bounding_box()
            assert box is not None and box["width"] <= 160  # thumbnails stay small
            async with context.expect_page() as popup_info:
                await thumbnail.click()
            full = await popup_info.value
            await full.wait_for_load_state()
            assert full.url == f"{appliance.base}/payloads/{sha256}"
            assert await full.evaluate("document.images[0].naturalWidth") == 1280


OVERFLOWING = """() => {
  const width = document.documentElement.clientWidth;
  const out = Array.from(document.querySelectorAll("body *"))
    .filter((el) => el.getBoundingClientRect().right > width + 0.5)
    .map((el) => `${el.tagName.toLowerCase()}.${el.className} ${el.textContent.slice(0, 60)}`);
  const scrolling = Array.from(document.querySelectorAll(".scroll"))
    .filter((el) => el.scrollWidth > el.clientWidth + 1)
    .map((el) => `scrolls sideways: ${el.textContent.slice(0, 60)}`);
  return out.concat(scrolling);
}"""


async def test_the_whole_page_fits_a_390_px_phone_without_sideways_scroll(
    browser: Browser, tmp_path: Path
) -> None:
    async with serve(tmp_path) as appliance:
        await journal_events(appliance)
        for name in ("pump", "generator_aft_bearing_temperature", "ballast"):
            appliance.monitor.sources[name] = SourceHealth(
                state="running", windows=12345, error="reconnected after a broker restart"
            )
        await raise_anomaly(appliance)
        async with opened(
            browser, viewport=PHONE, device_scale_factor=2, is_mobile=True, timezone_id=ZONE
        ) as (_, page):
            await show(page, appliance.base)
            width = await page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], await page.evaluate(OVERFLOWING)
            assert await page.evaluate(OVERFLOWING) == []
            # The pump's limit, the deck camera's zone and the winch's anomaly fit too.
            await expect(page.locator("[data-alarm]")).to_have_count(3)
            assert await page.evaluate(OVERFLOWING) == []
            # Every column is still there, labelled beside its value.
            cell = page.locator('#live table[data-name="sources"] td[data-label="reconnects"]')
            await expect(cell.first).to_be_visible()
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=ARTIFACTS / "status-page-phone-alarms.png", full_page=True)


async def test_active_alarms_come_first_with_their_count_apart_from_the_health(
    browser: Browser, tmp_path: Path
) -> None:
    async with (
        serve(tmp_path) as appliance,
        opened(browser, viewport={"width": 1280, "height": 900}) as (_, page),
    ):
        await show(page, appliance.base)
        section = page.locator('#live [data-name="alarms"]')
        await expect(section).to_contain_text("No active alarms")
        count = page.locator('#live [data-name="alarm-count"]')
        await expect(count).to_contain_text("no alarms")

        await appliance.recorder("pump").append(
            NewRecord(source="pump", kind="limit", priority=Priority.ALERT, body=LIMIT_BODY)
        )
        await raise_anomaly(appliance)
        critical = page.locator('[data-alarm^="limit:pump:vib_radial:peak"]')
        await expect(critical).to_be_visible(timeout=10_000)  # through the stream
        await expect(critical).to_have_attribute("data-severity", "critical")
        for text in ("CRITICAL", "pump", "vib_radial peak 3.51 over 2.0", "last value 3.51"):
            await expect(critical).to_contain_text(text)
        await expect(critical.locator("time")).to_have_count(1)
        warning = page.locator('[data-alarm="anomaly:winch"]')
        await expect(warning).to_have_attribute("data-severity", "warning")
        await expect(warning).to_contain_text("WARNING")
        await expect(warning).to_contain_text("anomaly started: score 7.24 over threshold 3.1")
        await expect(count).to_contain_text("2 alarms, 1 critical")
        # The appliance itself is fine: its health says so, apart from the alarms.
        health = page.locator('#live [data-name="summary"]')
        await expect(health).to_contain_text("ok")
        assert await health.evaluate(
            "(el, other) => !el.contains(other)", await count.element_handle()
        )
        # Colour and words: a critical alarm's shade differs from a warning's.
        shades = [
            await item.evaluate("el => getComputedStyle(el).backgroundColor")
            for item in (critical, warning)
        ]
        assert shades[0] != shades[1]
        # At the top: before the sources, the journal and the events.
        order = await page.evaluate(
            """() => Array.from(document.querySelectorAll(
                  '#live [data-name="alarm-count"], #live [data-name="alarms"], #live h2'))
                  .map((el) => el.dataset.name || el.textContent)"""
        )
        assert order[:3] == ["alarm-count", "alarms", "Active alarms"], order

        # Both clear, as the stages say so.
        await appliance.recorder("pump").append(
            NewRecord(
                source="pump",
                kind="limit",
                priority=Priority.EVENT,
                body={**LIMIT_BODY, "state": "cleared", "value": 1.2},
            )
        )
        await appliance.recorder("winch").append(
            NewRecord(
                source="winch",
                kind="anomaly",
                priority=Priority.EVENT,
                body={**ANOMALY_BODY, "kind": "ended", "windows": 12},
            )
        )
        await expect(page.locator("[data-alarm]")).to_have_count(0, timeout=10_000)
        await expect(section).to_contain_text("No active alarms")
        await expect(count).to_contain_text("no alarms")


CHART_AND_TABLE = """() => {
  const row = Array.from(document.querySelectorAll('#live table[data-name="destinations"] tr'))
    .find((tr) => tr.cells[0] && tr.cells[0].textContent.trim() === "usb");
  const waiting = row ? row.cells[2].textContent.split(", ")
    .map((part) => Number(part.split(" ")[1])).reduce((a, b) => a + b, 0) : null;
  const legend = Array.from(document.querySelectorAll(
    '#live figure[data-name="backlog"] .legend li')).find((li) => li.textContent.startsWith("usb"));
  return { table: waiting, chart: legend ? Number(legend.querySelector(".muted").textContent) : null };
}"""


async def test_the_backlog_chart_agrees_with_the_table_beside_it(
    browser: Browser, tmp_path: Path
) -> None:
    async with (
        serve(tmp_path) as appliance,
        opened(browser, viewport={"width": 1280, "height": 900}) as (_, page),
    ):
        await show(page, appliance.base)
        # The sample at start: nothing waits yet, on the chart and in the table.
        assert await page.evaluate(CHART_AND_TABLE) == {"table": 0, "chart": 0}
        for index in range(80):  # the next sample on the grid is a minute away
            await appliance.journal.append(
                NewRecord(
                    source="pump",
                    kind="reading",
                    priority=Priority.TELEMETRY,
                    body={"i": index},
                )
            )
        # Through the stream, within a few seconds: both read off one fragment.
        shown = await page.wait_for_function(
            f"() => {{ const s = ({CHART_AND_TABLE})(); return s.table === 80 ? s : null; }}",
            timeout=15_000,
        )
        assert await shown.json_value() == {"table": 80, "chart": 80}
        label = await page.locator('#live figure[data-name="backlog"] svg').get_attribute(
            "aria-label"
        )
        assert label is not None and "now usb 80" in label


async def test_sync_now_without_a_configured_token_says_how_to_enable_it(
    browser: Browser, tmp_path: Path
) -> None:
    async with (
        serve(tmp_path, token=False) as appliance,
        opened(browser, viewport={"width": 1280, "height": 900}) as (_, page),
    ):
        asked: list[Request] = []
        page.on("request", lambda r: asked.append(r) if "/api/sync" in r.url else None)
        await show(page, appliance.base)
        await expect(page.get_by_role("button", name="Sync now")).to_have_count(0)
        help_text = page.locator('[data-name="sync-help"]')
        await expect(help_text).to_contain_text("has none configured")
        await expect(help_text).to_contain_text("status.token_file")
        await expect(help_text).to_contain_text("appliance sync --now")
        assert asked == []
