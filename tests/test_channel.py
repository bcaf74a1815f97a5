"""The channel's server end: a reply is taken only as the answer to an instruction, and roles are what was asked."""

from __future__ import annotations

import numpy as np
from flwr.app import Message, RecordDict

from fedslim.channel.protocol import TRAIN_TYPE, Role, update_content
from fedslim.channel.updates import Instruction
from fedslim.channel.uplink import SizeScreen, UplinkReceiver
from fedslim.codecs import decode_budget, encode_update, parse_codec
from fedslim.codecs.pipeline import DELTA

SHAPES = {"w": (2,)}


def _reply(node: int, values: list[float], metrics: dict[str, int] | None = None) -> Message:
    blob = encode_update(
        {"w": np.array(values, np.float32)}, parse_codec("none"), kind=DELTA, base_fingerprint="base", state_version=3
    ).blob
    content = update_content(blob, {"num-examples": 10, **(metrics or {})})
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=TRAIN_TYPE))


def _receiver(factor: float = 10.0) -> UplinkReceiver:
    return UplinkReceiver(SHAPES, "base", SizeScreen(factor), lambda examples: 1)


def test_only_replies_to_this_rounds_instructions_are_taken() -> None:
    asked = {1: Instruction("a"), 2: Instruction("b")}
    replies = [_reply(1, [1, 0]), _reply(9, [1, 0]), _reply(1, [5, 5]), _reply(2, [0, 1])]
    assert [r.metadata.src_node_id for r in replies] == [1, 9, 1, 2]
    received = _receiver().receive(replies, asked, state_version=3)
    assert [r.update.client if r.update else None for r in received] == ["a", None, None, "b"]
    assert received[1].reason == "unexpected reply: not asked for in this round"
    assert received[2].reason == "unexpected reply: a second reply in this round"
    np.testing.assert_array_equal(received[0].update.delta["w"], [1, 0])  # the first reply, not the second


def test_the_role_is_the_one_asked_for_and_decides_the_screen() -> None:
    asked = {node: Instruction(f"c{node}") for node in range(1, 6)}
    asked[5] = Instruction("c5", Role.ANCHOR)
    # Node 4 claims to be an anchor (it was asked to train) and sends a huge update: it is screened.
    replies = [_reply(n, [1, 0]) for n in (1, 2, 3)]
    replies += [_reply(4, [1e4, 0], {"anchor": 1}), _reply(5, [1e4, 0])]
    received = _receiver().receive(replies, asked, state_version=3)
    assert received[3].update is None and received[3].reason.startswith("update too large")
    # Node 5 was asked for an anchor gradient: not a local run, not screened; its update carries the asked role.
    assert received[4].update is not None and received[4].update.role == Role.ANCHOR
    assert [r.update.role for r in received[:3]] == [Role.TRAIN] * 3


def test_the_screen_has_a_reference_from_the_first_round_candidates() -> None:
    asked = {node: Instruction(f"c{node}") for node in range(1, 5)}
    replies = [_reply(n, [1, 0]) for n in (1, 2, 3)] + [_reply(4, [0, 1e4])]
    received = _receiver().receive(replies, asked, state_version=3)
    assert [r.reason is None for r in received] == [True, True, True, False]


def test_a_reply_beyond_the_runs_decode_budget_is_rejected_before_it_is_decoded() -> None:
    shapes = {"m": (40, 30)}
    tensors = {"m": np.random.default_rng(3).standard_normal((40, 30)).astype(np.float32)}
    run_codec = parse_codec("powersgd:2")
    receiver = UplinkReceiver(
        shapes, "base", SizeScreen(0.0), lambda examples: 1, budget=decode_budget(run_codec, shapes)
    )
    replies = []
    for node, pipeline in ((1, run_codec), (2, parse_codec("powersgd:8+fp16"))):
        blob = encode_update(tensors, pipeline, kind=DELTA, base_fingerprint="base", state_version=3).blob
        replies.append(
            Message(
                update_content(blob, {"num-examples": 10}),
                reply_to=Message(RecordDict(), dst_node_id=node, message_type=TRAIN_TYPE),
            )
        )
    fits, beyond = receiver.receive(replies, {1: Instruction("a"), 2: Instruction("b")}, state_version=3)
    assert fits.reason is None and fits.update is not None
    assert beyond.update is None and beyond.reason == (
        "malformed update: tensor 'm' comes as rank-8 factors; codec powersgd:2 sends rank 2 at most"
    )
