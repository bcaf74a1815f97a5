"""Seeded runs give the numbers recorded before the channel refactor, bit for bit (scripts/record_behaviour.py), on
machines of the recording machine's float arithmetic (each kind has its own record)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest

from fedslim.base import float_arithmetic

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "record_behaviour.py"
spec = importlib.util.spec_from_file_location("record_behaviour", SCRIPT)
assert spec is not None and spec.loader is not None
record_behaviour = importlib.util.module_from_spec(spec)
spec.loader.exec_module(record_behaviour)

RECORD = record_behaviour.record_path()


@pytest.mark.parametrize("name", sorted(record_behaviour.scenarios()))
def test_seeded_run_matches_the_record(name: str, tmp_path: Path) -> None:
    if RECORD is None:
        pytest.skip(
            f"no behaviour record for this machine's float arithmetic {float_arithmetic()} and thread count (its "
            "products round otherwise than the recording machine's): python scripts/record_behaviour.py --write"
        )
    recorded = json.loads(RECORD.read_text())
    observed = record_behaviour.observe(replace(record_behaviour.scenarios()[name], out=str(tmp_path)))
    assert record_behaviour.differences(recorded[name], observed) == []
    # The record is not vacuous: every scenario moved bytes both ways and changed the fast state.
    directions = {row[2] for row in observed["messages"]}
    assert directions == {"up", "down"} and len(set(observed["accuracy"])) > 1
