"""`fedslim deploy` from zero: TLS SuperLink with node authentication, four registered SuperNodes, one intruder.

node-2 starts without the base and is given it over the run's connection;
node-3 holds another base and is refused. Three nodes train.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fakes import other_base
from flower_processes import flwr_run, tls_federation

from fedslim.base import checkpoint_fingerprint
from fedslim.channel.protocol import FINAL_SYNC_TYPE, PROVISION_TYPE
from fedslim.commlog import LOG_FILENAME
from fedslim.config import RunConfig
from fedslim.data.datasets import load_federation, save_array_file
from fedslim.task import prepared_base

NODES = 4
CONNECTION = "fedslim-tls"


def test_tls_federation_with_node_authentication(tmp_path: Path, private_cache: Path) -> None:
    config = RunConfig(task="synthetic", num_clients=NODES)
    base = prepared_base(config)
    base_path = base.path
    # node-0 and node-1 hold the base, node-2 holds nothing yet, node-3 holds another base.
    bases = {
        "node-0": base_path,
        "node-1": base_path,
        "node-2": tmp_path / "node-2" / "base.pt",
        "node-3": other_base(config, tmp_path / "node-3" / "base.pt"),
    }
    for node, data in enumerate(load_federation(config).clients):
        save_array_file(tmp_path / "data" / f"node-{node}.npz", data)

    with tls_federation(tmp_path, list(bases), ["rogue"], CONNECTION) as federation:
        for name in bases:
            federation.supernode(name, tmp_path / "data" / f"{name}.npz", bases[name])
        rogue = federation.supernode("rogue", tmp_path / "data" / "node-0.npz", base_path)
        out = tmp_path / "run"
        run_config = f'task="synthetic" rounds=3 num-clients={NODES} fraction=1.0 codec="topk:0.2+q8+lzma" '
        run_config += f'final-sync=true out="{out}"'
        completed = flwr_run(CONNECTION, run_config, federation.env)
        assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
        assert rogue.wait(timeout=30) != 0  # the intruder gave up: its key is not registered
    assert "Failed to activate SuperNode" in (tmp_path / "rogue.log").read_text()
    assert "No SuperNode found with the given public key" in (tmp_path / "superlink.log").read_text()

    db = sqlite3.connect(out / LOG_FILENAME)
    assert db.execute("SELECT COUNT(*), MAX(finished_at IS NOT NULL) FROM runs").fetchone() == (1, 1)
    clients = {c for (c,) in db.execute("SELECT DISTINCT client FROM messages")}
    assert clients == set(bases)  # the deployed nodes' names are their client keys
    # node-3 was refused at the start, with the reason, and never contacted again.
    refused = db.execute(
        "SELECT round, reason FROM messages WHERE client = 'node-3' AND status = 'rejected'"
    ).fetchall()
    assert len(refused) == 1 and refused[0][0] == 0 and refused[0][1].startswith("base fingerprint mismatch")
    assert db.execute("SELECT COUNT(*) FROM messages WHERE client = 'node-3' AND round > 0").fetchone() == (0,)
    # node-2 was given the base in round 0, verified it, and keeps it.
    provisioned = db.execute(
        "SELECT DISTINCT client, round FROM messages WHERE message_type = ? AND status = 'ok'", (PROVISION_TYPE,)
    ).fetchall()
    assert provisioned == [("node-2", 0)]
    (sent,) = db.execute(
        "SELECT SUM(payload_bytes) FROM messages WHERE message_type = ? AND direction = 'down'", (PROVISION_TYPE,)
    ).fetchone()
    assert sent == base_path.stat().st_size
    assert checkpoint_fingerprint(bases["node-2"], base.task) == base.fingerprint
    trained = db.execute(
        "SELECT round, COUNT(*) FROM messages WHERE message_type = 'train' AND direction = 'up' AND status = 'ok' "
        "GROUP BY round"
    ).fetchall()
    assert trained == [(1, 3), (2, 3), (3, 3)]
    (compressed,) = db.execute(
        "SELECT MAX(payload_bytes * 1.0 / raw_bytes) FROM messages WHERE message_type = 'train' AND direction = 'up'"
    ).fetchone()
    assert compressed < 0.5
    # Each node reported its footprint: CPU seconds of the round and the peak memory of its ClientApp process.
    footprints = db.execute(
        "SELECT client_cpu_s, client_peak_rss_bytes FROM messages WHERE message_type = 'train' AND direction = 'up'"
    ).fetchall()
    assert len(footprints) == 9 and all(cpu > 0 and rss > 50 * 2**20 for cpu, rss in footprints)
    # Final fast state equal on server and clients: every node confirmed the server's digest of it.
    confirmations = db.execute(
        "SELECT client, status FROM messages WHERE message_type = ? AND direction = 'up'", (FINAL_SYNC_TYPE,)
    ).fetchall()
    assert sorted(confirmations) == [("node-0", "ok"), ("node-1", "ok"), ("node-2", "ok")]
    # After round 0 only the fast layer moves: no message of the rounds comes near the size of the base.
    (largest,) = db.execute("SELECT MAX(message_bytes) FROM messages WHERE round > 0").fetchone()
    assert largest < base_path.stat().st_size / 4
