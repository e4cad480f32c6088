"""The README's commands are real: the two opening commands match the project's install and CI (every
other command it shows is parsed by tests/test_docs.py), and it stays a quickstart."""

from __future__ import annotations

import re
from pathlib import Path

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


def test_readme_shows_commands():
    """The tour and the device half; each of their lines is parsed by tests/test_docs.py with the real parsers."""
    lines = shell_lines()
    assert any(line.startswith("edgepack pack ") for line in lines)
    assert any(line.startswith("python -m runtime_shim bench ") for line in lines)


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
