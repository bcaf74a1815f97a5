"""Client-side evaluation: each client's held-out examples, the global model evaluated on them, claims checked."""

from __future__ import annotations

import io
import math
import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from rich.console import Console

from fedslim.channel.protocol import EVALUATION_RECORD, evaluation_content
from fedslim.client.app import app as client_app
from fedslim.commlog import LOG_FILENAME, SCHEMA_VERSION, CommLog, RoundRow, percentile
from fedslim.config import ConfigError, FastSpec, RunConfig
from fedslim.data.datasets import ArrayDataset
from fedslim.logs.reader import RunLog
from fedslim.report import round_table
from fedslim.server.evaluation import check_evaluations, evaluators, most_held_out
from fedslim.server.loop import run_federation
from fedslim.simulation.inline import FIRST_NODE_ID, InlineGrid
from fedslim.task import load_task


def evaluating_config(tmp_path: Path, name: str, **changes: object) -> RunConfig:
    config = RunConfig(
        task="synthetic",
        num_clients=6,
        rounds=3,
        fraction=0.5,
        fast=FastSpec("lora", rank=2),
        codec="topk:0.2+q8",
        downstream_codec="topk:0.1+q8",  # lossy: the replica trails the exact state, so its steps matter
        client_holdout=0.2,
        eval_every=2,
        out=str(tmp_path / name),
    )
    return replace(config, **changes)  # type: ignore[arg-type]


def test_a_client_holds_out_a_seeded_share_of_its_examples() -> None:
    task = load_task("synthetic")
    data = ArrayDataset(np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(10))
    train, held_out = task.hold_out(data, 0.3, [0, 1])
    assert held_out is not None and (len(train), len(held_out)) == (7, 3)
    assert sorted([*train.y, *held_out.y]) == list(range(10))  # disjoint, nothing lost
    assert list(train.y) == sorted(train.y) and np.array_equal(train.x[:, 0], 2 * train.y)  # in the data's order
    again, again_held = task.hold_out(data, 0.3, [0, 1])
    assert np.array_equal(again.y, train.y) and np.array_equal(again_held.y, held_out.y)  # type: ignore[union-attr]
    others = {tuple(task.hold_out(data, 0.3, [0, seed])[1].y) for seed in range(8)}  # type: ignore[union-attr]
    assert len(others) > 1
    assert task.hold_out(data, 0.04, [0, 1]) == (data, None)  # rounds to no example: all of them train


def test_the_held_out_share_is_a_checked_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="client_holdout must be in \\[0, 0.9\\], got 0.95"):
        evaluating_config(tmp_path, "x", client_holdout=0.95)
    with pytest.raises(ConfigError, match="fraction_evaluate must be in \\[0, 1\\], got 1.5"):
        evaluating_config(tmp_path, "x", fraction_evaluate=1.5)


@pytest.mark.parametrize("holdout", [0.1, 0.2, 0.25, 0.5, 0.9])
def test_the_held_out_bound_holds_for_every_client_size(holdout: float) -> None:
    for size in range(1, 400):
        held = round(holdout * size)
        if 0 < held < size:
            assert held <= most_held_out(size - held, holdout), (size, held)
    assert most_held_out(80, 0.2) == 20  # 100 examples hold out 20; 103 would hold out 21 and train on 82


def test_the_worst_decile_is_numpy_s_10th_percentile() -> None:
    rng = np.random.default_rng(3)
    for size in (1, 2, 9, 10, 31):
        values = list(rng.random(size))
        assert percentile(values, 10) == pytest.approx(float(np.percentile(values, 10)), abs=1e-12)


def test_evaluators_are_a_seeded_share_of_the_available_clients() -> None:
    clients = [f"partition-{i}" for i in range(10)]
    chosen = evaluators(clients, 0.3, seed=0, server_round=4)
    assert len(chosen) == 3 and chosen == [c for c in clients if c in chosen]
    assert chosen == evaluators(clients, 0.3, seed=0, server_round=4)
    assert evaluators(clients, 0.01, 0, 4) and len(evaluators(clients, 1.0, 0, 4)) == 10
    assert len(evaluators([f"c{i}" for i in range(100)], 0.07, 0, 4)) == 7  # 0.07 * 100 is 7.000000000000001
    assert evaluators(clients, 0.0, 0, 4) == [] and evaluators([], 1.0, 0, 4) == []


def test_client_evaluation_is_logged_and_leaves_training_unchanged(tmp_path: Path) -> None:
    config = evaluating_config(tmp_path, "evaluated")
    evaluated = run_federation(InlineGrid(client_app, config.num_clients), config)  # type: ignore[arg-type]
    held_out_only = replace(config, fraction_evaluate=0.0, out=str(tmp_path / "silent"))
    silent = run_federation(InlineGrid(client_app, config.num_clients), held_out_only)  # type: ignore[arg-type]

    # The replica steps the evaluation sends early are the ones the next round would have sent: same training.
    assert evaluated.final_state_digest == silent.final_state_digest
    assert [r.accuracy for r in evaluated.rounds] == [r.accuracy for r in silent.rounds]
    assert [r.clients_evaluated for r in evaluated.rounds] == [6, 0, 6, 6]  # rounds 0, 2 (every 2) and the last
    assert all(r.clients_evaluated == 0 and r.client_accuracy is None for r in silent.rounds)
    assert sum(r.bytes_down for r in evaluated.rounds) > sum(r.bytes_down for r in silent.rounds)

    db = sqlite3.connect(Path(config.out) / LOG_FILENAME)
    for totals in evaluated.rounds:
        if totals.clients_evaluated:
            rows = db.execute("SELECT correct, examples FROM client_evaluations WHERE round = ?", (totals.round,))
            accuracies = [correct / examples for correct, examples in rows]
            assert totals.client_accuracy == pytest.approx(np.mean(accuracies))
            assert totals.client_accuracy_p10 == pytest.approx(np.percentile(accuracies, 10))
    # The evaluated model is the trained one: the largest client's held-out accuracy rises from the start.
    largest = db.execute(
        "SELECT round, correct * 1.0 / examples FROM client_evaluations"
        " WHERE client = (SELECT client FROM client_evaluations ORDER BY examples DESC LIMIT 1) ORDER BY round"
    ).fetchall()
    assert largest[-1][1] > largest[0][1] + 0.2
    messages = db.execute(
        "SELECT direction, status, COUNT(*), MIN(message_bytes) FROM messages"
        " WHERE message_type = 'evaluate' GROUP BY direction, status"
    ).fetchall()
    assert [(d, s, n) for d, s, n, _ in messages] == [("down", "ok", 18), ("up", "ok", 18)]
    assert all(smallest > 0 for *_, smallest in messages)  # every one counted on the wire

    buffer = io.StringIO()
    Console(file=buffer, width=160).print(round_table(evaluated.rounds))
    assert "clients mean" in buffer.getvalue() and "clients p10" in buffer.getvalue()
    summary = RunLog(config.out).summary()
    assert summary.final_client_accuracy == evaluated.rounds[-1].client_accuracy


def test_a_dishonest_or_failing_evaluation_is_rejected_and_the_round_goes_on(tmp_path: Path) -> None:
    liar, failing = FIRST_NODE_ID + 1, FIRST_NODE_ID + 2

    def app(message: Message, context: Context) -> Message:
        if message.metadata.message_type == "evaluate" and context.node_id == failing:
            return Message(Error(code=7, reason="device ran out of memory"), reply_to=message)
        reply = client_app(message, context)
        if message.metadata.message_type == "evaluate" and context.node_id == liar:
            record = reply.content.config_records[EVALUATION_RECORD]
            record["correct"] = int(record["examples"]) + 1  # type: ignore[call-overload]
        return reply

    config = evaluating_config(tmp_path, "run", num_clients=4, rounds=1, eval_every=1)
    result = run_federation(InlineGrid(app, 4), config)  # type: ignore[arg-type]
    assert [r.clients_evaluated for r in result.rounds] == [2, 2]
    assert result.rounds[1].accepted == result.rounds[1].sampled == 2  # training goes on
    db = sqlite3.connect(Path(config.out) / LOG_FILENAME)
    refused = {
        int(node): (status, reason)
        for node, status, reason in db.execute(
            "SELECT node_id, status, reason FROM messages WHERE message_type = 'evaluate' AND direction = 'up'"
            " AND status != 'ok'"
        )
    }
    assert refused.keys() == {liar, failing}
    assert refused[liar][0] == "rejected" and refused[liar][1].startswith("impossible evaluation: ")
    assert refused[failing] == ("error", "no evaluation: client error 7: device ran out of memory")
    liar_key = db.execute("SELECT DISTINCT client FROM messages WHERE node_id = ?", (str(liar),)).fetchone()[0]
    assert not db.execute("SELECT 1 FROM client_evaluations WHERE client = ?", (liar_key,)).fetchall()


def _reply(node: int, claims: dict[str, int | float]) -> Message:
    request = Message(RecordDict(), dst_node_id=node, message_type="evaluate")
    return Message(evaluation_content(claims), reply_to=request)


def test_each_impossible_evaluation_claim_is_named() -> None:
    good = {"examples": 20, "correct": 15, "loss": 0.7}
    cases = {
        1: (good, None),
        2: ({**good, "correct": 21}, "impossible evaluation: 21 correct of 20 examples"),
        3: ({**good, "correct": -1}, "impossible evaluation: -1 correct of 20 examples"),
        4: ({**good, "examples": 0, "correct": 0}, "impossible evaluation: 0 correct of 0 examples"),
        5: ({**good, "loss": -math.inf}, "impossible evaluation: loss -inf"),
        6: ({**good, "loss": -0.1}, "impossible evaluation: loss -0.1"),
        7: ({**good, "examples": 2.0}, "malformed evaluation: examples and correct must be integers, loss a number"),
        8: ({**good, "examples": 60, "correct": 5}, "evaluation on 60 held-out examples: with client-holdout 0.2"),
    }
    replies = [_reply(node, claims) for node, (claims, _) in cases.items()]
    replies += [_reply(1, good), _reply(99, good)]  # a second reply, and one from a node never asked
    diverged = check_evaluations([_reply(1, {**good, "loss": math.nan})], {1: "partition-1"}, {}, holdout=0.2)
    assert diverged[0][1] is not None and diverged[0][1].loss is None  # its accuracy counts, the loss is unknown
    asked = {node: f"partition-{node}" for node in cases}
    checked = check_evaluations(replies, asked, {f"partition-{node}": 80 for node in cases}, holdout=0.2)
    for (node, (_, expected)), (client, evaluation, reason) in zip(cases.items(), checked):
        assert client == f"partition-{node}"
        if expected is None:
            assert reason is None and evaluation is not None and evaluation.accuracy == 0.75
        else:
            assert evaluation is None and reason is not None and reason.startswith(expected), (node, reason)
    assert checked[-2] == (None, None, "unexpected reply: a second reply in this round's evaluation")
    assert checked[-1] == (None, None, "unexpected reply: not asked for in this round's evaluation")


def test_a_log_of_schema_4_reads_as_one_without_client_evaluation(tmp_path: Path) -> None:
    path = tmp_path / LOG_FILENAME
    log = CommLog(path)
    log.start_run("r", {"rounds": 1}, "f" * 64, 10, 2, 8, 40)
    log.record_round("r", RoundRow(0, 0, 0, 4, 0.5, 1.0, 0.1, None))
    log.close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE client_evaluations")
    db.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    db.commit()
    db.close()

    run = RunLog(str(path))
    assert run.rounds()[0].clients_evaluated == 0 and run.rounds()[0].client_accuracy is None
    assert run.table("client_evaluations") == ([], [])
    CommLog(path).close()  # a writer (a resumed run) brings it to the current schema
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert db.execute("SELECT COUNT(*) FROM client_evaluations").fetchone()[0] == 0
