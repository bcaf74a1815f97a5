"""Seeded runs give the numbers recorded before the channel refactor, bit for bit (scripts/record_behaviour.py)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "record_behaviour.py"
spec = importlib.util.spec_from_file_location("record_behaviour", SCRIPT)
assert spec is not None and spec.loader is not None
record_behaviour = importlib.util.module_from_spec(spec)
spec.loader.exec_module(record_behaviour)

RECORDED = json.loads(record_behaviour.RECORD.read_text())


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_seeded_run_matches_the_record(name: str, tmp_path: Path) -> None:
    observed = record_behaviour.observe(replace(record_behaviour.scenarios()[name], out=str(tmp_path)))
    assert record_behaviour.differences(RECORDED[name], observed) == []
    # The record is not vacuous: every scenario moved bytes both ways and changed the fast state.
    directions = {row[2] for row in observed["messages"]}
    assert directions == {"up", "down"} and len(set(observed["accuracy"])) > 1
