"""The on-device model store (appliance/models/store.py) and `appliance models ...` for packages:
real keys, real ONNX files, real flocks, real kills; a refused package never touches the active
model, and a `package:NAME` camera model detects through the real onnxruntime session."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.cli import main
from appliance.models.store import ModelStore, StoreError, UnknownPackage, packages_dir
from config import ConfigError, DetectorModel, load_config
from inference.detect import open_detector
from inference.package_keys import TrustedKeys, public_key_text
from inference.package_manifest import PackageError, Thresholds
from inference.packages import build_package
from inference.session import ModelError
from tests.helpers import ROOT, cli_env
from tests.onnx_graphs import Box, constant_model, rank2_input_model, yolov8_output

APPLIANCE = "boat-7"
LABELS = ("person", "bicycle", "car")
# A 768 x 576 frame letterboxed into 640 x 640: scaled by 5/6, 80 rows of padding above.
SCALE, PAD_Y = 5 / 6, 80.0
CAR = Box(400, 300, 700, 500, class_id=2, score=0.8)
BICYCLE = Box(600, 50, 680, 120, class_id=1, score=0.6)


def to_network(box: Box) -> Box:
    return Box(
        box.x1 * SCALE,
        box.y1 * SCALE + PAD_Y,
        box.x2 * SCALE,
        box.y2 * SCALE + PAD_Y,
        box.class_id,
        box.score,
    )


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def store(tmp_path: Path, key: Ed25519PrivateKey) -> ModelStore:
    trusted = TrustedKeys.parse({"publisher": public_key_text(key.public_key())})
    return ModelStore(packages_dir(tmp_path / "data"), trusted, appliance_id=APPLIANCE)


def model_file(folder: Path, version: str) -> Path:
    """A detector whose output differs per version (so its bytes and sha256 do)."""
    boxes = [to_network(CAR), to_network(BICYCLE)]
    output = yolov8_output(boxes, len(LABELS), anchors=200 + len(version))
    folder.mkdir(parents=True, exist_ok=True)
    return constant_model(folder / f"cars-{version}.onnx", {"output0": output})


def pack(
    folder: Path,
    key: Ed25519PrivateKey,
    version: str,
    *,
    name: str = "cars",
    targets: tuple[str, ...] = (),
) -> Path:
    output = folder / f"{name}-{version}.tar"
    build_package(
        output,
        key,
        name=name,
        version=version,
        task="detector",
        model=model_file(folder / "models", version),
        labels=LABELS,
        thresholds=Thresholds(score_threshold=0.7),
        targets=targets,
    )
    return output


def installed(store: ModelStore, key: Ed25519PrivateKey, tmp_path: Path, *versions: str) -> None:
    for version in versions:
        store.import_package(pack(tmp_path / "pub", key, version))


def states(store: ModelStore) -> dict[str, str]:
    return {f"{e.name} {e.version}": e.state for e in store.entries()}


def sha256_of(package: Path) -> str:
    with tarfile.open(package) as archive:
        handle = archive.extractfile("model.onnx")
        assert handle is not None
        with handle:
            return hashlib.sha256(handle.read()).hexdigest()


def data_offset(package: Path, member: str) -> int:
    with tarfile.open(package) as archive:
        info = archive.getmember(member)
        return info.offset_data + info.size // 2


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# -- lifecycle ---------------------------------------------------------------------------------------


def test_import_activate_rollback(
    tmp_path: Path, store: ModelStore, key: Ed25519PrivateKey
) -> None:
    installed(store, key, tmp_path, "1.0")
    assert states(store) == {"cars 1.0": "staged"}
    with pytest.raises(UnknownPackage, match="cars has no active version"):
        store.resolve("cars")

    first = store.activate("cars", "1.0")
    assert first is not None and (first.version, first.previous) == ("1.0", None)
    assert store.activate("cars", "1.0") is None  # already active: nothing changes
    with pytest.raises(StoreError, match="no previous version to roll back to"):
        store.rollback("cars")

    installed(store, key, tmp_path, "2.0")
    store.activate("cars", "2.0")
    assert states(store) == {"cars 1.0": "previous", "cars 2.0": "active"}
    assert store.resolve("cars").manifest.version == "2.0"

    back = store.rollback("cars")
    assert (back.version, back.previous) == ("1.0", "2.0")
    assert states(store) == {"cars 1.0": "active", "cars 2.0": "previous"}
    resolved = store.resolve("cars")
    assert resolved.manifest.version == "1.0"
    assert resolved.model_path == store.root / "cars" / "1.0" / "model.onnx"
    assert json.loads((store.root / "cars" / "active.json").read_text()) == {
        "active": "1.0",
        "previous": "2.0",
    }
    assert [(h["action"], h["version"]) for h in store.history()] == [
        ("import", "1.0"),
        ("activate", "1.0"),
        ("import", "2.0"),
        ("activate", "2.0"),
        ("rollback", "1.0"),
    ]


def test_reimport_and_conflicting_versions(
    tmp_path: Path, store: ModelStore, key: Ed25519PrivateKey
) -> None:
    package = pack(tmp_path / "a", key, "1.0")
    _, events = store.import_package(package)
    assert [e.action for e in events] == ["import"]
    _, again = store.import_package(package)
    assert again == []  # same bytes: unchanged
    other = tmp_path / "other.tar"
    build_package(
        other,
        key,
        name="cars",
        version="1.0",
        task="detector",
        model=model_file(tmp_path / "b", "another model"),
    )
    with pytest.raises(StoreError, match="already installed with other contents"):
        store.import_package(other)
    assert store.import_package(package)[0].model_sha256 == sha256_of(package)


def test_prune_keeps_active_previous_and_newest(
    tmp_path: Path, store: ModelStore, key: Ed25519PrivateKey
) -> None:
    installed(store, key, tmp_path, "1", "2")
    store.activate("cars", "1")
    store.activate("cars", "2")
    installed(store, key, tmp_path, "3", "4")  # keep 3: 3 goes when 4 arrives
    assert states(store) == {"cars 1": "previous", "cars 2": "active", "cars 4": "staged"}
    assert not (store.root / "cars" / "3").exists()
    assert ("prune", "3") in [(h["action"], h["version"]) for h in store.history()]
    assert list((store.root / ".staging").iterdir()) == []


# -- refusals leave the active model alone ------------------------------------------------------------


def _tampered_model(path: Path) -> None:
    flip(path, data_offset(path, "model.onnx"))


def _tampered_manifest(path: Path) -> None:
    flip(path, data_offset(path, "manifest.json"))


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BAD_PACKAGES: dict[str, tuple[str, str]] = {
    # case: (cause, words in the message)
    "tampered model": ("hash_mismatch", "hash mismatch for model.onnx"),
    "tampered manifest": ("bad_signature", "bad signature"),
    "wrong key": ("unknown_key", "not a trusted key"),
    "truncated": ("truncated", "truncated"),
    "another appliance": ("not_addressed", f"not addressed to appliance {APPLIANCE}"),
}


@pytest.mark.parametrize("case", sorted(BAD_PACKAGES))
def test_refused_packages_leave_the_active_model_untouched(
    tmp_path: Path, store: ModelStore, key: Ed25519PrivateKey, case: str
) -> None:
    installed(store, key, tmp_path, "1.0")
    store.activate("cars", "1.0")
    before = store.resolve("cars")
    history = store.history()

    signer = Ed25519PrivateKey.generate() if case == "wrong key" else key
    targets = ("boat-1", "group:fleet-b") if case == "another appliance" else ()
    bad = pack(tmp_path / "bad", signer, "2.0", targets=targets)
    damage = {
        "tampered model": _tampered_model,
        "tampered manifest": _tampered_manifest,
        "truncated": _truncated,
    }.get(case)
    if damage is not None:
        damage(bad)

    cause, words = BAD_PACKAGES[case]
    with pytest.raises(PackageError) as info:
        store.import_package(bad)
    assert info.value.cause == cause
    assert str(info.value).startswith(f"{bad}: ") and words in str(info.value)

    after = store.resolve("cars")
    assert (after.manifest.version, after.model_sha256) == ("1.0", before.model_sha256)
    assert states(store) == {"cars 1.0": "active"}
    assert not (store.root / "cars" / "2.0").exists()
    assert list((store.root / ".staging").iterdir()) == []
    assert store.history() == history


def test_a_file_changed_on_disk_is_never_loaded_or_activated(
    tmp_path: Path, store: ModelStore, key: Ed25519PrivateKey
) -> None:
    installed(store, key, tmp_path, "1.0", "2.0")
    store.activate("cars", "1.0")
    flip(store.root / "cars" / "2.0" / "model.onnx", 200)
    with pytest.raises(PackageError, match=r"hash mismatch for model\.onnx"):
        store.activate("cars", "2.0")
    assert store.resolve("cars").manifest.version == "1.0"

    flip(store.root / "cars" / "1.0" / "model.onnx", 200)
    with pytest.raises(PackageError, match="the file on disk changed"):
        store.resolve("cars")
    with pytest.raises(ModelError, match="hash mismatch"):
        open_detector(DetectorModel(path="package:cars", threads=1), "front", packages=store)


# -- atomicity ---------------------------------------------------------------------------------------------


def fail_next_replace(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on os.replace raises once (as if the process died right there), then works; the
    targets it was called with are listed in the returned list."""
    real = os.replace
    calls: list[str] = []

    def failing(src: Any, dst: Any) -> None:
        calls.append(str(dst))
        if len(calls) == 1:
            raise OSError(5, "simulated crash at rename")
        real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    return calls


def test_activation_interrupted_at_the_rename_keeps_the_old_state(
    tmp_path: Path, store: ModelStore, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    installed(store, key, tmp_path, "1.0", "2.0")
    store.activate("cars", "1.0")
    renamed = fail_next_replace(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        store.activate("cars", "2.0")
    assert renamed == [str(store.root / "cars" / "active.json")]
    assert states(store) == {"cars 1.0": "active", "cars 2.0": "staged"}
    assert store.resolve("cars").manifest.version == "1.0"
    assert not list((store.root / "cars").glob(".*partial"))
    assert store.history()[-1]["action"] == "activate"
    assert store.history()[-1]["version"] == "1.0"
    store.activate("cars", "2.0")
    assert store.resolve("cars").manifest.version == "2.0"


def test_import_interrupted_at_the_rename_installs_nothing(
    tmp_path: Path, store: ModelStore, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    installed(store, key, tmp_path, "1.0")
    store.activate("cars", "1.0")
    package = pack(tmp_path / "pub", key, "2.0")
    fail_next_replace(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        store.import_package(package)
    assert states(store) == {"cars 1.0": "active"}
    assert list((store.root / ".staging").iterdir()) == []
    store.import_package(package)
    assert states(store) == {"cars 1.0": "active", "cars 2.0": "staged"}


def test_rename_failures_at_every_step(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail the n-th rename of an import + activate + rollback sequence, for every n: each time
    the store is left consistent, and the active model resolves to the old or the new version."""
    trusted = TrustedKeys.parse({"publisher": public_key_text(key.public_key())})
    packages = [pack(tmp_path / "pub", key, v) for v in ("1.0", "2.0")]
    real = os.replace
    for failing_call in range(1, 6):
        store = ModelStore(
            packages_dir(tmp_path / f"data{failing_call}"), trusted, appliance_id=APPLIANCE
        )
        store.import_package(packages[0])
        store.activate("cars", "1.0")
        count = 0

        def replace(src: Any, dst: Any, *, _fail_at: int = failing_call) -> None:
            nonlocal count
            count += 1
            if count == _fail_at:
                raise OSError(5, "simulated crash at rename")
            real(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(OSError, match="simulated crash"):
            store.import_package(packages[1])
            store.activate("cars", "2.0")
            store.rollback("cars")
            store.rollback("cars")
            store.rollback("cars")
        monkeypatch.setattr(os, "replace", real)
        active = store.resolve("cars")
        assert active.manifest.version in ("1.0", "2.0")
        assert states(store)[f"cars {active.manifest.version}"] == "active"
        switches = [h for h in store.history() if h["action"] in ("activate", "rollback")]
        assert switches[-1]["version"] == active.manifest.version
        # Whatever was interrupted can be done now, and leaves no debris behind.
        store.import_package(packages[1])
        store.activate("cars", "2.0")
        assert store.resolve("cars").manifest.version == "2.0"
        assert list((store.root / ".staging").iterdir()) == []
        assert not list((store.root / "cars").glob(".*partial"))


_KILLER = """
import os, signal, sys
from pathlib import Path
from appliance.models.store import ModelStore
from config import load_config

when = sys.argv[2]
real = os.replace
def replace(src, dst):
    if str(dst).endswith("active.json"):
        if when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
ModelStore.from_config(load_config(Path(sys.argv[1]))).activate("cars", "2.0")
"""


def write_config(tmp_path: Path, key: Ed25519PrivateKey, **extra: Any) -> Path:
    doc: dict[str, Any] = {
        "appliance": {"id": APPLIANCE, "data_dir": str(tmp_path / "data")},
        "model_packages": {"trusted_keys": {"publisher": public_key_text(key.public_key())}},
        **extra,
    }
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_during_activation(tmp_path: Path, key: Ed25519PrivateKey, when: str) -> None:
    """SIGKILL right before or right after the pointer's rename: the old or the new version is
    active, never anything else, and the store carries on."""
    config = write_config(tmp_path, key)
    store = ModelStore.from_config(load_config(config))
    installed(store, key, tmp_path, "1.0", "2.0")
    store.activate("cars", "1.0")
    child = subprocess.run(
        [sys.executable, "-c", _KILLER, str(config), when],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    if when == "before":
        assert states(store) == {"cars 1.0": "active", "cars 2.0": "staged"}
        store.activate("cars", "2.0")
    else:
        assert states(store) == {"cars 1.0": "previous", "cars 2.0": "active"}
        assert store.resolve("cars").manifest.version == "2.0"
        store.rollback("cars")
    assert store.resolve("cars").manifest.version == ("2.0" if when == "before" else "1.0")
    assert not list((store.root / "cars").glob(".*partial"))


def test_a_history_line_torn_by_a_crash_costs_only_itself(
    tmp_path: Path, store: ModelStore, key: Ed25519PrivateKey
) -> None:
    installed(store, key, tmp_path, "1.0")
    with (store.root / "history.jsonl").open("a") as handle:
        handle.write('{"action": "activ')  # the process died mid-write
    store.activate("cars", "1.0")
    assert [(h["action"], h["version"]) for h in store.history()] == [
        ("import", "1.0"),
        ("activate", "1.0"),
    ]


def test_changes_wait_for_the_lock(
    tmp_path: Path, store: ModelStore, key: Ed25519PrivateKey
) -> None:
    installed(store, key, tmp_path, "1.0")
    fd = os.open(store.root / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process's import, say
        worker = threading.Thread(target=store.activate, args=("cars", "1.0"))
        worker.start()
        time.sleep(0.3)
        assert worker.is_alive()
        assert store.active_version("cars") is None
    finally:
        os.close(fd)
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert store.active_version("cars") == "1.0"


# -- the camera's model --------------------------------------------------------------------------------


def test_a_package_model_detects_through_the_real_session(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    config_path = write_config(
        tmp_path,
        key,
        models={"front": {"path": "package:cars", "threads": 1}},
        cameras=[{"name": "quay", "url": "0", "model": "front", "classes": ["car", "bicycle"]}],
    )
    cfg = load_config(config_path)
    store = ModelStore.from_config(cfg)
    installed(store, key, tmp_path, "1.0")
    store.activate("cars", "1.0")
    camera = cfg.cameras[0]
    frame = np.zeros((576, 768, 3), np.uint8)
    with open_detector(
        cfg.detector_for(camera), camera.model, camera.classes, packages=store
    ) as detector:
        assert (detector.name, detector.version) == ("front", "1.0")
        assert detector.labels == LABELS  # from the manifest
        found = detector.detect_blocking(frame)
    # The manifest's score_threshold (0.7) drops the 0.6 bicycle.
    assert [(d.label, round(d.score, 4)) for d in found] == [("car", 0.8)]
    box = found[0]
    assert (box.x1, box.y1, box.x2, box.y2) == pytest.approx((400, 300, 700, 500), abs=0.01)

    # A threshold set in the config beats the manifest's.
    overridden = DetectorModel(path="package:cars", threads=1, score_threshold=0.5)
    with open_detector(overridden, "front", packages=store) as detector:
        labels = sorted(d.label for d in detector.detect_blocking(frame))
    assert labels == ["bicycle", "car"]

    with pytest.raises(ModelError, match="needs the appliance's model store"):
        open_detector(cfg.detector_for(camera), camera.model)
    with pytest.raises(UnknownPackage, match="no package named 'boats'"):
        open_detector(DetectorModel(path="package:boats"), "front", packages=store)


def test_an_anomaly_package_is_no_detector(
    tmp_path: Path, store: ModelStore, key: Ed25519PrivateKey
) -> None:
    package = tmp_path / "vib.tar"
    build_package(
        package,
        key,
        name="vib",
        version="1",
        task="anomaly",
        model=rank2_input_model(tmp_path / "vib.onnx"),
        thresholds=Thresholds(threshold=3.5),
    )
    store.import_package(package)
    store.activate("vib", "1")
    assert store.resolve("vib").manifest.thresholds.threshold == 3.5
    with pytest.raises(PackageError, match="vib 1 is a model for task 'anomaly', not a detector"):
        open_detector(DetectorModel(path="package:vib"), "front", packages=store)


# -- the CLI -------------------------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_publisher_to_appliance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: Ed25519PrivateKey
) -> None:
    keyfile = tmp_path / "publisher.pem"
    code, out, err = run_cli(capsys, "models", "keygen", "--out", str(keyfile))
    assert code == 0, err
    public = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("public"))
    key_id = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("key id"))
    assert oct(keyfile.stat().st_mode & 0o777) == "0o600"
    assert run_cli(capsys, "models", "keygen", "--out", str(keyfile))[0] == 2  # never overwrites

    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    packages = []
    for version in ("1.0", "1.1"):
        package = tmp_path / f"cars-{version}.tar"
        code, out, err = run_cli(
            capsys,
            "models", "pack", "--key", str(keyfile), "--name", "cars", "--version", version,
            "--task", "detector", "--model", str(model_file(tmp_path / "m", version)),
            "--labels", str(labels), "--target", APPLIANCE, "--target", "group:fleet-a",
            "--metric", "map50=0.61", "--score-threshold", "0.6", "--min-agreement", "0.95",
            "-o", str(package),
        )  # fmt: skip
        assert code == 0, err
        assert f"signed by key {key_id}" in out
        packages.append(package)

    doc = {
        "appliance": {"id": APPLIANCE, "data_dir": str(tmp_path / "data")},
        "model_packages": {"trusted_keys": {key_id: public}},
    }
    config = tmp_path / "appliance.yaml"
    config.write_text(yaml.safe_dump(doc))
    c = ("-c", str(config))

    code, out, err = run_cli(capsys, "models", "verify", str(packages[0]), *c)
    assert code == 0, err
    assert "name: cars" in out and "labels: 3" in out and '"map50": 0.61' in out
    assert not (tmp_path / "data" / "models" / "packages").exists()  # verify installs nothing

    for package in packages:
        assert run_cli(capsys, "models", "import", str(package), *c)[0] == 0
    assert run_cli(capsys, "models", "activate", "cars", "1.0", *c)[0] == 0
    code, out, err = run_cli(capsys, "models", "activate", "cars", "1.1", *c)
    assert code == 0 and "1.1 active (previous: 1.0)" in out, err

    code, out, _ = run_cli(capsys, "models", "list", "--json", *c)
    listed = {(e["version"], e["state"]) for e in json.loads(out)}
    assert listed == {("1.0", "previous"), ("1.1", "active")}
    code, out, _ = run_cli(capsys, "models", "list", *c)
    assert out.splitlines()[0].split() == ["NAME", "VERSION", "TASK", "STATE", "IMPORTED", "SHA256"]

    code, out, err = run_cli(capsys, "models", "rollback", "cars", *c)
    assert code == 0 and "1.0 active again (previous: 1.1)" in out, err

    # Refusals and bad input: exit 1 for a package that fails a check, 2 for what was typed.
    flip(packages[1], data_offset(packages[1], "model.onnx"))
    code, _, err = run_cli(capsys, "models", "verify", str(packages[1]), *c)
    assert code == 1 and "refused" in err and "hash mismatch for model.onnx" in err
    code, _, err = run_cli(capsys, "models", "activate", "cars", "9.9", *c)
    assert code == 2 and "cars 9.9 is not installed (installed versions: 1.0, 1.1)" in err
    code, _, err = run_cli(capsys, "models", "import", str(tmp_path / "nope.tar"), *c)
    assert code == 2 and "not a readable file" in err
    code, _, err = run_cli(capsys, "models", "activate", "../etc", "1", *c)
    assert code == 2 and "is not a package name" in err
    code, _, err = run_cli(
        capsys, "models", "pack", "--key", str(keyfile), "--name", "x", "--version", "1",
        "--task", "detector", "--model", str(model_file(tmp_path / "m", "x")),
        "--metric", "map50", "-o", str(tmp_path / "x.tar"),
    )  # fmt: skip
    assert code == 2 and "--metric 'map50' is not KEY=NUMBER" in err
    assert store_state(config) == {"1.0": "active", "1.1": "previous"}


def store_state(config: Path) -> dict[str, str]:
    store = ModelStore.from_config(load_config(config))
    return {e.version: e.state for e in store.entries()}


def test_a_misconfigured_trusted_key_is_a_config_error(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    doc = {
        "appliance": {"id": APPLIANCE, "data_dir": str(tmp_path / "data")},
        "model_packages": {"trusted_keys": {"0123456789abcdef": public_key_text(key.public_key())}},
    }
    config = tmp_path / "appliance.yaml"
    config.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="labelled like a key id"):
        ModelStore.from_config(load_config(config))
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "models", "list", "-c", str(config)],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "model_packages.trusted_keys" in result.stderr
