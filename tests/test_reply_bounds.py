"""No number in a reply stops the server, and no step makes the fast state non-finite: a reply whose claims are out
of bounds is rejected and logged on both backends, and a step that would overflow the state is refused."""

from __future__ import annotations

import logging
import math
import random
import sqlite3
from collections.abc import Iterable
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Message
from flwr.serverapp import Grid
from test_fuzz import SHAPES, random_server_case, server_run
from test_trust import TamperingGrid

from fedslim.channel.bounds import MAX_RSS_BYTES, claims_problem, finite_numbers, shown, version_lag
from fedslim.channel.protocol import DELTA_KEY, PEAK_RSS_KEY, TRAIN_TYPE, UPDATE_KEY, update_blob
from fedslim.channel.updates import ClientUpdate
from fedslim.codecs import decode_update, encode_update
from fedslim.commlog import LOG_FILENAME
from fedslim.config import RunConfig
from fedslim.server.loop import run_federation
from fedslim.server.nodes import ForwardingGrid
from fedslim.simulation import attacks
from fedslim.simulation.simulate import simulate
from fedslim.strategies import FedVARP
from fedslim.strategies.base import Federation
from fedslim.strategies.fedavg import FastFedAvg
from fedslim.task import prepared_base

NEWEST_VERSION = 2**64 - 1  # a valid uint64 on the wire
HOSTILE_RSS = (math.nan, math.inf, 1e300)


def reencoded(reply: Message, config: RunConfig, value: float | None = None, version: int | None = None) -> None:
    """Give ``reply`` an update of ``value`` in every entry (or its own), computed against ``version`` (or its own)."""
    shapes = prepared_base(config).build(config.fast).fast_shapes()
    update = decode_update(update_blob(reply.content), shapes)
    tensors = (
        update.tensors if value is None else {n: np.full(t.shape, value, np.float32) for n, t in update.tensors.items()}
    )
    blob = encode_update(
        tensors,
        config.uplink,
        kind=update.kind,
        base_fingerprint=update.base_fingerprint,
        state_version=update.state_version if version is None else version,
    ).blob
    reply.content.config_records[DELTA_KEY][UPDATE_KEY] = blob


def hostile_first_round(config: RunConfig) -> object:
    """A tamper for round 1's four train replies (by node id): version 2**64 - 1, then peak-rss NaN, inf, 1e300."""
    rounds: list[int] = []

    def tamper(replies: list[Message]) -> list[Message]:
        rounds.append(1)
        if len(rounds) == 1:
            first, *others = sorted((r for r in replies if not r.has_error()), key=lambda r: r.metadata.src_node_id)
            reencoded(first, config, version=NEWEST_VERSION)
            for reply, rss in zip(others, HOSTILE_RSS, strict=True):
                reply.content.config_records[DELTA_KEY][PEAK_RSS_KEY] = rss
        return replies

    return tamper


def assert_rejected_and_logged(config: RunConfig) -> None:
    db = sqlite3.connect(f"{config.out}/{LOG_FILENAME}")
    rows = db.execute(
        "SELECT round, status, reason, version_lag, client_peak_rss_bytes FROM messages"
        " WHERE direction = 'up' AND message_type = 'train' ORDER BY round, reason"
    ).fetchall()
    db.close()
    first = [row for row in rows if row[0] == 1]
    bound = f"[0, {MAX_RSS_BYTES:g}]"
    assert [row[1:] for row in first] == [
        (
            "rejected",
            f"malformed update: peak-rss-bytes must be in {bound}, got {value}",
            0,  # the update itself is of the round's version
            None,
        )
        for value in ("1e+300", "inf", "nan")
    ] + [("rejected", first[3][2], None, first[3][4])]
    assert first[3][2].startswith(f"stale update: computed against fast-state version {NEWEST_VERSION}, the round")
    assert first[3][4] > 0  # its honest footprint is kept
    assert [(row[0], row[1]) for row in rows if row[0] == 2] == [(2, "ok")] * 4


def test_hostile_version_and_memory_claims_are_rejected_inline(small_config: RunConfig) -> None:
    config = replace(small_config, num_clients=4, rounds=2, fraction=1.0)
    tamper = hostile_first_round(config)
    result = run_federation(TamperingGrid(4, lambda _, replies: tamper(replies)), config)  # type: ignore[operator]
    assert_rejected_and_logged(config)
    assert [(r.accepted, r.rejected) for r in result.rounds[1:]] == [(0, 4), (4, 0)]


class HostileGrid(ForwardingGrid):
    """Flower's grid, whose train replies pass through a tamper (as the simulated attackers' do)."""

    def __init__(self, grid: Grid, tamper: object) -> None:
        super().__init__(grid)
        self.tamper = tamper

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        if messages and messages[0].metadata.message_type == TRAIN_TYPE:
            return self.tamper(replies)  # type: ignore[operator]
        return replies


def test_hostile_version_and_memory_claims_are_rejected_in_flowers_engine(
    small_config: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = replace(small_config, num_clients=4, rounds=2, fraction=1.0)
    tamper = hostile_first_round(config)
    monkeypatch.setattr(attacks, "attack_wrapper", lambda _: lambda grid: HostileGrid(grid, tamper))
    result = simulate(config, backend="flower")
    assert_rejected_and_logged(config)
    assert [(r.accepted, r.rejected) for r in result.rounds[1:]] == [(0, 4), (4, 0)]


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_an_update_of_3e38_with_the_screen_off_leaves_fedvarps_state_finite(small_config: RunConfig) -> None:
    """FedVARP replays the stored 3e38 (1/N of it each round) until the state would overflow: that step is refused
    and the run ends with the state before it."""
    config = replace(small_config, num_clients=4, rounds=4, fraction=0.5, screen_factor=0.0, strategy="fedvarp")
    rounds: list[int] = []

    def tamper(_: Message, replies: list[Message]) -> list[Message]:
        rounds.append(1)
        if len(rounds) == 1:
            reencoded(next(r for r in replies if not r.has_error()), config, value=3e38)
        return replies

    warnings = Warnings()
    logging.getLogger("flwr").addHandler(warnings)
    try:
        result = run_federation(TamperingGrid(4, tamper), config)
    finally:
        logging.getLogger("flwr").removeHandler(warnings)
    assert all(np.all(np.isfinite(value)) for value in result.fast_state.values())
    assert [r.round for r in result.rounds] == [0, 1, 2, 3, 4]
    refused = [line for line in warnings.lines if "step refused" in line]
    assert len(refused) == 1 and refused[0].startswith("round 4: step refused: fast tensor ")
    assert "would hold NaN or Inf (fresh updates of none; stored updates of partition-" in refused[0]
    # Rounds 1 to 3 moved every entry by 1.5e38, then 0.75e38 twice (the stored 3e38 over N = 4); round 4 did not.
    assert max(float(np.abs(v).max()) for v in result.fast_state.values()) == pytest.approx(3e38, rel=1e-3)


def test_a_refused_step_keeps_the_state_and_the_run_trains_on(small_config: RunConfig) -> None:
    """With server_lr 4 the 3e38 update overflows in its own round: the step is refused, its updates are logged
    rejected, the state stays where it was, and the next rounds train from it."""
    config = replace(small_config, num_clients=4, rounds=3, fraction=0.5, screen_factor=0.0)
    rounds: list[int] = []

    def tamper(_: Message, replies: list[Message]) -> list[Message]:
        rounds.append(1)
        if len(rounds) == 1:
            reencoded(replies[0], config, value=3e38)
        return replies

    strategy = FastFedAvg(fraction_train=0.5, server_lr=4.0)
    result = run_federation(TamperingGrid(4, tamper), config, strategy)  # type: ignore[arg-type]
    db = sqlite3.connect(f"{config.out}/{LOG_FILENAME}")
    rows = db.execute(
        "SELECT client, status, reason, weight FROM messages WHERE round = 1 AND direction = 'up' ORDER BY client"
    ).fetchall()
    db.close()
    clients = [client for client, *_ in rows]
    assert len(clients) == 2 and [(status, weight) for _, status, _, weight in rows] == [("rejected", None)] * 2
    reason = rows[0][2]
    assert reason.startswith("step refused: fast tensor ") and reason == rows[1][2]
    assert reason.endswith(
        f"would hold NaN or Inf (fresh updates of {', '.join(clients)}; stored updates of none); "
        "the round keeps the fast state it had"
    )
    assert [(r.accepted, r.rejected) for r in result.rounds[1:]] == [(0, 2), (2, 0), (2, 0)]
    assert (result.rounds[1].accuracy, result.rounds[1].loss) == (result.rounds[0].accuracy, result.rounds[0].loss)
    assert all(np.all(np.isfinite(value)) for value in result.fast_state.values())


def test_a_snapshot_puts_fedvarps_memory_back_as_it_was() -> None:
    shapes = {"w": (3,)}
    strategy = FedVARP(memory="fp16")
    strategy.bind(Federation({1: "a", 2: "b"}, shapes))
    strategy.configure(1, {"w": np.zeros(3, np.float32)}, ["a", "b"])
    strategy.apply(1, [ClientUpdate("a", {"w": np.ones(3, np.float32)}, 10, {})])
    before = strategy.snapshot()
    huge = ClientUpdate("b", {"w": np.full(3, 1e5, np.float32)}, 10, {})  # fp16 stores it as inf
    strategy.apply(2, [huge])
    assert strategy.memory_problem() == "a stored update of FedVARP holds NaN or Inf (memory form fp16)"
    strategy.restore(before)
    assert strategy.memory_problem() is None
    assert "b" not in strategy.stored and np.array_equal(strategy.stored.total()["w"], np.ones(3))
    assert np.array_equal(strategy.stored.get("a")["w"], np.ones(3, np.float32))


@pytest.mark.parametrize(
    ("claims", "problem"),
    [
        ({"num-examples": 5, "train-loss": 0.3, "cpu-s": 1.5, "peak-rss-bytes": 2**30}, None),
        ({"train-loss": 0.3}, "num-examples is missing"),
        ({"num-examples": 2**63}, "num-examples must be in [1, 9.22337e+18], got 9223372036854775808"),
        ({"num-examples": True}, "num-examples must be an integer, got True"),
        ({"num-examples": 2**70000}, "num-examples must be in [1, 9.22337e+18], got an integer of 70,001 bits"),
        ({"num-examples": 3, "cpu-s": -1.0}, "cpu-s must be in [0, 1e+07], got -1.0"),
        ({"num-examples": 3, "cpu-s": "fast"}, "cpu-s must be a number, got 'fast'"),
        ({"num-examples": 3, "train-loss": math.nan}, "train-loss must be in [-1e+30, 1e+30], got nan"),
        ({"num-examples": 3, "peak-rss-bytes": -(2**64)}, f"peak-rss-bytes must be in [0, 1.1259e+15], got {-(2**64)}"),
        ({"num-examples": 3, "anchor": 2}, "anchor must be in [0, 1], got 2"),
    ],
)  # fmt: skip
def test_each_train_claim_has_its_bound(claims: dict[str, object], problem: str | None) -> None:
    keys = ("num-examples", "train-loss", "anchor", "cpu-s", "peak-rss-bytes")
    assert claims_problem(claims, keys, required=("num-examples",)) == problem


def test_what_the_server_keeps_of_numbers_it_cannot_store() -> None:
    assert version_lag(7, NEWEST_VERSION) is None and version_lag(7, 5) == 2
    assert finite_numbers({"a": 1, "b": math.nan, "c": 2**2000, "d": True, "e": "1", "f": -2.5}) == {
        "a": 1.0,
        "f": -2.5,
    }
    assert shown(b"x" * 1000) == repr(b"x" * 57)[:57] + "..."


def test_a_step_whose_replica_step_overflows_is_refused_though_the_state_is_finite() -> None:
    run = server_run(random_server_case(random.Random(0), "inline"))
    run.downlink.replica.state = {name: np.full(shape, -3e38, np.float32) for name, shape in SHAPES.items()}
    finite = {name: np.full(shape, 3e38, np.float32) for name, shape in SHAPES.items()}
    assert run.step_problem(finite) == "the replica's step of fast tensor 'w' would hold NaN or Inf"
    assert run.step_problem({name: -value for name, value in finite.items()}) is None
    finite["b"][0] = math.inf
    assert run.step_problem(finite) == "fast tensor 'b' would hold NaN or Inf"
