"""Error feedback: nothing is lost, only delayed; an absent client's residual decays."""

from __future__ import annotations

import numpy as np

from fedslim.codecs import encode_update, parse_codec
from fedslim.codecs.feedback import Residual, compensate, new_residual
from fedslim.codecs.pipeline import DELTA


def _send(update: dict[str, np.ndarray], codec: str, version: int) -> dict[str, np.ndarray]:
    pipeline = parse_codec(codec)
    return encode_update(update, pipeline, kind=DELTA, base_fingerprint="", state_version=version).decoded


def test_residual_is_what_the_codec_dropped_and_is_added_back() -> None:
    u = {"w": np.array([3.0, -1.0, 0.5, 0.25], np.float32)}
    sent = _send(u, "topk:0.25", 4)
    residual = new_residual(u, sent, 4)
    np.testing.assert_array_equal(sent["w"], [3.0, 0, 0, 0])
    np.testing.assert_array_equal(residual.tensors["w"], [0, -1.0, 0.5, 0.25])
    delta = {"w": np.array([1.0, 1.0, 1.0, 1.0], np.float32)}
    np.testing.assert_array_equal(compensate(delta, residual, 5, decay=0.5)["w"], [1.0, 0.0, 1.5, 1.25])


def test_an_absent_clients_residual_decays_per_missed_round() -> None:
    residual = Residual({"w": np.full(3, 8.0, np.float32)}, version=10)
    zero = {"w": np.zeros(3, np.float32)}
    assert compensate(zero, residual, 11, decay=0.5)["w"][0] == 8.0  # next round: nothing missed
    assert compensate(zero, residual, 14, decay=0.5)["w"][0] == 1.0  # three rounds missed: 8 * 0.5**3
    assert compensate(zero, None, 14, decay=0.5)["w"][0] == 0.0


def test_with_feedback_the_sum_of_what_arrives_tracks_the_sum_of_updates() -> None:
    rng = np.random.default_rng(0)
    residual = None
    total_in = np.zeros(1000)
    total_out = np.zeros(1000)
    for version in range(200):
        delta = {"w": rng.standard_normal(1000).astype(np.float32)}
        u = compensate(delta, residual, version, decay=1.0)
        sent = _send(u, "topk:0.05+q4", version)
        residual = new_residual(u, sent, version)
        total_in += delta["w"]
        total_out += sent["w"]
    # The gap is exactly the current residual, bounded while the sums grow like sqrt(200) * 1000.
    np.testing.assert_allclose(total_in - total_out, residual.tensors["w"], atol=1e-3)
    assert np.linalg.norm(total_in - total_out) < 0.5 * np.linalg.norm(total_in)


def test_a_long_absence_cannot_blow_up_the_update() -> None:
    # A client that accumulated a large residual, then was away for 50 rounds.
    residual = Residual({"w": np.full(1000, 100.0, np.float32)}, version=0)
    fresh = {"w": np.ones(1000, np.float32)}
    u = compensate(fresh, residual, 51, decay=0.9)
    assert np.linalg.norm(u["w"]) < 2 * np.linalg.norm(fresh["w"])  # 100 * 0.9**50 = 0.52
