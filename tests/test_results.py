"""Published numbers hold on the current code: each results file is stamped, naming a base the code still pretrains."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from fedslim.config import RunConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from provenance import (  # noqa: E402
    RESULTS,
    base_used,
    provenance,
    stale_results,
    supersede,
    unverifiable_results,
)

from fedslim.base import float_arithmetic  # noqa: E402

SYNTHETIC = RunConfig(task="synthetic", seed=3)


def write(folder: Path, name: str, stamp: dict[str, object] | None) -> None:
    record = {"rows": [{"final_accuracy": 0.5}]}
    (folder / f"{name}.json").write_text(json.dumps({"provenance": stamp, **record} if stamp else record))


def test_every_published_results_file_holds_on_the_current_code() -> None:
    """Re-pretrains every base a results file names (deterministic) and compares fingerprints."""
    assert stale_results(RESULTS) == []


def test_a_pretrained_base_measured_on_other_float_arithmetic_is_noted_not_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stamp = provenance([3], [{**base_used(SYNTHETIC), "fingerprint": "0" * 64}])
    assert stamp["machine"]["float_arithmetic"] == float_arithmetic()
    write(tmp_path, "here", stamp)
    assert len(stale_results(tmp_path)) == 1 and unverifiable_results(tmp_path) == []
    # Measured where products round otherwise: this machine cannot rebuild that base, so it says so.
    elsewhere = {**stamp, "machine": {**stamp["machine"], "float_arithmetic": "f" * 16}}
    write(tmp_path, "here", elsewhere)
    assert stale_results(tmp_path) == []
    (note,) = unverifiable_results(tmp_path)
    assert note.startswith(f"here.json: measured on a machine of float arithmetic {'f' * 16}, this one's is")
    # Stamped before stamps named it: checked, unless this machine is known to compute otherwise.
    unnamed = {**stamp, "machine": {k: v for k, v in stamp["machine"].items() if k != "float_arithmetic"}}
    write(tmp_path, "here", unnamed)
    monkeypatch.setattr(sys.modules["provenance"], "UNLIKE_UNNAMED", set())
    assert len(stale_results(tmp_path)) == 1 and unverifiable_results(tmp_path) == []
    monkeypatch.setattr(sys.modules["provenance"], "UNLIKE_UNNAMED", {float_arithmetic()})
    assert stale_results(tmp_path) == [] and len(unverifiable_results(tmp_path)) == 1


def test_a_results_file_on_another_base_is_stale(tmp_path: Path) -> None:
    base = base_used(SYNTHETIC)
    write(tmp_path, "holds", provenance([3], [base]))
    assert stale_results(tmp_path) == []

    other = {**base, "fingerprint": "0" * 64}
    write(tmp_path, "stale", provenance([3], [other]))
    (problem,) = stale_results(tmp_path)
    assert problem.startswith("stale.json: ran on base 0000000000000000 but the code now pretrains")
    assert base["fingerprint"][:16] in problem and "synthetic seed 3" in problem


def test_a_base_of_another_pretraining_recipe_is_stale(tmp_path: Path) -> None:
    base = base_used(SYNTHETIC)
    old = {**base, "identity": {**base["identity"], "recipe": {**base["identity"]["recipe"], "epochs": 1}}}
    write(tmp_path, "old-recipe", provenance([3], [old]))
    (problem,) = stale_results(tmp_path)
    assert problem.startswith("old-recipe.json: ran on a base pretrained by recipe")


def test_an_unstamped_file_is_stale_and_a_superseded_one_is_not(tmp_path: Path) -> None:
    write(tmp_path, "unstamped", None)
    assert stale_results(tmp_path) == ["unstamped.json: no provenance; rerun the benchmark that wrote it"]
    supersede(tmp_path, "unstamped", "measured on an earlier base")
    assert stale_results(tmp_path) == []
    record = json.loads((tmp_path / "unstamped.json").read_text())
    assert record["provenance"] == {"superseded": "measured on an earlier base"}
    assert record["rows"] == [{"final_accuracy": 0.5}]


def test_the_stamp_names_the_commit_the_command_and_the_seeds() -> None:
    stamp = provenance([2, 0, 2], [])
    assert len(stamp["commit"]) == 40
    assert stamp["command"].startswith("python ")
    assert stamp["seeds"] == [0, 2]


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_every_results_file_says_what_measured_it(path: Path) -> None:
    stamp = json.loads(path.read_text(encoding="utf-8"))["provenance"]
    assert stamp.get("superseded") or {"commit", "command", "seeds", "bases"} <= set(stamp)


def test_rows_measured_apart_join_one_results_file_only_from_the_same_commit_setup_and_machine(
    tmp_path: Path,
) -> None:
    from consolidation import command_of_every_row, earlier_rows, record_rows, rows_for

    args = argparse.Namespace(
        task="fmnist", every=[10], rank=2, rounds=20, clients=4, fraction=0.5, alpha=0.3, local_epochs=1,
        codec="none", downstream_codec="none", eval_every=5, seed=0, device="cpu", rows=None, out="o",
        results=tmp_path,
    )  # fmt: skip
    stamp = {"commit": "c" * 40, "modified": False, "machine": {"float_arithmetic": float_arithmetic()}}
    run = {"final": 0.5, "best": 0.5, "curve": [[20, 0.5, 100]], "total_bytes": 100, "effective_rank": 2}
    assert [row.key for row in rows_for(args)] == ["lora-r2", "consolidate-10", "lora-r4"]
    record_rows({"lora-r2": run}, stamp, args, "c")
    # A second process of the same commit and setup adds its row: the file holds both, in the table's order.
    text = record_rows({"lora-r4": {**run, "final": 0.6}}, stamp, args, "c")
    saved = json.loads((tmp_path / "c.json").read_text())
    assert list(saved["runs"]) == ["lora-r2", "lora-r4"] and "| LoRA r=4 (= r x rounds/K) | 2 | 0.6000" in text
    setup = {k: v for k, v in vars(args).items() if k not in ("rows", "out", "results")}
    assert list(earlier_rows(tmp_path / "c.json", stamp, setup)) == ["lora-r2", "lora-r4"]
    # Another commit, a modified tree, another setup or another kind of machine starts the file again.
    assert earlier_rows(tmp_path / "c.json", {**stamp, "commit": "d" * 40}, setup) == {}
    assert earlier_rows(tmp_path / "c.json", {**stamp, "modified": True}, setup) == {}
    assert earlier_rows(tmp_path / "c.json", stamp, {**setup, "rounds": 30}) == {}
    gpu = {**stamp, "machine": {**stamp["machine"], "accelerator": "NVIDIA H200"}}
    assert earlier_rows(tmp_path / "c.json", gpu, setup) == {}
    assert (
        command_of_every_row("python benchmarks/consolidation.py --rows lora-r4 consolidate-5 --task text")
        == "python benchmarks/consolidation.py --task text"
    )
