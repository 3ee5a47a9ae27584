"""bench.sync_drain runs end to end at a tiny size and prints one JSON object whose drains lost
nothing; BodyTap counts request headers, bodies and cut bodies as they cross."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.sync_drain import BodyTap

ROOT = Path(__file__).resolve().parents[1]


def test_a_tiny_run_prints_one_json_object_and_loses_nothing(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.sync_drain",
            "--records=3000",
            "--payload-mb=3",
            "--cap-seconds=3",
            "--cut-mib=1",
            "--cuts=2",
            f"--tmp-dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=True,
    )
    result = json.loads(done.stdout)
    assert result["ok"] is True, done.stdout
    drain = result["drain"]
    assert drain["engine"]["receiver_summary"]["records"] == 3000

    def undated(summary: dict[str, Any]) -> dict[str, Any]:
        # Each run ships to its own receiver at its own time: compare all but the times seen.
        journals = [
            {k: v for k, v in journal.items() if k not in ("first_seen", "last_seen")}
            for journal in summary["journals"]
        ]
        return {**summary, "journals": journals}

    for baseline in ("baseline_before", "baseline_after"):
        assert undated(drain[baseline]["receiver_summary"]) == undated(
            drain["engine"]["receiver_summary"]
        )
    assert drain["ratio"] > 0
    assert result["bandwidth"]["steady_bytes_per_s"] > 0
    assert result["resend"]["cuts"] == 2
    assert result["resend"]["checks"]["sha256_match"] is True
    assert list(tmp_path.iterdir()) == []  # the data dir is removed


async def test_body_tap_counts_headers_bodies_and_a_cut_body() -> None:
    async def echo_length(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await request.read())))

    app = web.Application()
    app.router.add_route("*", "/x", echo_length)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with BodyTap("127.0.0.1", port) as tap, aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{tap.bound_port}/x"
            for method, data in (("PUT", b"a" * 100_000), ("PATCH", b"b" * 5), ("HEAD", b"")):
                async with session.request(method, url, data=data or None) as response:
                    await response.read()
            assert tap.stats.body_bytes == {"PUT": 100_000, "PATCH": 5}
            assert tap.stats.requests == {"PUT": 1, "PATCH": 1, "HEAD": 1}
            assert tap.stats.header_bytes == tap.stats.total_bytes - 100_005 > 0

            # A request whose connection dies mid-body is counted as cut, with what got through.
            reader, writer = await asyncio.open_connection("127.0.0.1", tap.bound_port)
            writer.write(
                b"PATCH /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"c" * 300
            )
            await writer.drain()
            for _ in range(100):
                if tap.stats.body_bytes["PATCH"] == 305:
                    break
                await asyncio.sleep(0.01)
            writer.transport.abort()
            for _ in range(100):
                if tap.stats.cut:
                    break
                await asyncio.sleep(0.01)
            assert tap.stats.cut == [("PATCH", 300, 1000)]
            del reader
    finally:
        await runner.cleanup()
