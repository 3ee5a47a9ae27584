"""Model packages over the air (sync/model_pull.py, appliance/models/updates.py): the real
receiver on 127.0.0.1 behind the fault proxy, SeaweedFS for S3, real signed packages, a real
journal and model store; cuts resume, tampered and foreign packages are refused with a journalled
record and never touch the active model, and a running daemon stages what is published."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import tarfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.models.store import ModelStore, packages_dir
from appliance.models.updates import KEEP_REJECTED, MAX_MISMATCHES, Feed, ModelUpdates
from config.shipping import HttpDestination, S3Destination
from inference.package_keys import TrustedKeys, public_key_text
from receiver import build_receiver_app, serve_receiver
from receiver.model_feed import MODELS_DIR, publish_package
from sync import Journal, JournalMissing, JournalReader
from sync.destination import RateLimiter
from sync.model_pull import (
    HttpModelSource,
    ModelSource,
    PullError,
    S3ModelSource,
    download,
)
from tests.conftest import APPLIANCE_ID
from tests.faultproxy import FaultProxy
from tests.helpers import ROOT, cli_env, fast_sensor, write_config
from tests.seaweed import BUCKET, S3Server
from tests.test_model_feed import make_package, sha256_of

TOKEN = "token-of-the-appliance"
ADMIN = "admin-secret"
GROUP = "fleet-a"


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def store(data_dir: Path, key: Ed25519PrivateKey) -> ModelStore:
    trusted = TrustedKeys.parse({"publisher": public_key_text(key.public_key())})
    return ModelStore(packages_dir(data_dir), trusted, appliance_id=APPLIANCE_ID, group=GROUP)


@dataclass
class Upstream:
    """The receiver, and the fault proxy in front of it."""

    base: str
    data: Path
    proxy: FaultProxy

    async def publish(
        self, package: Path, *, appliances: tuple[str, ...] = (), groups: tuple[str, ...] = ()
    ) -> str:
        answer = await publish_package(
            self.base, ADMIN, package, appliances=appliances, groups=groups
        )
        return str(answer["sha256"])


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[Upstream]:
    data = tmp_path / "receiver"
    app = build_receiver_app(data, {APPLIANCE_ID: TOKEN}, admin_tokens=[ADMIN])
    async with serve_receiver(app, "127.0.0.1", 0) as bound:
        port = bound[0][1]
        async with FaultProxy("127.0.0.1", port) as proxy:
            yield Upstream(f"http://127.0.0.1:{port}", data, proxy)


def http_source(upstream: Upstream, tmp_path: Path, group: str | None = GROUP) -> HttpModelSource:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    cfg = HttpDestination.model_validate(
        {
            "name": "shore",
            "type": "http",
            "url": upstream.proxy.url_for(),
            "token_file": str(token_file),
            "timeout": "2s",
            "models": True,
        }
    )
    return HttpModelSource(cfg, APPLIANCE_ID, group)


def updates_for(
    store: ModelStore, journal: Journal, data_dir: Path, source: ModelSource
) -> ModelUpdates:
    feed = Feed(source, RateLimiter(None), [], lambda: None)
    return ModelUpdates(
        store,
        journal,
        [feed],
        models_dir=data_dir / "models",
        pull_interval=60.0,
        retry_max=5.0,
    )


async def model_records(journal: Journal) -> list[dict[str, Any]]:
    return await journal.read(lambda r: [rec.body for rec in r.iter_records(kind="model")])


def states(store: ModelStore) -> dict[str, str]:
    return {f"{e.name} {e.version}": e.state for e in store.entries()}


async def test_a_download_cut_three_times_resumes_and_completes(
    upstream: Upstream,
    tmp_path: Path,
    data_dir: Path,
    store: ModelStore,
    journal: Journal,
    key: Ed25519PrivateKey,
) -> None:
    package = make_package(tmp_path / "pub", key, "1.0", model_bytes=3_200_000)
    size = package.stat().st_size
    sha256 = await upstream.publish(package, appliances=(APPLIANCE_ID,))
    incoming = data_dir / "models" / "incoming"
    async with http_source(upstream, tmp_path) as source:
        [offered] = await source.offered()
        assert (offered.sha256, offered.size, offered.label) == (sha256, size, "pump 1.0")
        # Every connection dies after 1 MB from the receiver: three cuts, the fourth finishes.
        before = upstream.proxy.stats.bytes_downstream
        upstream.proxy.cut_after(1_000_000, "downstream", once=False)
        fetched = await download(source, offered, incoming, RateLimiter(None))
        upstream.proxy.clear()
    stats = upstream.proxy.stats
    assert stats.connections_cut == 3
    assert fetched.path == incoming / f"{sha256}.tar"
    assert sha256_of(fetched.path) == sha256 and fetched.fetched == size
    assert not (incoming / f"{sha256}.part").exists()
    # Each resume asks only for what is missing: what crossed the link again is what a cut lost
    # in flight (socket buffers), not the package again.
    resent = stats.bytes_downstream - before - size
    assert 0 <= resent < 3 * 256 * 1024, resent

    # The finished download is imported by the next round, without fetching anything again.
    updates = updates_for(store, journal, data_dir, http_source(upstream, tmp_path))
    async with updates:
        result = await updates.pull_once()
    assert [(s.name, s.version, s.sha256) for s in result.staged] == [("pump", "1.0", sha256)]
    assert upstream.proxy.stats.bytes_downstream - stats.bytes_downstream < 10_000
    assert states(store) == {"pump 1.0": "staged"}
    [record] = await model_records(journal)
    assert record["event"] == "staged" and record["sha256"] == sha256
    assert (record["name"], record["version"], record["source"]) == ("pump", "1.0", "shore")
    assert list(incoming.iterdir()) == []


async def test_a_link_that_stays_down_keeps_the_part_for_the_next_round(
    upstream: Upstream,
    tmp_path: Path,
    data_dir: Path,
    store: ModelStore,
    journal: Journal,
    key: Ed25519PrivateKey,
) -> None:
    package = make_package(tmp_path / "pub", key, "1.0", model_bytes=2_000_000)
    size = package.stat().st_size
    sha256 = await upstream.publish(package, groups=(GROUP,))
    part = data_dir / "models" / "incoming" / f"{sha256}.part"
    updates = updates_for(store, journal, data_dir, http_source(upstream, tmp_path))
    staged: list[str] = []

    async def on_staged(package: Any) -> None:
        staged.append(f"{package.name} {package.version}")

    updates.subscribe(on_staged)
    async with updates:
        upstream.proxy.rate_limit(1_000_000)
        first = asyncio.create_task(updates.pull_once())
        deadline = time.monotonic() + 10
        while not (part.exists() and part.stat().st_size > 300_000):
            assert time.monotonic() < deadline, "the download did not start"
            await asyncio.sleep(0.05)
        upstream.proxy.refuse(True)
        upstream.proxy.cut_all()
        result = await first
        assert not result.complete and result.staged == []
        assert "cut" in result.errors[0] and updates.health.last_error == result.errors[0]
        kept = part.stat().st_size
        assert 300_000 < kept < size
        assert states(store) == {}

        upstream.proxy.clear()
        before = upstream.proxy.stats.bytes_downstream
        result = await updates.pull_once()
    assert result.complete and [s.sha256 for s in result.staged] == [sha256]
    assert staged == ["pump 1.0"]
    # Only the missing tail (and the small listing) crossed the link again.
    moved = upstream.proxy.stats.bytes_downstream - before
    assert size - kept <= moved < size - kept + 20_000
    health = updates.describe()
    assert (health["staged"], health["refused"], health["last_staged"]) == (1, 0, "pump 1.0")
    assert health["last_error"] is None and health["last_pull"] is not None


async def test_tampered_on_the_receiver_is_refused_and_the_active_model_untouched(
    upstream: Upstream,
    tmp_path: Path,
    data_dir: Path,
    store: ModelStore,
    journal: Journal,
    key: Ed25519PrivateKey,
) -> None:
    store.import_package(make_package(tmp_path / "pub", key, "1.0"))
    store.activate("pump", "1.0")
    sha256 = await upstream.publish(make_package(tmp_path / "pub", key, "2.0"))
    stored = upstream.data / MODELS_DIR / sha256
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01  # flipped on the receiver's disk after publishing
    stored.write_bytes(bytes(data))

    async with updates_for(store, journal, data_dir, http_source(upstream, tmp_path)) as updates:
        rounds = [await updates.pull_once() for _ in range(MAX_MISMATCHES + 1)]
    refusals = [r.refused for r in rounds]
    assert [len(r) for r in refusals] == [1] * MAX_MISMATCHES + [0]  # then never fetched again
    first, last = refusals[0][0], refusals[MAX_MISMATCHES - 1][0]
    assert first["cause"] == "sha_mismatch" and first["will_retry"] is True
    assert f"not the listed {sha256}" in first["message"]
    assert last["will_retry"] is False and "gave up" in last["message"]
    assert rounds[-1].staged == [] and rounds[-1].complete
    records = await model_records(journal)
    assert [r["event"] for r in records] == ["refused"] * MAX_MISMATCHES
    assert records[0]["listed_as"] == "pump 2.0" and records[0]["source"] == "shore"
    # The active model never moved, and still verifies.
    assert states(store) == {"pump 1.0": "active"}
    assert store.resolve("pump").manifest.version == "1.0"
    assert list((data_dir / "models" / "incoming").iterdir()) == []
    assert updates.describe()["refused"] == MAX_MISMATCHES


async def test_bad_packages_are_refused_kept_and_never_fetched_again(
    upstream: Upstream,
    tmp_path: Path,
    data_dir: Path,
    store: ModelStore,
    journal: Journal,
    key: Ed25519PrivateKey,
) -> None:
    pub = tmp_path / "pub"
    store.import_package(make_package(pub, key, "1.0"))
    store.activate("pump", "1.0")
    # Signed by a key the appliance does not trust.
    stranger = Ed25519PrivateKey.generate()
    wrong_key = await upstream.publish(make_package(pub / "x", stranger, "2.0"))
    # Altered after signing (a byte of the model), then published as it is.
    altered = make_package(pub / "y", key, "3.0")
    with tarfile.open(altered) as archive:
        member = archive.getmember("model.npz")
    data = bytearray(altered.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0x01
    altered.write_bytes(bytes(data))
    tampered = await upstream.publish(altered)
    # Signed for another appliance, but published to this one.
    foreign = await upstream.publish(
        make_package(pub / "z", key, "4.0", targets=("boat-9",)), appliances=(APPLIANCE_ID,)
    )
    # For another appliance at the receiver: never listed here.
    await upstream.publish(make_package(pub / "w", key, "5.0"), appliances=("boat-9",))

    async with updates_for(store, journal, data_dir, http_source(upstream, tmp_path)) as updates:
        result = await updates.pull_once()
        causes = {r["sha256"]: r["cause"] for r in result.refused}
        assert causes == {
            wrong_key: "unknown_key",
            tampered: "hash_mismatch",
            foreign: "not_addressed",
        }
        messages = {r["sha256"]: r["message"] for r in result.refused}
        assert "which is not a trusted key" in messages[wrong_key]
        assert "hash mismatch for model.npz" in messages[tampered]
        assert f"not addressed to appliance {APPLIANCE_ID} / group {GROUP}" in messages[foreign]
        assert all(r["will_retry"] is False for r in result.refused)
        rejected = data_dir / "models" / "rejected"
        assert {p.name for p in rejected.iterdir()} == {f"{s}.tar" for s in causes}
        assert (rejected / f"{tampered}.tar").read_bytes() == altered.read_bytes()
        assert states(store) == {"pump 1.0": "active"}
        assert store.resolve("pump").manifest.version == "1.0"

        # Refused once, never fetched again; only the last KEEP_REJECTED stay in rejected/.
        before = upstream.proxy.stats.bytes_downstream
        again = await updates.pull_once()
        assert again.refused == [] and again.staged == []
        assert upstream.proxy.stats.bytes_downstream - before < 5_000
        for index in range(KEEP_REJECTED):
            await upstream.publish(make_package(pub / f"s{index}", stranger, f"9.{index}"))
        more = await updates.pull_once()
    assert len(more.refused) == KEEP_REJECTED
    kept = {p.name.removesuffix(".tar") for p in rejected.iterdir()}
    assert kept == {r["sha256"] for r in more.refused}
    records = await model_records(journal)
    assert [r["event"] for r in records] == ["refused"] * (3 + KEEP_REJECTED)
    assert {r["kept"] for r in records[:3]} == {str(rejected / f"{s}.tar") for s in causes}


async def test_without_trusted_keys_nothing_is_fetched(
    upstream: Upstream, tmp_path: Path, data_dir: Path, journal: Journal, key: Ed25519PrivateKey
) -> None:
    await upstream.publish(make_package(tmp_path / "pub", key, "1.0"))
    store = ModelStore(packages_dir(data_dir), TrustedKeys(), appliance_id=APPLIANCE_ID)
    async with updates_for(store, journal, data_dir, http_source(upstream, tmp_path)) as updates:
        result = await updates.pull_once()
    assert result.staged == [] and result.refused == []
    assert "trusted_keys is empty" in result.errors[0]
    assert upstream.proxy.stats.connections_accepted == 0


async def test_pull_errors_name_what_is_wrong(upstream: Upstream, tmp_path: Path) -> None:
    source = http_source(upstream, tmp_path)
    source.cfg = source.cfg.model_copy(update={"token_file": None})
    async with source:
        with pytest.raises(PullError, match="401") as refused:
            await source.offered()
        assert refused.value.cause == "refused" and not refused.value.retryable
    upstream.proxy.refuse(True)
    async with http_source(upstream, tmp_path) as source:
        with pytest.raises(PullError) as down:
            await source.offered()
        assert down.value.cause == "link" and down.value.retryable


def s3_cfg(server: S3Server, prefix: str) -> S3Destination:
    return S3Destination.model_validate(
        {
            "name": "bucket",
            "type": "s3",
            "endpoint_url": server.endpoint_url,
            "bucket": BUCKET,
            "prefix": prefix,
            "access_key_file": str(server.access_key_file),
            "secret_key_file": str(server.secret_key_file),
            "timeout": "10s",
            "models": True,
        }
    )


async def test_s3_prefix_listing_and_range_resume(
    s3_server: S3Server,
    tmp_path: Path,
    data_dir: Path,
    store: ModelStore,
    journal: Journal,
    key: Ed25519PrivateKey,
) -> None:
    pub = tmp_path / "pub"
    for_group = make_package(pub, key, "1.0", model_bytes=400_000)
    for_all = make_package(pub, key, "1.1", name="valve")
    for_other = make_package(pub, key, "1.2", name="gate")
    base = "model-pull/models/"
    objects = {
        f"{base}groups/{GROUP}/{sha256_of(for_group)}.tar": for_group.read_bytes(),
        f"{base}all/{sha256_of(for_all)}.tar": for_all.read_bytes(),
        f"{base}appliances/boat-9/{sha256_of(for_other)}.tar": for_other.read_bytes(),
        f"{base}groups/fleet-b/{sha256_of(for_other)}.tar": for_other.read_bytes(),
        f"{base}all/README.txt": b"packages are SHA256.tar",
    }
    source = S3ModelSource(s3_cfg(s3_server, "model-pull/"), APPLIANCE_ID, GROUP)
    async with source:
        for object_key, body in objects.items():
            await source.client.put_object(Bucket=BUCKET, Key=object_key, Body=body)
        offered = {p.sha256: p for p in await source.offered()}
        assert set(offered) == {sha256_of(for_group), sha256_of(for_all)}
        wanted = offered[sha256_of(for_group)]
        assert wanted.size == for_group.stat().st_size and wanted.label.startswith("package ")
        # Half of it already here from an earlier, cut round: only the rest is fetched.
        incoming = data_dir / "models" / "incoming"
        incoming.mkdir(parents=True)
        half = wanted.size // 2
        (incoming / f"{wanted.sha256}.part").write_bytes(for_group.read_bytes()[:half])
        fetched = await download(source, wanted, incoming, RateLimiter(None))
        assert fetched.fetched == wanted.size - half
        assert fetched.path.read_bytes() == for_group.read_bytes()

    updates = updates_for(
        store,
        journal,
        data_dir,
        S3ModelSource(s3_cfg(s3_server, "model-pull/"), APPLIANCE_ID, GROUP),
    )
    async with updates:
        result = await updates.pull_once()
    assert sorted((s.name, s.version, s.source) for s in result.staged) == [
        ("pump", "1.0", "bucket"),
        ("valve", "1.1", "bucket"),
    ]
    assert states(store) == {"pump 1.0": "staged", "valve 1.1": "staged"}


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "appliance",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
        cwd=ROOT,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _staged_records(data_dir: Path) -> list[dict[str, Any]]:
    try:
        reader = JournalReader.open(data_dir)
    except JournalMissing:
        return []  # the daemon has not created it yet
    with reader:
        return [r.body for r in reader.iter_records(kind="model") if r.body["event"] == "staged"]


def _heartbeat(data_dir: Path) -> dict[str, Any]:
    with JournalReader.open(data_dir) as reader:
        raw = reader.meta("daemon")
    return json.loads(raw) if raw else {}


async def test_a_running_daemon_stages_a_published_package_within_seconds(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    receiver_data, data_dir = tmp_path / "receiver", tmp_path / "data"
    token_file = tmp_path / "token"
    token_file.write_text("token-01\n")
    app = build_receiver_app(receiver_data, {"test-01": "token-01"}, admin_tokens=[ADMIN])
    async with serve_receiver(app, "127.0.0.1", 0) as bound:
        base = f"http://127.0.0.1:{bound[0][1]}"
        config = write_config(
            tmp_path / "appliance.yaml",
            data_dir,
            [fast_sensor("s1", sample_rate=50, window="500ms")],
            sync={
                "destinations": [
                    {
                        "name": "shore",
                        "type": "http",
                        "url": base,
                        "token_file": str(token_file),
                        "models": True,
                    }
                ]
            },
            model_packages={
                "trusted_keys": {"publisher": public_key_text(key.public_key())},
                "group": GROUP,
                "pull_interval": "1s",
            },
        )
        log = (tmp_path / "daemon.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "appliance",
            "run",
            "-c",
            str(config),
            stdout=log,
            stderr=log,
            env=cli_env(),
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 30
            while not _heartbeat_ready(data_dir):
                assert proc.returncode is None, (tmp_path / "daemon.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the daemon did not start"
                await asyncio.sleep(0.2)
            package = make_package(tmp_path / "pub", key, "1.0", targets=(f"group:{GROUP}",))
            published = time.monotonic()
            sha256 = (await publish_package(base, ADMIN, package, groups=(GROUP,)))["sha256"]
            while not (staged := await asyncio.to_thread(_staged_records, data_dir)):
                assert time.monotonic() - published < 15, "not staged within 15 s"
                await asyncio.sleep(0.2)
            assert staged[0]["sha256"] == sha256 and staged[0]["name"] == "pump"
            code, out, err = await _cli("models", "list", "-c", str(config), "--json")
            assert code == 0, err
            assert [(e["name"], e["version"], e["state"]) for e in json.loads(out)] == [
                ("pump", "1.0", "staged")
            ]
            while (_heartbeat(data_dir).get("models") or {}).get("staged") != 1:
                assert time.monotonic() - published < 30, _heartbeat(data_dir).get("models")
                await asyncio.sleep(0.5)
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 30)
            log.close()
    assert code == 0


def _heartbeat_ready(data_dir: Path) -> bool:
    try:
        models = _heartbeat(data_dir).get("models")
    except JournalMissing:
        return False
    return bool(models and models.get("last_pull"))
