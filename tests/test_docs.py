"""The commands and install hints that README.md and docs/ show a user are checked against the code.

Every ``transnext ...`` line of a fenced code block (also through ``torchrun ... -m transnext.cli.main``)
must parse with the real command-line parser, and every ``pip install`` hint in the docs and in the
library's messages must name this distribution and one of its extras.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from transnext.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """Lines of fenced code blocks, backslash continuations joined, comments dropped."""

    out: list[tuple[int, str]] = []
    inside = False
    pending = ""
    start = 0
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        if not pending:
            start = no
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def _documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        for no, line in _code_lines(path):
            for part in line.split("&&"):
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:
                    continue
                if not words:
                    continue
                if re.fullmatch(r"(\S*/)?transnext", words[0]) and len(words) > 1:
                    argv = words[1:]
                elif words[0] == "torchrun" and "-m" in words and words[words.index("-m") + 1].startswith("transnext"):
                    argv = words[words.index("-m") + 2:]
                elif words[:3] == ["python", "-m", "transnext"]:
                    argv = words[3:]
                else:
                    continue
                found.append((f"{path.relative_to(ROOT)}:{no}", argv))
    return found


COMMANDS = _documented_commands()


def test_docs_show_commands() -> None:
    # guards the extraction itself: README alone shows more than a dozen commands
    assert len([c for c in COMMANDS if c[0].startswith("README")]) >= 12
    assert {argv[0] for _, argv in COMMANDS} >= {"info", "train", "eval", "predict", "benchmark", "visualize", "detect", "segment"}


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(where: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        err = capsys.readouterr().err
        pytest.fail(f"{where}: `transnext {' '.join(argv)}` is rejected by the parser (exit {e.code}): {err.strip()}")


_HINT = re.compile(r"pip install\s+(?:-\S+\s+)*['\"]?([A-Za-z0-9_.\-]+)(\[[^\]]*\])?")


def _extras() -> set[str]:
    from importlib.metadata import metadata

    # the extras of the installed distribution, as pip sees them (pyproject's optional-dependencies)
    return set(metadata("transnext-pytorch").get_all("Provides-Extra") or [])


def _hints() -> list[tuple[str, str, str]]:
    files = DOCS + sorted((ROOT / "src").rglob("*.py"))
    hints = []
    for path in files:
        for no, line in enumerate(path.read_text().splitlines(), 1):
            for m in _HINT.finditer(line):
                hints.append((f"{path.relative_to(ROOT)}:{no}", m.group(1), m.group(2) or ""))
    return hints


def test_install_hints_name_this_distribution() -> None:
    hints = _hints()
    extras = _extras()
    ours = [h for h in hints if h[1] in ("transnext", "transnext-pytorch")]
    assert len(ours) >= 4, "the docs and messages should carry install hints"
    for where, name, extra in ours:
        # "transnext" on the package index is an unrelated project
        assert name == "transnext-pytorch", f"{where}: install hint names {name!r}, the distribution is 'transnext-pytorch'"
        for e in filter(None, extra.strip("[]").split(",")):
            if e.startswith("{"):  # an f-string placeholder: checked below
                continue
            assert e.strip() in extras, f"{where}: extra {e!r} does not exist (pyproject has {sorted(extras)})"
    # a bracketed extra on any other name is the same mistake in another spelling
    for where, name, extra in hints:
        if extra and name not in (".", "-e"):
            assert name == "transnext-pytorch" or not name.startswith("transnext"), where


def test_install_hint_placeholders_name_real_extras() -> None:
    from transnext.visualize import _common

    assert _common.EXTRA in _extras()


def _package_imports(folder: str) -> set[str]:
    """Sub-packages of transnext that the modules of ``folder`` import (relative or absolute, lazy included)."""
    import ast

    found = set()
    for path in (ROOT / "src" / "transnext" / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level >= 2 or mod.startswith("transnext."):
                    found.add(mod.removeprefix("transnext.").split(".")[0])
    return found


def test_models_and_data_do_not_import_each_other() -> None:
    # both read the normalisation constants and the crop rule from the leaf module transnext.preprocessing
    assert "data" not in _package_imports("models")
    assert "models" not in _package_imports("data")
