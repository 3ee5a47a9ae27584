"""The receiver's model package routes (receiver/model_feed.py, docs/sync-protocol.md "Model
packages"): a real receiver on 127.0.0.1 port 0 with its own receiver.db, real signed packages,
real HTTP; publishing with an admin token, listings per appliance and group, Range downloads, and
`appliance receiver publish` against `appliance receiver` in a subprocess."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.cli import main as cli_main
from inference.package_manifest import Thresholds
from inference.packages import build_package
from receiver import build_receiver_app, parse_admin_tokens_file, serve_receiver
from receiver.model_feed import (
    MODELS_DIR,
    PublishError,
    publish_package,
    read_package_identity,
)
from receiver.objects import BucketSettings, S3Objects
from tests.helpers import ROOT, cli_env, wait_for
from tests.seaweed import BUCKET, S3Server

TOKENS = {"boat-7": "token-boat-7", "boat-8": "token-boat-8", "tug-1": "token-tug-1"}
ADMIN = "admin-secret"


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def make_package(
    folder: Path,
    key: Ed25519PrivateKey,
    version: str,
    *,
    name: str = "pump",
    targets: tuple[str, ...] = (),
    model_bytes: int = 20_000,
) -> Path:
    """A signed anomaly-model package whose model is a real .npz of random values."""
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / f"{name}-{version}.npz"
    seed = hashlib.sha256(f"{name} {version} {model_bytes}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(seed[:8]))
    np.savez(model, weights=rng.standard_normal(model_bytes // 8))
    output = folder / f"{name}-{version}.tar"
    build_package(
        output,
        key,
        name=name,
        version=version,
        task="anomaly",
        model=model,
        thresholds=Thresholds(threshold=3.0),
        targets=targets,
    )
    return output


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Receiver:
    base: str
    data: Path
    session: aiohttp.ClientSession
    bucket: BucketSettings | None = None

    async def stored(self, sha256: str) -> bytes:
        """A published package's bytes where this receiver keeps them (folder or bucket)."""
        if self.bucket is None:
            return await asyncio.to_thread((self.data / MODELS_DIR / sha256).read_bytes)
        objects = await S3Objects.open(self.bucket)
        try:
            size = await objects.package_size(sha256)
            assert size is not None
            return b"".join([block async for block in objects.read_package(sha256, 0, size)])
        finally:
            await objects.close()

    async def offered(
        self, appliance_id: str, group: str | None = None, token: str | None = None
    ) -> tuple[int, Any]:
        params = {"group": group} if group else {}
        async with self.session.get(
            f"{self.base}/v1/appliances/{appliance_id}/models",
            params=params,
            headers=bearer(token or TOKENS[appliance_id]),
        ) as response:
            return response.status, await response.json()

    async def names(self, appliance_id: str, group: str | None = None) -> list[str]:
        status, body = await self.offered(appliance_id, group)
        assert status == 200, body
        return [f"{p['name']} {p['version']}" for p in body["packages"]]

    async def download(
        self,
        appliance_id: str,
        sha256: str,
        *,
        group: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        params = {"group": group} if group else {}
        async with self.session.get(
            f"{self.base}/v1/appliances/{appliance_id}/models/{sha256}",
            params=params,
            headers={**bearer(TOKENS[appliance_id]), **(headers or {})},
        ) as response:
            return response.status, dict(response.headers), await response.read()

    async def put(
        self, path: str, body: bytes, token: str | None = ADMIN, **params: Any
    ) -> tuple[int, Any]:
        headers = bearer(token) if token else {}
        async with self.session.put(
            f"{self.base}{path}", data=body, params=params, headers=headers
        ) as response:
            return response.status, await response.json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def start(
    data: Path,
    admin_tokens: tuple[str, ...] = (ADMIN,),
    database: str | None = None,
    bucket: BucketSettings | None = None,
) -> AsyncIterator[Receiver]:
    app = build_receiver_app(
        data, TOKENS, admin_tokens=admin_tokens, database=database, bucket=bucket
    )
    async with (
        serve_receiver(app, "127.0.0.1", 0) as bound,
        aiohttp.ClientSession() as session,
    ):
        yield Receiver(f"http://127.0.0.1:{bound[0][1]}", data, session, bucket)


def fleet_bucket(request: pytest.FixtureRequest) -> BucketSettings:
    """A fresh prefix of the session's SeaweedFS bucket."""
    server: S3Server = request.getfixturevalue("s3_server")
    return BucketSettings(
        endpoint_url=server.endpoint_url,
        bucket=BUCKET,
        access_key_file=server.access_key_file,
        secret_key_file=server.secret_key_file,
        prefix=f"feed-{uuid.uuid4().hex[:8]}/",
    )


@pytest.fixture(params=["sqlite", "postgres", "postgres+s3"])
async def receiver(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Receiver]:
    """The receiver on each of its stores: receiver.db and files, PostgreSQL and files, and
    PostgreSQL with packages in a bucket (a fleet's shore)."""
    database = None if request.param == "sqlite" else request.getfixturevalue("postgres_dsn")
    bucket = fleet_bucket(request) if request.param == "postgres+s3" else None
    async for running in start(tmp_path / "receiver", database=database, bucket=bucket):
        yield running


async def test_a_package_published_through_one_replica_downloads_through_another(
    tmp_path: Path, key: Ed25519PrivateKey, request: pytest.FixtureRequest
) -> None:
    dsn: str = request.getfixturevalue("postgres_dsn")
    bucket = fleet_bucket(request)
    package = make_package(tmp_path / "pub", key, "1.0", model_bytes=9_000_000)
    data = package.read_bytes()
    async for first in start(tmp_path / "a", database=dsn, bucket=bucket):
        answer = await publish_package(first.base, ADMIN, package)
        async for second in start(tmp_path / "b", database=dsn, bucket=bucket):
            assert await second.names("tug-1") == ["pump 1.0"]
            status, _, body = await second.download("tug-1", answer["sha256"])
            assert (status, body) == (200, data)
            offset = len(data) - 1000
            status, headers, body = await second.download(
                "tug-1", answer["sha256"], headers={"Range": f"bytes={offset}-"}
            )
            assert (status, body) == (206, data[offset:])
            assert headers["Content-Range"] == f"bytes {offset}-{len(data) - 1}/{len(data)}"


async def test_published_packages_are_listed_for_their_appliances_and_groups_only(
    receiver: Receiver, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    pub = tmp_path / "pub"
    for_boat = make_package(pub, key, "1.0", targets=("boat-7",))
    for_fleet = make_package(pub, key, "1.1", targets=("group:fleet-a",))
    for_all = make_package(pub, key, "2.0", name="valve")
    answers = [
        await publish_package(receiver.base, ADMIN, for_boat, appliances=["boat-7"]),
        await publish_package(receiver.base, ADMIN, for_fleet, groups=["fleet-a"]),
        await publish_package(receiver.base, ADMIN, for_all),
    ]
    assert [a["republished"] for a in answers] == [False, False, False]
    assert answers[0]["sha256"] == sha256_of(for_boat)
    assert answers[0]["size"] == for_boat.stat().st_size
    assert (answers[0]["appliances"], answers[1]["groups"]) == (["boat-7"], ["fleet-a"])
    assert all(a["warnings"] == [] for a in answers)
    # Stored under its sha256 (a file, or an object in the bucket), and a row.
    assert await receiver.stored(answers[1]["sha256"]) == for_fleet.read_bytes()

    assert await receiver.names("boat-7") == ["pump 1.0", "valve 2.0"]
    assert await receiver.names("boat-7", "fleet-b") == ["pump 1.0", "valve 2.0"]
    assert await receiver.names("boat-8", "fleet-a") == ["pump 1.1", "valve 2.0"]
    assert await receiver.names("boat-8") == ["valve 2.0"]
    assert await receiver.names("tug-1", "fleet-b") == ["valve 2.0"]
    status, body = await receiver.offered("boat-7")
    entry = body["packages"][0]
    assert set(entry) == {"name", "version", "sha256", "size", "published_at"}

    # A package for another appliance or group is a 404, the same as one that does not exist.
    for appliance_id, group in (("boat-8", None), ("tug-1", "fleet-a"), ("boat-8", "fleet-b")):
        status, _, body_bytes = await receiver.download(
            appliance_id, answers[0]["sha256"], group=group
        )
        assert status == 404 and b"unknown package" in body_bytes
    status, _, data = await receiver.download("boat-8", answers[1]["sha256"], group="fleet-a")
    assert status == 200 and data == for_fleet.read_bytes()
    status, _, _ = await receiver.download("boat-8", "0" * 64, group="fleet-a")
    assert status == 404
    # Appliance tokens still bind to their appliance; a group that is not a name is refused.
    status, _ = await receiver.offered("boat-8", token=TOKENS["boat-7"])
    assert status == 403
    status, body = await receiver.offered("boat-8", group="../x")
    assert status == 400 and body["error"] == "bad group"

    # The admin sees every package with its targets.
    async with receiver.session.get(f"{receiver.base}/v1/models", headers=bearer(ADMIN)) as r:
        everything = await r.json()
    assert [(p["name"], p["appliances"], p["groups"]) for p in everything["packages"]] == [
        ("pump", ["boat-7"], []),
        ("pump", [], ["fleet-a"]),
        ("valve", [], []),
    ]


async def test_downloads_resume_with_range(
    receiver: Receiver, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    package = make_package(tmp_path / "pub", key, "1.0", model_bytes=300_000)
    answer = await publish_package(receiver.base, ADMIN, package)
    data, sha256 = package.read_bytes(), answer["sha256"]
    offset = len(data) // 3
    status, headers, body = await receiver.download(
        "tug-1", sha256, headers={"Range": f"bytes={offset}-"}
    )
    assert status == 206
    assert headers["Content-Range"] == f"bytes {offset}-{len(data) - 1}/{len(data)}"
    assert body == data[offset:]
    status, _, _ = await receiver.download(
        "tug-1", sha256, headers={"Range": f"bytes={len(data) + 10}-"}
    )
    assert status == 416


async def test_publishing_needs_an_admin_token(
    receiver: Receiver, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    body = make_package(tmp_path / "pub", key, "1.0").read_bytes()
    path = "/v1/models/pump/1.0"
    status, answer = await receiver.put(path, body, token=None)
    assert status == 401 and answer["error"] == "missing token"
    status, answer = await receiver.put(path, body, token=TOKENS["boat-7"])
    assert status == 401 and answer["error"] == "unknown admin token"
    status, answer = await receiver.put(path, body, token="guess")
    assert status == 401
    assert await receiver.names("boat-7") == []
    with pytest.raises(PublishError, match=r"refused the package \(401\)"):
        await publish_package(receiver.base, "guess", tmp_path / "pub" / "pump-1.0.tar")

    async for closed in start(tmp_path / "closed", admin_tokens=()):
        status, answer = await closed.put(path, body)
        assert status == 403 and "--admin-tokens" in answer["detail"]
    with pytest.raises(ValueError, match="also an appliance's token"):
        build_receiver_app(tmp_path / "x", TOKENS, admin_tokens=[TOKENS["tug-1"]])


async def test_bad_publishes_are_refused_clearly(
    receiver: Receiver, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    pub = tmp_path / "pub"
    first = make_package(pub, key, "1.0", targets=("boat-7",)).read_bytes()
    other = make_package(pub / "other", key, "1.0", targets=("boat-7",), model_bytes=30_000)
    cases = [
        ("/v1/models/pump/2.0", first, {}, 422, "wrong name or version"),
        ("/v1/models/valve/1.0", first, {}, 422, "wrong name or version"),
        ("/v1/models/pump/1.0", b"not a tar at all" * 64, {}, 422, "not a model package"),
        ("/v1/models/pump/1.0", b"", {}, 422, "not a model package"),
        ("/v1/models/pump/1.0", first, {"appliance": "../etc"}, 400, "bad appliance id"),
        ("/v1/models/pump/1.0", first, {"group": "a b"}, 400, "bad group"),
        ("/v1/models/pump/1.0", first, {"everyone": "1"}, 400, "bad query"),
        ("/v1/models/pump/-1", first, {}, 400, "bad name or version"),
    ]
    for path, body, params, code, error in cases:
        status, answer = await receiver.put(path, body, **params)
        assert (status, answer["error"]) == (code, error), (path, params, answer)
    assert await receiver.names("boat-7") == []

    status, answer = await receiver.put("/v1/models/pump/1.0", first, appliance="boat-7")
    assert status == 201 and answer["republished"] is False
    # The same version with other bytes is never replaced.
    status, answer = await receiver.put("/v1/models/pump/1.0", other.read_bytes())
    assert status == 409 and "never replaced" in answer["detail"]
    # The same bytes again: new targets, same row.
    status, answer = await receiver.put("/v1/models/pump/1.0", first, group="fleet-b")
    assert status == 200 and answer["republished"] is True
    assert (answer["appliances"], answer["groups"]) == ([], ["fleet-b"])
    # ... and a warning: the manifest itself names boat-7 only.
    assert answer["warnings"] and "group fleet-b is not among" in answer["warnings"][0]
    assert await receiver.names("boat-7") == []
    assert await receiver.names("boat-8", "fleet-b") == ["pump 1.0"]
    leftovers = list((receiver.data / MODELS_DIR / ".incoming").iterdir())
    assert leftovers == []


async def test_publications_survive_a_receiver_restart(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    data = tmp_path / "receiver"
    package = make_package(tmp_path / "pub", key, "1.0")
    async for first in start(data):
        await publish_package(first.base, ADMIN, package, appliances=["boat-8"])
    # A publish a crash cut off leaves a spool file; the next start removes it.
    (data / MODELS_DIR / ".incoming" / "cut.part").write_bytes(b"half")
    async for second in start(data):
        assert await second.names("boat-8") == ["pump 1.0"]
        assert list((data / MODELS_DIR / ".incoming").iterdir()) == []


def test_package_identity_is_read_without_trusting_it(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    package = make_package(tmp_path, key, "3.1", targets=("boat-7", "group:fleet-a"))
    identity = read_package_identity(package)
    assert (identity.name, identity.version) == ("pump", "3.1")
    assert identity.targets == ("boat-7", "group:fleet-a")
    (tmp_path / "junk.tar").write_bytes(b"\0" * 2048)
    with pytest.raises(ValueError, match=r"manifest\.json"):
        read_package_identity(tmp_path / "junk.tar")


def test_admin_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "admins"
    path.write_text("# publishers\none\n\n  two  \n")
    assert parse_admin_tokens_file(path) == ["one", "two"]
    for text, message in (
        ("one two\n", ":1: an admin token is one word"),
        ("one\none\n", ":2: this token is listed twice"),
        ("# nobody\n", "no admin token"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            parse_admin_tokens_file(path)


@pytest.fixture
def receiver_process(tmp_path: Path) -> Iterator[str]:
    """`appliance receiver` with --tokens and --admin-tokens; its URL."""
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{a} {t}\n" for a, t in TOKENS.items()))
    admins = tmp_path / "admins"
    admins.write_text(f"{ADMIN}\n")
    out = tmp_path / "receiver.out"
    args = [
        "--data",
        str(tmp_path / "data"),
        "--tokens",
        str(tokens),
        "--admin-tokens",
        str(admins),
    ]
    with out.open("wb") as stdout:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "receiver", "--listen", "127.0.0.1:0", *args],
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            env=cli_env(),
            cwd=ROOT,
        )
    try:
        line = wait_for(
            lambda: next((x for x in out.read_text().splitlines() if "listening on" in x), None),
            20,
            "the receiver to print its address",
        )
        yield line.rsplit(" ", 1)[1]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


async def run_cli(*args: str) -> tuple[int, str, str]:
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


async def test_cli_publish_to_a_receiver_process(
    receiver_process: str, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    package = make_package(tmp_path / "pub", key, "1.0", targets=("boat-7",))
    token_file = tmp_path / "admin-token"
    token_file.write_text(f"{ADMIN}\n")
    publish = ["receiver", "publish", str(package), "--url", receiver_process]
    code, out, err = await run_cli(
        *publish, "--admin-token-file", str(token_file), "--appliance", "boat-7", "--group", "x"
    )
    assert code == 0, err
    assert f"published pump 1.0 (sha256 {sha256_of(package)}" in out
    assert "for boat-7, group:x" in out
    assert "warning: group x is not among the package's targets" in err

    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{receiver_process}/v1/appliances/boat-7/models", headers=bearer(TOKENS["boat-7"])
        ) as response,
    ):
        listing = json.loads(await response.read())
    assert [p["sha256"] for p in listing["packages"]] == [sha256_of(package)]

    # Refused by the receiver: exit 1 with its reason; bad input: exit 2 naming it.
    token_file.write_text("not-the-admin\n")
    code, _, err = await run_cli(*publish, "--admin-token-file", str(token_file))
    assert code == 1 and "401" in err and "unknown admin token" in err
    code, _, err = await run_cli(*publish, "--admin-token-file", str(tmp_path / "missing"))
    assert code == 2 and "--admin-token-file" in err


def test_cli_publish_usage_errors(
    tmp_path: Path, key: Ed25519PrivateKey, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("a b\n")
    base = ["receiver", "publish", "--url", "http://127.0.0.1:9", "--admin-token-file"]
    assert cli_main([*base, str(token_file), str(tmp_path / "nothing.tar")]) == 2
    assert "is not a readable file" in capsys.readouterr().err
    package = make_package(tmp_path, key, "1.0")
    assert cli_main([*base, str(token_file), str(package)]) == 2
    assert "must hold one token" in capsys.readouterr().err
    token_file.write_text("admin\n")
    assert cli_main([*base, str(token_file), str(package), "--appliance", "a/b"]) == 1
    assert "--appliance 'a/b' is not an appliance id" in capsys.readouterr().err
    # Nothing listens on port 9: a clear "cannot publish", exit 1.
    assert cli_main([*base, str(token_file), str(package)]) == 1
    assert "cannot publish to http://127.0.0.1:9" in capsys.readouterr().err
    # Serving still needs --listen and --data; a bad admin tokens file is a usage error.
    assert cli_main(["receiver", "--data", str(tmp_path)]) == 2
    assert "--listen" in capsys.readouterr().err
    admins = tmp_path / "admins"
    admins.write_text("# none\n")
    serve = ["receiver", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "d")]
    assert cli_main([*serve, "--admin-tokens", str(admins)]) == 2
    assert "no admin token" in capsys.readouterr().err
