"""The run config is declared once: the CLI, Flower's flat run_config, the client task and pyproject follow from it."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedslim.cli import main as cli_main
from fedslim.config import (
    ConfigError,
    FastSpec,
    RunConfig,
    add_run_config_arguments,
    flat_defaults,
    join_repeated,
    split_repeated,
)
from fedslim.strategies.registry import parse_strategy_args

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

# What a client needs to train; the order is irrelevant (a record's size does not depend on it).
CLIENT_KEYS = [
    "task",
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
    assert len(defaults) == 47 and defaults["server-lr"] == 1.0 and defaults["provision-chunk-bytes"] == 4 << 20
    assert defaults["ray-address"] == ""
    assert RunConfig.from_flat(defaults) == RunConfig()


def test_cli_without_flags_gives_the_defaults() -> None:
    config = _from_cli()
    assert config == RunConfig(fraction=0.2)
    assert (config.num_clients, config.fast.kind, config.error_feedback, config.strategy_args) == (30, "lora", True, "")


def test_cli_fraction_default_follows_participation() -> None:
    assert _from_cli("--participation", "label").fraction == 1.0
    assert _from_cli("--participation", "label", "--fraction", "0.5").fraction == 0.5
    assert _from_cli("--participation", "all").fraction == 0.2


def test_round_timeout_and_faults_flags() -> None:
    config = _from_cli("--round-timeout", "2.5", "--faults", "drop=0.2,error=0.1,late=0.1")
    assert (config.round_timeout, config.faults) == (2.5, "drop=0.2,error=0.1,late=0.1")


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
    assert "--round-timeout ROUND_TIMEOUT seconds the server waits for replies in one round" in text
    assert "--faults FAULTS simulated faults (simulation only)" in text
    assert "--synthetic-alpha" not in text


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

    # Settings whose default clients fill in themselves travel only when set otherwise.
    with_dir = dataclasses.replace(config, data_dir="/data/fmnist", device="auto", client_holdout=0.2).client_task()
    assert sorted(with_dir) == sorted([*CLIENT_KEYS, "data-dir", "device", "client-holdout"])
    received = RunConfig.from_flat(with_dir)
    assert (received.data_dir, received.device, received.client_holdout) == ("/data/fmnist", "auto", 0.2)


def test_from_flat_takes_snake_case_and_the_run_seed_for_the_fast_layer() -> None:
    config = RunConfig.from_flat({"num_clients": 3, "lora-alpha": 2.0, "seed": 5, "round-timeout": 5.0})
    assert (config.num_clients, config.fast.lora_alpha, config.fast.seed, config.round_timeout) == (3, 2.0, 5, 5.0)


@pytest.mark.parametrize("key", ["clients", "kind", "fast-biases", "strategy-arg"])
def test_unknown_flat_key_is_named(key: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        RunConfig.from_flat({"rounds": 2, key: 1})


# ----------------------------------------------------------------- bad input: one line, exit code 2


def cli_error(capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    """``fedslim simulate FLAGS``'s stderr, which must be one error line after an exit with code 2."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["simulate", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("fedslim simulate: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seed", "-1"], "seed must be an integer in [0, 4294967295], got -1"),
        (["--seed", str(2**32)], "seed must be an integer in [0, 4294967295], got 4294967296"),
        (["--server-lr", "nan"], "server_lr must be a finite number > 0, got nan (--server-lr)"),
        (["--server-lr", "inf"], "server_lr must be a finite number > 0, got inf"),
        (["--server-lr", "0"], "server_lr must be a finite number > 0, got 0.0"),
        (["--server-lr", "-1"], "server_lr must be a finite number > 0, got -1.0"),
        (["--lr", "nan"], "lr must be a finite number > 0, got nan (--lr)"),
        (["--lr=-inf"], "lr must be a finite number > 0, got -inf"),
        (["--lr", "inf"], "lr must be a finite number > 0, got inf"),
        (["--lora-alpha", "nan"], "lora_alpha must be a finite number > 0, got nan (--lora-alpha)"),
        (["--lora-alpha", "0"], "lora_alpha must be a finite number > 0, got 0.0"),
        (["--lora-alpha", "-8"], "lora_alpha must be a finite number > 0, got -8.0"),
        (["--fraction", "0"], "fraction must be in (0, 1], got 0.0 (--fraction)"),
        (["--fraction", "nan"], "fraction must be in (0, 1], got nan"),
        (["--participation-mean", "nan"], "participation_mean must be in (0, 1], got nan"),
        (["--participation-mean", "0"], "participation_mean must be in (0, 1], got 0.0"),
        (["--ef-decay", "nan"], "error_feedback_decay must be in [0, 1], got nan (--ef-decay)"),
        (["--screen-factor", "nan"], "screen_factor must be a finite number >= 0, got nan (--screen-factor)"),
        (["--screen-factor", "inf"], "screen_factor must be a finite number >= 0, got inf"),
        (["--screen-factor", "0.5"], "screen_factor must be > 1, or 0 to turn the screen off; got 0.5"),
        (["--density", "nan"], "density must be in (0, 1], got nan (--density)"),
        (["--alpha", "inf"], "dirichlet_alpha must be a finite number > 0, got inf (--alpha)"),
        (["--alpha", "0"], "dirichlet_alpha must be a finite number > 0, got 0.0"),
        (["--rank", "-1"], "rank must be an integer >= 1, got -1 (--rank)"),
        (["--clients", "-3"], "num_clients must be an integer >= 1, got -3 (--clients)"),
        (["--rounds", "0"], "rounds must be an integer >= 1, got 0 (--rounds)"),
        (["--batch-size", "-1"], "batch_size must be an integer >= 1, got -1 (--batch-size)"),
        (["--local-epochs", "-1"], "local_epochs must be an integer >= 1, got -1 (--local-epochs)"),
        (["--local-steps", "-1"], "local_steps must be an integer >= 0, got -1 (--local-steps)"),
        (["--eval-every", "-1"], "eval_every must be an integer >= 1, got -1 (--eval-every)"),
        (["--lora-min-params", "-1"], "lora_min_params must be an integer >= 0, got -1 (--lora-min-params)"),
        (["--participation", "label", "--participation-mean", "0.01"], "participation_mean 0.01 is below 0.02"),
    ],
)
def test_a_value_out_of_range_is_one_error_line(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in cli_error(capsys, *flags)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"round-timeout": float("inf")}, "round_timeout must be a finite number > 0, got inf (--round-timeout)"),
        ({"round-timeout": 0.0}, "round_timeout must be a finite number > 0, got 0.0"),
        ({"synthetic-alpha": float("nan")}, "synthetic_alpha must be a finite number >= 0, got nan"),
        ({"synthetic-beta": -1.0}, "synthetic_beta must be a finite number >= 0, got -1.0"),
        ({"provision-chunk-bytes": 1000}, "provision_chunk_bytes must be an integer >= 1024, got 1000"),
        ({"rounds": "10"}, "rounds must be an integer, got '10'"),
        ({"rounds": 2.5}, "rounds must be an integer, got 2.5"),
        ({"lr": True}, "lr must be a number, got True"),
    ],
)
def test_flower_run_configs_get_the_same_checks(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        RunConfig.from_flat(values)
    assert message in str(error.value)


def test_values_in_range_are_accepted() -> None:
    config = RunConfig.from_flat(
        {"fraction": 1, "lr": 1, "seed": 2**32 - 1, "screen-factor": 0.0, "error-feedback-decay": 0.0}
    )
    assert (config.fraction, config.lr, config.fast.seed, config.screen_factor) == (1, 1, 2**32 - 1, 0.0)
    assert _from_cli("--fraction", "1").fraction == 1.0
    assert FastSpec(rank=1, lora_alpha=1e-3, density=1.0, lora_min_params=0).rank == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--codec", ""], "codec: the codec spec is empty; none is dense float32"),
        (["--codec", " "], "codec: the codec spec is empty"),
        (["--downstream-codec", ""], "downstream_codec: the codec spec is empty"),
        (["--codec", "topk:0.1+"], "codec: bad codec spec 'topk:0.1+': an empty stage: '+' joins two stages"),
        (["--codec", "+zstd"], "an empty stage"),
        (["--codec", "fp16++zstd"], "an empty stage"),
        (["--out", ""], "--out is empty: name the run directory (it would be the current folder)"),
        (["--out", "  "], "--out is empty"),
        (["--task-setting", "a=1", "--task-setting", "a=2"], "--task-setting a is given twice"),
    ],
)
def test_an_empty_or_repeated_spec_is_one_error_line(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in cli_error(capsys, *flags)


def test_a_strategy_argument_given_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="^strategy argument p-estimate is given twice$"):
        parse_strategy_args("p-estimate=fedau,beta=0.5,p-estimate=known")


def test_out_must_be_a_writable_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    assert "--out {} is a file".format(tmp_path / "file") in cli_error(capsys, "--out", str(tmp_path / "file"))
    assert "Not a directory" in cli_error(capsys, "--out", str(tmp_path / "file" / "run"))
    fresh = RunConfig(out=str(tmp_path / "new" / "run"))
    fresh.check_run_dir()
    assert fresh.run_dir.is_dir() and not any(fresh.run_dir.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert "Permission denied" in cli_error(capsys, "--out", str(locked))
        assert "Permission denied" in cli_error(capsys, "--out", str(locked / "run"))
    finally:
        locked.chmod(0o700)


def test_the_command_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fedslim.cli", "simulate", "--server-lr", "nan", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr == "fedslim simulate: error: server_lr must be a finite number > 0, got nan (--server-lr)\n"


# ----------------------------------------------------------------- repeatable flags in one string


@pytest.mark.parametrize(
    "values",
    [["name=a, b", "beta=0.5"], ["note=it's", 'quote="x"', "path=C:\\dir #1"], ["k=1"], []],
)
def test_repeated_values_round_trip_through_one_string(values: list[str]) -> None:
    assert split_repeated(join_repeated(values)) == values


def test_a_strategy_argument_may_hold_a_comma_and_a_space() -> None:
    config = _from_cli("--strategy-arg", "name=a, b", "--strategy-arg", "beta=0.5")
    assert config.strategy_args == "'name=a, b',beta=0.5"
    assert parse_strategy_args(config.strategy_args) == {"name": "a, b", "beta": 0.5}
    assert RunConfig.from_flat({"strategy-args": config.strategy_args}).strategy_args == config.strategy_args
    assert parse_strategy_args('name="a, b" beta=0.5') == {"name": "a, b", "beta": 0.5}
    for old_style in ("beta=0.5,p-estimate=fedau", "beta=0.5 p-estimate=fedau", " beta=0.5 ,, p-estimate=fedau "):
        assert parse_strategy_args(old_style) == {"beta": 0.5, "p_estimate": "fedau"}
