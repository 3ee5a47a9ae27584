"""Rotating tokens as docs/operations.md says: the `http` destination's token (`token_file`) and
the status page's (`status.token_file`) are read when the daemon starts, so a new token written
into its file takes effect at the next start, and not before."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from sync.reader import JournalReader
from tests.helpers import (
    fast_sensor,
    receiver_process,
    run_cli,
    start_daemon,
    status_json,
    stop_daemon,
    wait_for,
    write_config,
)

APPLIANCE_ID = "test-01"  # write_config's
OLD_STATUS = "old-status-token-0123456789"
NEW_STATUS = "new-status-token-9876543210"


def add_token(shore: Path) -> tuple[str, str]:
    """`appliance receiver tokens add` on the shore's store: (token id, token)."""
    added = run_cli("receiver", "--data", str(shore), "tokens", "add", APPLIANCE_ID)
    assert added.returncode == 0, added.stderr
    found = re.search(r"token (\w+) for", added.stderr)
    assert found, added.stderr
    return found[1], added.stdout.strip()


def sync_answers(data: Path, token: str) -> int:
    """The status code of POST /api/sync with `token` on the page the daemon runs now (on a
    loopback address that is the route that asks for the status token)."""
    with JournalReader.open(data) as reader:
        url = (reader.meta("status_url") or "").rstrip("/")
    request = urllib.request.Request(
        f"{url}/api/sync", method="POST", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def received(url: str, token: str) -> int:
    request = urllib.request.Request(
        f"{url}/v1/appliances/{APPLIANCE_ID}/summary",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        summary: dict[str, Any] = json.loads(answer.read())
    return int(summary["records"])


def shore_state(config: Path) -> dict[str, Any]:
    found: dict[str, Any] = status_json(config)["destinations"]["shore"]
    return found


@pytest.mark.slow
def test_new_tokens_take_effect_when_the_daemon_restarts(tmp_path: Path) -> None:
    shore, data = tmp_path / "shore", tmp_path / "data"
    old_id, old_token = add_token(shore)
    shore_token, status_token = tmp_path / "shore_token", tmp_path / "status_token"
    shore_token.write_text(old_token + "\n")
    status_token.write_text(OLD_STATUS + "\n")
    args = ["--listen", "127.0.0.1:0", "--data", str(shore)]
    with receiver_process(args, tmp_path) as (url, _log):
        config = write_config(
            tmp_path / "c.yaml",
            data,
            [fast_sensor("a")],
            status={"token_file": str(status_token)},
            sync={
                "interval": "1s",
                "retry_max": "1s",
                "destinations": [
                    {"name": "shore", "type": "http", "url": url, "token_file": str(shore_token)}
                ],
            },
        )
        daemon = start_daemon(config, tmp_path / "daemon.log")
        try:
            wait_for(lambda: received(url, old_token) > 0, 60, "records to reach shore")
            assert sync_answers(data, OLD_STATUS) == 202

            # New tokens into both files while the daemon runs, and the old destination token
            # revoked ashore (the receiver refuses it within 5 s).
            new_id, new_token = add_token(shore)
            shore_token.write_text(new_token + "\n")
            status_token.write_text(NEW_STATUS + "\n")
            revoked = run_cli("receiver", "--data", str(shore), "tokens", "revoke", "--id", old_id)
            assert revoked.returncode == 0, revoked.stderr

            # The running daemon still sends the token it read at start: shore refuses it...
            refused = wait_for(
                lambda: shore_state(config)["refused"], 60, "shore to refuse the old token"
            )
            assert "401" in refused and "token_file" in refused
            # ...and its page still takes the old status token, not the new one.
            assert sync_answers(data, OLD_STATUS) == 202
            assert sync_answers(data, NEW_STATUS) == 401
            before = received(url, new_token)
        finally:
            assert stop_daemon(daemon) == 0

        daemon = start_daemon(config, tmp_path / "daemon.log")
        try:
            # Restarted, it reads both files again: shore takes its records again...
            wait_for(lambda: received(url, new_token) > before, 60, "records under the new token")
            wait_for(
                lambda: shore_state(config)["refused"] is None,
                30,
                "the refusal to clear",
                interval=0.5,
            )
            # ...and the page takes the new status token only.
            wait_for(lambda: sync_answers(data, NEW_STATUS) == 202, 30, "the restarted page")
            assert sync_answers(data, OLD_STATUS) == 401
        finally:
            assert stop_daemon(daemon) == 0
    assert new_id != old_id
