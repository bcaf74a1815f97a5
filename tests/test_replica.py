"""Downstream replica: versioned steps, chains or full state, bit-identical on both sides."""

from __future__ import annotations

import numpy as np
import pytest

from fedslim.channel.downlink import ClientReplica, ReplicaMismatch, ServerReplica, state_digest
from fedslim.codecs import UpdateError, parse_codec

SHAPES = {"a": (30, 20), "b": (20,)}


def _states(rounds: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """A trajectory of exact server states: a random walk from zero."""
    rng = np.random.default_rng(seed)
    state = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    out = []
    for _ in range(rounds):
        state = {n: (v + rng.standard_normal(v.shape).astype(np.float32)) for n, v in state.items()}
        out.append(state)
    return out


@pytest.mark.parametrize("codec", ["none", "topk:0.1+q8", "randk:0.2+fp16", "powersgd:2+q4+zstd", "ternary:0.05"])
def test_clients_joining_at_any_round_hold_the_servers_replica_bit_for_bit(codec: str) -> None:
    initial = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    server = ServerReplica(initial, parse_codec(codec), "base", seed=3)
    # Client i takes part in round r when (r + i) % (i + 1) == 0: every round, every other, every third...
    clients = [ClientReplica(dict(initial), 0) for _ in range(4)]
    for r, exact in enumerate(_states(12), start=1):
        server.publish(exact)
        for i, client in enumerate(clients):
            if (r + i) % (i + 1) == 0:
                blobs = server.sync_for(client.version)
                clients[i] = client.synced(blobs, SHAPES, "base", server.version, server.digest)
                for name in SHAPES:
                    assert np.array_equal(clients[i].state[name].view(np.uint32), server.state[name].view(np.uint32))
    assert server.version == 12


def test_compressed_steps_converge_to_the_exact_state_once_it_stops_moving() -> None:
    initial = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    target = _states(1)[0]
    server = ServerReplica(initial, parse_codec("topk:0.2+q8"), "base")
    for _ in range(40):
        server.publish(target)
    gap = max(float(np.max(np.abs(server.state[n] - target[n]))) for n in SHAPES)
    assert gap < 0.02  # what top-k and 8 bits drop stays in x - x_hat and goes out with later steps


def test_a_long_absence_gets_the_full_state_when_it_is_smaller_than_the_chain() -> None:
    initial = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    server = ServerReplica(initial, parse_codec("topk:0.3"), "base")
    states = _states(10)
    server.publish(states[0])
    one_step = server.sync_for(0)
    assert len(one_step) == 1 and len(one_step[0]) < len(server.full_state_blob())
    for exact in states[1:]:
        server.publish(exact)
    assert server.sync_for(0) == [server.full_state_blob()]  # 10 steps at ~60% each would cost more
    assert len(server.sync_for(9)) == 1
    assert server.sync_for(server.version) == []
    assert server.sync_for(None) == [server.full_state_blob()]


def test_identical_states_publish_no_step() -> None:
    initial = {n: np.ones(s, np.float32) for n, s in SHAPES.items()}
    server = ServerReplica(initial, parse_codec("topk:0.1"), "base")
    server.publish(initial)
    assert server.version == 0 and server.digest == state_digest(initial)


def test_client_skips_steps_it_already_applied_and_refuses_gaps_and_foreign_bases() -> None:
    initial = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    server = ServerReplica(initial, parse_codec("topk:0.05"), "base")
    server.publish(_states(1)[0])
    server.publish(_states(2)[1])
    after_two = ClientReplica(dict(initial), 0).synced(server.sync_for(0), SHAPES, "base", 2, server.digest)
    server.publish(_states(3)[2])
    chain = server.sync_for(0)
    assert len(chain) == 3
    # A client whose reply was lost is ahead of what the server believes: it skips steps 0 and 1.
    synced = after_two.synced(chain, SHAPES, "base", server.version, server.digest)
    assert synced.version == 3 and state_digest(synced.state) == server.digest
    with pytest.raises(ReplicaMismatch, match="next step starts at 1"):
        ClientReplica(dict(initial), 0).synced(chain[1:], SHAPES, "base", 3, server.digest)
    with pytest.raises(UpdateError, match="another base"):
        ClientReplica(dict(initial), 0).synced(chain, SHAPES, "other", 3, server.digest)
    with pytest.raises(ReplicaMismatch, match="digest"):
        ClientReplica(dict(initial), 0).synced(chain, SHAPES, "base", 3, "0" * 32)


def test_a_step_published_ahead_is_not_published_again_and_only_once() -> None:
    start = {"w": np.zeros(50, np.float32)}
    target = {"w": np.linspace(-1.0, 1.0, 50, dtype=np.float32)}
    ahead = ServerReplica(start, parse_codec("topk:0.2+q8"), "f" * 64)
    plain = ServerReplica(start, parse_codec("topk:0.2+q8"), "f" * 64)
    ahead.publish_ahead(target)  # the evaluation's early step
    ahead.publish_once(target)  # the next round: nothing more
    plain.publish_once(target)
    assert (ahead.version, ahead.digest) == (plain.version, plain.digest) == (1, plain.digest)
    ahead.publish_once(target)  # the round after: a lossy replica refines again, as without the early step
    plain.publish_once(target)
    assert (ahead.version, ahead.digest) == (plain.version, plain.digest) == (2, plain.digest)
    ahead.publish_ahead(target)
    moved = {"w": target["w"] + 0.5}
    ahead.publish_once(moved)  # the state moved since the early step: it is published as usual
    assert ahead.version == 4
