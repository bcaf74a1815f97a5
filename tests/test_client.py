"""The client: base fingerprint checks, and what actually crosses the wire in both directions."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedslim.base import save_base
from fedslim.channel.accounting import message_bytes
from fedslim.channel.downlink import Downlink, ServerReplica
from fedslim.channel.protocol import (
    BASE_FINGERPRINT_KEY,
    CONFIG_KEY,
    DIRECTION_KEY,
    REPLICA_DIGEST_KEY,
    REPLICA_META_KEY,
    REPLICA_STATE_KEY,
    REPLICA_VERSION_KEY,
    RESIDUAL_META_KEY,
    RESIDUAL_STATE_KEY,
    ROLE_KEY,
    SERVER_ROUND_KEY,
    SYNC_KEY,
    TASK_DIGEST_KEY,
    RefusalCode,
    instruction_content,
    instruction_sync,
    update_blob,
    update_claims,
    update_content,
)
from fedslim.channel.updates import Instruction
from fedslim.channel.uplink import UpdateCheck, check_update, update_size
from fedslim.client.app import train
from fedslim.codecs import decode_update, encode_update, parse_codec
from fedslim.codecs.pipeline import DELTA, STATE
from fedslim.config import RunConfig
from fedslim.data.datasets import load_federation
from fedslim.models import SyntheticMLP
from fedslim.task import prepared_base
from fedslim.training import full_gradient


def _train_request(
    config: RunConfig,
    fast: dict[str, np.ndarray],
    fingerprint: str,
    replica: ServerReplica | None = None,
    held: int | None = None,
) -> Message:
    """A train instruction as the server's downlink builds it, for a client holding replica ``held`` (None: none)."""
    replica = replica or ServerReplica(fast, parse_codec("none"), fingerprint)
    downlink = Downlink(replica, {**config.client_task(), BASE_FINGERPRINT_KEY: fingerprint})
    (message,) = downlink.train_messages(
        1, [Instruction("partition-0")], {"partition-0": 11}, {"partition-0": held}, set()
    )
    return message


def _with_sync(request: Message, blobs: list[bytes]) -> Message:
    """The same instruction carrying another replica sync."""
    config = {k: v for k, v in request.content.config_records[CONFIG_KEY].items() if k != SYNC_KEY}
    content = instruction_content(config, blobs)
    return Message(content, dst_node_id=request.metadata.dst_node_id, message_type=request.metadata.message_type)


def _context(**node_config: object) -> Context:
    return Context(run_id=1, node_id=11, node_config=dict(node_config), state=RecordDict(), run_config={})


def _wire_blob(message: Message) -> bytes:
    return b"".join(obj.deflate() for obj in get_all_nested_objects(message).values())


@pytest.fixture
def resident(small_config: RunConfig):
    base = prepared_base(small_config)
    return base, base.build(small_config.fast)


def test_training_reply_carries_only_the_fast_delta(small_config: RunConfig, resident) -> None:
    base, model = resident
    request = _train_request(small_config, model.fast_state(), base.fingerprint)
    reply = train(request, _context(**{"partition-id": 1}))

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    fast_names = set(model.fast_names)
    (sync,) = [decode_update(blob, model.fast_shapes()) for blob in _blobs(request)]
    assert sync.kind == STATE and set(sync.tensors) == fast_names
    update, reason = check_update(reply, UpdateCheck(model.fast_shapes(), base.fingerprint, 0))
    assert reason is None and update is not None and set(update.tensors) == fast_names
    assert update_claims(reply.content)["num-examples"] > 0
    # One record per message: the message, its record dict and that record are all of its Flower objects.
    assert [len(get_all_nested_objects(m)) for m in (request, reply)] == [3, 3]
    # No slow tensor appears anywhere in the serialised messages, in either direction.
    # (In LoRA mode the head is fast: its pretrained values are its initial fast state.)
    slow = {name: tensor for name, tensor in base.state.items() if name not in fast_names}
    assert slow
    for message, direction in ((request, "down"), (reply, "up")):
        blob = _wire_blob(message)
        for name, tensor in slow.items():
            assert tensor.numpy().tobytes()[:64] not in blob, f"slow tensor {name} was sent"
        assert message_bytes(message, direction) < 0.2 * ArrayRecord(base.state).count_bytes()


def test_mismatched_base_is_refused(small_config: RunConfig, resident, tmp_path: Path) -> None:
    base, model = resident
    torch.manual_seed(123)
    other = tmp_path / "other-base.pt"
    save_base(SyntheticMLP(), other, {})
    request = _train_request(small_config, model.fast_state(), base.fingerprint)
    reply = train(request, _context(**{"partition-id": 0, "base-path": str(other)}))
    assert reply.has_error()
    assert reply.error.code == RefusalCode.BASE_MISMATCH
    assert "fingerprint mismatch" in reply.error.reason
    update, reason = check_update(reply, UpdateCheck(model.fast_shapes(), base.fingerprint, 0))
    assert update is None and reason is not None and reason.startswith("client error 1001")


def test_missing_base_is_refused(small_config: RunConfig, resident, tmp_path: Path) -> None:
    base, model = resident
    request = _train_request(small_config, model.fast_state(), base.fingerprint)
    reply = train(request, _context(**{"partition-id": 0, "base-path": str(tmp_path / "absent.pt")}))
    assert reply.has_error() and reply.error.code == RefusalCode.BASE_MISSING


def _blobs(message: Message) -> list[bytes]:
    return instruction_sync(message.content)


def test_bad_fast_state_from_server_is_refused(small_config: RunConfig, resident) -> None:
    base, model = resident
    fast = model.fast_state()
    fast[model.fast_names[0]] = np.zeros(3, np.float32)
    reply = train(_train_request(small_config, fast, base.fingerprint), _context(**{"partition-id": 0}))
    assert reply.has_error() and reply.error.code == RefusalCode.BAD_REQUEST
    assert "shape" in reply.error.reason


def test_client_that_cannot_reach_the_servers_version_refuses_and_forgets_its_replica(
    small_config: RunConfig, resident
) -> None:
    base, model = resident
    fast = model.fast_state()
    replica = ServerReplica(fast, parse_codec("topk:0.5"), base.fingerprint)
    for step in (1.0, 2.0):
        replica.publish({n: v + step for n, v in fast.items()})
    request = _train_request(small_config, fast, base.fingerprint, replica)
    # Only the last step: a client at version 0 cannot apply a step that starts at version 1.
    request = _with_sync(request, replica.sync_for(1))
    context = _context(**{"partition-id": 0})
    reply = train(request, context)
    assert reply.has_error() and reply.error.code == RefusalCode.REPLICA_MISMATCH
    assert "version 0" in reply.error.reason
    assert REPLICA_STATE_KEY not in context.state
    # The full state (what the server sends a client it marked unknown) brings it back.
    reply = train(_with_sync(request, replica.sync_for(None)), context)
    assert not reply.has_error()
    assert context.state.config_records[REPLICA_META_KEY]["version"] == 2


def _update(blob: bytes, claims: dict[str, int | float]) -> Message:
    content = update_content(blob, claims)
    return Message(content=content, dst_node_id=0, message_type="train")


def _blob(w: np.ndarray, *, kind: int = DELTA, fingerprint: str = "base", version: int = 3) -> bytes:
    return encode_update(
        {"w": w}, parse_codec("none"), kind=kind, base_fingerprint=fingerprint, state_version=version
    ).blob


@pytest.mark.parametrize(
    ("blob", "metrics", "reason"),
    [
        (_blob(np.zeros(3, np.float32)), {"num-examples": 3}, "shape"),
        (_blob(np.zeros(2, np.float32)), {"train-loss": 1.0}, "num-examples"),
        (_blob(np.zeros(2, np.float32)), {"num-examples": 0}, "num-examples must be in [1, "),
        (_blob(np.zeros(2, np.float32), kind=STATE), {"num-examples": 3}, "not a delta"),
        (_blob(np.zeros(2, np.float32), fingerprint="other"), {"num-examples": 3}, "wrong base fingerprint"),
        (_blob(np.zeros(2, np.float32), version=2), {"num-examples": 3}, "stale update"),
        (b"\x0a\xff", {"num-examples": 3}, "corrupt"),
    ],
)
def test_server_rejects_malformed_updates(blob: bytes, metrics, reason: str) -> None:
    _, found = check_update(_update(blob, metrics), UpdateCheck({"w": (2,)}, "base", 3))
    assert found is not None and reason in found


def test_update_size_is_the_norm_per_root_local_step() -> None:
    config = RunConfig(local_epochs=2, batch_size=10)
    delta = np.array([3.0, 4.0], np.float32)  # L2 norm 5
    update, _ = check_update(_update(_blob(delta), {"num-examples": 25}), UpdateCheck({"w": (2,)}, "base", 3))
    assert update is not None
    assert update_size(update, 25, config.local_step_count) == pytest.approx(5.0 / 6**0.5)  # 2 epochs x 3 batches
    assert update_size(update, 25, RunConfig(local_steps=5).local_step_count) == pytest.approx(5.0 / 5**0.5)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (RecordDict({"delta": ConfigRecord({"update": [0.0, 0.0], "num-examples": 3})}), "delta.update must be bytes"),
        (RecordDict({"delta": ArrayRecord({"update": Array(np.zeros(2, np.float32))})}), "malformed update"),
        (RecordDict({"update": ConfigRecord({"update": b"", "num-examples": 3})}), "malformed update"),
    ],
)
def test_server_rejects_an_update_that_is_not_a_blob_in_delta(content: RecordDict, reason: str) -> None:
    reply = Message(content, dst_node_id=0, message_type="train")
    update, found = check_update(reply, UpdateCheck({"w": (2,)}, "b", 0))
    assert update is None and found is not None and reason in found
    assert update_blob(update_content(b"abc", {"num-examples": 1})) == b"abc"


def test_error_feedback_residual_lives_in_the_node_context(small_config: RunConfig, resident) -> None:
    base, model = resident
    request = _train_request(replace(small_config, codec="topk:0.1+q4"), model.fast_state(), base.fingerprint)
    context = _context(**{"partition-id": 0})
    reply = train(request, context)
    assert not reply.has_error()
    residual = {n: a.numpy() for n, a in context.state.array_records[RESIDUAL_STATE_KEY].items()}
    update, _ = check_update(reply, UpdateCheck(model.fast_shapes(), base.fingerprint, 0))
    assert update is not None and set(residual) == set(update.tensors)
    delta = update.tensors
    # What was sent plus what was kept back is the whole local update (this was the first round).
    sent_share = sum(np.count_nonzero(d) for d in delta.values()) / sum(d.size for d in delta.values())
    assert 0.05 < sent_share <= 0.11
    assert context.state.config_records[RESIDUAL_META_KEY]["version"] == 0

    plain = _context(**{"partition-id": 0})
    unbiased = replace(small_config, codec="topk:0.1+q4", error_feedback=False)
    assert not train(_train_request(unbiased, model.fast_state(), base.fingerprint), plain).has_error()
    assert RESIDUAL_STATE_KEY not in plain.state


def test_a_diverged_local_update_is_refused_not_sent(
    small_config: RunConfig, resident, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, model = resident

    def diverge(module: torch.nn.Module, data, objective, optimizer: torch.optim.Optimizer, *args) -> float:
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                parameter.data.fill_(float("nan"))
        return float("nan")

    monkeypatch.setattr("fedslim.client.app.train_epochs", diverge)
    reply = train(_train_request(small_config, model.fast_state(), base.fingerprint), _context(**{"partition-id": 0}))
    assert reply.has_error() and reply.error.code == RefusalCode.NON_FINITE_UPDATE
    assert "non-finite" in reply.error.reason


@pytest.mark.parametrize(
    ("role", "direction", "reason"),
    [
        ("boss", None, "unknown role 'boss'"),
        ("miner", None, "miner instruction without a valid direction"),
        ("miner", b"\x00garbage", "miner instruction without a valid direction"),
    ],
)
def test_bad_fedamd_instructions_are_refused(
    small_config: RunConfig, resident, role: str, direction: bytes | None, reason: str
) -> None:
    base, model = resident
    request = _train_request(small_config, model.fast_state(), base.fingerprint)
    request.content.config_records[CONFIG_KEY][ROLE_KEY] = role
    if direction is not None:
        request.content.config_records[CONFIG_KEY][DIRECTION_KEY] = direction
    reply = train(request, _context(**{"partition-id": 0}))
    assert reply.has_error() and reply.error.code == RefusalCode.BAD_REQUEST and reason in reply.error.reason


def test_anchor_sends_its_full_local_gradient(small_config: RunConfig, resident) -> None:
    base, model = resident
    request = _train_request(small_config, model.fast_state(), base.fingerprint)
    request.content.config_records[CONFIG_KEY][ROLE_KEY] = "anchor"
    reply = train(request, _context(**{"partition-id": 1}))
    assert update_claims(reply.content)["anchor"] == 1
    sent = decode_update(update_blob(reply.content), model.fast_shapes()).tensors

    model.load_fast_state(model.fast_state())
    expected, _ = full_gradient(
        model.module, model.fast_parameters(), load_federation(small_config).clients[1], base.task
    )
    for name, gradient in zip(model.fast_state(), expected):
        np.testing.assert_allclose(sent[name], gradient, rtol=1e-5, atol=1e-7)


def _replica_one_step_on(base, model) -> tuple[dict[str, np.ndarray], ServerReplica]:
    """The initial fast state and a replica one (dense) step past it: version 1."""
    fast = model.fast_state()
    replica = ServerReplica(fast, parse_codec("none"), base.fingerprint)
    replica.publish({n: v + 1.0 for n, v in fast.items()})
    return fast, replica


def test_the_static_task_is_sent_once_and_remembered(small_config: RunConfig, resident) -> None:
    base, model = resident
    fast, replica = _replica_one_step_on(base, model)
    first = _train_request(small_config, fast, base.fingerprint, replica, held=0)
    later = _train_request(small_config, fast, base.fingerprint, replica, held=1)
    task = {**small_config.client_task(), BASE_FINGERPRINT_KEY: base.fingerprint}
    assert set(task) <= set(first.content.config_records[CONFIG_KEY])
    assert set(later.content.config_records[CONFIG_KEY]) == {
        TASK_DIGEST_KEY,
        SERVER_ROUND_KEY,
        REPLICA_VERSION_KEY,
        REPLICA_DIGEST_KEY,
        SYNC_KEY,
    }
    assert message_bytes(first, "down") - message_bytes(later, "down") > 200

    context = _context(**{"partition-id": 0})
    assert not train(first, context).has_error()
    reply = train(later, context)  # the task comes from what the node remembered
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert context.state.config_records[REPLICA_META_KEY]["version"] == 1


def test_a_node_without_the_task_refuses_and_the_server_sends_it_again(small_config: RunConfig, resident) -> None:
    base, model = resident
    fast, replica = _replica_one_step_on(base, model)
    digest_only = _train_request(small_config, fast, base.fingerprint, replica, held=1)
    reply = train(digest_only, _context(**{"partition-id": 0}))  # a node that lost its context
    assert reply.has_error() and reply.error.code == RefusalCode.TASK_UNKNOWN
    assert "holds no run task" in reply.error.reason
    # The server marks such a client unknown (as for a replica mismatch): it gets the task and the state again.
    again = _train_request(small_config, fast, base.fingerprint, replica, held=None)
    assert not train(again, _context(**{"partition-id": 0})).has_error()

    context = _context(**{"partition-id": 0})
    assert not train(_train_request(small_config, fast, base.fingerprint, replica), context).has_error()
    other = Downlink(replica, {**replace(small_config, lr=0.5).client_task(), BASE_FINGERPRINT_KEY: base.fingerprint})
    (changed,) = other.train_messages(1, [Instruction("partition-0")], {"partition-0": 11}, {"partition-0": 1}, set())
    reply = train(changed, context)  # a digest the node does not hold is never trained under the old task
    assert reply.has_error() and reply.error.code == RefusalCode.TASK_UNKNOWN
