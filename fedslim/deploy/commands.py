"""The Flower commands that start a federation, and the `flwr` connection that runs fedslim on it.

Each function returns the argument list of one Flower 1.39 command, so the
CLI (`fedslim deploy ...`), the docs and the integration tests start the
same processes:

- :func:`superlink_command`: ``flower-superlink`` with TLS and SuperNode
  authentication (or ``--insecure`` on a trusted network), the Fleet API
  (gRPC) on one address and the HTTP control/runtime API on another;
- :func:`supernode_command`: ``flower-supernode`` dialling the Fleet API
  with the CA certificate and its authentication key, and the node config a
  fedslim ClientApp reads (``node-name``, ``data-path``, ``base-path``, ``tasks``);
- :func:`register_command`: ``flwr supernode register`` for a node's public key;
- :func:`write_connection`: the ``[superlink.NAME]`` entry of
  ``$FLWR_HOME/config.toml`` that ``flwr run . NAME`` and ``flwr ls NAME`` use.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from fedslim.channel.protocol import BASE_PATH_KEY, DATA_PATH_KEY, NODE_NAME_KEY, TASKS_KEY
from fedslim.deploy.credentials import ServerCredentials


class DeployError(ValueError):
    """A deployment command cannot be built as asked."""


def flower_binary(name: str) -> str:
    """A Flower executable: next to this Python's (a virtual environment), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name} not found: install fedslim (it installs flwr) in this environment")
    return found


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DeployError(f"expected HOST:PORT, got {text!r}")
    return text


def _node_config_value(value: str) -> str:
    if '"' in value or "\n" in value:
        raise DeployError(f"node config values cannot contain quotes or newlines: {value!r}")
    return f'"{value}"'


def superlink_command(
    fleet_address: str,
    control_address: str,
    database: Path,
    credentials: ServerCredentials | None,
    node_auth: bool = True,
) -> list[str]:
    """``flower-superlink``; ``credentials=None`` runs without TLS (then without node authentication)."""
    host, _, port = _address(control_address).rpartition(":")
    command = [flower_binary("flower-superlink"), "--fleet-api-address", _address(fleet_address)]
    command += ["--host", host, "--port", port, "--database", str(database)]
    command += ["--disable-runtime-dependency-installation"]  # the app's dependencies are installed already
    if credentials is None:
        if node_auth:
            raise DeployError("SuperNode authentication needs TLS: give the certificates or turn authentication off")
        return [*command, "--insecure"]
    command += ["--ssl-ca-certfile", str(credentials.ca_certificate)]
    command += ["--ssl-certfile", str(credentials.certificate), "--ssl-keyfile", str(credentials.private_key)]
    return [*command, "--enable-supernode-auth"] if node_auth else command


@dataclass(frozen=True)
class NodeSettings:
    """What a deployed fedslim node is: its name, its data, its resident base.

    Parameters
    ----------
    name : str
        The node's stable client key (the server orders and samples by it).
    data_path : Path, optional
        The node's training data, as its task's ``node_data`` reads it (by
        default an ``.npz`` with ``x``, float32 features, and ``y``, int64
        labels; the text task reads JSON Lines).
    base_path : Path, optional
        The resident base checkpoint; if absent, the node asks the server for
        it once (base provisioning) and keeps it there.
    tasks : tuple of str
        The ``module:object`` tasks the node agrees to import when the
        server's run names one (the built-in tasks need no listing).
    extra : tuple of (str, str)
        Further node config entries (``partition-id`` for a node that reads a
        simulated partition).
    """

    name: str
    data_path: Path | None = None
    base_path: Path | None = None
    tasks: tuple[str, ...] = ()
    extra: tuple[tuple[str, str], ...] = ()

    def node_config(self) -> str:
        entries = [(NODE_NAME_KEY, self.name)]
        entries += [(DATA_PATH_KEY, str(self.data_path))] if self.data_path else []
        entries += [(BASE_PATH_KEY, str(self.base_path))] if self.base_path else []
        entries += [(TASKS_KEY, ",".join(self.tasks))] if self.tasks else []
        entries += list(self.extra)
        return " ".join(f"{key}={_node_config_value(value)}" for key, value in entries)


def supernode_command(
    superlink: str,
    node: NodeSettings,
    runtime_port: int,
    ca_certificate: Path | None,
    auth_key: Path | None,
) -> list[str]:
    """``flower-supernode`` for ``node``; ``ca_certificate=None`` dials without TLS."""
    command = [flower_binary("flower-supernode"), "--superlink", _address(superlink), "--port", str(runtime_port)]
    command += ["--node-config", node.node_config()]
    if ca_certificate is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(ca_certificate)]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(auth_key)]
    return command


def register_command(public_key: Path, connection: str, name: str | None = None) -> list[str]:
    command = [flower_binary("flwr"), "supernode", "register", str(public_key), connection, "--format", "json"]
    return [*command, "--name", name] if name else command


def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))


def write_connection(
    name: str, control_address: str, ca_certificate: Path | None, make_default: bool = False, home: Path | None = None
) -> Path:
    """Add (or replace) the ``[superlink.NAME]`` connection in ``config.toml``; returns the file."""
    import tomli
    import tomli_w

    path = (home or flwr_home()) / "config.toml"
    config = tomli.loads(path.read_text()) if path.exists() else {}
    superlinks = config.setdefault("superlink", {})
    entry: dict[str, object] = {"address": _address(control_address)}
    if ca_certificate is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(ca_certificate).resolve())
    superlinks[name] = entry
    if make_default or "default" not in superlinks:
        superlinks["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path
