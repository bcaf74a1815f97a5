"""The size screen has a reference from the first round, whatever the fast layer: a round-1 100x update is rejected.

Its reference is the lower median of the sizes it has seen and the round's candidates; a size is an update's L2
norm over the square root of its local steps.
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import numpy as np
import pytest

from fedslim.channel.uplink import SizeScreen, update_size
from fedslim.codecs.pipeline import DELTA, DecodedUpdate
from fedslim.commlog import LOG_FILENAME
from fedslim.config import FastSpec, RunConfig
from fedslim.simulation.simulate import simulate


def test_of_two_first_round_candidates_the_smaller_is_the_reference() -> None:
    screen = SizeScreen(factor=10.0)
    assert screen.reference([1.0, 100.0]) == 1.0
    found = screen.reasons([1.0, 100.0])
    assert found[0] is None
    assert found[1] == (
        "update too large: 100 per root local step, 100x the median of recent updates (1; the screen rejects "
        "above 10x): local training diverged?"
    )
    assert screen.reasons([1.0, 10.0]) == [None, None]  # 10x is the limit, not above it
    assert screen.reasons([1e9]) == [None]  # a lone first update has nothing to be compared with


def test_the_reference_is_the_lower_median_of_the_remembered_sizes_and_the_candidates() -> None:
    screen = SizeScreen(factor=10.0)
    for size in (4.0, 1.0, 3.0):
        screen.remember(size)
    assert screen.reference([]) == 3.0  # 1, 3, 4
    assert screen.reference([2.0]) == 2.0  # 1, 2, 3, 4: the smaller middle one
    assert screen.reference([None, 5.0, 6.0]) == 4.0  # 1, 3, 4, 5, 6; None is not screened
    found = screen.reasons([35.0, 41.0, None])  # 1, 3, 4, 35, 41: the reference is 4
    assert found[0] is None and found[2] is None
    assert found[1] is not None and found[1].startswith("update too large: 41 per root local step, 10x the median")


def test_an_attacker_in_every_round_so_far_does_not_move_the_reference() -> None:
    # Half the sizes are 100x (one attacker of two, every round): the median of numbers would be ~50x.
    screen = SizeScreen(factor=10.0)
    for _ in range(3):
        found = screen.reasons([1.0, 100.0])
        assert found[0] is None and found[1] is not None and "100x the median" in found[1]
        screen.remember(1.0)
        screen.remember(100.0)
    assert screen.reference([]) == 1.0


def test_zero_sizes_are_no_reference() -> None:
    assert SizeScreen(factor=10.0).reference([0.0, 0.0, 2.0, 50.0]) == 2.0
    assert SizeScreen(factor=10.0).reasons([0.0, 0.0, 2.0, 50.0])[3] is not None
    assert SizeScreen(factor=10.0).reasons([0.0, 0.0]) == [None, None]


def test_a_lasting_change_of_every_size_moves_the_reference_within_a_window() -> None:
    screen = SizeScreen(factor=10.0, window=6)
    for size in (1.0, 1.2, 0.8, 1.1):
        screen.remember(size)
    assert screen.reasons([40.0])[0] is not None
    for _ in range(6):
        screen.remember(40.0)
    assert screen.reasons([45.0, 40.0]) == [None, None]


def test_factor_zero_turns_the_screen_off() -> None:
    assert SizeScreen(factor=0.0).reasons([1.0, 1e9]) == [None, None]


def test_a_size_is_the_norm_over_the_square_root_of_the_local_steps() -> None:
    tensors = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[4.0]], np.float32)}  # L2 norm 5
    update = DecodedUpdate(DELTA, "f", 0, tensors)
    assert update_size(update, 90, lambda examples: examples // 10) == pytest.approx(5.0 / 3.0)  # 9 steps
    assert update_size(update, 10, lambda examples: 1) == 5.0
    assert update_size(update, 40, lambda examples: 4) == 2.5


def test_a_round_one_100x_update_in_a_4_client_lora_federation_is_rejected(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Seed 6: the attacker (partition-2) is one of the two clients sampled in rounds 1 and 3. The screen of before,
    # against 10x the norm of the LoRA state while it had fewer than 5 sizes, let its round-1 update through.
    seed = 6
    clean = RunConfig(
        task="synthetic-transfer",
        num_clients=4,
        fraction=0.5,
        rounds=3,
        fast=FastSpec("lora", seed=seed),
        codec="none",
        downstream_codec="none",
        seed=seed,
        checkpoint_every=0,
        out=str(tmp_path / "clean"),
    )
    attacked = replace(clean, attack="scale:100@0.25", out=str(tmp_path / "attacked"))
    clean_result = simulate(clean, backend="inline")
    attacked_result = simulate(attacked, backend="inline")

    def rejected(config: RunConfig) -> list[tuple[int, str, str]]:
        with sqlite3.connect(f"{config.out}/{LOG_FILENAME}") as db:
            return db.execute("SELECT round, client, reason FROM messages WHERE status = 'rejected'").fetchall()

    assert rejected(clean) == []
    found = rejected(attacked)
    assert [(r, client) for r, client, _ in found] == [(1, "partition-2"), (3, "partition-2")]
    assert all(reason.startswith("update too large") for *_, reason in found)
    assert attacked_result.rounds[-1].accuracy >= clean_result.rounds[-1].accuracy - 0.02  # type: ignore[operator]
