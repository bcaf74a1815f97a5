"""The terminal: piped tables are never cut, `simulate --help` is grouped with defaults, wall time is the run's."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fedslim.cli import main
from fedslim.commlog import LOG_FILENAME, CommLog, RoundRow
from fedslim.config import FLAT_KEYS, HelpGroup
from fedslim.logs.reader import RunLog
from fedslim.logs.views import kib

# The widest tables: client-side evaluation (two more columns), a strategy that keeps memory on the server.
WIDE_RUN = ["--task", "synthetic", "--clients", "4", "--rounds", "2", "--fraction", "0.5", "--strategy", "fedvarp",
            "--client-holdout", "0.2", "--backend", "inline"]  # fmt: skip


def cells(output: str, first: str) -> list[str]:
    """The cells of the table row of ``output`` whose first cell is ``first``."""
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in output.splitlines() if "│" in line]
    (row,) = [row for row in rows if row and row[0] == first]
    return row


def test_piped_simulate_and_logs_print_every_table_whole(tmp_path: Path, private_cache: Path) -> None:
    run_dir = tmp_path / "run"
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    simulated = subprocess.run(
        [sys.executable, "-m", "fedslim.cli", "simulate", *WIDE_RUN, "--out", str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert simulated.returncode == 0, simulated.stderr[-3000:]
    printed = simulated.stdout
    assert "…" not in printed
    assert max(len(line) for line in printed.splitlines()) > 80  # not squeezed into 80 columns
    with RunLog(str(run_dir)) as log:
        rounds, summary = log.rounds(), log.summary()
    for r in rounds:
        moved = r.bytes_up + r.bytes_down
        expected = [f"{r.accuracy:.4f}", f"{r.loss:.4f}", f"{r.client_accuracy:.4f}", f"{r.client_accuracy_p10:.4f}"]
        expected += [f"{r.accepted}/{r.sampled}", kib(r.bytes_up), kib(r.bytes_down), kib(r.full_model_bytes)]
        expected += [f"{r.full_model_bytes / moved:,.1f}x", kib(r.strategy_memory_bytes or 0)]
        assert cells(printed, str(r.round))[1:] == expected
    assert f"final state digest: {summary.final_state_digest}\n" in printed
    assert f"(fedslim logs summary {run_dir})\n" in printed  # the last line, not wrapped
    header = next(line for line in printed.splitlines() if line.startswith("fedslim: task synthetic"))
    assert header.endswith(f"run dir {run_dir}")


def test_logs_views_print_whole_on_a_pipe(
    tmp_path: Path, private_cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    run_dir = tmp_path / "run"
    assert main(["simulate", *WIDE_RUN, "--out", str(run_dir)]) == 0
    capsys.readouterr()
    with RunLog(str(run_dir)) as log:
        summary, clients = log.summary(), log.clients()
    assert main(["logs", "summary", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "…" not in printed
    assert cells(printed, "KiB up / down")[1] == f"{kib(summary.bytes_up)} / {kib(summary.bytes_down)}"
    on_clients = f"{summary.final_client_accuracy:.4f} / {summary.final_client_accuracy_p10:.4f}"
    assert cells(printed, "client-side accuracy, final: mean / worst decile")[1] == on_clients
    assert cells(printed, "server memory (strategy)")[1].startswith(kib(summary.strategy_memory_bytes or 0))
    assert cells(printed, "wall time")[1] == f"{summary.wall_time_s:,.1f} s"
    for command in ("rounds", "clients"):
        assert main(["logs", command, str(run_dir)]) == 0
        printed = capsys.readouterr().out
        assert "…" not in printed
    assert cells(printed, "partition-0")[7:9] == [kib(clients[0].bytes_up), kib(clients[0].bytes_down)]
    assert main(["logs", "compare", str(run_dir), str(run_dir), "--target", "0"]) == 0
    printed = capsys.readouterr().out
    assert "…" not in printed and kib(summary.total_bytes) in printed


def test_wall_time_is_the_runs_less_the_time_it_was_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the run's start to its end, not the sum of its rounds; the time between a kill and its resume is out."""
    clock = [1000.0]
    monkeypatch.setattr("fedslim.commlog.time.time", lambda: clock[0])
    log = CommLog(tmp_path / LOG_FILENAME)
    log.start_run("r1", {"rounds": 3}, "base", 10, 2, 8, 40)
    for server_round, at in ((0, 1002.0), (1, 1010.0), (2, 1020.0)):
        clock[0] = at
        log.record_round("r1", RoundRow(server_round, 1, 1, 1, 0.5, 1.0, 1.5, None))
    clock[0] = 1025.0  # round 3 runs, is killed at 1025: its rows go when the run resumes at 5000
    log.record_round("r1", RoundRow(3, 1, 1, 1, 0.5, 1.0, 1.5, None))
    clock[0] = 5000.0
    log.continue_run("r1", 2)
    clock[0] = 5012.0
    log.record_round("r1", RoundRow(3, 1, 1, 1, 0.5, 1.0, 1.5, None))
    with RunLog(str(tmp_path)) as reader:
        assert reader.summary().wall_time_s == pytest.approx(12.0 + 25.0)  # interrupted: up to its last row
    clock[0] = 5013.0
    log.finish_run("r1", "digest")
    log.close()
    with RunLog(str(tmp_path)) as reader:
        summary = reader.summary()
        assert summary.wall_time_s == pytest.approx(13.0 + 25.0)
        assert sum(r.wall_time_s for r in reader.rounds()) == pytest.approx(6.0)
    with sqlite3.connect(tmp_path / LOG_FILENAME) as db:
        assert db.execute("SELECT * FROM resumes").fetchall() == [("r1", 2, 1025.0, 5000.0)]


def help_sections(text: str) -> dict[str, dict[str, str]]:
    """``--help``'s sections by title, each its flags with their help (the flag's lines joined)."""
    sections: dict[str, dict[str, str]] = {}
    for block in text.split("\n\n"):
        title, *lines = block.splitlines()
        if title.endswith(":") and not title.startswith(" "):
            flags = sections[title[:-1]] = {}
            for line in lines:
                if line.lstrip().startswith("-"):
                    flag = line.split()[0].rstrip(",")
                    flags[flag] = line
                else:
                    flags[flag] += " " + line.strip()
    return sections


def test_simulate_help_lists_every_flag_in_its_group_with_its_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # a flag's help on one line
    with pytest.raises(SystemExit) as exited:
        main(["simulate", "--help"])
    assert exited.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: fedslim simulate [options]\n")
    sections = help_sections(printed)
    assert list(sections) == ["options", *(group.value for group in HelpGroup)]
    flags = {flag: (title, text) for title, found in sections.items() for flag, text in found.items()}
    declared = [entry for entry in FLAT_KEYS.values() if entry.flag is not None]
    assert {entry.flag: flags[entry.flag][0] for entry in declared} == {
        entry.flag: entry.setting.group for entry in declared
    }
    own = {"--backend", "--verbose", "--resume", "--task-setting"}
    assert set(flags) == {"-h", *(entry.flag for entry in declared), *own}
    assert all(flags[flag][0] == HelpGroup.RUN for flag in ("--backend", "--verbose", "--resume"))
    assert flags["--task-setting"][0] == HelpGroup.TASK
    shown = {
        "--clients": "(default: 30)",
        "--rounds": "(default: 10)",
        "--fast": "(default: lora)",
        "--lr": "(default: 0.05)",
        "--server-lr": "(default: 1)",
        "--codec": "(default: topk:0.1+q8+lzma)",
        "--strategy": "(default: fedavg)",
        "--out": "(default: runs/latest)",
        "--fraction": "(default: 0.2 with --participation all, else 1.0)",  # said by its own help
        "--backend": "(default: flower)",
    }
    assert {flag: flags[flag][1].endswith(default) for flag, default in shown.items()} == dict.fromkeys(shown, True)
    # Every flag taking a value says its default, unless it has none (empty: off) or is repeatable.
    valued = [e for e in declared if not isinstance(e.default, bool) and e.default != "" and not e.setting.repeatable]
    assert [e.flag for e in valued if "(default: " not in flags[e.flag][1]] == []
