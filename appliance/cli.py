"""The `appliance` command: argument parsing, exit codes, and the one place exceptions become
one-line messages (0 ok, 1 could not finish, 2 usage or config error)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

# Only what building the parser needs is imported here; each command imports what it uses
# when it runs, so `--help`, `status` and `export` start without numpy, OpenCV, onnxruntime,
# aiohttp or the journal's writer side (measured in docs/benchmarks.md, held by
# tests/test_cli_basics.py).
from appliance.models.commands import add_models_parser
from appliance.status.kinds import KIND_NAMES, check_kind
from receiver.commands import add_receiver_parser

if TYPE_CHECKING:
    from config import ApplianceConfig
    from sync.identity import JournalIdentity

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


class _Version(argparse.Action):
    """`appliance --version`: the installed package's version, looked up only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> NoReturn:
        from appliance.status.health import app_version

        print(f"appliance {app_version()}")
        parser.exit()


def _kind(value: str) -> str:
    try:
        return check_kind(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    parser.add_argument("--version", action=_Version, help="print the version and exit")
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
        "--kind",
        type=_kind,
        metavar="KIND",
        help=f"only records of this kind: {', '.join(KIND_NAMES)}",
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
        "check",
        help="validate FILE and the files it names; exit 2 naming the line, column and key of "
        "every problem",
    )
    check.add_argument("file", type=Path)
    check.add_argument(
        "--skip-file-checks",
        action="store_true",
        help="leave out the files FILE names (secrets, tokens, certificates, labels, models): "
        "for a config meant for another machine",
    )
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

    add_receiver_parser(commands, _Parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # After parsing: `--help`, `--version` and usage errors answer before the config loads.
    from config import ConfigError
    from sync import SyncError

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
    import asyncio

    from appliance.runtime.logs import setup_logging
    from config import config_schema, load_config

    if args.command == "config":
        if args.config_command == "schema":
            print(json.dumps(config_schema(), indent=2))
            return EXIT_OK
        from config import check_config

        # The file itself, not this shell's overrides or variables.
        checked = check_config(args.file, check_files=not args.skip_file_checks)
        for warning in checked.warnings:
            print(f"{args.file}: warning: {warning}", file=sys.stderr)
        cfg = checked.config
        print(
            f"{args.file}: ok ({len(cfg.sensors)} sensor sources, {len(cfg.cameras)} cameras, "
            f"{len(cfg.sync.destinations)} destinations, data_dir {cfg.appliance.data_dir})"
        )
        return EXIT_OK
    if args.command == "receiver":
        from receiver.cli import run_receiver_command

        return run_receiver_command(args, setup_logging)
    if args.command == "models":
        # Imported here: model libraries (onnx, scikit-learn) take seconds to load.
        from appliance.models.cli import run_models

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
        from appliance.syncnow import sync_now

        drained, reason = asyncio.run(sync_now(cfg, args.destination, args.timeout))
        if drained:
            print("drained: nothing left to ship", file=sys.stderr)
            return EXIT_OK
        print(f"not finished: {reason}", file=sys.stderr)
        return EXIT_FAILED
    if args.command == "status":
        from appliance.status.report import collect_status, render_status

        report = collect_status(cfg)
        print(json.dumps(report, indent=2) if args.json else render_status(report))
        return EXIT_OK
    if args.command == "export":
        from appliance.status.export import export_records
        from sync.reader import JournalReader
        from sync.records import parse_since

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
    import asyncio

    from sync import Journal
    from sync.reader import JOURNAL_FILE

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
    from config.models import AUTO_APPLIANCE_ID
    from sync.identity import data_dir_appliance_id

    if cfg.appliance.id != AUTO_APPLIANCE_ID:
        return cfg
    made = data_dir_appliance_id(cfg.appliance.data_dir, create=create)
    if made is None:
        return cfg  # nothing has run here yet: there is no journal to read either
    appliance = cfg.appliance.model_copy(update={"id": made})
    return cfg.model_copy(update={"appliance": appliance})
