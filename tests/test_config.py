"""The run config is declared once: the CLI, Flower's flat run_config, the client task and pyproject follow from it."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from pathlib import Path

import pytest

from fedslim.config import ConfigError, FastSpec, RunConfig, add_run_config_arguments, flat_defaults

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

# What a client needs to train; the order is irrelevant (a record's size does not depend on it).
CLIENT_KEYS = [
    "dataset",
    "num-clients",
    "seed",
    "local-epochs",
    "local-steps",
    "lr",
    "batch-size",
    "dirichlet-alpha",
    "synthetic-alpha",
    "synthetic-beta",
    "fast",
    "rank",
    "lora-alpha",
    "density",
    "biases",
    "lora-min-params",
    "codec",
    "error-feedback",
    "error-feedback-decay",
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedslim simulate")
    add_run_config_arguments(parser)
    return parser


def _from_cli(*flags: str) -> RunConfig:
    return RunConfig.from_args(_parser().parse_args(list(flags)))


def test_pyproject_lists_every_flat_key_with_its_default() -> None:
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    defaults = flat_defaults()
    assert set(declared) == set(defaults)
    assert declared.pop("out") == "runs/flwr-run"
    for key, value in declared.items():
        assert (key, type(value), value) == (key, type(defaults[key]), defaults[key])


def test_flat_defaults_build_the_default_config() -> None:
    defaults = flat_defaults()
    assert len(defaults) == 35 and defaults["server-lr"] == 1.0 and defaults["provision-chunk-bytes"] == 4 << 20
    assert RunConfig.from_flat(defaults) == RunConfig()


def test_cli_without_flags_gives_the_defaults() -> None:
    config = _from_cli()
    assert config == RunConfig(fraction=0.2)
    assert (config.num_clients, config.fast.kind, config.error_feedback, config.strategy_args) == (30, "lora", True, "")


def test_cli_fraction_default_follows_participation() -> None:
    assert _from_cli("--participation", "label").fraction == 1.0
    assert _from_cli("--participation", "label", "--fraction", "0.5").fraction == 0.5
    assert _from_cli("--participation", "all").fraction == 0.2


def test_renamed_flags_land_in_their_fields() -> None:
    config = _from_cli(
        *("--clients", "7", "--alpha", "0.5", "--fast-biases", "--ef-decay", "0.5", "--no-error-feedback"),
        *("--strategy-arg", "a=1", "--strategy-arg", "b=2", "--fast", "head", "--seed", "3"),
    )
    assert config.num_clients == 7
    assert config.dirichlet_alpha == 0.5
    assert config.fast == FastSpec("head", biases=True, seed=3)
    assert config.error_feedback_decay == 0.5
    assert config.error_feedback is False
    assert config.strategy_args == "a=1,b=2"


def test_help_lists_every_flag_with_its_help() -> None:
    text = " ".join(_parser().format_help().split())
    for flag, help_text in [
        ("--clients NUM_CLIENTS", "number of clients (virtual SuperNodes)"),
        ("--fast {lora,ffa-lora,head,sparse,full}", "which tensors train and travel"),
        ("--no-error-feedback", "send biased codecs' output"),
        ("--strategy-arg KEY=VALUE", "strategy argument (repeatable)"),
        ("--fraction FRACTION", "fraction of the available clients sampled per round (default: 0.2 with"),
        ("--server-lr SERVER_LR", "server step size applied to the aggregated fast delta"),
    ]:
        assert f"{flag} {help_text}" in text
    assert "--synthetic-alpha" not in text and "--round-timeout" not in text


def test_client_task_keys_and_round_trip() -> None:
    config = RunConfig(
        num_clients=5,
        seed=4,
        local_steps=3,
        lr=0.1,
        fast=FastSpec("sparse", density=0.5, seed=4, biases=True),
        codec="q8",
        error_feedback=False,
        rounds=7,
        strategy="mifa",
    )
    task = config.client_task()
    assert sorted(task) == sorted(CLIENT_KEYS)
    assert (task["num-clients"], task["fast"], task["density"], task["error-feedback"]) == (5, "sparse", 0.5, False)
    rebuilt = RunConfig.from_flat(task)
    assert rebuilt.client_task() == task
    assert rebuilt.fast == config.fast
    assert (rebuilt.rounds, rebuilt.strategy) == (RunConfig.rounds, RunConfig.strategy)  # not sent: defaults

    with_dir = dataclasses.replace(config, data_dir="/data/fmnist").client_task()
    assert sorted(with_dir) == sorted([*CLIENT_KEYS, "data-dir"]) and with_dir["data-dir"] == "/data/fmnist"
    assert RunConfig.from_flat(with_dir).data_dir == "/data/fmnist"


def test_from_flat_takes_snake_case_and_the_run_seed_for_the_fast_layer() -> None:
    config = RunConfig.from_flat({"num_clients": 3, "lora-alpha": 2.0, "seed": 5, "round-timeout": 5.0})
    assert (config.num_clients, config.fast.lora_alpha, config.fast.seed, config.round_timeout) == (3, 2.0, 5, 5.0)


@pytest.mark.parametrize("key", ["clients", "kind", "fast-biases", "strategy-arg"])
def test_unknown_flat_key_is_named(key: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        RunConfig.from_flat({"rounds": 2, key: 1})
