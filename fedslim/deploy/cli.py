"""`fedslim deploy`: certificates, node keys, the flwr connection, and the SuperLink/SuperNode commands."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
from pathlib import Path


def add_deploy_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    deploy = sub.add_parser(
        "deploy",
        help="run a federation on real devices (TLS, node keys, SuperLink and SuperNodes)",
        description="From zero to a running federation: see docs/edge.md.",
    )
    commands = deploy.add_subparsers(dest="deploy_command", required=True)

    certs = commands.add_parser("certs", help="a CA and the SuperLink's TLS certificate")
    certs.add_argument("--out", type=Path, required=True, help="folder for ca.crt, ca.key, server.pem, server.key")
    certs.add_argument(
        "--host", action="append", required=True, help="host name or IP the nodes dial (repeatable; all go in the SAN)"
    )
    certs.add_argument("--days", type=int, default=825, help="validity of the server certificate")
    certs.add_argument("--overwrite", action="store_true")

    key = commands.add_parser("node-key", help="a SuperNode's authentication key pair (ECDSA P-384, OpenSSH)")
    key.add_argument("name", help="the node's name: files NAME and NAME.pub")
    key.add_argument("--out", type=Path, required=True)
    key.add_argument("--overwrite", action="store_true")

    connection = commands.add_parser("connection", help="add the SuperLink to $FLWR_HOME/config.toml for flwr")
    connection.add_argument("name")
    connection.add_argument("--address", required=True, help="the SuperLink's control API, HOST:PORT")
    tls = connection.add_mutually_exclusive_group(required=True)
    tls.add_argument("--ca", type=Path, help="the CA certificate (ca.crt)")
    tls.add_argument("--insecure", action="store_true", help="no TLS (a trusted network only)")
    connection.add_argument("--default", action="store_true", help="make it flwr's default connection")

    register = commands.add_parser("register", help="allow a node's public key on the SuperLink")
    register.add_argument("public_key", type=Path)
    register.add_argument("--connection", required=True, help="the flwr connection of the SuperLink")
    register.add_argument("--name", help="a name the SuperLink shows for the node")

    superlink = commands.add_parser("superlink", help="start the SuperLink (replaces this process)")
    superlink.add_argument("--fleet-address", default="0.0.0.0:9092", help="Fleet API (gRPC), where nodes connect")
    superlink.add_argument("--control-address", default="127.0.0.1:9093", help="control/runtime HTTP API, for flwr")
    superlink.add_argument("--database", type=Path, default=Path("superlink.db"))
    mode = superlink.add_mutually_exclusive_group(required=True)
    mode.add_argument("--certs", type=Path, help="folder made by `fedslim deploy certs`")
    mode.add_argument("--insecure", action="store_true", help="no TLS and no node authentication")
    superlink.add_argument("--no-node-auth", action="store_true", help="TLS, but accept any node")
    superlink.add_argument("--print", action="store_true", help="print the command instead of running it")

    supernode = commands.add_parser("supernode", help="start a SuperNode on this device (replaces this process)")
    supernode.add_argument("--superlink", required=True, help="the SuperLink's Fleet API, HOST:PORT")
    supernode.add_argument("--name", required=True, help="the node's stable name (its client key)")
    supernode.add_argument(
        "--data",
        type=Path,
        help="the node's data file, as its task reads it (.npz with x and y; the text task: JSON Lines)",
    )
    supernode.add_argument("--base", type=Path, help="the resident base checkpoint (provisioned there if absent)")
    supernode.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="MODULE:OBJECT",
        help="a task of your own this node agrees to import (repeatable; the built-in tasks need none)",
    )
    supernode.add_argument(
        "--model-out",
        type=Path,
        help="where the node writes its trained model (with its own head) at a run's final sync (final-sync=true)",
    )
    supernode.add_argument("--port", type=int, default=9094, help="the SuperNode's local runtime API port")
    node_tls = supernode.add_mutually_exclusive_group(required=True)
    node_tls.add_argument("--ca", type=Path, help="the CA certificate (ca.crt)")
    node_tls.add_argument("--insecure", action="store_true")
    supernode.add_argument("--key", type=Path, help="the node's private key (from `fedslim deploy node-key`)")
    supernode.add_argument("--print", action="store_true", help="print the command instead of running it")


def run_deploy(args: argparse.Namespace) -> int:
    from fedslim.channel.protocol import MODEL_OUT_KEY
    from fedslim.deploy.commands import (
        NodeSettings,
        register_command,
        superlink_command,
        supernode_command,
        write_connection,
    )
    from fedslim.deploy.credentials import CA_CERT, SERVER_CERT, SERVER_KEY, ServerCredentials

    command = args.deploy_command
    if command == "certs":
        from fedslim.deploy.credentials import make_server_certificate

        made = make_server_certificate(args.out, args.host, args.days, args.overwrite)
        print(f"CA certificate (give it to every node and to flwr): {made.ca_certificate}")
        print(f"SuperLink certificate and key: {made.certificate}, {made.private_key}")
        return 0
    if command == "node-key":
        from fedslim.deploy.credentials import make_node_key

        private, public = make_node_key(args.out, args.name, args.overwrite)
        print(f"private key (stays on the node): {private}\npublic key (register it): {public}")
        return 0
    if command == "connection":
        print(f"wrote {write_connection(args.name, args.address, args.ca, args.default)}")
        return 0
    if command == "register":
        return subprocess.run(register_command(args.public_key, args.connection, args.name)).returncode
    if command == "superlink":
        credentials = None
        if args.certs:
            credentials = ServerCredentials(args.certs / CA_CERT, args.certs / SERVER_CERT, args.certs / SERVER_KEY)
            missing = [str(p) for p in (credentials.ca_certificate, credentials.certificate) if not p.exists()]
            if missing:
                raise FileNotFoundError(f"missing {', '.join(missing)}: run `fedslim deploy certs` first")
        node_auth = not (args.insecure or args.no_node_auth)
        argv = superlink_command(args.fleet_address, args.control_address, args.database, credentials, node_auth)
    else:
        model_out = ((MODEL_OUT_KEY, str(args.model_out.resolve())),) if args.model_out else ()
        node = NodeSettings(args.name, args.data, args.base, tuple(args.task), model_out)
        argv = supernode_command(args.superlink, node, args.port, args.ca, args.key)
    if args.print:
        print(shlex.join(argv))
        return 0
    os.execv(argv[0], argv)
