"""The model lifecycle end to end, as the issue's "done when" says it: a model published at the
reference receiver reaches a running appliance over its `http` destination, proves itself in
shadow, takes over, and every step is on the status page and in the records shipped ashore.
Everything is real: the receiver on 127.0.0.1, the daemon (in this process) with a camera on real
footage, signed packages of real ONNX detectors (tests/test_canary.py's), the model store."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from config import ApplianceConfig
from receiver import build_receiver_app, serve_receiver
from receiver.model_feed import publish_package
from sync.reader import JournalReader
from tests.test_canary import APPLIANCE, install, key, make_config, package_status, publish, running

__all__ = ["key"]  # the module-scoped signing key fixture of tests/test_canary.py

TOKEN = "token-of-boat-7"
ADMIN = "admin-of-the-fleet"


def with_receiver(cfg: ApplianceConfig, url: str, token_file: Path) -> ApplianceConfig:
    """The canary test's config, shipping to the receiver and pulling model packages from it."""
    doc = cfg.model_dump(mode="json", exclude_unset=True)
    doc["sync"]["destinations"] = [
        {"name": "shore", "type": "http", "url": url, "token_file": str(token_file), "models": True}
    ]
    doc["model_packages"]["pull_interval"] = "1s"
    return ApplianceConfig.model_validate(doc)


def shipped_model_events(receiver_data: Path) -> list[dict[str, Any]]:
    """The `model` records the receiver holds for the appliance, in seq order."""
    db = receiver_data / "receiver.db"
    if not db.exists():
        return []
    with closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT line FROM records WHERE appliance_id = ? AND kind = 'model' ORDER BY seq",
            (APPLIANCE,),
        ).fetchall()
    return [json.loads(line)["body"] for (line,) in rows]


async def test_a_published_model_reaches_the_appliance_proves_itself_and_takes_over(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    receiver_data = tmp_path / "receiver"
    app = build_receiver_app(receiver_data, {APPLIANCE: TOKEN}, admin_tokens=[ADMIN])
    async with serve_receiver(app, "127.0.0.1", 0) as bound:
        base = f"http://127.0.0.1:{bound[0][1]}"
        cfg = with_receiver(
            make_config(tmp_path, key, loop=True, canary={"watch": "2s"}), base, token_file
        )
        install(cfg, tmp_path, key)  # v1 imported and active before the appliance starts
        async with running(cfg) as daemon:
            answer = await publish_package(
                base, ADMIN, publish(tmp_path / "pub", key, "2.0", "good"), groups=()
            )
            assert answer["version"] == "2.0"
            published_at = time.monotonic()

            deadline = published_at + 90
            while package_status(daemon)["active"] != "2.0":
                assert time.monotonic() < deadline, package_status(daemon)
                await asyncio.sleep(0.1)
            took_over_s = time.monotonic() - published_at

            # The status page says so: /api/status of the running daemon.
            with JournalReader.open(cfg.appliance.data_dir) as reader:
                status_url = reader.meta("status_url")
            assert status_url
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{status_url.rstrip('/')}/api/status") as response,
            ):
                assert response.status == 200
                status = await response.json()
            cars = status["daemon"]["models"]["packages"]["cars"]
            assert cars["active"] == "2.0" and cars["previous"] == "1.0", cars

            # Every step reached the shore as records, in the order they happened.
            wanted = ["staged", "canary_started", "canary_passed", "activated"]
            deadline = time.monotonic() + 30
            while True:
                events = [
                    e["event"]
                    for e in shipped_model_events(receiver_data)
                    if e.get("version") == "2.0"
                ]
                if all(w in events for w in wanted):
                    break
                assert time.monotonic() < deadline, events
                await asyncio.sleep(0.2)
            assert [e for e in events if e in wanted] == wanted
    # A published model took over within the minute an appliance may be online.
    assert took_over_s < 60, took_over_s
