"""The page's active alarms in a real browser (Debian's headless chromium driven by playwright)
against the real daemon in a subprocess: a camera on real footage through the built-in detector
floods the event list with objects, zone entries and clips while a sensor's limit alarm is
raised; the alarm is in the alarms section within 5 s, stays there while the flood pushes its
record out of the newest events, and leaves when the limit clears."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import reduce
from operator import xor
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, expect

from inference.builtin import lookup, model_cache_dir
from sensors.capture import builtin_footage
from tests.helpers import (
    ROOT,
    component_missing,
    log_events,
    start_daemon,
    stop_daemon,
    wait_for,
    write_config,
)

ARTIFACTS = ROOT / "test-artifacts"
ALARM_ID = "limit:gps:water_temp_c:max>40.0"
PAGE_EVENTS = 20  # the newest events the page lists
pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@dataclass(frozen=True)
class Daemon:
    base: str
    nmea_port: int


def nmea(body: str) -> bytes:
    """A sentence framed with its checksum (XOR of the characters between $ and *)."""
    return f"${body}*{reduce(xor, body.encode('ascii'), 0):02X}\r\n".encode("ascii")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def water_temperature(daemon: Daemon, celsius: float) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(nmea(f"IIMTW,{celsius:.1f},C"), ("127.0.0.1", daemon.nmea_port))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    try:
        builtin_footage("bikes")
    except ValueError as exc:
        component_missing(str(exc))
    if not (model_cache_dir() / lookup("yolov3-tiny").filename).is_file():
        component_missing("the built-in detector builtin:yolov3-tiny (`make` converts it)")
    tmp = tmp_path_factory.mktemp("alarms-browser")
    nmea_port = free_udp_port()
    config = write_config(
        tmp / "c.yaml",
        tmp / "data",
        [
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
                        "above": 40.0,
                        "priority": "alert",
                    }
                ],
            }
        ],
        appliance={"id": "alarms-01", "health_interval": "1h"},
        # The demo's camera: people and bicycles on a looped clip, a zone on its right side
        # (`event` priority here, so the only alarm on the page is the sensor's).
        cameras=[
            {
                "name": "yard",
                "url": "builtin:bikes",
                "loop": True,
                "fps": 5,
                "classes": ["person", "bicycle", "car", "bus", "truck", "motorbike"],
                "zones": [
                    {
                        "name": "cycle_lane",
                        "polygon": [[0.5, 0.0], [1.0, 0.0], [1.0, 1.0], [0.5, 1.0]],
                        "priority": "event",
                    }
                ],
            }
        ],
    )
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

        yield Daemon(wait_for(announced, 60, "the status page to listen"), nmea_port)
    finally:
        assert stop_daemon(proc) == 0, log.read_text()[-3000:]


async def api(daemon: Daemon, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{daemon.base}{path}") as response,
    ):
        assert response.status == 200, await response.text()
        return await response.json()


async def until(check: Any, within: float, what: str, every: float = 0.3) -> Any:
    """Await `check()` until it answers something truthy, for at most `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


def shown_count(text: str) -> int:
    """The number of alarms the header's count says ("1 alarm, 1 critical", "no alarms")."""
    found = re.search(r"\d+", text)
    if found is None:
        assert "no alarm" in text.lower(), text
        return 0
    return int(found.group())


async def test_an_alarm_raised_while_a_camera_floods_events_is_shown_until_it_clears(
    browser: Browser, daemon: Daemon
) -> None:
    async def running() -> bool:
        sources = (await api(daemon, "/api/status"))["daemon"]["sources"]
        return all(sources.get(n, {}).get("state") == "running" for n in ("gps", "yard"))

    await until(running, 60, "the NMEA source and the camera to run")

    async def flooding() -> bool:
        newest = (await api(daemon, f"/api/events?limit={PAGE_EVENTS}"))["events"]
        return len(newest) == PAGE_EVENTS and all(e["source"] == "yard" for e in newest)

    await until(flooding, 90, f"the camera's events to fill the {PAGE_EVENTS} newest")

    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page: Page = await context.new_page()
        await page.goto(daemon.base + "/")
        live = page.locator("#live")
        await expect(live).to_have_attribute("data-updates", "stream", timeout=10_000)
        section = page.locator('#live [data-name="alarms"]')
        alarm = section.locator(f'[data-alarm="{ALARM_ID}"]')
        count = page.locator('#live [data-name="alarm-count"]')
        await expect(section).to_have_count(1)
        await expect(alarm).to_have_count(0)
        assert shown_count(await count.inner_text()) == 0

        raised = time.monotonic()
        water_temperature(daemon, 55.0)
        await expect(alarm).to_be_visible(timeout=5_000)
        shown_after = time.monotonic() - raised
        print(f"alarm on the page {shown_after:.2f} s after the datagram")
        assert shown_after < 5
        assert await alarm.get_attribute("data-severity") == "critical"
        await expect(alarm).to_contain_text("water_temp_c max 55.0 over 40.0")
        assert shown_count(await count.inner_text()) == 1

        # The camera goes on: the alarm's record leaves the newest events, the alarm stays.
        (record,) = (await api(daemon, "/api/events?kind=limit&source=gps&limit=1"))["events"]

        async def flooded_out() -> bool:
            assert await alarm.count() == 1, "the alarm left the page before it cleared"
            newest = (await api(daemon, f"/api/events?limit={PAGE_EVENTS}"))["events"]
            return bool(min(e["seq"] for e in newest) > record["seq"])

        await until(flooded_out, 120, "the camera to push the limit record out", every=0.5)
        await expect(alarm).to_be_visible()
        assert shown_count(await count.inner_text()) == 1
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=ARTIFACTS / "status-page-alarm.png", full_page=True)

        cleared = time.monotonic()
        water_temperature(daemon, 20.0)
        await expect(alarm).to_have_count(0, timeout=5_000)
        print(f"alarm off the page {time.monotonic() - cleared:.2f} s after the datagram")

        async def none_counted() -> bool:
            return shown_count(await count.inner_text()) == 0

        await until(none_counted, 5, "the header's count to say no alarms")
        assert (await api(daemon, "/api/status"))["alarms"] == []
    finally:
        await context.close()
