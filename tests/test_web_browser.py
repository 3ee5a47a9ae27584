"""The status page in a real browser (Debian's headless chromium driven by playwright) against
the real daemon in a subprocess: its figures against /api/status, an alert arriving through the
event stream, the polling fallback, "Sync now" saying where its token is, the charts, no
sideways scroll on a phone, the CSP, and screenshots kept in test-artifacts/ (desktop and phone
size)."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import reduce
from operator import xor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import Browser, ConsoleMessage, FloatRect, Locator, Page, expect

from appliance.status.history import HISTORY_FILE
from tests.helpers import (
    ROOT,
    log_events,
    start_daemon,
    stop_daemon,
    wait_for,
    write_config,
)

ARTIFACTS = ROOT / "test-artifacts"
TOKEN = "browser-test-token-0123456789"
APPLIANCE_ID = "browser-01"
ALARM_ABOVE_C = 40.0
CSV_ROWS = 60
# One browser and one daemon for the module: each costs seconds to start.
pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]


@dataclass(frozen=True)
class Daemon:
    base: str
    nmea_port: int
    started: float  # Unix time, just before the daemon was started


def nmea(body: str) -> bytes:
    """A sentence framed with its checksum (XOR of the characters between $ and *)."""
    return f"${body}*{reduce(xor, body.encode('ascii'), 0):02X}\r\n".encode("ascii")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def seed_history(data: Path, now: float) -> int:
    """Three hours of minute samples up to a minute ago, as a previous run of this appliance
    would have left them: the charts have a line before the daemon's own samples add to it."""
    samples = []
    for minute in range(180, 0, -1):
        backlog = 3 * (180 - abs(minute - 90) * 2)
        samples.append(
            {
                "t": round(now - minute * 60.0, 3),
                "journalled_per_min": round(20.0 + 4.0 * math.sin(minute / 9.0), 2),
                "destinations": {
                    "usb": {
                        "backlog_records": backlog,
                        "backlog_bytes": backlog * 300,
                        "acked_per_min": 0.0 if minute > 90 else 26.0,
                    }
                },
            }
        )
    doc = {
        "format": "appliance-status-history",
        "version": 1,
        "appliance_id": APPLIANCE_ID,
        "samples": samples,
    }
    (data / HISTORY_FILE).write_text(json.dumps(doc))
    return len(samples)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("browser")
    data = tmp / "data"
    data.mkdir()
    token_file = tmp / "status.token"
    token_file.write_text(TOKEN + "\n")
    start = time.time()
    csv = tmp / "line.csv"
    csv.write_text(
        "timestamp,temp\n"
        + "".join(f"{start - CSV_ROWS + i:.1f},{20 + i % 5}\n" for i in range(CSV_ROWS))
    )
    nmea_port = free_udp_port()
    config = write_config(
        tmp / "c.yaml",
        data,
        [
            # A finite source: once it has finished, the journal only grows when the test
            # makes the NMEA source alarm, so the page and /api/status can be compared.
            {"name": "line", "type": "csv", "path": str(csv), "timestamp_format": "epoch_s"},
            {
                "name": "gps",
                "type": "nmea",
                "transport": "udp",
                "host": "127.0.0.1",
                "port": nmea_port,
                "window": "300ms",
                "limits": [
                    {
                        "feature": "max",
                        "channel": "water_temp_c",
                        "above": ALARM_ABOVE_C,
                        "priority": "alert",
                    }
                ],
            },
        ],
        appliance={"id": APPLIANCE_ID, "health_interval": "1h"},
        sync={
            "interval": "1h",
            "destinations": [{"name": "usb", "type": "directory", "path": "outbox"}],
        },
        status={"token_file": str(token_file)},
    )
    seed_history(data, start)
    log = tmp / "daemon.log"
    proc = start_daemon(config, log)
    try:

        def announced() -> str | None:
            try:
                events = log_events(log)
            except json.JSONDecodeError:  # a line still being written
                return None
            urls = [e["url"] for e in events if e["msg"] == "status page listening"]
            return urls[-1].rstrip("/") if urls else None

        yield Daemon(wait_for(announced, 30, "the status page to listen"), nmea_port, start)
    finally:
        assert stop_daemon(proc) == 0, log.read_text()[-3000:]


@dataclass
class OpenPage:
    page: Page
    csp_violations: list[str]


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser, daemon: Daemon) -> AsyncIterator[OpenPage]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    opened = OpenPage(await context.new_page(), [])

    def note_csp_violation(message: ConsoleMessage) -> None:
        # A style or script the Content-Security-Policy blocks shows only in the console.
        if "Content Security Policy" in message.text:
            opened.csp_violations.append(message.text)

    opened.page.on("console", note_csp_violation)
    try:
        yield opened
    finally:
        await context.close()
    assert opened.csp_violations == []


async def api(path: str, daemon: Daemon) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{daemon.base}{path}") as response,
    ):
        assert response.status == 200, await response.text()
        return await response.json()


async def until(check: Any, within: float, what: str) -> Any:
    """Await `check()` until it answers something truthy, for at most `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


# What the test reads off the page in one go, so a live update cannot land halfway through.
READ_FIGURES = """() => {
  const rows = (name) => Array.from(
    document.querySelectorAll(`#live table[data-name="${name}"] tr`)).slice(1)
    .map((tr) => Array.from(tr.cells).map((td) => td.textContent.trim()));
  return {
    appliance_id: document.querySelector("h1").textContent.trim(),
    records: Object.fromEntries(rows("records").map((r) => [r[0], Number(r[1])])),
    sources: Object.fromEntries(rows("sources").map((r) => [r[0], r[1]])),
    backlog: Object.fromEntries(rows("destinations").map((r) => [r[0], r[2]])),
  };
}"""


# Elements that stick out of the page's right edge (what would make a phone scroll sideways),
# and boxes that scroll sideways inside the page (a table wider than the screen).
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


async def test_the_page_shows_the_figures_of_api_status(page: OpenPage, daemon: Daemon) -> None:
    async def csv_journalled() -> bool:
        # The state is live; the journal's figures are shared for 2 s, so they lag behind it.
        report = await api("/api/status", daemon)
        finished = report["daemon"]["sources"]["line"]["state"] == "finished"
        return finished and int(report["records"]["by_priority"]["telemetry"]) >= CSV_ROWS // 2

    await until(csv_journalled, 30, "the CSV source's windows in the journal")

    async def same_figures() -> tuple[dict[str, Any], dict[str, Any]] | None:
        await page.page.goto(daemon.base + "/")
        shown: dict[str, Any] = await page.page.evaluate(READ_FIGURES)
        report = await api("/api/status", daemon)
        backlog = {
            priority: int(part.split(" ")[1])
            for part in shown["backlog"]["usb"].split(", ")
            for priority in [part.split(" ")[0]]
        }
        expected = {
            "appliance_id": report["appliance_id"],
            "records": report["records"]["by_priority"],
            "sources": {n: s["state"] for n, s in report["daemon"]["sources"].items()},
            "backlog": {
                p: b["records"] for p, b in report["destinations"]["usb"]["backlog"].items()
            },
        }
        actual = {**shown, "backlog": backlog}
        return (actual, report) if actual == expected else None

    shown, report = await until(same_figures, 15, "the page's figures to match /api/status")
    assert shown["appliance_id"] == APPLIANCE_ID
    assert shown["sources"] == {"line": "finished", "gps": "running"}
    assert report["records"]["by_priority"]["telemetry"] > 0
    assert sum(shown["backlog"].values()) == report["destinations"]["usb"]["backlog_records"] > 0


async def test_an_alert_appears_within_seconds_through_the_stream(
    page: OpenPage, daemon: Daemon
) -> None:
    await page.page.goto(daemon.base + "/")
    live = page.page.locator("#live")
    await expect(live).to_have_attribute("data-updates", "stream", timeout=10_000)
    before = {e["seq"] for e in (await api("/api/events?limit=500", daemon))["events"]}
    alarm = (
        page.page.locator('#live table[data-name="events"] tr')
        .filter(has=page.page.get_by_role("cell", name="gps", exact=True))
        .filter(has=page.page.get_by_role("cell", name="alert", exact=True))
    )
    await expect(alarm).to_have_count(0)

    sent = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(nmea(f"IIMTW,{ALARM_ABOVE_C + 15:.1f},C"), ("127.0.0.1", daemon.nmea_port))
    await expect(alarm.first).to_be_visible(timeout=10_000)
    seen_after = time.monotonic() - sent

    events = (await api("/api/events?limit=500", daemon))["events"]
    (journalled,) = [e for e in events if e["seq"] not in before and e["source"] == "gps"]
    assert journalled["priority"] == "alert" and journalled["kind"] == "limit"
    assert await alarm.first.get_by_role("cell", name="limit", exact=True).count() == 1
    # Through the stream, not a reload: the page never left the stream mode.
    assert await live.get_attribute("data-updates") == "stream"
    print(f"alert on the page {seen_after:.2f} s after the datagram")
    assert seen_after < 10


async def test_the_page_falls_back_to_polling_when_the_stream_fails(
    page: OpenPage, daemon: Daemon
) -> None:
    await page.page.route(
        "**/api/stream", lambda route: route.fulfill(status=503, body="no stream here")
    )
    async with page.page.expect_response("**/partial", timeout=10_000) as polled:
        await page.page.goto(daemon.base + "/")
    assert (await polled.value).status == 200
    await expect(page.page.locator("#live")).to_have_attribute("data-updates", "polling")
    await expect(page.page.locator('#live table[data-name="sources"]')).to_contain_text("gps")


async def test_sync_now_says_where_the_token_is_before_and_after_a_wrong_one(
    page: OpenPage, daemon: Daemon
) -> None:
    before = (await api("/api/status", daemon))["destinations"]["usb"]
    asked: list[str] = []
    page.page.on("request", lambda r: asked.append(r.url) if "/api/sync" in r.url else None)
    await page.page.goto(daemon.base + "/")
    await expect(page.page.locator('[data-name="sync-help"]')).to_contain_text("status.token_file")
    result = page.page.locator("#sync-result")

    # Nothing typed: no request (it could only be refused), but where the token is.
    await page.page.get_by_role("button", name="Sync now").click()
    await expect(result).to_contain_text("Type the status token first")
    await expect(result).to_contain_text("the file that status.token_file names")
    assert asked == []

    # A wrong one: the server refuses it, and the page says so in words, not a bare status.
    await page.page.get_by_label("token").fill("not-the-token-0123456789")
    async with page.page.expect_response("**/api/sync") as answered:
        await page.page.get_by_role("button", name="Sync now").click()
    assert (await answered.value).status == 401
    await expect(result).to_contain_text("that token is not the status token")
    await expect(result).to_contain_text("status.token_file")
    await expect(result).not_to_contain_text("401")
    # No drain started: the engine's figures are where they were.
    after = (await api("/api/status", daemon))["destinations"]["usb"]
    assert (after["last_success"], after["records_sent"]) == (
        before["last_success"],
        before["records_sent"],
    )


async def shown_box(element: Locator) -> FloatRect:
    """The element's box once it is shown: the stream replaces the live fragment at any moment,
    and an element caught between the old fragment and the new one has no box."""
    for _ in range(50):
        await element.wait_for(state="visible")
        box = await element.bounding_box()
        if box is not None:
            return box
    raise AssertionError("the element never stayed on the page long enough to be measured")


async def test_the_charts_draw_the_history_on_desktop_and_phone(
    browser: Browser, page: OpenPage, daemon: Daemon
) -> None:
    async def with_this_runs_sample() -> dict[str, Any] | None:
        doc: dict[str, Any] = await api("/api/history", daemon)
        return doc if doc["samples"][-1]["t"] >= daemon.started else None

    history = await until(with_this_runs_sample, 15, "a history sample of this run")
    assert len(history["samples"]) >= 2 and history["destinations"] == ["usb"]

    await page.page.goto(daemon.base + "/")
    for name in ("backlog", "throughput"):
        chart = page.page.locator(f'#live figure[data-name="{name}"] svg')
        await expect(chart).to_have_attribute("role", "img")
        label = await chart.get_attribute("aria-label")
        assert label and "from 3h" in label and "now" in label
        d = await chart.locator("path.line").first.get_attribute("d")
        assert d is not None and d.startswith("M") and d.count("L") >= 50  # hours of samples
        box = await shown_box(chart)
        assert box["width"] > 500  # the column's width, not a fixed size
    backlog_label = await page.page.locator('#live figure[data-name="backlog"] svg').get_attribute(
        "aria-label"
    )
    assert backlog_label is not None and "highest 540" in backlog_label  # the seeded peak

    ARTIFACTS.mkdir(exist_ok=True)
    await page.page.screenshot(path=ARTIFACTS / "status-page.png", full_page=True)
    phone = await browser.new_context(
        viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True
    )
    try:
        small = await phone.new_page()
        await small.goto(daemon.base + "/")
        chart = small.locator('#live figure[data-name="backlog"] svg')
        box = await shown_box(chart)
        assert 300 < box["width"] <= 390
        # Nothing scrolls sideways: not the page, not a table inside it (rows stack there).
        wide = await small.evaluate("document.documentElement.scrollWidth")
        assert wide <= 390, await small.evaluate(OVERFLOWING)
        assert await small.evaluate(OVERFLOWING) == []
        await small.screenshot(path=ARTIFACTS / "status-page-phone.png", full_page=True)
    finally:
        await phone.close()
    assert (ARTIFACTS / "status-page.png").stat().st_size > 10_000
    assert (ARTIFACTS / "status-page-phone.png").stat().st_size > 10_000
