"""End to end through Flower's simulation engine, and the CLI's error paths."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from fedslim.cli import main
from fedslim.commlog import LOG_FILENAME, RoundTotals
from fedslim.config import RunConfig
from fedslim.report import saving_summary
from fedslim.simulation.simulate import simulate


def test_short_simulation_logs_one_row_per_message(small_config: RunConfig) -> None:
    config = replace(small_config, rounds=3, fraction=0.75, codec="topk:0.3+q8", downstream_codec="topk:0.5+q8+zstd")
    rounds_seen: list[int] = []
    result = simulate(config, on_round=lambda totals: rounds_seen.append(totals.round))

    assert rounds_seen == [0, 1, 2, 3]
    db = sqlite3.connect(Path(config.out) / LOG_FILENAME)
    per_round = db.execute(
        "SELECT round, direction, COUNT(*), COUNT(DISTINCT node_id), SUM(status = 'ok') FROM messages "
        "WHERE message_type = 'train' GROUP BY round, direction ORDER BY round, direction"
    ).fetchall()
    sampled = 3  # fraction 0.75 of 4 clients
    assert per_round == [(r, d, sampled, sampled, sampled) for r in (1, 2, 3) for d in ("down", "up")]
    # Round 0 is the identity exchange with every node.
    identity = db.execute("SELECT direction, COUNT(*) FROM messages WHERE round = 0 GROUP BY 1 ORDER BY 1").fetchall()
    assert identity == [("down", config.num_clients), ("up", config.num_clients)]
    fast_payload, full_payload = db.execute("SELECT fast_payload_bytes, full_model_payload_bytes FROM runs").fetchone()
    rows = db.execute(
        "SELECT round, direction, payload_bytes, message_bytes, full_model_bytes FROM messages "
        "WHERE message_type = 'train'"
    ).fetchall()
    for server_round, direction, payload, size, full in rows:
        if server_round == 1 and direction == "down":
            assert payload == 0  # version 0 is built by every client from its base: nothing to send
        else:
            assert 0 < payload < 0.6 * fast_payload, (server_round, direction)
        assert payload < size < payload + 4096
        assert full == size - payload + (full_payload if payload else 0)
    # Rounds 2 and 3 each train 3 of 4 clients, so at least two train in both: their replica (and
    # error-feedback residual) at version 1 must have survived in the node's Flower context, or they
    # would have refused the step from version 1 to 2.
    assert [r.round for r in result.rounds] == [0, 1, 2, 3]
    assert all(r.accepted == sampled for r in result.rounds[1:])
    assert all(0.0 <= r.accuracy <= 1.0 for r in result.rounds)

    # The inline backend runs the same loop and client code: the same run. Ray's actors train with one thread (one
    # CPU each), the inline backend with the process's; on some CPUs (an AMD EPYC with AVX-512) products then round
    # otherwise in the last bits, so the loss is compared to float rounding.
    inline = simulate(replace(config, out=config.out + "-inline"), backend="inline")
    assert [(r.accuracy, r.accepted) for r in inline.rounds] == [(r.accuracy, r.accepted) for r in result.rounds]
    assert [r.loss for r in inline.rounds] == pytest.approx([r.loss for r in result.rounds], rel=1e-5)
    inline_payloads = sqlite3.connect(inline.log_path).execute(
        "SELECT round, direction, SUM(payload_bytes) FROM messages GROUP BY 1, 2 ORDER BY 1, 2"
    )
    payloads = db.execute("SELECT round, direction, SUM(payload_bytes) FROM messages GROUP BY 1, 2 ORDER BY 1, 2")
    assert inline_payloads.fetchall() == payloads.fetchall()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--fraction", "1.5"], "fraction must be in (0, 1]"),
        (["--codec", "topk:0.1+gzip"], "codec: bad codec spec 'topk:0.1+gzip': unknown codec stage 'gzip'"),
        (["--downstream-codec", "q12"], "downstream_codec: bad codec spec 'q12'"),
        (["--ef-decay", "1.5"], "error_feedback_decay must be in [0, 1]"),
    ],
)
def test_cli_rejects_bad_flags(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_reports_missing_fashion_mnist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--task", "fmnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().out


def test_cli_simulate_prints_the_round_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-run"
    code = main(
        ["simulate", "--clients", "3", "--rounds", "1", "--fraction", "0.5", "--fast", "head", "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "full FedAvg" in printed and "total" in printed
    assert str(out / LOG_FILENAME) in printed.replace("\n", "")
    assert "fewer bytes" in printed and "at round 0 ->" in printed.replace("\n", " ")
    rows = sqlite3.connect(out / LOG_FILENAME).execute(
        "SELECT message_type, direction, COUNT(*) FROM messages GROUP BY 1, 2"
    )
    assert sorted(rows) == [("query", "down", 3), ("query", "up", 3), ("train", "down", 2), ("train", "up", 2)]


def test_cli_strategy_and_participation_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps table cells to the console width
    out = tmp_path / "cli-mifa"
    flags = ["--clients", "4", "--rounds", "3", "--fast", "head", "--out", str(out), "--backend", "inline"]
    flags += ["--strategy", "mifa", "--strategy-arg", "memory=fp16", "--participation", "cyclic"]
    flags += ["--participation-mean", "0.5", "--eval-every", "2", "--local-steps", "2"]
    assert main(["simulate", *flags]) == 0
    printed = capsys.readouterr().out
    assert "strategy mifa, participation cyclic" in printed.replace("\n", "")
    db = sqlite3.connect(out / LOG_FILENAME)
    (held,) = db.execute("SELECT MAX(strategy_memory_bytes) FROM rounds").fetchone()
    assert held > 0 and f"({held / 4:,.0f} B/client)" in printed  # MIFA's memory of 4 clients, per client
    config = json.loads(db.execute("SELECT config FROM runs").fetchone()[0])
    assert (config["strategy"], config["strategy_args"], config["fraction"], config["local_steps"]) == (
        "mifa",
        "memory=fp16",
        1.0,
        2,
    )
    rounds = db.execute("SELECT round, accuracy IS NOT NULL, available FROM rounds ORDER BY round").fetchall()
    assert [(r, evaluated) for r, evaluated, _ in rounds] == [(0, 1), (1, 0), (2, 1), (3, 1)]
    trace = (out / "participation.trace").read_text().splitlines()[1:]
    assert [available for _, _, available in rounds[1:]] == [len(line.split()) for line in trace]


def test_saving_summary_names_the_accuracy_gain_and_the_byte_saving() -> None:
    def totals(round_: int, accuracy: float | None, moved: int, full: int) -> RoundTotals:
        return RoundTotals(round_, accuracy, None, 2, 2, moved // 2, moved - moved // 2, full)

    rounds = [totals(0, 0.5, 2048, 4096), totals(1, None, 2**20, 100 * 2**20), totals(2, 0.625, 2**20, 100 * 2**20)]
    assert saving_summary(rounds) == (
        "accuracy 0.5000 at round 0 -> 0.6250 at round 2 (+12.5 points); moved 2.00 MiB where full-model "
        "FedAvg would have moved 200.00 MiB: 99.9x fewer bytes"
    )
    assert saving_summary([totals(0, 0.5, 0, 0)]) == ""  # nothing moved, one evaluation: nothing to say
