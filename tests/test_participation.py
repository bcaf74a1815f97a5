"""Participation models, traces, the plug-in API, and the loop contacting only available clients."""

from __future__ import annotations

import re
import sqlite3
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedslim.cli import main as cli_main
from fedslim.client.app import app as client_app
from fedslim.commlog import LOG_FILENAME
from fedslim.config import ConfigError, RunConfig
from fedslim.data.participation import (
    P_MIN,
    TRACE_FILENAME,
    ParticipationError,
    bernoulli_schedule,
    cyclic_schedule,
    label_count_matrix,
    label_probabilities,
    markov_schedule,
    participation_schedule,
    read_trace,
    spread_probabilities,
    write_trace,
)
from fedslim.server.loop import run_federation
from fedslim.simulation.inline import FIRST_NODE_ID, InlineGrid
from fedslim.strategies import (
    STRATEGIES,
    ClientUpdate,
    FastFedAvg,
    FedAU,
    FedAUWeights,
    Federation,
    FedStale,
    StrategyConfigError,
    build_strategy,
)
from fedslim.strategies.registry import parse_strategy_args, strategy_for

# ----------------------------------------------------------------- models


def test_spread_probabilities_have_the_mean_and_a_ninefold_range() -> None:
    p = spread_probabilities(100, 0.1, np.random.default_rng(0))
    assert p.mean() == pytest.approx(0.1) and p.min() == pytest.approx(0.02) and p.max() == pytest.approx(0.18)


def test_spread_probabilities_narrow_above_five_ninths_to_keep_the_mean() -> None:
    p = spread_probabilities(101, 0.9, np.random.default_rng(0))
    assert p.mean() == pytest.approx(0.9) and p.min() == pytest.approx(0.8) and p.max() == pytest.approx(1.0)
    assert p.max() <= 1.0 and len(np.unique(p)) == 101
    low = spread_probabilities(100, 0.03, np.random.default_rng(0))  # no floor: still a ninefold range
    assert low.mean() == pytest.approx(0.03) and low.max() / low.min() == pytest.approx(9)


def test_label_probabilities_follow_fedau_formula_scaled_to_the_mean() -> None:
    counts = np.array([[10, 0, 0], [0, 5, 5], [1, 1, 2], [0, 0, 7]])
    rng = np.random.default_rng(4)
    p = label_probabilities(counts, 0.1, np.random.default_rng(4))
    weights = 3 * (counts / counts.sum(1, keepdims=True)) @ rng.dirichlet(0.1 * np.ones(3))
    scale = p.max() / weights.max()
    np.testing.assert_allclose(p, np.clip(scale * weights, 0.02, 1.0))
    assert p.mean() == pytest.approx(0.1) and p.min() == 0.02


def test_label_models_refuse_a_mean_they_cannot_realise() -> None:
    counts = np.array([[5, 0], [0, 0]])  # the second client holds nothing: its p_i stays at the floor
    assert participation_schedule("label", counts, 3, 0.5, 0).probabilities.mean() == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="average at most 0.5100"):
        participation_schedule("label", counts, 3, 0.9, 0)
    with pytest.raises(ConfigError, match="below 0.02"):
        participation_schedule("markov", counts, 3, 0.01, 0)
    assert participation_schedule("bernoulli", counts, 3, 0.01, 0).probabilities.mean() == pytest.approx(0.01)


def label_counts(num_clients: int, seed: int) -> np.ndarray:
    """A Dirichlet(0.1) label split of 10 classes, the benchmarks' kind of federation."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(300, rng.dirichlet(0.1 * np.ones(10), size=num_clients))


@pytest.mark.parametrize("spec", ["bernoulli", "label", "markov", "cyclic"])
@pytest.mark.parametrize("mean", [0.03, 0.1, 0.5, 0.9])
def test_each_model_realises_the_asked_mean(spec: str, mean: float) -> None:
    schedule = participation_schedule(spec, label_counts(300, 1), 400, mean, seed=2)
    assert schedule.probabilities.mean() == pytest.approx(mean, rel=1e-9)
    assert abs(schedule.available.mean() - mean) <= min(0.02, 0.1 * mean)
    assert np.ptp(schedule.probabilities) > min(mean, 1 - mean)  # still heterogeneous
    if spec != "bernoulli":
        assert schedule.probabilities.min() >= P_MIN


@pytest.mark.parametrize("dynamics", [bernoulli_schedule, markov_schedule, cyclic_schedule])
def test_each_dynamics_is_available_a_fraction_p_of_the_time(dynamics) -> None:  # type: ignore[no-untyped-def]
    p = np.array([0.05, 0.1, 0.3, 0.6])
    available = dynamics(p, 20_000, np.random.default_rng(0))
    np.testing.assert_allclose(available.mean(axis=0), p, rtol=0.15)


def test_markov_availability_comes_in_runs_and_cyclic_in_blocks() -> None:
    p = np.full(50, 0.1)
    markov = markov_schedule(p, 2000, np.random.default_rng(1))
    bernoulli = bernoulli_schedule(p, 2000, np.random.default_rng(1))

    def mean_run(a: np.ndarray) -> float:
        starts = (a[1:] & ~a[:-1]).sum()
        return float(a[1:].sum() / max(starts, 1))

    # An on-spell lasts 1/P(on->off) rounds on average: 1/(0.05 * (1/0.1 - 1)) for Markov, 1/(1 - 0.1) for Bernoulli.
    assert mean_run(markov) == pytest.approx(1 / 0.45, rel=0.1)
    assert mean_run(bernoulli) == pytest.approx(1 / 0.9, rel=0.1)
    cyclic = cyclic_schedule(np.array([0.1]), 300, np.random.default_rng(2))[:, 0]
    assert cyclic.sum() == 30 and all(cyclic[t : t + 100].sum() == 10 for t in range(0, 201, 100))


def test_trace_round_trip_and_bad_traces(tmp_path: Path) -> None:
    available = np.random.default_rng(0).random((5, 7)) < 0.4
    available[2] = False  # a round where nobody is available
    write_trace(tmp_path / "t", available)
    np.testing.assert_array_equal(read_trace(tmp_path / "t", 7, 5), available)
    np.testing.assert_array_equal(read_trace(tmp_path / "t", 7, 3), available[:3])
    with pytest.raises(ParticipationError, match="has 5 rounds, the run needs 6"):
        read_trace(tmp_path / "t", 7, 6)
    (tmp_path / "bad").write_text("0 1\n2 x\n")
    with pytest.raises(ParticipationError, match="round 2: 'x'"):
        read_trace(tmp_path / "bad", 7, 2)
    (tmp_path / "big").write_text("0 9\n")
    with pytest.raises(ParticipationError, match="round 1: '9'"):
        read_trace(tmp_path / "big", 7, 1)
    with pytest.raises(ParticipationError, match="cannot read"):
        read_trace(tmp_path / "missing", 7, 1)


def trace_error(capsys: pytest.CaptureFixture[str], spec: str, *flags: str) -> str:
    """The one stderr line of ``fedslim simulate --participation SPEC FLAGS``, which exits with code 2."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["simulate", "--participation", spec, "--clients", "4", "--rounds", "2", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("fedslim simulate: error: ") and err.count("\n") == 1, err
    return err


def test_a_bad_trace_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out", str(tmp_path / "run")]
    missing = tmp_path / "missing.trace"
    assert f"cannot read participation trace {missing}: No such file or directory" in trace_error(
        capsys, f"trace:{missing}", *out
    )
    for empty in ("trace:", "trace:  "):
        assert "trace: needs a file" in trace_error(capsys, empty, *out)
    assert "Is a directory" in trace_error(capsys, f"trace:{tmp_path}", *out)
    (tmp_path / "garbage").write_bytes(bytes(range(256)) * 4)
    assert "is not a text file" in trace_error(capsys, f"trace:{tmp_path / 'garbage'}", *out)
    for name, text, message in [
        ("short", "0 1\n", "has 1 rounds, the run needs 2"),
        ("wide", "0 1\n2 4\n", "round 2: '4' is not a client index in [0, 4)"),
        ("negative", "-1\n0\n", "round 1: '-1' is not a client index"),
        ("unicode", "\u00b2\n0\n", "round 1: '\u00b2' is not a client index"),
        ("long", "x" * 1000 + "\n0\n", "round 1: 'xxxxxxxxxxxxxxxxxxxx...' is not a client index"),
    ]:
        (tmp_path / name).write_text(text)
        assert message in trace_error(capsys, f"trace:{tmp_path / name}", *out)
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_unknown_participation_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown participation model 'poisson'"):
        RunConfig(participation="poisson")
    schedule = participation_schedule("all", np.ones((3, 2)), 4, 0.1, 0)
    assert schedule.available.all()


# ----------------------------------------------------------------- plug-in API

USER_STRATEGY = '''
"""A user strategy: the coordinate-wise median of the updates."""
import numpy as np

from fedslim.strategies import FastStrategy, Step


class MedianStrategy(FastStrategy):
    def __init__(self, shrink: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.shrink = shrink

    def aggregate(self, server_round, updates):
        if not updates:
            return Step({n: np.zeros(s) for n, s in self.federation.shapes.items()}, {})
        direction = {
            name: self.shrink * np.median([u.delta[name] for u in updates], axis=0)
            for name in self.federation.shapes
        }
        return Step(direction, {u.client: float("nan") for u in updates})
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_strategies.py").write_text(textwrap.dedent(USER_STRATEGY))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_strategies"
    sys.modules.pop("my_strategies", None)


def test_strategies_by_name_and_by_import_path(user_module: str) -> None:
    defaults = {"fraction_train": 0.5, "server_lr": 2.0, "seed": 3}
    stale = build_strategy("fedstale", parse_strategy_args("beta=0.25, p-estimate=known cutoff=inf"), defaults)
    assert isinstance(stale, FedStale)
    assert (stale.beta, stale.p_estimate, stale.cutoff, stale.fraction_train, stale.seed) == (
        0.25,
        "known",
        float("inf"),
        0.5,
        3,
    )
    user = build_strategy(f"{user_module}:MedianStrategy", {"shrink": 0.5}, defaults)
    assert type(user).__name__ == "MedianStrategy" and user.shrink == 0.5 and user.server_lr == 2.0
    assert set(STRATEGIES) >= {"fedavg", "fedau", "fedvarp", "mifa", "fedstale", "fedamd"}


@pytest.mark.parametrize(
    ("spec", "args", "message"),
    [
        ("fedprox", {}, "unknown strategy 'fedprox'"),
        ("nowhere.module:X", {}, "cannot import strategy"),
        ("fedslim.config:RunConfig", {}, "neither a fedslim FastStrategy nor a Flower Strategy"),
        ("fedstale", {"gamma": 1}, "unexpected keyword argument 'gamma'"),
    ],
)
def test_bad_strategy_specs_name_the_problem(spec: str, args: dict[str, object], message: str) -> None:
    with pytest.raises(StrategyConfigError, match=message):
        build_strategy(spec, args, {})


def test_strategy_args_must_be_key_value() -> None:
    assert parse_strategy_args(["k=50", "flag=true", "name=x"]) == {"k": 50, "flag": True, "name": "x"}
    with pytest.raises(StrategyConfigError, match="not key=value"):
        parse_strategy_args("beta")


def test_cli_refuses_a_bad_strategy_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["simulate", "--strategy", "fedstale", "--strategy-arg", "beta=3"])
    assert "beta must be in [0, 1]" in capsys.readouterr().err


BROKEN_STRATEGIES = {
    "raises_import_error": "import not_a_module_anywhere\n",
    "raises_at_import": "raise RuntimeError('no GPU\\nfound')\n",
    "bad_syntax": "def broken(:\n",
    "refuses_arguments": textwrap.dedent(
        """
        from fedslim.strategies import FastFedAvg


        class Picky(FastFedAvg):
            def __init__(self, name: str = "x", **kwargs):
                super().__init__(**kwargs)
                self.name = name
                if "," in name:
                    raise ValueError(f"no commas in names,\\nplease: {name!r}")
        """
    ),
}


@pytest.fixture
def broken_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, code in BROKEN_STRATEGIES.items():
        (tmp_path / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in BROKEN_STRATEGIES:
        sys.modules.pop(name, None)


@pytest.mark.usefixtures("broken_modules")
@pytest.mark.parametrize(
    ("spec", "args", "message"),
    [
        (":X", [], "strategy ':X' is not module:Class"),
        ("fedslim.strategies:", [], "strategy 'fedslim.strategies:' is not module:Class"),
        ("raises_import_error:X", [], "cannot import strategy 'raises_import_error:X': ModuleNotFoundError: No module"),
        ("raises_at_import:X", [], "cannot import strategy 'raises_at_import:X': RuntimeError: no GPU found"),
        ("bad_syntax:X", [], "cannot import strategy 'bad_syntax:X': SyntaxError: "),
        ("fedslim.strategies:Nope", [], "AttributeError: module 'fedslim.strategies' has no attribute 'Nope'"),
        (
            "refuses_arguments:Picky",
            ["--strategy-arg", "name=a, b"],
            "refuses_arguments:Picky: ValueError: no commas in names, please: 'a, b'",
        ),
        ("fedavg", ["--strategy-arg", "weighting='a"], 'unknown weighting "\'a"'),
    ],
)
def test_plug_in_strategy_errors_are_one_line(
    spec: str, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["simulate", "--strategy", spec, *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert message in err


@pytest.mark.usefixtures("broken_modules")
def test_a_plug_in_constructor_error_is_a_strategy_config_error() -> None:
    with pytest.raises(StrategyConfigError, match="refuses_arguments:Picky: ValueError: no commas"):
        build_strategy("refuses_arguments:Picky", parse_strategy_args("name='a, b'"), {})
    assert build_strategy("refuses_arguments:Picky", parse_strategy_args("name='a b'"), {}).name == "a b"
    with pytest.raises(StrategyConfigError, match='strategy arguments: cannot split "name=\'a": no closing quotation'):
        parse_strategy_args("name='a")


# ----------------------------------------------------------------- in the loop


def test_only_available_clients_are_contacted_and_weights_are_logged(small_config: RunConfig) -> None:
    config = replace(
        small_config,
        num_clients=8,
        rounds=6,
        fraction=1.0,
        participation="bernoulli",
        participation_mean=0.4,
        strategy="fedstale",
        strategy_args="beta=0.5,p-estimate=fedau",
        codec="topk:0.5+q8",
    )
    result = run_federation(InlineGrid(client_app, config.num_clients), config)  # type: ignore[arg-type]
    trace = read_trace(Path(config.out) / TRACE_FILENAME, 8, 6)
    db = sqlite3.connect(Path(config.out) / LOG_FILENAME)
    for t in range(1, 7):
        contacted = {
            c for (c,) in db.execute("SELECT client FROM messages WHERE round = ? AND direction = 'down'", (t,))
        }
        assert contacted == {f"partition-{i}" for i in np.flatnonzero(trace[t - 1])}
    assert [r.sampled for r in result.rounds[1:]] == list(trace.sum(axis=1))

    # Recompute round 6's direction coefficients: every accepted update has a weight, stale terms are logged.
    weights = db.execute("SELECT client, weight FROM messages WHERE round = 6 AND direction = 'up'").fetchall()
    assert weights and all(w is not None and w > 0 for _, w in weights)
    memory = dict(db.execute("SELECT client, weight FROM memory_weights WHERE round = 6"))
    earlier = {
        c
        for (c,) in db.execute(
            "SELECT DISTINCT client FROM messages WHERE round BETWEEN 1 AND 5 AND direction = 'up' AND status = 'ok'"
        )
    }
    assert set(memory) == earlier
    held = [m for (m,) in db.execute("SELECT strategy_memory_bytes FROM rounds WHERE round > 0 ORDER BY round")]
    assert held[-1] > 0 and held == sorted(held)  # wire-form memory grows as clients first report


def test_strategy_never_sees_p_unless_told(small_config: RunConfig) -> None:
    config = replace(
        small_config, participation="label", fraction=1.0, strategy="fedavg", strategy_args="p-estimate=known"
    )
    with pytest.raises(StrategyConfigError, match="--p-known"):
        run_federation(InlineGrid(client_app, config.num_clients), config)  # type: ignore[arg-type]
    known = replace(config, p_known=True, out=config.out + "-known")
    strategy = strategy_for(known)
    run_federation(InlineGrid(client_app, known.num_clients), known, strategy)  # type: ignore[arg-type]
    assert isinstance(strategy, FastFedAvg) and strategy.federation.probabilities
    assert set(strategy.federation.probabilities) == {f"partition-{i}" for i in range(known.num_clients)}


def test_a_run_replays_from_its_own_trace(small_config: RunConfig) -> None:
    config = replace(
        small_config, num_clients=6, rounds=4, fraction=1.0, participation="markov", participation_mean=0.5
    )
    first = run_federation(InlineGrid(client_app, 6), config)  # type: ignore[arg-type]
    replay = replace(config, participation=f"trace:{Path(config.out) / TRACE_FILENAME}", out=config.out + "-replay")
    second = run_federation(InlineGrid(client_app, 6), replay)  # type: ignore[arg-type]
    assert [(r.sampled, r.accuracy) for r in first.rounds] == [(r.sampled, r.accuracy) for r in second.rounds]


def test_fedamd_sends_anchors_and_miners_different_work(small_config: RunConfig) -> None:
    config = replace(
        small_config,
        num_clients=6,
        rounds=3,
        fraction=1.0,
        strategy="fedamd",
        strategy_args="anchor-probability=0.5,initial-direction=anchor-first",
        local_steps=3,
    )
    result = run_federation(InlineGrid(client_app, 6), config)  # type: ignore[arg-type]
    db = sqlite3.connect(Path(config.out) / LOG_FILENAME)
    assert all(r.accepted == r.sampled == 6 for r in result.rounds[1:])
    round_one = [w for (w,) in db.execute("SELECT weight FROM messages WHERE round = 1 AND direction = 'up'")]
    assert round_one == [0.0] * 6  # everyone is an anchor first: no miner, no step
    assert result.rounds[1].accuracy == result.rounds[0].accuracy
    later = [w for (w,) in db.execute("SELECT weight FROM messages WHERE round > 1 AND direction = 'up'")]
    assert any(w > 0 for w in later) and any(w == 0 for w in later)
    assert result.rounds[-1].accuracy != result.rounds[0].accuracy


def test_the_guide_strategy_runs_as_documented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guide = (Path(__file__).parents[1] / "docs" / "custom_strategy.md").read_text()
    code = guide.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) < 40
    (tmp_path / "guide_clipped.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    strategy = build_strategy("guide_clipped:ClippedFedAvg", parse_strategy_args(["max-norm=1"]), {"seed": 0})
    strategy.bind(Federation({1: "a", 2: "b"}, {"w": (2,)}))
    step = strategy.aggregate(
        1,
        [
            ClientUpdate("a", {"w": np.array([3.0, 4.0], np.float32)}, 10, {}),  # norm 5: scaled by 1/5
            ClientUpdate("b", {"w": np.array([0.5, 0.0], np.float32)}, 30, {}),  # norm 0.5: kept
        ],
    )
    np.testing.assert_allclose(step.direction["w"], [0.25 * 0.6 + 0.75 * 0.5, 0.25 * 0.8])
    assert step.weights == pytest.approx({"a": 0.05, "b": 0.75})
    sys.modules.pop("guide_clipped", None)


def test_fedamd_without_anchors_is_plain_local_sgd(small_config: RunConfig) -> None:
    """Anchor probability 0 and zero initial directions: FedAMD's rounds are FedAvg's (equal weights), exactly."""
    config = replace(small_config, num_clients=5, rounds=3, fraction=0.6, local_steps=4)
    fedamd = replace(config, strategy="fedamd", strategy_args="anchor-probability=0,initial-direction=zeros")
    fedavg = replace(config, strategy="fedavg", strategy_args="weighting=uniform", out=config.out + "-fedavg")
    amd = run_federation(InlineGrid(client_app, 5), fedamd)  # type: ignore[arg-type]
    avg = run_federation(InlineGrid(client_app, 5), fedavg)  # type: ignore[arg-type]
    assert [(r.accuracy, r.loss) for r in amd.rounds] == [(r.accuracy, r.loss) for r in avg.rounds]
    assert amd.rounds[-1].accuracy != amd.rounds[0].accuracy


class SilentNodesGrid(InlineGrid):
    """Nodes that never answer a train instruction, as if they missed every round's timeout."""

    def __init__(self, num_nodes: int, silent: set[int]) -> None:
        super().__init__(client_app, num_nodes)
        self.silent = silent

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        return [
            reply
            for reply in super().send_and_receive(messages, timeout=timeout)
            if not (reply.metadata.message_type == "train" and reply.metadata.src_node_id in self.silent)
        ]


def test_in_deployment_a_node_that_does_not_reply_is_absent(small_config: RunConfig) -> None:
    config = replace(small_config, num_clients=4, rounds=3, fraction=1.0)
    grid = SilentNodesGrid(4, silent={FIRST_NODE_ID})  # partition 0
    strategy = FedAU()
    result = run_federation(grid, config, strategy)  # type: ignore[arg-type]
    assert [(r.sampled, r.accepted) for r in result.rounds[1:]] == [(4, 3)] * 3
    estimates = strategy.estimator
    assert isinstance(estimates, FedAUWeights)
    assert estimates.missed["partition-0"] == 3 and estimates.weight("partition-1") == 1.0


def test_label_counts_of_any_width_make_one_matrix_as_wide_as_the_largest_label_held() -> None:
    rows = [np.array([2, 0, 1, 0, 0]), np.array([], dtype=np.int64), np.array([0, 3])]
    assert label_count_matrix(rows).tolist() == [[2, 0, 1], [0, 0, 0], [0, 3, 0]]
    for bad, found in ((np.array([1.0, 2.0]), "float64 of shape (2,)"), (np.array([[1, 2]]), "int64 of shape (1, 2)")):
        with pytest.raises(ParticipationError, match=rf"label_counts of client 1 .* got {re.escape(found)}"):
            label_count_matrix([np.array([1]), bad])
    with pytest.raises(ParticipationError, match="label_counts of client 0 must be non-negative"):
        label_count_matrix([np.array([1, -1])])


def test_the_server_schedules_label_participation_from_label_counts_not_the_clients_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedslim.data.datasets import load_federation
    from fedslim.server.loop import simulated_participation
    from fedslim.task import task_for
    from fedslim.tasks.benchmarks import BenchmarkTask

    config = RunConfig(
        task="synthetic", num_clients=30, rounds=6, participation="label", participation_mean=0.3, out=str(tmp_path)
    )
    # As the server counted them before: every client's data loaded, its labels counted.
    labels = [client.y for client in load_federation(config).clients]
    counts = np.stack([np.bincount(y, minlength=int(max(y.max() for y in labels)) + 1) for y in labels])
    expected = participation_schedule("label", counts, 6, 0.3, config.seed)

    def no_data(self: BenchmarkTask, config: RunConfig, partition_id: int) -> None:
        raise AssertionError(f"the server loaded client {partition_id}'s data")

    monkeypatch.setattr(BenchmarkTask, "client_data", no_data)
    schedule = simulated_participation(config, task_for(config))
    assert schedule is not None
    np.testing.assert_array_equal(schedule.available, expected.available)
    np.testing.assert_array_equal(schedule.probabilities, expected.probabilities)
