"""The model package format (inference/packages.py, package_manifest.py, package_keys.py): real Ed25519 keys, real ONNX files, real tar
archives; every refusal names the package and the cause, and leaves nothing behind."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from config import DetectorModel
from config.cameras import ModelPackagesSection
from inference.package_keys import (
    PackageKeyError,
    TrustedKeys,
    key_id,
    load_private_key,
    parse_public_key,
    public_key_text,
    write_private_key,
)
from inference.package_manifest import (
    MANIFEST,
    SIGNATURE,
    CanaryLimits,
    Manifest,
    PackageError,
    Thresholds,
)
from inference.packages import (
    VerifiedPackage,
    build_package,
    detector_settings,
    read_package,
    verify_installed,
)
from tests.onnx_graphs import constant_model, rank2_input_model, yolov8_output

APPLIANCE = "boat-7"
LABELS = ("person", "bicycle", "car")


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def trusted(key: Ed25519PrivateKey) -> TrustedKeys:
    return TrustedKeys.parse({"publisher": public_key_text(key.public_key())})


@pytest.fixture
def model(tmp_path: Path) -> Path:
    output = yolov8_output([], len(LABELS))
    return constant_model(tmp_path / "cars.onnx", {"output0": output}, input_shape=(1, 3, 64, 64))


def pack(
    folder: Path,
    key: Ed25519PrivateKey,
    model: Path,
    *,
    version: str = "1.0",
    targets: Sequence[str] = (),
    **extra: Any,
) -> Path:
    output = folder / f"cars-{version}.tar"
    build_package(
        output,
        key,
        name="cars",
        version=version,
        task="detector",
        model=model,
        labels=extra.pop("labels", LABELS),
        targets=targets,
        **extra,
    )
    return output


def read(path: Path, trusted: TrustedKeys, into: Path, **audience: Any) -> VerifiedPackage:
    return read_package(
        path,
        trusted,
        into=into,
        appliance_id=audience.get("appliance_id", APPLIANCE),
        group=audience.get("group"),
    )


def refused(
    path: Path, trusted: TrustedKeys, into: Path, cause: str, *words: str, **audience: Any
) -> PackageError:
    """Reading `path` fails with `cause`, the message names the package and `words`, and the
    staging folder is gone."""
    with pytest.raises(PackageError) as info:
        read(path, trusted, into, **audience)
    error = info.value
    assert error.cause == cause, str(error)
    assert str(error).startswith(f"{path}: "), str(error)
    for word in words:
        assert word in str(error), str(error)
    assert not into.exists()
    return error


def members(path: Path) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as archive:
        found = {}
        for member in archive.getmembers():
            handle = archive.extractfile(member)
            found[member.name] = (member, handle.read() if handle else b"")
        return found


def write_tar(path: Path, entries: Sequence[tuple[str, bytes] | tarfile.TarInfo]) -> Path:
    """A tar of exactly `entries`: (name, bytes) for files, a TarInfo for anything else."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                archive.addfile(entry)
                continue
            name, data = entry
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def signed(manifest: dict[str, Any], key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    data = json.dumps(manifest, indent=2).encode()
    return data, key.sign(data)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# -- the good path -----------------------------------------------------------------------------------


def test_round_trip_keeps_every_field_and_byte(
    tmp_path: Path, key: Ed25519PrivateKey, trusted: TrustedKeys, model: Path
) -> None:
    created = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    package = pack(
        tmp_path,
        key,
        model,
        thresholds=Thresholds(score_threshold=0.6, nms_iou=0.5),
        metrics={"map50": 0.61, "images": 1200},
        canary=CanaryLimits(min_agreement=0.9, max_latency_ratio=1.5),
        targets=[APPLIANCE, "group:fleet-a"],
        created_at=created,
    )
    assert list(members(package)) == [MANIFEST, SIGNATURE, "model.onnx"]

    verified = read(package, trusted, tmp_path / "stage")
    manifest = verified.manifest
    assert (manifest.name, manifest.version, manifest.task) == ("cars", "1.0", "detector")
    assert manifest.created_at == created
    assert manifest.key_id == key_id(key.public_key()) == verified.signer.key_id
    assert verified.signer.label == "publisher"
    assert manifest.input is not None
    assert manifest.input.model_dump() == {
        "shape": [1, 3, 64, 64],
        "dtype": "float32",
        "layout": "nchw",
    }
    assert verified.labels() == LABELS
    assert manifest.thresholds == Thresholds(score_threshold=0.6, nms_iou=0.5)
    assert manifest.metrics == {"map50": 0.61, "images": 1200.0}
    assert manifest.canary == CanaryLimits(min_agreement=0.9, max_latency_ratio=1.5)
    assert manifest.targets == [APPLIANCE, "group:fleet-a"]
    assert verified.model_path.read_bytes() == model.read_bytes()
    assert (tmp_path / "stage" / MANIFEST).read_bytes() == members(package)[MANIFEST][1]
    summary = verified.summary()
    assert summary["labels"] == 3 and summary["model_sha256"] == verified.model_sha256
    # What was installed verifies again as a folder.
    again = verify_installed(tmp_path / "stage", trusted, appliance_id=APPLIANCE, group=None)
    assert again.manifest == manifest and again.manifest_sha256 == verified.manifest_sha256


def test_labels_file_member(
    tmp_path: Path, key: Ed25519PrivateKey, trusted: TrustedKeys, model: Path
) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("person\nbicycle\ncar\n\n")
    package = pack(tmp_path, key, model, labels=None, labels_file=labels)
    assert "labels.txt" in members(package)
    verified = read(package, trusted, tmp_path / "stage")
    assert verified.manifest.labels is None
    assert verified.labels() == LABELS


def test_building_refuses_bad_input(tmp_path: Path, key: Ed25519PrivateKey, model: Path) -> None:
    with pytest.raises(ValueError, match="name: String should match pattern"):
        build_package(
            tmp_path / "x.tar", key, name="../cars", version="1", task="detector", model=model
        )
    with pytest.raises(ValueError, match=r"anomaly model needs `thresholds\.threshold`"):
        build_package(tmp_path / "x.tar", key, name="a", version="1", task="anomaly", model=model)
    with pytest.raises(ValueError, match="not an image"):
        build_package(
            tmp_path / "x.tar",
            key,
            name="t",
            version="1",
            task="detector",
            model=rank2_input_model(tmp_path / "tab.onnx"),
        )
    with pytest.raises(ValueError, match=r"ends in \.onnx or \.npz"):
        build_package(
            tmp_path / "x.tar", key, name="a", version="1", task="detector", model=tmp_path
        )
    with pytest.raises(ValueError, match="reserved name"):
        pack(tmp_path, key, model, version="active.json")
    assert not (tmp_path / "x.tar").exists()


# -- refusals -----------------------------------------------------------------------------------------


def test_tampered_model_file_is_a_hash_mismatch(
    tmp_path: Path, key: Ed25519PrivateKey, trusted: TrustedKeys, model: Path
) -> None:
    package = pack(tmp_path, key, model)
    member = members(package)["model.onnx"][0]
    flip(package, member.offset_data + member.size // 2)
    refused(package, trusted, tmp_path / "stage", "hash_mismatch", "hash mismatch for model.onnx")


def test_tampered_manifest_fails_the_signature(
    tmp_path: Path, key: Ed25519PrivateKey, trusted: TrustedKeys, model: Path
) -> None:
    package = pack(tmp_path, key, model, thresholds=Thresholds(score_threshold=0.6))
    member, data = members(package)[MANIFEST]
    # Same length, so the archive stays well formed: only the signature can tell.
    position = data.index(b'"score_threshold": 0.6')
    tampered = bytearray(package.read_bytes())
    tampered[member.offset_data + position + len('"score_threshold": 0.')] = ord("1")
    package.write_bytes(bytes(tampered))
    refused(package, trusted, tmp_path / "stage", "bad_signature", "bad signature")


def test_signed_by_an_untrusted_key(tmp_path: Path, trusted: TrustedKeys, model: Path) -> None:
    stranger = Ed25519PrivateKey.generate()
    package = pack(tmp_path, stranger, model)
    stranger_id = key_id(stranger.public_key())
    error = refused(
        package, trusted, tmp_path / "stage", "unknown_key", f"key id {stranger_id}", "publisher"
    )
    assert "not a trusted key" in str(error)
    # No trusted keys at all: the message says where they come from.
    refused(package, TrustedKeys(), tmp_path / "stage", "unknown_key", "trusted_keys")


def test_a_trusted_key_id_signed_with_another_key(
    tmp_path: Path, key: Ed25519PrivateKey, trusted: TrustedKeys, model: Path
) -> None:
    """A forger who copies the trusted key id into the manifest still fails the signature."""
    package = pack(tmp_path, key, model)
    manifest = json.loads(members(package)[MANIFEST][1])
    data, _ = signed(manifest, key)
    forged_signature = Ed25519PrivateKey.generate().sign(data)
    model_bytes = members(package)["model.onnx"][1]
    forged = write_tar(
        tmp_path / "forged.tar",
        [(MANIFEST, data), (SIGNATURE, forged_signature), ("model.onnx", model_bytes)],
    )
    refused(forged, trusted, tmp_path / "stage", "bad_signature", "bad signature")


@pytest.mark.parametrize(
    "cut",
    [
        "inside the first header",
        "inside the manifest",
        "after the manifest",
        "inside the signature",
        "after the signature",
        "inside the model",
        "after the model",
        "inside the end marker",
    ],
)
def test_truncated_download(
    tmp_path: Path, key: Ed25519PrivateKey, trusted: TrustedKeys, model: Path, cut: str
) -> None:
    package = pack(tmp_path, key, model)
    found = members(package)
    manifest, signature, onnx_member = (found[n][0] for n in (MANIFEST, SIGNATURE, "model.onnx"))

    def end_of(member: tarfile.TarInfo) -> int:
        return member.offset_data + -(-member.size // 512) * 512

    offsets = {
        "inside the first header": 300,
        "inside the manifest": manifest.offset_data + manifest.size // 2,
        "after the manifest": end_of(manifest),
        "inside the signature": signature.offset_data + 10,
        "after the signature": end_of(signature),
        "inside the model": onnx_member.offset_data + onnx_member.size // 2,
        "after the model": end_of(onnx_member),
        "inside the end marker": end_of(onnx_member) + 700,
    }
    data = package.read_bytes()
    package.write_bytes(data[: offsets[cut]])
    refused(package, trusted, tmp_path / "stage", "truncated", "truncated")


def test_empty_and_foreign_files(tmp_path: Path, trusted: TrustedKeys, model: Path) -> None:
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    refused(empty, trusted, tmp_path / "stage", "truncated", "only 0 bytes")
    refused(model, trusted, tmp_path / "stage", "not_a_package", "no tar header")


def _good_parts(tmp_path: Path, key: Ed25519PrivateKey, model: Path) -> tuple[bytes, bytes, bytes]:
    found = members(pack(tmp_path, key, model))
    return found[MANIFEST][1], found[SIGNATURE][1], found["model.onnx"][1]


def test_member_with_a_path_is_refused(
    tmp_path: Path, key: Ed25519PrivateKey, trusted: TrustedKeys, model: Path
) -> None:
    manifest, signature, model_bytes = _good_parts(tmp_path, key, model)
    escaping = write_tar(
        tmp_path / "escape.tar",
        [
            (MANIFEST, manifest),
            (SIGNATURE, signature),
            ("../x", b"owned"),
            ("model.onnx", model_bytes),
        ],
    )
    refused(escaping, trusted, tmp_path / "stage", "bad_member", "'../x' is a path")
    assert not (tmp_path / "x").exists()
    first = write_tar(tmp_path / "first.tar", [("../manifest.json", manifest)])
    refused(first, trusted, tmp_path / "stage", "bad_member", "is a path")


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_links_are_refused(
    tmp_path: Path, key: Ed25519PrivateKey, trusted: TrustedKeys, model: Path, kind: bytes
) -> None:
    manifest, signature, _ = _good_parts(tmp_path, key, model)
    link = tarfile.TarInfo("model.onnx")
    link.type = kind
    link.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else MANIFEST
    linked = write_tar(tmp_path / "link.tar", [(MANIFEST, manifest), (SIGNATURE, signature), link])
    refused(linked, trusted, tmp_path / "stage", "bad_member", "'model.onnx' is a link")


def test_members_the_manifest_does_not_name_are_refused(
    tmp_path: Path, key: Ed25519PrivateKey, trusted: TrustedKeys, model: Path
) -> None:
    manifest, signature, model_bytes = _good_parts(tmp_path, key, model)
    extra = write_tar(
        tmp_path / "extra.tar",
        [
            (MANIFEST, manifest),
            (SIGNATURE, signature),
            ("model.onnx", model_bytes),
            ("run.sh", b"x"),
        ],
    )
    refused(extra, trusted, tmp_path / "stage", "bad_member", "'run.sh' is not one of the files")
    twice = write_tar(
        tmp_path / "twice.tar",
        [
            (MANIFEST, manifest),
            (SIGNATURE, signature),
            ("model.onnx", model_bytes),
            ("model.onnx", model_bytes),
        ],
    )
    refused(twice, trusted, tmp_path / "stage", "bad_member", "appears twice")
    reordered = write_tar(
        tmp_path / "reordered.tar", [(SIGNATURE, signature), (MANIFEST, manifest)]
    )
    refused(reordered, trusted, tmp_path / "stage", "not_a_package", "expected manifest.json")


def test_package_for_another_appliance_or_group(
    tmp_path: Path, key: Ed25519PrivateKey, trusted: TrustedKeys, model: Path
) -> None:
    package = pack(tmp_path, key, model, targets=["boat-1", "group:fleet-a"])
    stage = tmp_path / "stage"
    refused(package, trusted, stage, "not_addressed", "appliance boat-7 (no group set)", "boat-1")
    refused(
        package, trusted, stage, "not_addressed", "group fleet-b", "group:fleet-a", group="fleet-b"
    )
    assert read(package, trusted, stage, group="fleet-a").manifest.version == "1.0"
    assert read(package, trusted, tmp_path / "s2", appliance_id="boat-1").manifest.name == "cars"


def test_signed_but_invalid_manifests_are_refused(
    tmp_path: Path, key: Ed25519PrivateKey, trusted: TrustedKeys, model: Path
) -> None:
    """Strict manifests: unknown keys, a newer format, a wrong input spec are refused even when
    the signature is good (a publisher's mistake must not become a model)."""
    manifest_bytes, _, model_bytes = _good_parts(tmp_path, key, model)
    base = json.loads(manifest_bytes)
    cases = [
        ({**base, "surprise": 1}, "surprise: Extra inputs are not permitted"),
        ({**base, "format": 2}, "package format 2 is not one this appliance reads"),
        ({**base, "input": {**base["input"], "shape": [1, 3, 32, 32]}}, "declares input"),
        ({**base, "input": {**base["input"], "dtype": "uint8"}}, "declares input"),
        ({**base, "metrics": {"map": "high"}}, "metrics.map"),
        ({**base, "targets": ["../x"]}, "neither an appliance id nor group:NAME"),
    ]
    for number, (manifest, words) in enumerate(cases):
        data, signature = signed(manifest, key)
        path = write_tar(
            tmp_path / f"bad{number}.tar",
            [(MANIFEST, data), (SIGNATURE, signature), ("model.onnx", model_bytes)],
        )
        refused(path, trusted, tmp_path / "stage", "bad_manifest", words)


def test_installed_files_changed_on_disk_are_refused(
    tmp_path: Path, key: Ed25519PrivateKey, trusted: TrustedKeys, model: Path
) -> None:
    folder = tmp_path / "installed"
    read(pack(tmp_path, key, model), trusted, folder)
    flip(folder / "model.onnx", 100)
    with pytest.raises(
        PackageError, match=r"hash mismatch for model\.onnx: the file on disk changed"
    ):
        verify_installed(folder, trusted, appliance_id=APPLIANCE, group=None)
    (folder / "model.onnx").unlink()
    with pytest.raises(PackageError, match=r"model\.onnx is missing"):
        verify_installed(folder, trusted, appliance_id=APPLIANCE, group=None)
    # A key removed from the trusted set revokes what it signed, installed or not.
    with pytest.raises(PackageError, match="not a trusted key"):
        verify_installed(folder, TrustedKeys(), appliance_id=APPLIANCE, group=None)


# -- keys and config ------------------------------------------------------------------------------------


def test_keys_in_pem_and_base64_are_the_same_key(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    public = key.public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    assert key_id(parse_public_key(pem)) == key_id(parse_public_key(public_key_text(public)))
    keys = TrustedKeys.parse({key_id(public): pem, "backup": public_key_text(public)})
    assert len(keys) == 1  # one key under two labels is one trusted key

    private_path = tmp_path / "publisher.pem"
    write_private_key(private_path, key)
    assert private_path.stat().st_mode & 0o777 == 0o600
    assert key_id(load_private_key(private_path).public_key()) == key_id(public)
    with pytest.raises(FileExistsError):
        write_private_key(private_path, key)


def test_bad_trusted_keys_name_their_label(key: Ed25519PrivateKey) -> None:
    with pytest.raises(PackageKeyError, match=r"'short'.*base64 of 3 bytes"):
        TrustedKeys.parse({"short": base64.b64encode(b"abc").decode()})
    with pytest.raises(PackageKeyError, match="'junk': neither a PEM public key nor base64"):
        TrustedKeys.parse({"junk": "not a key!"})
    rsa_pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(PackageKeyError, match="not an Ed25519 public key"):
        TrustedKeys.parse({"rsa": rsa_pem})
    with pytest.raises(PackageKeyError, match="labelled like a key id"):
        TrustedKeys.parse({"0123456789abcdef": public_key_text(key.public_key())})


def test_config_section_checks_key_shapes(key: Ed25519PrivateKey) -> None:
    good = ModelPackagesSection.model_validate(
        {"trusted_keys": {"pub": public_key_text(key.public_key())}, "group": "fleet-a"}
    )
    assert good.keep == 3
    with pytest.raises(ValidationError, match="base64 of an Ed25519 public key"):
        ModelPackagesSection.model_validate({"trusted_keys": {"pub": "abc"}})
    with pytest.raises(ValidationError, match="greater than or equal to 2"):
        ModelPackagesSection.model_validate({"keep": 1})


def test_detector_settings_fill_what_the_config_leaves_unset(
    tmp_path: Path, key: Ed25519PrivateKey, trusted: TrustedKeys, model: Path
) -> None:
    package = read(
        pack(tmp_path, key, model, thresholds=Thresholds(score_threshold=0.7, nms_iou=0.3)),
        trusted,
        tmp_path / "stage",
    )
    settings, labels = detector_settings(DetectorModel(path="package:cars"), package)
    assert (settings.version, settings.score_threshold, settings.nms_iou) == ("1.0", 0.7, 0.3)
    assert labels == LABELS
    labels_file = tmp_path / "mine.txt"
    labels_file.write_text("a\nb\nc\n")
    explicit = DetectorModel(
        path="package:cars", version="pinned", score_threshold=0.2, labels_file=labels_file
    )
    settings, labels = detector_settings(explicit, package)
    assert (settings.version, settings.score_threshold, settings.nms_iou) == ("pinned", 0.2, 0.3)
    assert labels is None


def test_manifest_round_trips_through_its_encoding(
    tmp_path: Path, key: Ed25519PrivateKey, model: Path
) -> None:
    manifest_bytes, _, _ = _good_parts(tmp_path, key, model)
    manifest = Manifest.model_validate_json(manifest_bytes)
    assert manifest.encode() == manifest_bytes
