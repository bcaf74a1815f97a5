"""Short run labels for legends and table headers: what differs between the runs' configs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedslim.logs.reader import RunLog

MAX_LABEL = 40
"""Characters a label's fields may take; later fields are left out and counted (the first one is always shown)."""
# Config keys that never change what a run computes: where it was written, where the data was cached.
IGNORED_KEYS = frozenset({"out", "data_dir", "resume", "overwrite", "checkpoint_every"})
# The keys comparisons are usually about, shown first; the rest follow in the config's order.
FIRST_KEYS = ("fast", "codec", "downstream_codec", "strategy", "participation", "robust", "attack", "faults")
# A field with one of these values is left out of a label that has other fields ("fast=full", not "... codec=none").
EMPTY_VALUES = frozenset({"", "none"})


def short_labels(configs: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[str]:
    """A short, distinct label per run: ``key=value`` of the config fields in which the runs differ.

    A run's label leaves out fields set to nothing (``codec=none``) unless
    they are all it has, and stops before the field that would take it past
    :data:`MAX_LABEL` characters, counting the rest (``+2 more``). ``names``
    (the run directories' names) label the runs when their configs are all
    the same, shortened to :data:`MAX_LABEL` characters, and follow the
    labels that would otherwise be the same.
    """
    if len(configs) != len(names):
        raise ValueError(f"{len(configs)} configs for {len(names)} names")
    flat = [flatten(config) for config in configs]
    keys = differing_keys(flat)
    if not keys:
        return [shorten(name) for name in names]
    labels = [describe(f, keys) for f in flat]
    return [f"{label} ({shorten(name)})" if labels.count(label) > 1 else label for label, name in zip(labels, names)]


def log_labels(logs: Sequence[RunLog]) -> list[str]:
    """:func:`short_labels` of ``logs``; runs of one log file are named by their run ids too."""
    directories = [log.label for log in logs]
    names = [f"{d}#{log.run_id}" if directories.count(d) > 1 else d for d, log in zip(directories, logs)]
    return short_labels([log.config for log in logs], names)


def flatten(config: Mapping[str, Any]) -> dict[str, str]:
    """Config values as text, nested ones under ``outer.inner`` (the fast layer's kind as plain ``fast``)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if key in IGNORED_KEYS:
            continue
        if isinstance(value, Mapping):
            for inner, inner_value in value.items():
                flat[key if inner == "kind" else f"{key}.{inner}"] = text(inner_value)
        else:
            flat[key] = text(value)
    return flat


def text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def differing_keys(flat: Sequence[Mapping[str, str]]) -> list[str]:
    """Keys whose value is not the same in every config: :data:`FIRST_KEYS` first, then in the configs' order."""
    every = list(dict.fromkeys(key for f in flat for key in f))
    differ = [key for key in every if len({f.get(key, "-") for f in flat}) > 1]
    return sorted(differ, key=lambda key: FIRST_KEYS.index(key) if key in FIRST_KEYS else len(FIRST_KEYS))


def describe(flat: Mapping[str, str], keys: Sequence[str]) -> str:
    fields = [(key, flat.get(key, "-")) for key in keys]
    telling = [f"{key}={value}" for key, value in fields if value not in EMPTY_VALUES]
    telling = telling or [f"{key}={value}" for key, value in fields]
    shown = 1
    while shown < len(telling) and len(" ".join(telling[: shown + 1])) <= MAX_LABEL:
        shown += 1
    hidden = len(telling) - shown
    return " ".join(telling[:shown]) + (f" +{hidden} more" if hidden else "")


def shorten(name: str) -> str:
    return name if len(name) <= MAX_LABEL else name[: MAX_LABEL - 1] + "…"
