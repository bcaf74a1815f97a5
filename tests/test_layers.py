"""Layers go one way: a module imports fedslim modules of its own layer or below (docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fedslim"

# Lowest first; a module's layer is that of the longest prefix listed.
LAYERS: list[set[str]] = [
    {
        "fedslim",
        "fedslim.config",
        "fedslim.models",
        "fedslim.task",
        "fedslim.tasks",
        "fedslim.base",
        "fedslim.adapters",
        "fedslim.consolidation",
        "fedslim.training",
        "fedslim.data",
        "fedslim.codecs",
        "fedslim.protos",
        "fedslim.commlog",
        "fedslim.report",
    },
    {"fedslim.channel"},
    {"fedslim.strategies"},
    {"fedslim.client", "fedslim.server"},
    {"fedslim.simulation", "fedslim.deploy", "fedslim.logs", "fedslim.cli", "fedslim.bases_cli"},
]


def layer_of(module: str) -> int:
    matches = [
        (len(prefix), level)
        for level, prefixes in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert matches, f"{module} is in no layer"
    return max(matches)[1]


def fedslim_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedslim"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("fedslim")}
    return found


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return found


def test_imports_go_down_the_layers() -> None:
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, path in modules()
        for target in fedslim_imports(path)
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from fedslim.server.loop import run_federation\nimport fedslim.cli\n")
    assert fedslim_imports(module) == {"fedslim.server.loop", "fedslim.cli"}
    assert layer_of("fedslim.server.loop") > layer_of("fedslim.channel.uplink") > layer_of("fedslim.codecs.layouts")


@pytest.mark.parametrize("entry", ["fedslim.client.app"])
def test_the_deployed_client_app_loads_nothing_from_simulation_or_server(entry: str) -> None:
    code = f"import sys, {entry}; print(sorted(m for m in sys.modules if m.startswith('fedslim.')))"
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "fedslim.channel.uplink" in loaded
    assert "fedslim.simulation" not in loaded and "fedslim.server" not in loaded


SIMULATION_ONLY = ("ray", "datasets", "flwr_datasets", "matplotlib")


def test_the_device_install_carries_no_simulation_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    device = " ".join(project["dependencies"])
    assert "flwr==" in device and "torch==" in device
    for package in ("flwr[simulation]", "flwr-datasets", "matplotlib", "ray"):
        assert package not in device, f"{package} belongs in the simulation extra, not the device install"
    assert "fedslim[simulation" in " ".join(project["optional-dependencies"]["test"])


def test_the_node_processes_import_no_simulation_package() -> None:
    code = "import sys, fedslim.client.app, fedslim.server.app, fedslim.cli; print(sorted(sys.modules))"
    loaded = set(
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split("'")
    )
    assert loaded.isdisjoint(SIMULATION_ONLY), sorted(loaded & set(SIMULATION_ONLY))


def test_a_missing_simulation_package_is_one_line_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedslim import cli

    assert cli.missing_extra(ModuleNotFoundError("No module named 'datasets'", name="datasets")) == (
        'datasets is not installed: it comes with the simulation extra (pip install "fedslim[simulation]")'
    )
    assert cli.missing_extra(ModuleNotFoundError("No module named 'numpy'", name="numpy")) is None
    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "ray" else real_find_spec(name))
    with pytest.raises(SystemExit) as exited:
        cli.main(["simulate", "--rounds", "1"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "fedslim simulate: error: --backend flower runs on Ray, which is not installed: "
        'pip install "fedslim[simulation]", or --backend inline\n'
    )
