"""The example profiles (config/ship.yaml, config/turbine.yaml) forward what they journal: to
shore over `http` with a token from a secret file, and to a USB disk at port calls and service
visits; they watch the site with a camera; `appliance config check` passes them."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from config import ApplianceConfig, DirectoryDestination, HttpDestination
from config.loader import load_config
from inference.detect import COCO_LABELS
from tests.helpers import ROOT, receiver_process, run_cli, status_json

EXAMPLES = {"ship": "deck", "turbine": "nacelle"}  # profile -> the camera its site has
TOKEN = "profile-test-token-0123456789"
SHORE_TOKEN = Path("/run/secrets/shore_token")


def shipped(profile: str) -> ApplianceConfig:
    return load_config(ROOT / "config" / f"{profile}.yaml", environ={})


@pytest.mark.parametrize("profile", EXAMPLES)
def test_config_check_passes_the_profile(profile: str) -> None:
    # --skip-file-checks: the profile is meant for a ship or a turbine, where its secret files
    # are mounted; this machine has none of them.
    path = str(ROOT / "config" / f"{profile}.yaml")
    result = run_cli("config", "check", "--skip-file-checks", path)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    assert result.stderr == ""  # not even a warning: it forwards, and to two places
    if not SHORE_TOKEN.exists():
        # Checked without the flag, as on the machine it is for, it asks for the token file.
        on_site = run_cli("config", "check", path)
        assert on_site.returncode == 2
        assert str(SHORE_TOKEN) in on_site.stderr


@pytest.mark.parametrize("profile", EXAMPLES)
def test_the_profile_ships_to_shore_with_a_token_file_and_to_a_usb_disk(profile: str) -> None:
    cfg = shipped(profile)
    destinations = cfg.sync.destinations
    assert destinations, f"{profile}.yaml journals but forwards nowhere"
    shore = [d for d in destinations if isinstance(d, HttpDestination)]
    assert len(shore) == 1
    # The token is a secret file, where Docker and compose secrets are mounted; never inline.
    assert shore[0].token_file == SHORE_TOKEN
    assert shore[0].url.startswith("https://")
    usb = [d for d in destinations if isinstance(d, DirectoryDestination)]
    assert len(usb) == 1
    assert usb[0].path.is_absolute()
    # Only onto a mounted disk: an empty mount point must never fill the appliance's own disk.
    assert usb[0].require_mount


@pytest.mark.parametrize(("profile", "camera"), EXAMPLES.items())
def test_the_profile_watches_its_site_with_a_camera_the_detector_understands(
    profile: str, camera: str
) -> None:
    cameras = {c.name: c for c in shipped(profile).cameras}
    assert camera in cameras
    watched = cameras[camera]
    assert watched.url.startswith("rtsp://")
    assert watched.model == "detector"  # the built-in YOLOv3-tiny: its labels are COCO's
    named = {*watched.classes, *watched.blur_classes}
    named |= {c for zone in watched.zones for c in zone.classes}
    assert named <= set(COCO_LABELS), named - set(COCO_LABELS)
    assert watched.zones, "a zone entry is what makes an alert with a snapshot and a clip"


def at_this_site(profile: str, folder: Path, shore_url: str, token_file: Path) -> Path:
    """The shipped profile as a site would have it, in `folder`: its data directory there, its
    shore URL and token file pointing at a receiver here, its USB disk a folder here (not a mount
    point, so require_mount is off). The sources that need the site's hardware (live sources,
    cameras) are left out; its simulated ones run for 6 s of data, as fast as they can
    (`appliance replay`). Its sync section is otherwise as shipped."""
    doc: dict[str, Any] = yaml.safe_load((ROOT / "config" / f"{profile}.yaml").read_text())
    doc["appliance"]["data_dir"] = str(folder / "data")
    doc["sensors"] = [
        {**sensor, "pace": "fast", "duration": "6s"}
        for sensor in doc["sensors"]
        if sensor["type"] == "simulated"
    ]
    assert doc["sensors"], f"{profile}.yaml has no simulated source to replay"
    doc.pop("cameras", None)
    doc["status"] = {"listen": "127.0.0.1:0"}
    for destination in doc["sync"]["destinations"]:
        if destination["type"] == "http":
            destination["url"] = shore_url
            destination["token_file"] = str(token_file)
        elif destination["type"] == "directory":
            destination["path"] = str(folder / "usb")
            destination["require_mount"] = False
            (folder / "usb").mkdir()
    config = folder / f"{profile}.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return config


@pytest.mark.slow
@pytest.mark.parametrize("profile", EXAMPLES)
def test_what_the_profile_journals_reaches_shore_and_the_usb_disk(
    profile: str, tmp_path: Path
) -> None:
    appliance_id = shipped(profile).appliance.id
    assert appliance_id is not None
    token_file = tmp_path / "shore_token"
    token_file.write_text(TOKEN + "\n")
    tokens = tmp_path / "receiver-tokens"
    tokens.write_text(f"{appliance_id} {TOKEN}\n")
    args = ["--listen", "127.0.0.1:0", "--data", str(tmp_path / "shore"), "--tokens", str(tokens)]
    with receiver_process(args, tmp_path) as (url, _log):
        config = at_this_site(profile, tmp_path, url, token_file)
        replayed = run_cli("replay", "-c", str(config), timeout=120)
        assert replayed.returncode == 0, replayed.stderr
        journalled = status_json(config)["records"]["total"]
        assert journalled > 0

        drained = run_cli("sync", "--now", "-c", str(config), timeout=120)
        assert drained.returncode == 0, drained.stderr
        report = status_json(config)
        for name, destination in report["destinations"].items():
            assert destination["backlog_records"] == 0, (name, destination)
            assert destination["refused"] is None, (name, destination)

        request = urllib.request.Request(
            f"{url}/v1/appliances/{appliance_id}/summary",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            summary = json.loads(answer.read())
    assert summary["records"] == journalled
    manifests = list((tmp_path / "usb" / "records" / appliance_id).rglob("*.manifest.json"))
    assert manifests, "nothing reached the USB disk"
    on_disk = sum(json.loads(m.read_text())["records"] for m in manifests)
    assert on_disk == journalled
