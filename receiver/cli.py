"""Owns the shore side's command, `appliance receiver`: serving from flags or from the config
file (config/receiver.py), `config check|schema`, `tokens add|revoke|list` on the store, and
`publish` (a model package, through a running receiver). The `appliance` command (appliance/cli.py)
adds its options (receiver/commands.py) to its parser and hands it the arguments; exit codes 0 ok,
1 could not finish, 2 usage."""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from config import load_receiver_config, receiver_config_schema
from config.receiver import DEFAULT_MAX_INFLIGHT
from config.units import parse_duration
from receiver.app import run_receiver, server_tls_context
from receiver.backend import RecordStore, TokenRole, new_token_entry
from receiver.model_feed import PublishError, publish_package
from receiver.objects import BucketSettings, BucketUnavailable
from receiver.postgres import PostgresStore, StoreUnavailable, read_database_file
from receiver.protocol import (
    parse_admin_tokens_file,
    parse_listen,
    parse_tokens_file,
    valid_appliance_id,
)
from receiver.store import ReceiverStore

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def run_receiver_command(args: argparse.Namespace, setup_logging: Callable[[str], None]) -> int:
    """Run `appliance receiver ...`; the exit code. `setup_logging(level)` is the appliance's
    (JSON log lines), called before serving."""
    if args.receiver_command == "publish":
        return _publish(args)
    if args.receiver_command == "tokens":
        return _tokens(args)
    if args.receiver_command == "config":
        if args.receiver_config_command == "schema":
            print(json.dumps(receiver_config_schema(), indent=2))
            return EXIT_OK
        cfg = load_receiver_config(args.file)
        print(f"{args.file}: ok (store {cfg.store.type}, objects {cfg.objects.type})")
        return EXIT_OK
    # Check what the user typed before serving, so a typo is a usage error (2), not a crash.
    try:
        serving = _receiver_from_config(args) if args.config else _receiver_from_flags(args)
    except ssl.SSLError as exc:
        print(f"error: cannot use the TLS files: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(serving.log_level)
    try:
        asyncio.run(
            run_receiver(
                serving.listen,
                serving.data,
                serving.tokens_file,
                partial_ttl=serving.partial_ttl,
                ssl_context=serving.ssl_context,
                admin_tokens_file=serving.admin_tokens_file,
                concurrent_quiet=serving.concurrent_quiet,
                database=serving.database,
                bucket=serving.bucket,
                max_connections=serving.max_connections,
                max_inflight=serving.max_inflight,
            )
        )
    except (StoreUnavailable, BucketUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _tokens(args: argparse.Namespace) -> int:
    """`appliance receiver tokens add|revoke|list`, on the store the receiver uses."""
    try:
        if args.config is not None:
            cfg = load_receiver_config(args.config)
            data = cfg.data
            database = (
                read_database_file(cfg.store.database_file, "store.database_file")
                if cfg.store.type == "postgres"
                else None
            )
        else:
            if args.data is None:
                raise ValueError("tokens needs -c FILE, or --data DIR [--database-file FILE]")
            data = args.data
            database = (
                None if args.database_file is None else read_database_file(args.database_file)
            )
        if args.tokens_command == "add":
            if args.admin == (args.appliance_id is not None):
                raise ValueError("tokens add takes an APPLIANCE_ID, or --admin (not both)")
            if args.appliance_id is not None and not valid_appliance_id(args.appliance_id):
                raise ValueError(f"{args.appliance_id!r} is not an appliance id")
        if args.tokens_command == "revoke" and (args.appliance_id is None) == (
            args.token_id is None
        ):
            raise ValueError("tokens revoke takes an APPLIANCE_ID, or --id TOKEN_ID")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_run_tokens(args, data, database))
    except StoreUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


async def _run_tokens(args: argparse.Namespace, data: Path, database: str | None) -> int:
    store: RecordStore = (
        await PostgresStore.open(database)
        if database is not None
        else await ReceiverStore.open(data)
    )
    try:
        if args.tokens_command == "add":
            token = secrets.token_urlsafe(32)
            role: TokenRole = "admin" if args.admin else "appliance"
            entry = new_token_entry(token, role, args.appliance_id, args.label)
            await store.add_token(entry)
            whom = "an admin" if args.admin else args.appliance_id
            print(
                f"token {entry.token_id} for {whom} added; only its sha256 is kept, so this is "
                "the only time it is shown (running receivers take it within 5 s)",
                file=sys.stderr,
            )
            print(token)
            return EXIT_OK
        if args.tokens_command == "revoke":
            revoked = await store.revoke_tokens(
                appliance_id=args.appliance_id, token_id=args.token_id
            )
            if revoked == 0:
                print("error: no active token matches", file=sys.stderr)
                return EXIT_FAILED
            print(f"{revoked} token(s) revoked; running receivers refuse them within 5 s")
            return EXIT_OK
        for entry in await store.tokens():
            state = "active" if entry.revoked_at is None else f"revoked {entry.revoked_at}"
            print(
                f"{entry.token_id}  {entry.role:<9}  {entry.appliance_id or '-':<20}  "
                f"created {entry.created_at}  {state}  {entry.label}".rstrip()
            )
        return EXIT_OK
    finally:
        await store.close()


@dataclass(frozen=True)
class _Serving:
    """How `appliance receiver` serves, from its flags or from its config file."""

    listen: str
    data: Path
    tokens_file: Path | None
    admin_tokens_file: Path | None
    partial_ttl: float
    concurrent_quiet: float
    ssl_context: ssl.SSLContext | None
    database: str | None
    bucket: BucketSettings | None
    max_connections: int
    log_level: str
    max_inflight: int = DEFAULT_MAX_INFLIGHT


def _check_receiver_files(
    tokens_file: Path | None,
    admin_tokens_file: Path | None,
    tls: tuple[Path | None, Path | None, Path | None],
    names: tuple[str, str, str],
) -> ssl.SSLContext | None:
    """Parse the tokens files and load the TLS files now: a mistake is a usage error."""
    if tokens_file is not None:
        parse_tokens_file(tokens_file)
    if admin_tokens_file is not None:
        parse_admin_tokens_file(admin_tokens_file)
    cert, key, client_ca = tls
    if cert is None and (key or client_ca):
        raise ValueError(f"{names[1]} and {names[2]} need {names[0]}")
    for flag, path in zip(names, tls, strict=True):
        if path is not None and not path.is_file():
            raise ValueError(f"{flag}: {path} is not a readable file")
    return None if cert is None else server_tls_context(cert, key, client_ca)


def _receiver_from_flags(args: argparse.Namespace) -> _Serving:
    if args.listen is None or args.data is None:
        raise ValueError("serving needs --listen HOST:PORT and --data DIR (or -c FILE)")
    parse_listen(args.listen)
    try:
        partial_ttl = parse_duration(args.partial_ttl)
    except ValueError as exc:
        raise ValueError(f"--partial-ttl: {exc}") from None
    if partial_ttl < 3600:
        raise ValueError("--partial-ttl must be at least 1h (appliances resume after cuts)")
    try:
        concurrent_quiet = parse_duration(args.concurrent_quiet)
    except ValueError as exc:
        raise ValueError(f"--concurrent-quiet: {exc}") from None
    if concurrent_quiet <= 0:
        raise ValueError("--concurrent-quiet must be positive")
    if args.max_inflight < 1:
        raise ValueError("--max-inflight must be at least 1")
    database = None if args.database_file is None else read_database_file(args.database_file)
    ssl_context = _check_receiver_files(
        args.tokens,
        args.admin_tokens,
        (args.tls_cert, args.tls_key, args.client_ca),
        ("--tls-cert", "--tls-key", "--client-ca"),
    )
    return _Serving(
        listen=args.listen,
        data=args.data,
        tokens_file=args.tokens,
        admin_tokens_file=args.admin_tokens,
        partial_ttl=partial_ttl,
        concurrent_quiet=concurrent_quiet,
        ssl_context=ssl_context,
        database=database,
        bucket=None,
        max_connections=10,
        log_level=args.log_level,
        max_inflight=args.max_inflight,
    )


_SERVING_FLAGS = (
    "listen",
    "data",
    "tokens",
    "admin_tokens",
    "database_file",
    "tls_cert",
    "tls_key",
    "client_ca",
)


def _receiver_from_config(args: argparse.Namespace) -> _Serving:
    given = [f"--{name.replace('_', '-')}" for name in _SERVING_FLAGS if getattr(args, name)]
    if given:
        raise ValueError(f"-c FILE says how to serve; leave out {', '.join(given)}")
    cfg = load_receiver_config(args.config)
    parse_listen(cfg.listen)
    tls = cfg.tls
    ssl_context = _check_receiver_files(
        cfg.tokens_file,
        cfg.admin_tokens_file,
        (None, None, None) if tls is None else (tls.cert, tls.key, tls.client_ca),
        ("tls.cert", "tls.key", "tls.client_ca"),
    )
    database: str | None = None
    max_connections = 10
    if cfg.store.type == "postgres":
        database = read_database_file(cfg.store.database_file, "store.database_file")
        max_connections = cfg.store.max_connections
    bucket: BucketSettings | None = None
    if cfg.objects.type == "s3":
        objects = cfg.objects
        bucket = BucketSettings(
            endpoint_url=objects.endpoint_url,
            bucket=objects.bucket,
            access_key_file=objects.access_key_file,
            secret_key_file=objects.secret_key_file,
            prefix=objects.prefix,
            region=objects.region,
            timeout_s=objects.timeout,
        )
    return _Serving(
        listen=cfg.listen,
        data=cfg.data,
        tokens_file=cfg.tokens_file,
        admin_tokens_file=cfg.admin_tokens_file,
        partial_ttl=cfg.partial_ttl,
        concurrent_quiet=cfg.concurrent_quiet,
        ssl_context=ssl_context,
        database=database,
        bucket=bucket,
        max_connections=max_connections,
        log_level=cfg.log_level,
        max_inflight=cfg.max_inflight,
    )


def _publish(args: argparse.Namespace) -> int:
    if not args.package.is_file():
        print(f"error: PKG {args.package} is not a readable file", file=sys.stderr)
        return EXIT_USAGE
    try:
        token = args.admin_token_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: --admin-token-file {args.admin_token_file}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not token or len(token.split()) != 1:
        print(
            f"error: --admin-token-file {args.admin_token_file} must hold one token",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        answer = asyncio.run(
            publish_package(
                args.url,
                token,
                args.package,
                appliances=args.appliance,
                groups=args.group,
                ca_file=args.ca_file,
            )
        )
    except PublishError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    audience = [*answer.get("appliances", []), *(f"group:{g}" for g in answer.get("groups", []))]
    print(
        f"{'republished' if answer.get('republished') else 'published'} {answer.get('name')} "
        f"{answer.get('version')} (sha256 {answer.get('sha256')}, {answer.get('size')} bytes) "
        f"for {', '.join(audience) or 'every appliance'}"
    )
    for warning in answer.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


__all__ = ["run_receiver_command"]
