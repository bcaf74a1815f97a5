"""The client: base fingerprint checks, and what actually crosses the wire in both directions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import ListGrid
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedslim.base import ensure_pretrained_base, load_base, save_base
from fedslim.client.app import BAD_REQUEST, BASE_MISMATCH, BASE_MISSING, train
from fedslim.codec import DenseCodec
from fedslim.commlog import message_bytes
from fedslim.config import RunConfig
from fedslim.models import SyntheticMLP
from fedslim.server.loop import check_update
from fedslim.strategies.fedavg import FastFedAvg


def _train_request(config: RunConfig, fast: dict[str, np.ndarray], fingerprint: str) -> Message:
    task = ConfigRecord({**config.client_task(), "base-fingerprint": fingerprint})
    strategy = FastFedAvg(fraction_train=1.0)
    (message,) = strategy.configure_train(1, DenseCodec().encode(fast), task, ListGrid([11]))
    return message


def _context(**node_config: object) -> Context:
    return Context(run_id=1, node_id=11, node_config=dict(node_config), state=RecordDict(), run_config={})


def _wire_blob(message: Message) -> bytes:
    return b"".join(obj.deflate() for obj in get_all_nested_objects(message).values())


@pytest.fixture
def resident(small_config: RunConfig):
    base = load_base(ensure_pretrained_base(small_config), small_config.dataset)
    return base, base.build(small_config.fast)


def test_training_reply_carries_only_the_fast_delta(small_config: RunConfig, resident) -> None:
    base, model = resident
    request = _train_request(small_config, model.fast_state(), base.fingerprint)
    reply = train(request, _context(**{"partition-id": 1}))

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    fast_names = set(model.fast_names)
    assert set(request.content["fast"].keys()) == fast_names
    assert set(reply.content["delta"].keys()) == fast_names
    assert reply.content["metrics"]["num-examples"] > 0
    assert check_update(reply, model.fast_shapes(), DenseCodec()) is None
    # No slow tensor appears anywhere in the serialised messages, in either direction.
    # (In LoRA mode the head is fast: its pretrained values are its initial fast state.)
    slow = {name: tensor for name, tensor in base.state.items() if name not in fast_names}
    assert slow
    for message in (request, reply):
        blob = _wire_blob(message)
        for name, tensor in slow.items():
            assert tensor.numpy().tobytes()[:64] not in blob, f"slow tensor {name} was sent"
        assert message_bytes(message) < 0.2 * ArrayRecord(base.state).count_bytes()


def test_mismatched_base_is_refused(small_config: RunConfig, resident, tmp_path: Path) -> None:
    base, model = resident
    torch.manual_seed(123)
    other = tmp_path / "other-base.pt"
    save_base(SyntheticMLP(), other, {})
    request = _train_request(small_config, model.fast_state(), base.fingerprint)
    reply = train(request, _context(**{"partition-id": 0, "base-path": str(other)}))
    assert reply.has_error()
    assert reply.error.code == BASE_MISMATCH
    assert "fingerprint mismatch" in reply.error.reason
    assert check_update(reply, model.fast_shapes(), DenseCodec()).startswith("client error 1001")


def test_missing_base_is_refused(small_config: RunConfig, resident, tmp_path: Path) -> None:
    base, model = resident
    request = _train_request(small_config, model.fast_state(), base.fingerprint)
    reply = train(request, _context(**{"partition-id": 0, "base-path": str(tmp_path / "absent.pt")}))
    assert reply.has_error() and reply.error.code == BASE_MISSING


def test_bad_fast_state_from_server_is_refused(small_config: RunConfig, resident) -> None:
    base, model = resident
    fast = model.fast_state()
    fast[model.fast_names[0]] = np.zeros(3, np.float32)
    reply = train(_train_request(small_config, fast, base.fingerprint), _context(**{"partition-id": 0}))
    assert reply.has_error() and reply.error.code == BAD_REQUEST
    assert "shape" in reply.error.reason


def _update(delta: dict[str, np.ndarray], metrics: dict[str, object]) -> Message:
    content = RecordDict(
        {"delta": ArrayRecord({k: Array(v) for k, v in delta.items()}), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, dst_node_id=0, message_type="train")


@pytest.mark.parametrize(
    ("delta", "metrics", "reason"),
    [
        ({"w": np.full(2, np.nan, np.float32)}, {"num-examples": 3}, "NaN"),
        ({"w": np.zeros(3, np.float32)}, {"num-examples": 3}, "shape"),
        ({"v": np.zeros(2, np.float32)}, {"num-examples": 3}, "missing"),
        ({"w": np.zeros(2, np.float64)}, {"num-examples": 3}, "dtype"),
        ({"w": np.zeros(2, np.float32)}, {"train-loss": 1.0}, "num-examples"),
        ({"w": np.zeros(2, np.float32)}, {"num-examples": 0}, "positive"),
    ],
)
def test_server_rejects_malformed_updates(delta, metrics, reason: str) -> None:
    found = check_update(_update(delta, metrics), {"w": (2,)}, DenseCodec())
    assert found is not None and reason in found
