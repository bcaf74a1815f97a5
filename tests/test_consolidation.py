"""Slow consolidation: the fast layer merged into the base every K rounds, the same base on every machine."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message
from rich.console import Console

from fedslim import consolidation
from fedslim.adapters import LoRADelta, SparseDelta
from fedslim.base import ResidentBase
from fedslim.channel.downlink import ServerReplica
from fedslim.channel.protocol import (
    BASE_CHAIN_KEY,
    BASE_META_KEY,
    CHAIN_STATE_KEY,
    CONFIG_KEY,
    MERGES_KEY,
    PERSONAL_META_KEY,
    PERSONAL_STATE_KEY,
    RefusalCode,
    instruction_merges,
    instruction_sync,
)
from fedslim.channel.uplink import UplinkEncoder
from fedslim.client.app import app as client_app
from fedslim.codecs.pipeline import parse_codec
from fedslim.config import ConfigError, FastSpec, RunConfig
from fedslim.consolidation import (
    BaseChain,
    Merge,
    advance,
    header,
    keep_merged,
    merged_base_path,
    merged_weight,
    replayed_base,
)
from fedslim.logs.reader import RunLog
from fedslim.logs.views import UNBOUNDED, kib, summary_table
from fedslim.server.checkpoint import load_checkpoint
from fedslim.server.loop import run_federation
from fedslim.simulation.inline import FIRST_NODE_ID, InlineGrid
from fedslim.strategies.fedavg import FastFedAvg
from fedslim.strategies.mifa import MIFA
from fedslim.strategies.robust import RobustStrategy
from fedslim.task import prepared_base

Exchange = tuple[Message, Message, Context]


@pytest.fixture
def merging_config(small_config: RunConfig) -> RunConfig:
    return replace(
        small_config,
        num_clients=6,
        rounds=6,
        fraction=0.5,
        consolidate_every=2,
        codec="topk:0.3+q8",
        downstream_codec="topk:0.5+q8",
        final_sync=True,
    )


def recording_grid(
    config: RunConfig, before: Callable[[Message, Context], None] | None = None
) -> tuple[InlineGrid, list[Exchange]]:
    """An inline grid whose every exchange is kept (``before`` may change a node's context first)."""
    exchanges: list[Exchange] = []

    def recording(message: Message, context: Context) -> Message:
        if before is not None:
            before(message, context)
        reply = client_app(message, context)
        exchanges.append((message, reply, context))
        return reply

    return InlineGrid(recording, config.num_clients), exchanges  # type: ignore[arg-type]


def server_chain(config: RunConfig) -> BaseChain:
    """The server's base after the run, rebuilt from the merges its checkpoint kept."""
    return BaseChain.replayed(prepared_base(config), config.fast, list(load_checkpoint(Path(config.out)).merges))


def node_base(context: Context, config: RunConfig) -> ResidentBase:
    """The base a node's kept merges make of the resident checkpoint."""
    base = prepared_base(config)
    kept = context.state.config_records[CHAIN_STATE_KEY]
    assert kept[BASE_META_KEY] == base.fingerprint
    for blob in kept[MERGES_KEY]:  # type: ignore[union-attr]
        base = advance(base, config.fast, blob)  # type: ignore[arg-type]
    return base


def assert_same_base(a: ResidentBase, b: ResidentBase) -> None:
    assert a.fingerprint == b.fingerprint and a.generation == b.generation
    assert a.state.keys() == b.state.keys()
    assert all(torch.equal(a.state[name], b.state[name]) for name in a.state)


def round_of(message: Message) -> int:
    """The round of an instruction (-1: a message of no round, such as the identity query)."""
    return int(message.content.config_records[CONFIG_KEY].get("server-round", -1))  # type: ignore[union-attr,arg-type]


# ------------------------------------------------------------------------------------------------ the merge itself


def test_a_lora_merge_adds_the_scaled_product_one_rank_one_term_at_a_time() -> None:
    delta = LoRADelta(torch.Size([2, 3]), rank=2, lora_alpha=4.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        delta.lora_A.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]))
        delta.lora_B.copy_(torch.tensor([[1.0, -2.0], [0.0, 0.25]]))
    weight = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], np.float32)
    # (alpha / r) B A = 2 * [[1 - 1, 0 - 4, -1 + 0], [0 + 0.125, 0 + 0.5, 0]]
    expected = weight + np.array([[0.0, -8.0, -2.0], [0.25, 1.0, 0.0]], np.float32)
    np.testing.assert_array_equal(merged_weight(weight, delta), expected)


def test_a_sparse_merge_adds_the_values_at_their_positions() -> None:
    delta = SparseDelta(torch.Size([2, 2]), density=0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        delta.values.copy_(torch.tensor([3.0, -1.0]))
    positions = delta.get_buffer("indices").tolist()
    weight = np.ones((2, 2), np.float32)
    expected = np.ones(4, np.float32)
    expected[positions] += [3.0, -1.0]
    np.testing.assert_array_equal(merged_weight(weight, delta), expected.reshape(2, 2))


@pytest.mark.parametrize("kind", ["lora", "ffa-lora", "sparse"])
def test_a_merge_keeps_the_model_and_starts_a_fresh_fast_layer(small_config: RunConfig, kind: str) -> None:
    spec = FastSpec(kind, rank=2, density=0.1)
    config = replace(small_config, fast=spec)
    root = prepared_base(config)
    model = root.build(spec)
    rng = np.random.default_rng(0)
    trained = {name: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32) for name, v in model.fast_state().items()}
    model.load_fast_state(trained)
    chain = BaseChain(root, spec)
    merged = chain.consolidate(4, trained, 9, parse_codec("lzma"))
    fresh = merged.build(spec)

    test = root.task.test_data(config)
    before, after = root.task.evaluate(model.module, test), root.task.evaluate(fresh.module, test)
    assert after.accuracy == before.accuracy and after.loss == pytest.approx(before.loss, rel=1e-5)
    assert merged.generation == 1 and merged.root_fingerprint == root.fingerprint != merged.fingerprint
    assert merged.fingerprint == Merge(root.fingerprint, 4, 9, trained).fingerprint
    assert fresh.base_fingerprint == merged.fingerprint
    initial = root.build(spec).fast_state()
    for name, value in fresh.fast_state().items():
        if name.endswith(("lora_B", "delta.values")):
            assert not value.any()  # B = 0 (and sparse values 0): the fresh layer adds nothing yet
        elif name.endswith("lora_A"):
            assert not np.array_equal(value, initial[name])  # A drawn anew for generation 1
        else:
            np.testing.assert_array_equal(value, trained[name])  # the head: now part of the base
    if kind == "sparse":
        old = dict(root.build(spec).module.named_buffers())
        new = dict(merged.build(spec).module.named_buffers())
        assert any(not torch.equal(old[n], new[n]) for n in old if n.endswith("indices"))
    # The same merge on the same base is the same object (nodes of a process share it); another round is another.
    assert advance(root, spec, chain.blobs[0]) is merged
    other = Merge(root.fingerprint, 5, 9, trained).encode(parse_codec("lzma"))
    assert advance(root, spec, other).fingerprint != merged.fingerprint


def test_the_merged_base_is_the_same_in_another_process(small_config: RunConfig, tmp_path: Path) -> None:
    root = prepared_base(small_config)
    model = root.build(small_config.fast)
    rng = np.random.default_rng(1)
    trained = {name: rng.normal(size=v.shape).astype(np.float32) for name, v in model.fast_state().items()}
    chain = BaseChain(root, small_config.fast)
    chain.consolidate(2, trained, 3, parse_codec("none"))
    (tmp_path / "merge.bin").write_bytes(chain.blobs[0])
    script = f"""
import hashlib, torch
from pathlib import Path
from fedslim.config import FastSpec, RunConfig
from fedslim.consolidation import advance
from fedslim.task import prepared_base
torch.set_num_threads(1)  # another thread count: BLAS blocking would differ, the elementwise merge does not
config = RunConfig(task="synthetic", num_clients=4, fast=FastSpec("lora", rank=2))
merged = advance(prepared_base(config), config.fast, Path({str(tmp_path / "merge.bin")!r}).read_bytes())
digest = hashlib.sha256()
for name in sorted(merged.state):
    digest.update(merged.state[name].numpy().tobytes())
print(merged.fingerprint, digest.hexdigest())
"""
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    fingerprint, tensors = output.stdout.split()
    here = chain.base
    digest = __import__("hashlib").sha256()
    for name in sorted(here.state):
        digest.update(here.state[name].numpy().tobytes())
    assert (fingerprint, tensors) == (here.fingerprint, digest.hexdigest())


def test_a_node_keeps_the_base_its_chain_made_and_a_new_process_loads_it_instead_of_replaying(
    small_config: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, spec = prepared_base(small_config), small_config.fast
    rng = np.random.default_rng(2)
    chain = BaseChain(root, spec)
    for server_round in (2, 4):
        trained = {
            name: rng.normal(size=v.shape).astype(np.float32) for name, v in root.build(spec).fast_state().items()
        }
        chain.consolidate(server_round, trained, server_round + 1, parse_codec("none"))
    blobs = tuple(chain.blobs)
    replayed_base.cache_clear()
    made = replayed_base(root, spec, blobs)
    assert_same_base(made, chain.base)
    kept = merged_base_path(root, chain.base.fingerprint)
    assert not kept.exists()  # kept only once the server has named it (the client checks the head first)
    keep_merged(root, made)
    assert kept.is_file()

    replayed: list[int] = []

    def counted(base: ResidentBase, spec: FastSpec, blob: bytes) -> ResidentBase:
        replayed.append(base.generation)
        return advance(base, spec, blob)

    monkeypatch.setattr(consolidation, "advance", counted)
    # A new process (nothing in memory): the kept base is loaded, no merge is replayed; the links are still checked.
    replayed_base.cache_clear()
    advance.cache_clear()
    loaded = replayed_base(root, spec, blobs)
    assert loaded is not made and replayed == []
    assert_same_base(loaded, chain.base)
    with pytest.raises(ValueError, match="the merge of round 4 was made on base"):
        replayed_base(root, spec, blobs[1:])
    # A kept base with one number changed is not used: it is removed, the chain replayed, and the base kept again.
    saved = torch.load(kept, weights_only=True)
    name = sorted(saved["state_dict"])[0]
    saved["state_dict"][name] = saved["state_dict"][name] + 1
    torch.save(saved, kept)
    replayed_base.cache_clear()
    again = replayed_base(root, spec, blobs)
    assert_same_base(again, chain.base)
    assert replayed == [0, 1] and not kept.exists()
    keep_merged(root, again)
    replayed_base.cache_clear()
    assert_same_base(replayed_base(root, spec, blobs), chain.base)
    assert replayed == [0, 1]  # the base kept again is loaded
    # A directory that cannot be written: nothing kept, nothing left behind, no error.
    first = advance(root, spec, blobs[0])

    def unwritable(*args: object, **kwargs: object) -> None:
        raise RuntimeError("File cannot be opened.")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", unwritable)
        keep_merged(root, first)
    assert sorted(p.name for p in root.path.parent.glob(f"{root.path.stem}.merged-*")) == [kept.name]
    assert not list(root.path.parent.glob(f".{root.path.stem}.merged-*"))
    # The newest two are kept per checkpoint.
    other = advance(root, spec, Merge(root.fingerprint, 7, 8, chain.merges[0].state).encode(parse_codec("none")))
    start = kept.stat().st_mtime
    for later, base in enumerate((first, other), start=1):
        keep_merged(root, base)
        os.utime(merged_base_path(root, base.fingerprint), (start + later, start + later))
    names = {p.name for p in root.path.parent.glob(f"{root.path.stem}.merged-*")}
    assert names == {merged_base_path(root, b.fingerprint).name for b in (first, other)}


def test_a_merge_kept_before_links_named_their_base_is_still_replayed(small_config: RunConfig) -> None:
    root, spec = prepared_base(small_config), small_config.fast
    state = {name: np.full(v.shape, 0.5, np.float32) for name, v in root.build(spec).fast_state().items()}
    merge = Merge(root.fingerprint, 2, 3, state)
    unnamed = header(merge.encode(parse_codec("none")))
    unnamed.ClearField("merged")
    blob = unnamed.SerializeToString()
    replayed_base.cache_clear()
    assert replayed_base(root, spec, (blob,)).fingerprint == merge.fingerprint == advance(root, spec, blob).fingerprint
    unnamed_steps = header(merge.encode(parse_codec("none"), [b""], origin=0))
    unnamed_steps.ClearField("merged")
    with pytest.raises(ValueError, match="without the base they make"):
        Merge.decode(unnamed_steps.SerializeToString(), root.build(spec).fast_shapes(), state)


def replica_steps(small_config: RunConfig, codec: str, rounds: int) -> tuple[ServerReplica, list[bytes], dict]:
    """A replica of the fresh fast layer moved ``rounds`` times towards random states under ``codec``."""
    root = prepared_base(small_config)
    start = root.build(small_config.fast).fast_state()
    replica = ServerReplica(start, parse_codec(codec), root.fingerprint)
    rng = np.random.default_rng(3)
    for _ in range(rounds):
        replica.publish({name: rng.normal(size=v.shape).astype(np.float32) for name, v in start.items()})
    steps = replica.steps_from_origin()
    assert steps is not None and len(steps) == rounds
    return replica, steps, start


def test_a_merge_travels_as_the_replica_steps_that_lead_to_it_when_they_cost_less(small_config: RunConfig) -> None:
    root, spec = prepared_base(small_config), small_config.fast
    replica, steps, start = replica_steps(small_config, "topk:0.2+q8", 3)
    merge = Merge(root.fingerprint, 3, replica.version + 1, replica.state)
    full, compact = merge.encode(parse_codec("none")), merge.encode(parse_codec("none"), steps, origin=0)
    assert len(compact) < len(full) and header(compact).steps == steps and not header(compact).state
    rebuilt = Merge.decode(compact, root.build(spec).fast_shapes(), start)
    assert rebuilt.fingerprint == merge.fingerprint == header(full).merged
    assert all(np.array_equal(rebuilt.state[name], replica.state[name]) for name in replica.state)  # bit for bit
    assert_same_base(advance(root, spec, compact), advance(root, spec, full))
    # Steps that cost more than the state: the merge travels as the state.
    as_state = merge.encode(parse_codec("none"), [bytes(len(full))], origin=0)
    assert as_state == full
    # Dense float32 steps each cost as much as the state: the replica prunes them, and the merge goes as the state.
    dense = ServerReplica(start, parse_codec("none"), root.fingerprint)
    for scale in (1.0, 2.0, 3.0):
        dense.publish({name: np.full(v.shape, scale, np.float32) for name, v in start.items()})
    assert dense.steps_from_origin() is None
    # Steps that do not lead to the state the merge names are refused.
    shapes = root.build(spec).fast_shapes()
    broken = {
        "does not belong to it": header(compact).__class__(**{**fields(compact), "steps": steps[1:]}),
        "steps end at version 2": header(compact).__class__(**{**fields(compact), "steps": steps[:2]}),
        "does not make the base": header(compact).__class__(**{**fields(compact), "merged": "0" * 64}),
    }
    for reason, message in broken.items():
        with pytest.raises(ValueError, match=reason):
            Merge.decode(message.SerializeToString(), shapes, start)
    with pytest.raises(ValueError, match="needs the fast layer they start from"):
        Merge.decode(compact, shapes)


def fields(blob: bytes) -> dict:
    """A merge's proto fields, to build altered copies."""
    message = header(blob)
    return {
        "parent": message.parent,
        "round": message.round,
        "version": message.version,
        "state": message.state,
        "merged": message.merged,
        "origin": message.origin,
        "steps": list(message.steps),
    }


def test_a_merge_blob_is_decoded_or_refused_with_value_error(small_config: RunConfig) -> None:
    root = prepared_base(small_config)
    shapes = root.build(small_config.fast).fast_shapes()
    state = {name: np.ones(shape, np.float32) for name, shape in shapes.items()}
    blob = Merge(root.fingerprint, 2, 3, state).encode(parse_codec("lzma"))
    replica, steps, start = replica_steps(small_config, "topk:0.2+q8", 2)
    compact = Merge(root.fingerprint, 2, replica.version + 1, replica.state).encode(parse_codec("none"), steps)
    assert header(compact).steps
    rng = random.Random(0)
    for original in (blob, compact):
        for _ in range(300):
            mutated = bytearray(original)
            for _ in range(rng.randint(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            cut = bytes(mutated[: rng.randint(0, len(mutated))]) if rng.random() < 0.3 else bytes(mutated)
            try:
                Merge.decode(cut, shapes, start)
            except ValueError:
                pass
    with pytest.raises(ValueError, match="not on"):
        advance(root, small_config.fast, Merge("0" * 64, 2, 3, state).encode(parse_codec("none")))


# ------------------------------------------------------------------------------------------------ in a run


@pytest.mark.parametrize("strategy", ["fedavg", "mifa", "fedamd"])
def test_after_consolidations_every_client_holds_the_servers_base(merging_config: RunConfig, strategy: str) -> None:
    merging_config = replace(merging_config, strategy=strategy)
    grid, exchanges = recording_grid(merging_config)
    result = run_federation(grid, merging_config)  # type: ignore[arg-type]
    assert [r.accepted for r in result.rounds] == [0, 3, 3, 3, 3, 3, 3]
    chain = server_chain(merging_config)
    assert [m.round for m in chain.merges] == [2, 4]  # never after the last round
    assert chain.base.generation == 2
    assert all(not reply.has_error() for _, reply, _ in exchanges)
    for context in grid.contexts.values():  # every node took the final sync, so every node holds the chain
        assert_same_base(node_base(context, merging_config), chain.base)
    for message, _, _ in exchanges:
        if message.metadata.message_type == "train" and round_of(message) > 2:
            assert (
                message.content.config_records[CONFIG_KEY][BASE_CHAIN_KEY]
                == chain.merges[(round_of(message) - 1) // 2 - 1].fingerprint
            )
        if message.metadata.message_type == "train" and round_of(message) <= 2:
            assert BASE_CHAIN_KEY not in message.content.config_records[CONFIG_KEY]


def test_the_log_records_each_merge_and_counts_it_in_the_payload_of_the_message_carrying_it(
    merging_config: RunConfig,
) -> None:
    grid, exchanges = recording_grid(merging_config)
    run_federation(grid, merging_config)  # type: ignore[arg-type]
    chain = server_chain(merging_config)
    with RunLog(merging_config.out) as log:
        _, rows = log.table("consolidations")
        summary = log.summary()
        logged = log.db.execute(
            "SELECT round, node_id, payload_bytes FROM messages WHERE direction = 'down' AND message_type = 'train'"
        ).fetchall()
    assert [row[1:] for row in rows] == [
        (2, 1, chain.root.fingerprint, chain.merges[0].fingerprint, chain.merges[0].version, len(chain.blobs[0])),
        (4, 2, chain.merges[0].fingerprint, chain.merges[1].fingerprint, chain.merges[1].version, len(chain.blobs[1])),
    ]
    assert (summary.consolidations, summary.merge_bytes) == (2, sum(map(len, chain.blobs)))
    console = Console(width=UNBOUNDED, record=True)
    console.print(summary_table(summary, 0.5, None))
    (line,) = [line for line in console.export_text().splitlines() if "base consolidations" in line]
    assert f"2 ({kib(sum(map(len, chain.blobs)) / 2)} KiB each)" in line
    carried = {
        (round_of(m), str(m.metadata.dst_node_id)): (
            sum(map(len, instruction_sync(m.content))),
            sum(map(len, instruction_merges(m.content))),
        )
        for m, _, _ in exchanges
        if m.metadata.message_type == "train"
    }
    assert {(r, node): payload for r, node, payload in logged} == {
        k: sync + merges for k, (sync, merges) in carried.items()
    }
    assert sum(merges > 0 for _, merges in carried.values()) > 0
    # Under a compressing downstream codec each merge travels as the replica's steps that lead to it: smaller.
    as_states = [merge.encode(parse_codec(merging_config.downstream_codec)) for merge in chain.merges]
    assert all(header(blob).steps and len(blob) < len(full) for blob, full in zip(chain.blobs, as_states))


class Absent(FastFedAvg):
    """FedAvg that leaves ``client`` out of every round but ``rounds``."""

    def __init__(self, client: str, rounds: Sequence[int], **kwargs: float) -> None:
        super().__init__(**kwargs)
        self.client, self.rounds = client, tuple(rounds)

    def sample(self, server_round: int, available: Sequence[str]) -> list[str]:
        others = [c for c in available if c != self.client]
        chosen = super().sample(server_round, others)[:2]
        return sorted(chosen + [self.client]) if server_round in self.rounds else chosen


def test_a_client_that_missed_two_consolidations_catches_up_by_replay(merging_config: RunConfig) -> None:
    config = replace(merging_config, final_sync=False)
    grid, exchanges = recording_grid(config)
    strategy = Absent("partition-0", rounds=(1, 6), fraction_train=config.fraction)
    result = run_federation(grid, config, strategy=strategy)  # type: ignore[arg-type]
    assert all(r.accepted == r.sampled for r in result.rounds)
    chain = server_chain(config)
    node = grid.node_ids[0]
    trains = [
        (m, r, c) for m, r, c in exchanges if m.metadata.dst_node_id == node and m.metadata.message_type == "train"
    ]
    assert [round_of(m) for m, _, _ in trains] == [1, 6]
    back, reply, context = trains[1]
    # It trained in round 1, before both merges: its round-6 instruction carries both, and it replays them.
    assert instruction_merges(back.content) == chain.blobs and len(chain.blobs) == 2
    assert not reply.has_error()
    assert_same_base(node_base(context, config), chain.base)
    # Every other client got each merge at most once: with its first instruction after the merge.
    for other in grid.node_ids[1:]:
        assert sum(len(instruction_merges(m.content)) for m, _, _ in exchanges if m.metadata.dst_node_id == other) <= 2


@pytest.mark.parametrize(
    ("every", "rounds", "reason"),
    [
        (1, 4, "the merge of round 2 was made on base"),  # round 3 brings the next merge: it does not fit
        (2, 5, "consolidations lead to base"),  # round 4 brings none: the chain ends on another base
    ],
)
def test_a_broken_chain_is_refused_and_the_client_is_given_the_whole_chain_again(
    merging_config: RunConfig, every: int, rounds: int, reason: str
) -> None:
    config = replace(merging_config, rounds=rounds, fraction=1.0, consolidate_every=every, final_sync=False)
    fresh = prepared_base(config).build(config.fast)  # the fast layer the first merge's steps start from
    node, broken_round = FIRST_NODE_ID, rounds - 1
    dropped: list[bool] = []

    def tamper(message: Message, context: Context) -> None:
        """Before the last round but one, change the merge the node keeps (a valid merge, one number changed)."""
        if message.metadata.message_type != "train" or message.metadata.dst_node_id != node:
            return
        if round_of(message) == broken_round + 1:
            dropped.append(CHAIN_STATE_KEY not in context.state.config_records)
        if round_of(message) != broken_round:
            return
        kept = context.state.config_records[CHAIN_STATE_KEY]
        (blob,) = kept[MERGES_KEY]  # type: ignore[misc]
        merge = Merge.decode(blob, fresh.fast_shapes(), fresh.fast_state())  # type: ignore[arg-type]
        name = sorted(merge.state)[0]
        changed = replace(merge, state={**merge.state, name: merge.state[name] + np.float32(1.0)})
        context.state[CHAIN_STATE_KEY] = ConfigRecord(
            {BASE_META_KEY: kept[BASE_META_KEY], MERGES_KEY: [changed.encode(parse_codec("none"))]}
        )

    grid, exchanges = recording_grid(config, tamper)
    result = run_federation(grid, config)  # type: ignore[arg-type]
    assert [r.accepted for r in result.rounds[1:]] == [6] * (rounds - 2) + [5, 6]
    trains = [
        (m, r, c) for m, r, c in exchanges if m.metadata.dst_node_id == node and m.metadata.message_type == "train"
    ]
    refused = [(round_of(m), r.error) for m, r, _ in trains if r.has_error()]
    assert [(server_round, error.code) for server_round, error in refused] == [(broken_round, RefusalCode.CHAIN_BROKEN)]
    assert reason in refused[0][1].reason
    assert dropped == [True]  # the refusing node forgot the merges it kept
    # The next instruction gives the chain again: every merge, from the resident checkpoint, and the full state.
    after, reply, context = trains[-1]
    chain = server_chain(config)
    assert instruction_merges(after.content) == chain.blobs and len(chain.blobs) == (rounds - 1) // every
    assert not reply.has_error()
    assert_same_base(node_base(context, config), chain.base)


def test_a_run_with_consolidations_resumes_to_the_same_final_state(small_config: RunConfig, tmp_path: Path) -> None:
    from pausing import ServerCrash

    marker = tmp_path / "crashed"
    config = replace(
        small_config,
        rounds=5,
        consolidate_every=2,
        strategy="pausing:CrashingFedAvg",
        strategy_args=f"pause-round=3,marker={marker}",
    )
    reference = run_federation(
        InlineGrid(client_app, config.num_clients),  # type: ignore[arg-type]
        replace(config, strategy_args="", out=str(tmp_path / "reference")),
    )
    with pytest.raises(ServerCrash):
        run_federation(InlineGrid(client_app, config.num_clients), config)  # type: ignore[arg-type]
    assert len(load_checkpoint(Path(config.out)).merges) == 1
    # A fresh grid: the nodes lost everything, and are given the chain again with their first instruction.
    result = run_federation(InlineGrid(client_app, config.num_clients), replace(config, resume=True))  # type: ignore[arg-type]
    assert result.final_state_digest == reference.final_state_digest
    assert len(load_checkpoint(Path(config.out)).merges) == 2


def test_personal_heads_stay_with_their_clients_across_merges(merging_config: RunConfig) -> None:
    config = replace(merging_config, fast=FastSpec("lora", rank=2, personal="head"), consolidate_every=1, rounds=4)
    grid, exchanges = recording_grid(config)
    result = run_federation(grid, config)  # type: ignore[arg-type]
    assert all(r.accepted == r.sampled for r in result.rounds)
    root = prepared_base(config)
    model = root.build(config.fast)
    chain = server_chain(config)
    assert len(chain.merges) == 3 and not set(model.personal_names) & set(chain.merges[0].state)
    head = model.personal_names[0]
    assert torch.equal(chain.base.state[head], root.state[head])  # the shared layer was merged, not the heads
    trained = {m.metadata.dst_node_id for m, r, _ in exchanges if m.metadata.message_type == "train"}
    for node in trained:  # each kept its own head through the merges (it is kept per resident checkpoint)
        meta = grid.contexts[node].state.config_records[PERSONAL_META_KEY]
        assert meta[BASE_META_KEY] == root.fingerprint
        kept = grid.contexts[node].state.array_records[PERSONAL_STATE_KEY][head].numpy()
        assert not np.array_equal(kept, root.state[head].numpy())


# ------------------------------------------------------------------------------------------------ the pieces


def test_the_replica_starts_again_at_a_merge_and_clients_behind_it_get_only_the_steps_after() -> None:
    replica = ServerReplica({"w": np.zeros(3, np.float32)}, parse_codec("none"), "a" * 64)
    replica.publish({"w": np.ones(3, np.float32)})
    replica.rebase({"w": np.full(3, 5.0, np.float32)}, "b" * 64)
    assert (replica.version, replica.origin, replica.base_fingerprint) == (2, 2, "b" * 64)
    assert replica.sync_for(0) == [] and replica.sync_for(1) == []  # they build the origin themselves
    replica.publish({"w": np.full(3, 6.0, np.float32)})
    assert len(replica.sync_for(0)) == 1 and replica.sync_for(0) == replica.sync_for(2)
    assert replica.sync_for(None) == [replica.full_state_blob()]


def test_an_error_feedback_residual_from_another_base_is_dropped(tmp_path: Path) -> None:
    from flwr.app import RecordDict

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    encoder = UplinkEncoder(context, parse_codec("topk:0.5"), error_feedback=True, decay=1.0)
    delta = {"w": np.array([1.0, 0.1, 0.0, 0.0], np.float32)}
    encoder.encode_delta(delta, "a" * 64, 0, 0, drop_residual=False)  # top-1/2 keeps 1.0: 0.1 is the residual
    assert encoder._residual("a" * 64) is not None
    assert encoder._residual("b" * 64) is None


def test_strategies_forget_their_stored_updates_at_a_merge_and_keep_participation() -> None:
    from fedslim.channel.updates import ClientUpdate
    from fedslim.strategies.base import Federation

    federation = Federation({1: "a", 2: "b"}, {"w": (2,)})
    mifa = MIFA(memory="fp32")
    robust = RobustStrategy(MIFA(memory="fp32"), "clip")
    for strategy in (mifa, robust):
        strategy.bind(federation)
        strategy.configure(1, {"w": np.zeros(2, np.float32)}, ["a", "b"])
        strategy.apply(1, [ClientUpdate("a", {"w": np.ones(2, np.float32)}, 1, {})])
        assert len(strategy.stored) == 1
        strategy.forget_memory()
        assert len(strategy.stored) == 0 and strategy.consolidates


def test_consolidation_is_refused_where_there_is_nothing_to_merge_or_the_strategy_cannot_forget(
    small_config: RunConfig,
) -> None:
    with pytest.raises(ConfigError, match="--consolidate-every with --fast head"):
        replace(small_config, fast=FastSpec("head"), consolidate_every=2)
    config = replace(small_config, consolidate_every=1, strategy="flwr.serverapp.strategy:FedAvg")
    with pytest.raises(ConfigError, match="cannot forget its state"):
        run_federation(InlineGrid(client_app, config.num_clients), config)  # type: ignore[arg-type]
