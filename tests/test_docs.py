"""The README stays the front door, docs/results.md matches its tables, and no relative link is broken."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "write_results_doc.py"
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[`~]*[ \t]*$", re.M | re.S)
COMMENT = re.compile(r"<!--.*?-->", re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def relative_links(text: str) -> list[str]:
    """Link targets in Markdown that point into the repository, outside code blocks, code spans and comments."""
    text = CODE_SPAN.sub("", COMMENT.sub("", FENCE.sub("", text)))
    targets = INLINE_LINK.findall(text) + REFERENCE.findall(text)
    return [t for t in targets if not SCHEME.match(t) and not t.startswith("#")]


def broken_links(page: Path) -> list[str]:
    """The relative links of a page whose file part does not exist (anchors are not checked)."""
    broken = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        resolved = ROOT / file_part.lstrip("/") if file_part.startswith("/") else page.parent / file_part
        if not resolved.exists():
            broken.append(target)
    return broken


def test_results_page_matches_its_template_and_tables() -> None:
    done = run_script("--check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_check_fails_when_the_page_was_edited_by_hand(tmp_path: Path) -> None:
    page = tmp_path / "results.md"
    page.write_text((ROOT / "docs" / "results.md").read_text(encoding="utf-8") + "| a number typed in by hand |\n")
    done = run_script("--check", "--output", str(page))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "stale" in done.stdout


def test_check_fails_when_a_table_was_rerun(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    for table in [*(ROOT / "benchmarks" / "results").glob("*.md"), *(ROOT / "benchmarks" / "results").glob("*.json")]:
        (results / table.name).write_text(table.read_text(encoding="utf-8"), encoding="utf-8")
    rerun = results / "logs_summary.md"
    rerun.write_text(rerun.read_text(encoding="utf-8") + "| a row of the new run |\n", encoding="utf-8")
    done = run_script("--check", "--results", str(results))
    assert done.returncode == 1, done.stdout + done.stderr


def test_a_placeholder_naming_no_table_is_an_error(tmp_path: Path) -> None:
    template = tmp_path / "template.md"
    template.write_text("# Results\n\n{{table: no-such-benchmark}}\n")
    done = run_script("--check", "--template", str(template), "--output", str(tmp_path / "out.md"))
    assert done.returncode == 2
    assert "no-such-benchmark" in done.stderr


def test_tables_are_included_verbatim(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "md.md").write_text("setup line\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    (results / "box.md").write_text("  title  \n┏━━━┓\n┃ a ┃\n┗━━━┛\n")
    template = tmp_path / "template.md"
    template.write_text("<!-- note for editors -->\n# T\n\n{{table: md}}\n\n{{ table: box }}\n")
    out = tmp_path / "out.md"
    readme = tmp_path / "README.md"
    readme.write_text("# R\n")
    done = run_script(
        "--template", str(template), "--results", str(results), "--output", str(out), "--readme", str(readme)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    page = out.read_text(encoding="utf-8")
    assert "note for editors" not in page
    assert "setup line\n\n| a | b |\n|---|---|\n| 1 | 2 |\n" in page
    assert "```text\n  title  \n┏━━━┓\n┃ a ┃\n┗━━━┛\n```\n" in page
    assert page.count("*Provenance not recorded: measured before results were stamped.*") == 2


def stamped_results(folder: Path, superseded: str | None = None) -> None:
    folder.mkdir()
    (folder / "wire.md").write_text("| row | x fewer |\n|---|---|\n| lora | 312.0x |\n")
    stamp = {
        "commit": "0123456789abcdef" * 2 + "01234567",
        "command": "python benchmarks/wire.py --seeds 0 1",
        "seeds": [0, 1],
        "bases": [{"identity": {}, "fingerprint": "ab" * 32}],
        "measured_at": "2026-11-26T20:00:00Z",
    }
    if superseded:
        stamp["superseded"] = superseded
    (folder / "wire.json").write_text(json.dumps({"provenance": stamp, "values": {"x_fewer": "312.0x"}}))


def site(tmp_path: Path, template: str, readme: str) -> tuple[list[str], Path, Path]:
    """A template and README in ``tmp_path`` over ``tmp_path/results``: the script's arguments, page and README."""
    (tmp_path / "template.md").write_text(template)
    (tmp_path / "README.md").write_text(readme)
    out = tmp_path / "out.md"
    paths = ("--template", "template.md", "--results", "results", "--output", "out.md", "--readme", "README.md")
    args = [str(tmp_path / value) if index % 2 else value for index, value in enumerate(paths)]
    return args, out, tmp_path / "README.md"


def test_numbers_in_prose_come_from_the_results_files(tmp_path: Path) -> None:
    stamped_results(tmp_path / "results")
    template = "# T\n\nIt moves {{value: wire.x_fewer}} fewer bytes.\n\n{{table: wire}}\n"
    args, out, readme = site(tmp_path, template, "Moves <!-- value: wire.x_fewer -->220x<!-- /value --> fewer bytes.\n")
    template = tmp_path / "template.md"
    assert run_script("--check", *args).returncode == 1  # the README still says 220x
    done = run_script(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert readme.read_text() == "Moves <!-- value: wire.x_fewer -->312.0x<!-- /value --> fewer bytes.\n"
    page = out.read_text(encoding="utf-8")
    assert "It moves 312.0x fewer bytes." in page
    caption = "*Measured by `python benchmarks/wire.py --seeds 0 1` at commit `0123456789`, 2026-11-26; seeds 0, 1;"
    assert caption + " bases `abababababab`.*" in page
    assert run_script("--check", *args).returncode == 0

    template.write_text("It moves {{value: wire.nothing}} fewer bytes.\n")
    done = run_script(*args)
    assert done.returncode == 2 and "has no value 'nothing'" in done.stderr


def test_a_caption_names_the_accelerator_that_measured_a_table(tmp_path: Path) -> None:
    stamped_results(tmp_path / "results")
    path = tmp_path / "results" / "wire.json"
    record = json.loads(path.read_text())
    record["provenance"]["machine"] = {"float_arithmetic": "20fe8115097e7594", "accelerator": "NVIDIA H200"}
    path.write_text(json.dumps(record))
    args, out, _ = site(tmp_path, "# T\n\n{{table: wire}}\n", "# R\n")
    assert run_script(*args).returncode == 0
    page = out.read_text(encoding="utf-8")
    assert "at commit `0123456789` on an NVIDIA H200, 2026-11-26;" in page
    assert "float arithmetic `20fe8115097e7594`.*" in page


def test_a_superseded_table_is_published_with_its_reason(tmp_path: Path) -> None:
    stamped_results(tmp_path / "results", superseded="measured on an earlier base")
    args, out, _ = site(tmp_path, "# T\n\n{{table: wire}}\n", "# R\n")
    assert run_script(*args).returncode == 0
    page = out.read_text(encoding="utf-8")
    assert "> **Superseded, kept for the record:** measured on an earlier base\n\n| row | x fewer |" in page


def test_readme_is_the_front_door() -> None:
    size = README.stat().st_size
    assert size < 12_000, f"README.md is {size} bytes; move results and design into docs/"


def test_readme_keeps_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    first_run = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[simulation]" && fedslim simulate\n'
    assert first_run in text
    test_command = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && python -m pytest -q\n'
    assert test_command in text
    first = next(line for line in text.splitlines() if re.search(r"pytest|make test|nox|tox", line))
    assert first + "\n" == test_command, "CI and the stop hook read the first line that mentions pytest"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_point_to_files_that_exist(page: Path) -> None:
    broken = broken_links(page)
    assert broken == [], f"{page.relative_to(ROOT)} links to files that do not exist: {broken}"


def test_the_link_check_finds_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# there\n")
    page.write_text(
        "[ok](there.md#a-section) [web](https://flower.ai) [here](#top)\n"
        "[gone](missing.md#x) and `[code](not-a-link.md)`\n"
        "```\n[in a block](also-not-a-link.md)\n```\n"
        "[ref]: gone-too.md\n"
    )
    assert broken_links(page) == ["missing.md#x", "gone-too.md"]
