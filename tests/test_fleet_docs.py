"""docs/FLEET.md is real: its inventory example loads, and each of its ``edgepack`` commands parses
with the CLI's own parser (subcommands and flags exist)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

DOC = (Path(__file__).resolve().parents[1] / "docs" / "FLEET.md").read_text()


def _commands() -> list[list[str]]:
    out = []
    for block in re.findall(r"```bash\n(.*?)```", DOC, flags=re.S):
        for raw in block.splitlines():
            line = raw.split(" #", 1)[0].strip()
            if line.startswith("edgepack "):
                out.append(shlex.split(line))
    return out


def test_inventory_example_loads(tmp_path):
    from edgepack.fleet.inventory import load_inventory

    (toml,) = re.findall(r"```toml\n(.*?)```", DOC, flags=re.S)
    path = tmp_path / "devices.toml"
    path.write_text(toml)
    inv = load_inventory(path)
    by_name = {d.name: d for d in inv.devices}
    assert list(by_name) == ["edge-box-1", "pi5-kitchen", "venv-local", "haswell-qemu"]
    assert by_name["haswell-qemu"].emulated and by_name["haswell-qemu"].command_prefix[0] == "qemu-x86_64-static"
    assert by_name["pi5-kitchen"].jump and by_name["pi5-kitchen"].signed_only
    assert by_name["edge-box-1"].remote_dir == "~/edgepack"  # from [defaults]


def test_the_docs_show_the_three_commands():
    assert {a[1] for a in _commands()} == {"devices", "deploy", "fleet"}
    assert (Path(__file__).resolve().parents[1] / "docs" / "fleet_report.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv", _commands(), ids=[" ".join(a[1:3]) for a in _commands()])
def test_docs_command_parses(argv, monkeypatch):
    from edgepack.cli import make_parser

    args = make_parser().parse_args(argv[1:])
    assert getattr(args, "_run", None) is not None
