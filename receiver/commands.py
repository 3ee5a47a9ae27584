"""The `appliance receiver` command line: its actions and their options (what `--help` shows).
Kept apart from receiver/cli.py, which runs them, so that building the `appliance` command's
parser loads neither aiohttp nor a database driver: `appliance --help`, `status` and `export`
start in a fraction of a second."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from config.receiver import DEFAULT_MAX_INFLIGHT


def add_receiver_parser(commands: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """`appliance receiver` and its actions, added to the appliance command's subparsers."""
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
        "--max-inflight",
        type=int,
        default=DEFAULT_MAX_INFLIGHT,
        metavar="N",
        help="batches and payload chunks taken at once; the next is answered 503 (the appliance "
        f"sends it again), bounding memory when a fleet comes back at once (default: "
        f"{DEFAULT_MAX_INFLIGHT})",
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
        dest="receiver_command", metavar="ACTION", parser_class=parser_class
    )
    tokens = receiver_actions.add_parser(
        "tokens",
        help="bearer tokens kept in the receiver's store (with -c FILE, or --data and "
        "--database-file)",
    )
    token_actions = tokens.add_subparsers(
        dest="tokens_command", required=True, metavar="ACTION", parser_class=parser_class
    )
    token_add = token_actions.add_parser(
        "add", help="make a token for an appliance (or --admin) and print it, once"
    )
    token_add.add_argument("appliance_id", nargs="?", metavar="APPLIANCE_ID")
    token_add.add_argument(
        "--admin", action="store_true", help="a token that may publish model packages"
    )
    token_add.add_argument("--label", default="", help="a note kept with it (who, what for)")
    token_revoke = token_actions.add_parser(
        "revoke", help="revoke an appliance's tokens, or one token by its id"
    )
    token_revoke.add_argument("appliance_id", nargs="?", metavar="APPLIANCE_ID")
    token_revoke.add_argument("--id", dest="token_id", metavar="TOKEN_ID", help="one token")
    token_actions.add_parser("list", help="every token's id, role, appliance, label, dates")
    receiver_config = receiver_actions.add_parser(
        "config", help="check the receiver's config file, or print its JSON schema"
    )
    receiver_config_actions = receiver_config.add_subparsers(
        dest="receiver_config_command", required=True, metavar="ACTION", parser_class=parser_class
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
