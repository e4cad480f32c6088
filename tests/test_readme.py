"""The README's commands are real: the two opening commands match the project's install and CI, and
every ``edgepack`` / ``python -m runtime_shim`` line in its shell blocks parses with the real CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def shell_lines() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = []
    for block in blocks:
        for raw in block.replace("\\\n", " ").splitlines():
            line = raw.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_opening_commands_install_and_run_the_demo_and_the_tests():
    first, second = shell_lines()[:2]
    assert first == 'pip install -c constraints-cpu.txt -e ".[demo]" && edgepack demo'
    assert second == 'pip install -c constraints-cpu.txt -e ".[dev]" && python -m pytest -q'
    # CI runs the README's two commands verbatim, read from the README itself.
    import subprocess
    import sys

    printed = subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_commands.py")], check=True,
                             capture_output=True, text=True).stdout.splitlines()
    assert printed == [first, second]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_commands.py" in ci and "python3 -m venv" in ci


def test_constraints_pin_every_declared_dependency():
    """The tested set: every package pyproject declares (extras included) has an exact pin."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(d for deps in project["optional-dependencies"].values() for d in deps)]
    pins = {}
    for line in (ROOT / "constraints-cpu.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    missing = [d for d in declared if canonicalize_name(Requirement(d).name) not in pins]
    assert not missing, f"constraints-cpu.txt pins none of {missing}: run bash .ci/refresh-constraints"
    assert pins["torch"] == "2.13.0"


def _argv(line: str) -> list[str] | None:
    for part in line.split("&&"):
        words = shlex.split(part.strip())
        if words[:1] == ["edgepack"]:
            return words
        if words[:3] == ["python", "-m", "runtime_shim"]:
            return words
        if words[:2] == ["python", "benchmarks/clinc150.py"]:
            return words
    return None


COMMANDS = [a for a in (_argv(line) for line in shell_lines()) if a]


def test_readme_shows_commands():
    assert any(a[0] == "edgepack" and a[1] == "pack" for a in COMMANDS)
    assert any(a[:4] == ["python", "-m", "runtime_shim", "bench"] for a in COMMANDS)


def _scratch_paths(argv: list[str], root: Path) -> None:
    """The paths a line names, made empty under ``root``: parsing checks that a teacher directory exists."""
    for word in argv[1:]:
        if word.startswith("-") or "/" not in word or word.startswith(("/", "..")):
            continue
        path = root / word
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            path.mkdir(parents=True, exist_ok=True)


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a[:3]) for a in COMMANDS])
def test_readme_command_parses(argv, monkeypatch, tmp_path):
    """Parse (not run) each command with the CLI's own parser: subcommands and flags must exist."""
    _scratch_paths(argv, tmp_path)
    monkeypatch.chdir(tmp_path)
    if argv[0] == "edgepack":
        from edgepack.cli import make_parser

        args = make_parser().parse_args(argv[1:])
        assert args.command == argv[1]
    elif argv[1] == "-m":
        from runtime_shim import __main__ as shim

        shim.make_parser().parse_args(argv[3:])
    else:
        import importlib.util

        spec = importlib.util.spec_from_file_location("clinc_bench", ROOT / "benchmarks" / "clinc150.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert callable(mod.main)


def test_readme_predict_runs_on_a_real_bundle(tiny_bundle, label_names, capsys):
    """The README's on-device predict, on the tiny bundle: one answer naming a known label."""
    from runtime_shim.__main__ import main

    assert main(["predict", str(tiny_bundle), "what is my checking balance"]) == 0
    out = capsys.readouterr().out
    assert any(name in out for name in label_names)


def test_readme_is_a_quickstart():
    """Short enough to read before trying (figures live in docs/results.md, guides on the docs site)."""
    assert len(README.splitlines()) <= 250
    assert README.count("\n|---") <= 1, "one headline table at most; the rest belongs in docs/results.md"
