"""`fedslim logs`: summary, rounds, clients, compare, export, plot, tensorboard; a killed run's log stays readable."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from fedslim.cli import main
from fedslim.client.app import app as client_app
from fedslim.commlog import LOG_FILENAME, SCHEMA_VERSION
from fedslim.config import RunConfig
from fedslim.logs.labels import MAX_LABEL, log_labels, short_labels
from fedslim.logs.plot import runs_figure
from fedslim.logs.reader import RunLog, bytes_to_reach
from fedslim.logs.views import COMPARE_COLUMNS, accuracy, compare_rows, compare_table, kib
from fedslim.server.loop import run_federation
from fedslim.simulation.inline import InlineGrid


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, private_cache: Path) -> tuple[Path, Path]:
    """Two short inline runs: FedAvg with a compressed uplink, FedVARP under Bernoulli participation."""
    root = tmp_path_factory.mktemp("logs")
    base = RunConfig(
        task="synthetic", num_clients=5, rounds=4, fraction=0.6, eval_every=2, codec="none", downstream_codec="none"
    )
    first = replace(base, codec="topk:0.2+q8+zlib", out=str(root / "fedavg-topk"))
    second = replace(
        base,
        strategy="fedvarp",
        participation="bernoulli",
        participation_mean=0.6,
        fraction=1.0,
        out=str(root / "varp"),
    )
    for config in (first, second):
        run_federation(InlineGrid(client_app, config.num_clients), config)  # type: ignore[arg-type]
    return Path(first.out), Path(second.out)


def test_summary_counts_what_the_log_holds(two_runs: tuple[Path, Path]) -> None:
    run = two_runs[0]
    db = sqlite3.connect(run / LOG_FILENAME)
    with RunLog(str(run)) as log:
        summary = log.summary()
        rounds = log.rounds()
    up, down = (
        db.execute(f"SELECT SUM(message_bytes) FROM messages WHERE direction = '{d}'").fetchone()[0]
        for d in ("up", "down")
    )
    assert (summary.bytes_up, summary.bytes_down) == (up, down)
    assert summary.messages == db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    assert summary.rounds_done == summary.rounds_planned == 4 and summary.finished
    accuracies = [
        a for r, a in db.execute("SELECT round, accuracy FROM rounds WHERE accuracy IS NOT NULL AND round > 0")
    ]
    assert summary.best_accuracy == max(accuracies)
    # The uplink is compressed: the same messages with a dense fast layer would have been larger.
    assert summary.vs_dense_fast > 1.0 and summary.vs_full_model > summary.vs_dense_fast
    # Bytes to reach the best accuracy: everything moved up to the round that first reached it.
    reached = bytes_to_reach(rounds, summary.best_accuracy or 0.0)
    assert reached is not None and reached[0] == summary.best_round
    assert reached[1] == sum(r.bytes_up + r.bytes_down for r in rounds if r.round <= reached[0])
    assert bytes_to_reach(rounds, 1.01) is None


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_export_round_trips_to_the_summary_totals(two_runs: tuple[Path, Path], tmp_path: Path, fmt: str) -> None:
    run = two_runs[1]
    out = tmp_path / ("export.json" if fmt == "json" else "export-csv")
    assert main(["logs", "export", str(run), "--format", fmt, "-o", str(out)]) == 0
    if fmt == "json":
        document = json.loads(out.read_text())
        assert document["schema_version"] == SCHEMA_VERSION and document["run"]["config"]["strategy"] == "fedvarp"
        messages, rounds = document["messages"], document["rounds"]
    else:
        with (out / "messages.csv").open() as handle:
            messages = list(csv.DictReader(handle))
        with (out / "rounds.csv").open() as handle:
            rounds = list(csv.DictReader(handle))
        tables = {f"{name}.csv" for name in ("runs", "rounds", "messages", "memory_weights", "client_evaluations")}
        tables |= {"consolidations.csv", "bases.csv", "round_metrics.csv", "resumes.csv"}
        assert {p.name for p in out.iterdir()} == tables
    with RunLog(str(run)) as log:
        summary = log.summary()
    up = sum(int(m["message_bytes"]) for m in messages if m["direction"] == "up")
    down = sum(int(m["message_bytes"]) for m in messages if m["direction"] == "down")
    dense = sum(int(m["message_bytes"]) - int(m["payload_bytes"]) + int(m["raw_bytes"]) for m in messages)
    best = max(float(r["accuracy"]) for r in rounds if r["accuracy"] not in (None, "") and int(r["round"]) > 0)
    assert (up, down, dense, len(messages), best) == (
        summary.bytes_up,
        summary.bytes_down,
        summary.dense_fast_bytes,
        summary.messages,
        summary.best_accuracy,
    )


def test_tables_print_from_the_command_line(
    two_runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    topk, varp = (str(p) for p in two_runs)
    assert main(["logs", "summary", topk, "--target", "0"]) == 0
    printed = capsys.readouterr().out
    assert (
        "topk:0.2+q8+zlib / none" in printed and "4 of 4, finished" in printed and "KiB (round 2)" in printed
    )  # the first evaluation after the start
    assert main(["logs", "rounds", varp]) == 0
    assert "server KiB" in capsys.readouterr().out  # FedVARP keeps one update per client on the server
    assert main(["logs", "clients", varp]) == 0
    printed = capsys.readouterr().out
    assert all(f"partition-{i}" in printed for i in range(5))
    assert main(["logs", "compare", topk, varp, "--markdown", "--target", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| run | strategy |") and len(lines) == 4
    assert lines[2].startswith("| codec=topk:0.2+q8+zlib strategy=fedavg +3 more | fedavg |")
    assert lines[3].startswith("| strategy=fedvarp participation=bernoulli +2 more | fedvarp |")


def test_compare_reads_in_80_columns(
    two_runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    logs = [RunLog(str(run)) for run in two_runs]
    labels = log_labels(logs)
    summaries = [log.summary() for log in logs]
    rows = compare_rows(labels, [(s, bytes_to_reach(log.rounds(), 0.0)) for s, log in zip(summaries, logs)])
    for log in logs:
        log.close()
    console = Console(width=80, file=io.StringIO())
    console.print(compare_table(rows, 0.0, console.width))
    printed = console.file.getvalue()  # type: ignore[attr-defined]
    assert "…" not in printed and max(len(line) for line in printed.splitlines()) <= 80
    # A column per run: its label is the header (wrapped between fields, never inside one), a metric per row.
    assert all(word in printed for label in labels for word in label.split())
    for s in summaries:
        assert re.search(rf"│ final acc +│ .*{accuracy(s.final_accuracy)}", printed)
        assert kib(s.total_bytes) in printed
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["logs", "compare", *(str(run) for run in two_runs), "--target", "0"]) == 0
    assert capsys.readouterr().out == printed
    wide = compare_table(rows, 0.0, 250)  # one row per run where that fits
    assert [column.header for column in wide.columns] == list(COMPARE_COLUMNS) and wide.row_count == 2


def test_plot_puts_bytes_on_log_axes_and_names_runs_by_short_labels(
    two_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    from matplotlib.figure import Figure

    zeroed = tmp_path / "zeroed" / LOG_FILENAME  # the FedVARP run without round 2's messages: a round with no bytes
    zeroed.parent.mkdir()
    zeroed.write_bytes((two_runs[1] / LOG_FILENAME).read_bytes())
    with sqlite3.connect(zeroed) as db:
        db.execute("DELETE FROM messages WHERE round = 2")
    logs = [RunLog(str(two_runs[0])), RunLog(str(zeroed.parent))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figure = runs_figure(logs)
        figure.savefig(io.BytesIO(), format="png")
    labels = log_labels(logs)
    for log in logs:
        log.close()
    assert isinstance(figure, Figure)
    accuracy_axes, bytes_axes = figure.axes[:2]
    assert (accuracy_axes.get_xscale(), bytes_axes.get_yscale()) == ("log", "log")
    assert accuracy_axes.xaxis.get_major_formatter()(4096) == "4 KiB"
    assert bytes_axes.yaxis.get_major_formatter()(2**21) == "2 MiB"
    assert [text.get_text() for text in figure.legends[0].get_texts()] == labels
    assert all(label in axes.get_title().replace("\n", " ") for label, axes in zip(labels, figure.axes[2:]))
    zeroed_up, zeroed_down = bytes_axes.get_lines()[2:4]
    assert 2 not in zeroed_up.get_xdata() and 2 not in zeroed_down.get_xdata()
    assert all(min(line.get_ydata()) > 0 for line in bytes_axes.get_lines())


def test_short_labels_name_what_differs() -> None:
    base = RunConfig(task="synthetic", codec="none", downstream_codec="none", out="runs/a")
    full = replace(base, fast=replace(base.fast, kind="full"), out="runs/b")
    compressed = replace(base, codec="topk:0.1+q8+lzma", out="runs/c")
    assert short_labels([full.to_dict(), base.to_dict()], ["b", "a"]) == ["fast=full", "fast=lora"]
    labels = short_labels([full.to_dict(), compressed.to_dict()], ["b", "c"])
    assert labels == ["fast=full", "fast=lora codec=topk:0.1+q8+lzma"]
    same = replace(base, out="runs/d")
    long_name = "2024-05-01-lora-rank4-topk0.1-q8-lzma-seed0-fmnist-dirichlet0.3"
    labels = short_labels([base.to_dict(), same.to_dict()], ["a", long_name])
    assert labels[0] == "a" and long_name.startswith(labels[1][:-1]) and len(labels[1]) == MAX_LABEL
    # Many differences: the first fields, the rest counted; configs that are the same get their names.
    many = replace(compressed, strategy="fedvarp", participation="bernoulli", rounds=7)
    labels = short_labels([many.to_dict(), base.to_dict(), same.to_dict()], ["m", "a", "d"])
    same_labels = [f"strategy=fedavg participation=all +1 more ({name})" for name in ("a", "d")]
    assert labels == ["codec=topk:0.1+q8+lzma strategy=fedvarp +2 more", *same_labels]


def test_clients_add_up_to_the_run(two_runs: tuple[Path, Path]) -> None:
    with RunLog(str(two_runs[1])) as log:
        clients, summary = log.clients(), log.summary()
        weights = log.db.execute("SELECT client, weight FROM messages WHERE weight IS NOT NULL").fetchall()
    assert sum(c.bytes_up + c.bytes_down for c in clients) == summary.total_bytes
    assert sum(c.accepted for c in clients) == sum(r.accepted for r in RunLog(str(two_runs[1])).rounds())
    by_client: dict[str, list[float]] = {}
    for client, weight in weights:
        by_client.setdefault(client, []).append(weight)
    for c in clients:
        if c.client in by_client:
            assert c.mean_weight == pytest.approx(np.mean(by_client[c.client]))


def test_plot_writes_a_png_of_the_requested_size(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    from matplotlib.image import imread

    out = tmp_path / "runs.png"
    assert main(["logs", "plot", *(str(p) for p in two_runs), "-o", str(out), "--size", "800x600"]) == 0
    image = imread(out)
    assert image.shape[:2] == (600, 800)
    pixels = image[..., :3].reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50  # lines, rasters and text, not a blank canvas
    assert main(["logs", "plot", str(two_runs[0]), "-o", str(tmp_path / "x.png"), "--size", "big"]) == 2


def test_tensorboard_scalars_match_the_log(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["logs", "tensorboard", str(two_runs[0]), "--logdir", str(tmp_path)]) == 0
    (folder,) = tmp_path.iterdir()
    events = EventAccumulator(str(folder))
    events.Reload()
    with RunLog(str(two_runs[0])) as log:
        rounds = log.rounds()
    logged = [(e.step, e.value) for e in events.Scalars("accuracy")]
    assert logged == [(r.round, pytest.approx(r.accuracy)) for r in rounds if r.accuracy is not None]
    assert [e.value for e in events.Scalars("bytes/up")] == [r.bytes_up for r in rounds]


def test_bad_run_names_are_named(
    two_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["logs", "summary", str(tmp_path / "nothing-here")]) == 2
    assert "no communication log at" in capsys.readouterr().err
    assert main(["logs", "summary", f"{two_runs[0]}#0123abcd"]) == 2
    assert "holds no run '0123abcd'" in capsys.readouterr().err
    old = tmp_path / "old" / LOG_FILENAME
    old.parent.mkdir()
    db = sqlite3.connect(old)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    db.commit()
    assert main(["logs", "summary", str(old.parent)]) == 2
    assert f"has log schema 2; this fedslim reads schema {SCHEMA_VERSION}" in capsys.readouterr().err


def broken_copy(log: Path, folder: Path, *statements: str) -> Path:
    """A copy of ``log`` in ``folder`` with ``statements`` run on it."""
    copy = folder / LOG_FILENAME
    folder.mkdir()
    copy.write_bytes(log.read_bytes())
    db = sqlite3.connect(copy)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()
    return copy


@pytest.mark.parametrize(
    ("statement", "problem"),
    [
        ("DROP TABLE runs", " is not a whole communication log: it has no runs table"),
        ("DROP TABLE messages", " is not a whole communication log: it has no messages table"),
        ("ALTER TABLE rounds DROP COLUMN loss", ": the rounds table has no column loss"),
        ("UPDATE rounds SET accuracy = 'high' WHERE round = 2", ": rounds.accuracy holds 'high' in run "),
        ("UPDATE messages SET message_bytes = 'many'", ": messages.message_bytes holds 'many' in run "),
        ("UPDATE runs SET started_at = 'noon'", ": runs.started_at holds 'noon' in run "),
        ("UPDATE rounds SET sampled = x'00'", ": rounds.sampled holds b'\\x00' in run "),
        ("UPDATE runs SET config = '{broken'", " is not JSON (Expecting property name enclosed in double quotes"),
        ("UPDATE runs SET config = '[1]'", " is not a JSON object"),
    ],
)
def test_a_broken_log_is_one_error_line_naming_the_file(
    statement: str, problem: str, two_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = broken_copy(two_runs[0] / LOG_FILENAME, tmp_path / "broken", statement)
    for command in ("summary", "rounds", "clients", "export"):
        assert main(["logs", command, str(broken)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fedslim logs: error: {broken}") and problem in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", " is not a fedslim communication log (no such table: meta)"),
        (b"runs,rounds\n1,2\n", " is not a fedslim communication log (file is not a database)"),
    ],
)
def test_a_file_that_is_no_log_is_one_error_line_naming_it(
    content: bytes, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / LOG_FILENAME).write_bytes(content)
    assert main(["logs", "summary", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"fedslim logs: error: {tmp_path / LOG_FILENAME}{problem}\n"


def test_a_killed_simulation_leaves_a_log_that_summary_reads(
    tmp_path: Path, private_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "fedslim.cli", "simulate", "--clients", "4", "--rounds", "200"]
    command += ["--fast", "head", "--local-steps", "1", "--backend", "inline", "--out", str(out)]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ}, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        done = 0
        while done < 3:
            assert process.poll() is None, "the simulation ended before it could be killed"
            assert time.monotonic() < deadline, "no three finished rounds within two minutes"
            time.sleep(0.2)
            if (out / LOG_FILENAME).exists():
                try:
                    with sqlite3.connect(f"file:{out / LOG_FILENAME}?mode=ro", uri=True) as db:
                        done = db.execute("SELECT COALESCE(MAX(round), 0) FROM rounds").fetchone()[0]
                except sqlite3.OperationalError:  # the schema is being created
                    done = 0
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    with RunLog(str(out)) as log:
        summary = log.summary()
        rounds = log.rounds()
    assert not summary.finished and 3 <= summary.rounds_done < 200
    assert [r.round for r in rounds] == list(range(summary.rounds_done + 1))
    assert all(r.sampled == r.accepted > 0 for r in rounds[1:])
    assert main(["logs", "summary", str(out)]) == 0
    assert f"{summary.rounds_done} of 200, interrupted" in capsys.readouterr().out


def test_each_message_row_names_its_codec_raw_size_and_version_lag(two_runs: tuple[Path, Path]) -> None:
    db = sqlite3.connect(two_runs[0] / LOG_FILENAME)
    (fast_parameters,) = db.execute("SELECT fast_parameters FROM runs").fetchone()
    rows = db.execute(
        "SELECT round, client, direction, message_type, codec, raw_bytes, payload_bytes, version_lag, status"
        " FROM messages ORDER BY id"
    ).fetchall()
    last_accepted: dict[str, int] = {}
    for server_round, client, direction, kind, codec, raw, payload, lag, status in rows:
        if kind == "query":
            assert (codec, raw, payload, lag) == (None, 0, 0, None)
        elif direction == "up":
            assert (codec, raw, lag, status) == ("topk:0.2+q8+zlib", 4 * fast_parameters, 0, "ok")
            assert 0 < payload < raw
            last_accepted[client] = server_round
        else:
            # FedAvg moves the state every round from round 1 on, so round t serves version t - 1; a client
            # last accepted in round r holds version r - 1 (never accepted: version 0, what round 1 serves).
            assert lag == server_round - last_accepted.get(client, 1)
            assert (codec, raw) == (("none", 4 * fast_parameters) if lag else (None, 0))
            assert (payload > 0) == (lag > 0)
