"""Personal fast tensors: they train on their client, stay in its context and never appear in a message."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedslim.channel.protocol import (
    BASE_META_KEY,
    PERSONAL_META_KEY,
    PERSONAL_STATE_KEY,
    UPDATE_KEY,
    instruction_sync,
)
from fedslim.client.app import app as client_app
from fedslim.client.app import fast_model, keep_personal, load_personal
from fedslim.codecs.pipeline import decode_update
from fedslim.config import ConfigError, FastSpec, RunConfig
from fedslim.server.loop import run_federation
from fedslim.simulation.inline import InlineGrid
from fedslim.task import prepared_base


@pytest.fixture
def personal_config(small_config: RunConfig) -> RunConfig:
    return replace(
        small_config,
        rounds=3,
        lr=0.01,
        fast=FastSpec("lora", rank=2, personal="head"),
        codec="topk:0.5+q8",
        downstream_codec="q8",
        client_holdout=0.25,
    )


def test_the_head_is_personal_and_the_rest_of_the_fast_layer_is_shared(personal_config: RunConfig) -> None:
    base = prepared_base(personal_config)
    model = base.build(personal_config.fast)
    everything = base.build(replace(personal_config.fast, personal="none"))
    assert model.personal_names and set(model.personal_names) < set(everything.fast_names)
    assert sorted(model.fast_names + model.personal_names) == everything.fast_names
    assert model.num_fast_parameters() < everything.num_fast_parameters()
    trained = {name for name, p in model.module.named_parameters() if p.requires_grad}
    assert trained == set(model.fast_names) | set(model.personal_names)
    assert len(model.fast_parameters()) == len(trained) and len(model.shared_parameters()) == len(model.fast_names)


def test_personal_tensors_train_on_their_client_and_never_travel(personal_config: RunConfig) -> None:
    messages: list[tuple[Message, Message]] = []

    def recording(message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        messages.append((message, reply))
        return reply

    grid = InlineGrid(recording, personal_config.num_clients)  # type: ignore[arg-type]
    result = run_federation(grid, personal_config)  # type: ignore[arg-type]
    assert [r.accepted for r in result.rounds] == [0, 2, 2, 2]
    assert all(r.client_accuracy is not None for r in result.rounds)

    base = prepared_base(personal_config)
    model = base.build(personal_config.fast)
    shared, personal = model.fast_shapes(), model.personal_shapes()
    trains = [(m, r) for m, r in messages if m.metadata.message_type == "train"]
    assert trains and all(not reply.has_error() for _, reply in trains)
    for instruction, reply in trains:
        # Every blob either way decodes against the shared tensors alone: a head tensor in one would be refused.
        for blob in instruction_sync(instruction.content):
            decode_update(blob, shared)
        update = decode_update(reply.content.config_records["delta"][UPDATE_KEY], shared)  # type: ignore[arg-type]
        assert set(update.tensors) == set(shared) and not set(update.tensors) & set(personal)
        for content in (instruction.content, reply.content):
            assert not content.array_records

    initial_head = model.personal_state()
    trained_nodes = {m.metadata.dst_node_id for m, _ in trains}
    heads = {}
    for node, context in grid.contexts.items():
        if node not in trained_nodes:
            assert PERSONAL_STATE_KEY not in context.state.array_records
            continue
        held = {name: array.numpy() for name, array in context.state.array_records[PERSONAL_STATE_KEY].items()}
        assert sorted(held) == model.personal_names
        assert any(not np.array_equal(held[name], initial_head[name]) for name in held)
        heads[node] = held
    first, second = list(heads.values())[:2]
    assert any(not np.array_equal(first[name], second[name]) for name in first)  # each client its own head


def test_a_node_of_a_shared_process_model_gets_its_own_head_or_the_bases(personal_config: RunConfig) -> None:
    base = prepared_base(personal_config)
    model = fast_model(base, personal_config.fast, "cpu")  # one per process, shared by the nodes it hosts
    initial = base.build(personal_config.fast).personal_state()
    mine = {name: value + 1.0 for name, value in initial.items()}

    holder, newcomer, elsewhere = (
        Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in (1, 2, 3)
    )
    model.load_personal_state(mine)
    keep_personal(model, holder, base)
    load_personal(model, newcomer, base, personal_config.fast)
    assert all(np.array_equal(model.personal_state()[n], initial[n]) for n in initial)
    load_personal(model, holder, base, personal_config.fast)
    assert all(np.array_equal(model.personal_state()[n], mine[n]) for n in mine)

    # A head kept on another base is not this one's: the node starts again from the base's.
    elsewhere.state[PERSONAL_STATE_KEY] = ArrayRecord({n: Array(v) for n, v in mine.items()})
    elsewhere.state[PERSONAL_META_KEY] = ConfigRecord({BASE_META_KEY: "another-base"})
    load_personal(model, elsewhere, base, personal_config.fast)
    assert all(np.array_equal(model.personal_state()[n], initial[n]) for n in initial)


def test_personal_settings_that_cannot_work_are_refused(small_config: RunConfig) -> None:
    with pytest.raises(ConfigError, match="leaves nothing to share"):
        FastSpec("head", personal="head")
    with pytest.raises(ConfigError, match="unknown personal tensors 'adapter'"):
        FastSpec("lora", personal="adapter")
    with pytest.raises(ConfigError, match="--personal with --strategy fedamd"):
        replace(small_config, fast=FastSpec("lora", personal="head"), strategy="fedamd")
    flat = replace(small_config, fast=FastSpec("lora", personal="head")).client_task()
    assert flat["personal"] == "head" and RunConfig.from_flat(flat).fast.personal == "head"
