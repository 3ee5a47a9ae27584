"""The `appliance` command: argument parsing, exit codes, and the one place exceptions become
one-line messages (0 ok, 1 could not finish, 2 usage or config error)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from appliance.models.cli import add_models_parser, run_models
from appliance.runtime.logs import setup_logging
from appliance.status.export import export_records
from appliance.status.report import collect_status, render_status
from appliance.syncnow import sync_now
from config import (
    ApplianceConfig,
    ConfigError,
    config_schema,
    load_config,
    load_receiver_config,
    receiver_config_schema,
)
from config.models import AUTO_APPLIANCE_ID
from config.units import parse_duration
from receiver import (
    parse_admin_tokens_file,
    parse_listen,
    parse_tokens_file,
    run_receiver,
    server_tls_context,
)
from receiver.model_feed import PublishError, publish_package
from receiver.objects import BucketSettings, BucketUnavailable
from receiver.postgres import StoreUnavailable, read_database_file
from sync import Journal, JournalReader, SyncError
from sync.identity import JournalIdentity, data_dir_appliance_id
from sync.reader import JOURNAL_FILE
from sync.records import parse_since

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--data-dir", type=Path, help="data directory (overrides the config and APPLIANCE_DATA_DIR)"
    )
    common.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )

    parser = _Parser(
        prog="appliance", description="Offline-first edge store-and-forward appliance."
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    run = commands.add_parser(
        "run", parents=[common], help="run the daemon (default: the embedded demo profile)"
    )
    run.add_argument(
        "-c", "--config", type=Path, help="config file (default: embedded demo profile)"
    )

    replay = commands.add_parser(
        "replay",
        parents=[common],
        help="run the pipeline over finite sources as fast as possible, then exit",
    )
    replay.add_argument(
        "-c", "--config", type=Path, required=True, help="config file with finite sources"
    )

    status = commands.add_parser(
        "status", parents=[common], help="health, backlog, disk and evictions"
    )
    status.add_argument(
        "-c", "--config", type=Path, help="config file (default: embedded demo profile)"
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of text")

    export = commands.add_parser("export", parents=[common], help="print journal records to stdout")
    export.add_argument(
        "-c", "--config", type=Path, help="config file (default: embedded demo profile)"
    )
    export.add_argument(
        "--kind", help="only records of this kind (reading, limit, sample, data_quality, ...)"
    )
    export.add_argument(
        "--since", help="only records at or after this time (ISO-8601) or age (e.g. 2h)"
    )
    export.add_argument(
        "--format", choices=["ndjson", "csv"], default="ndjson", help="output format"
    )

    journal_cmd = commands.add_parser("journal", help="the journal's identity")
    journal_sub = journal_cmd.add_subparsers(
        dest="journal_command", required=True, metavar="ACTION", parser_class=_Parser
    )
    fork = journal_sub.add_parser(
        "fork",
        parents=[common],
        help="ship records after a seq under a new journal id (after restoring a backup older "
        "than what was shipped, or on a copied journal); the daemon must be stopped",
    )
    fork.add_argument("-c", "--config", type=Path, help="config file (default: demo profile)")
    fork.add_argument(
        "--after",
        type=int,
        metavar="SEQ",
        help="last seq that keeps the current id (default: the last seq handed out; after a "
        "409, one less than the first conflicting seq it names)",
    )

    config_cmd = commands.add_parser(
        "config", help="validate a config file or print its JSON schema"
    )
    config_sub = config_cmd.add_subparsers(
        dest="config_command", required=True, metavar="ACTION", parser_class=_Parser
    )
    check = config_sub.add_parser(
        "check", help="validate FILE; exit 2 naming the key and line if invalid"
    )
    check.add_argument("file", type=Path)
    config_sub.add_parser("schema", help="print the JSON schema of the config file")

    add_models_parser(commands, _Parser)

    sync_cmd = commands.add_parser(
        "sync", parents=[common], help="ship the backlog to the destinations now"
    )
    sync_cmd.add_argument(
        "--now", action="store_true", required=True, help="drain now (the only mode so far)"
    )
    sync_cmd.add_argument("-c", "--config", type=Path, help="config file (default: demo profile)")
    sync_cmd.add_argument("--destination", metavar="NAME", help="only this destination")
    sync_cmd.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="give up after this long (exit 1)"
    )

    receiver = commands.add_parser(
        "receiver", help="run the reference upstream receiver (docs/sync-protocol.md)"
    )
    # Required to serve, checked in _receiver: `receiver publish` takes none of them.
    receiver.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        help="the receiver's config file (docs/fleet.md); instead of the flags below",
    )
    receiver.add_argument(
        "--listen", metavar="HOST:PORT", help="address to serve on (port 0: any); required"
    )
    receiver.add_argument("--data", type=Path, metavar="DIR", help="receiver data directory")
    receiver.add_argument(
        "--tokens", type=Path, metavar="FILE", help="'APPLIANCE_ID TOKEN' a line (default: none)"
    )
    receiver.add_argument(
        "--admin-tokens",
        type=Path,
        metavar="FILE",
        help="tokens that may publish model packages, one a line (default: publishing disabled)",
    )
    receiver.add_argument(
        "--database-file",
        type=Path,
        metavar="FILE",
        help="file holding a PostgreSQL URL (postgresql://USER:PASSWORD@HOST:PORT/DB): records, "
        "batches, the payload index and model packages go there, shared by every receiver "
        "replica, instead of DATA_DIR/receiver.db (docs/fleet.md)",
    )
    receiver.add_argument(
        "--partial-ttl",
        default="30d",
        metavar="DURATION",
        help="delete partial uploads nobody resumed for this long (default: 30d)",
    )
    receiver.add_argument(
        "--concurrent-quiet",
        default="24h",
        metavar="DURATION",
        help="two journals of one appliance id shipping within this long of each other are "
        "flagged as two boxes sharing the id; the flag clears once all but one have been quiet "
        "this long (default: 24h)",
    )
    receiver.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="serve HTTPS with this certificate chain (PEM)",
    )
    receiver.add_argument(
        "--tls-key", type=Path, metavar="FILE", help="private key of --tls-cert (default: in it)"
    )
    receiver.add_argument(
        "--client-ca",
        type=Path,
        metavar="FILE",
        help="require client certificates signed by this CA (PEM); needs --tls-cert",
    )
    receiver.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    receiver_actions = receiver.add_subparsers(
        dest="receiver_command", metavar="ACTION", parser_class=_Parser
    )
    receiver_config = receiver_actions.add_parser(
        "config", help="check the receiver's config file, or print its JSON schema"
    )
    receiver_config_actions = receiver_config.add_subparsers(
        dest="receiver_config_command", required=True, metavar="ACTION", parser_class=_Parser
    )
    receiver_check = receiver_config_actions.add_parser(
        "check", help="validate a receiver config file (exit 2 naming file:line: key)"
    )
    receiver_check.add_argument("file", type=Path, metavar="FILE")
    receiver_config_actions.add_parser("schema", help="print the JSON schema of the file")
    publish = receiver_actions.add_parser(
        "publish",
        help="publish a model package on a running receiver for appliances or groups",
    )
    publish.add_argument("package", type=Path, metavar="PKG", help="package file (.tar)")
    publish.add_argument(
        "--url", required=True, metavar="URL", help="the receiver, e.g. https://shore:8443"
    )
    publish.add_argument(
        "--admin-token-file",
        type=Path,
        required=True,
        metavar="FILE",
        help="file holding an admin token (one of the receiver's --admin-tokens)",
    )
    publish.add_argument(
        "--appliance",
        action="append",
        default=[],
        metavar="ID",
        help="an appliance it is for (repeatable)",
    )
    publish.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="GROUP",
        help="a group it is for (repeatable); no --appliance and no --group: every appliance",
    )
    publish.add_argument(
        "--ca-file", type=Path, metavar="FILE", help="CA bundle to verify an https receiver with"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SyncError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        if args.config_command == "schema":
            print(json.dumps(config_schema(), indent=2))
            return EXIT_OK
        cfg = load_config(
            args.file, environ={}
        )  # check the file itself, not this shell's overrides
        print(f"{args.file}: ok ({len(cfg.sensors)} sources, data_dir {cfg.appliance.data_dir})")
        return EXIT_OK
    if args.command == "receiver":
        return _receiver(args)
    if args.command == "models":
        return run_models(args)

    cfg = load_config(args.config, data_dir=args.data_dir)
    cfg = with_appliance_id(cfg, create=args.command in ("run", "replay", "sync", "journal"))
    if args.command in ("run", "replay"):
        # Imported here: the daemon brings every source library, which the operator's quick
        # commands (status, export) do not need to load.
        from appliance.daemon import Daemon

        setup_logging(args.log_level)
        return asyncio.run(Daemon(cfg, mode=args.command).run())
    if args.command == "journal":
        return _fork_journal(cfg, args.after)
    if args.command == "sync":
        if args.timeout is not None and args.timeout <= 0:
            print("error: --timeout must be positive", file=sys.stderr)
            return EXIT_USAGE
        drained, reason = asyncio.run(sync_now(cfg, args.destination, args.timeout))
        if drained:
            print("drained: nothing left to ship", file=sys.stderr)
            return EXIT_OK
        print(f"not finished: {reason}", file=sys.stderr)
        return EXIT_FAILED
    if args.command == "status":
        report = collect_status(cfg)
        print(json.dumps(report, indent=2) if args.json else render_status(report))
        return EXIT_OK
    if args.command == "export":
        try:
            since = parse_since(args.since) if args.since else None
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        reader = JournalReader.open(cfg.appliance.data_dir)
        try:
            export_records(reader, sys.stdout, kind=args.kind, since=since, fmt=args.format)
            sys.stdout.flush()
        except BrokenPipeError:
            # `appliance export | head` closed the pipe: not an error for the user.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            reader.close()
        return EXIT_OK
    raise AssertionError(f"unhandled command {args.command}")


def _fork_journal(cfg: ApplianceConfig, after: int | None) -> int:
    async def fork() -> tuple[JournalIdentity, JournalIdentity]:
        journal = await Journal.open(
            cfg.appliance.data_dir, appliance_id=cfg.appliance.id, settings=cfg.journal
        )
        async with journal:
            return await journal.fork(after)

    if not (cfg.appliance.data_dir / JOURNAL_FILE).exists():
        print(f"error: no journal in {cfg.appliance.data_dir}", file=sys.stderr)
        return EXIT_FAILED
    try:
        before, forked = asyncio.run(fork())
    except ValueError as exc:
        print(f"error: --after: {exc}", file=sys.stderr)
        return EXIT_USAGE
    point = forked.earlier[-1][0] if forked.earlier else forked.legacy_high_water
    kept = before.shipped_as(point) or "legacy (no journal id)"
    print(
        f"journal forked: records up to seq {point} ship as {kept}, "
        f"records after it as {forked.journal_id}"
    )
    return EXIT_OK


def with_appliance_id(cfg: ApplianceConfig, *, create: bool) -> ApplianceConfig:
    """The config with `appliance.id` resolved when it was left out: the data directory's own id
    (sync/identity.py), made now when `create` (commands that write the journal)."""
    if cfg.appliance.id != AUTO_APPLIANCE_ID:
        return cfg
    made = data_dir_appliance_id(cfg.appliance.data_dir, create=create)
    if made is None:
        return cfg  # nothing has run here yet: there is no journal to read either
    appliance = cfg.appliance.model_copy(update={"id": made})
    return cfg.model_copy(update={"appliance": appliance})


def _receiver(args: argparse.Namespace) -> int:
    if args.receiver_command == "publish":
        return _publish(args)
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
            )
        )
    except (StoreUnavailable, BucketUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


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
