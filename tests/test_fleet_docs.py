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

    toml, _ = re.findall(r"```toml\n(.*?)```", DOC, flags=re.S)
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


def test_arm64_recipe_loads_and_answers_where_the_root_exists(tmp_path):
    """The arm64 device recipe: the inventory loads; where the arm64 root it names exists (and this is
    root, for chroot), `devices --check` reaches it and reads an arm64 CPU matching the profile."""
    import json
    import os

    from edgepack.cli import main
    from edgepack.fleet.inventory import load_inventory

    _, toml = re.findall(r"```toml\n(.*?)```", DOC, flags=re.S)
    path = tmp_path / "devices.toml"
    path.write_text(toml)
    (device,) = load_inventory(path).devices
    assert device.emulated and "/usr/bin/qemu-aarch64-static" in device.command_prefix
    root = Path(device.command_prefix[device.command_prefix.index("chroot") + 1])
    if os.geteuid() != 0 or not (root / "opt" / "edgepack" / "ready.json").is_file():
        pytest.skip(f"no arm64 root at {root} (edgepack emulate setup arm64), or not root")
    assert main(["devices", "--check", "--inventory", str(path), "--json", str(tmp_path / "c.json")]) == 0
    (found,) = json.loads((tmp_path / "c.json").read_text())
    assert found["machine"] == "aarch64" and found["detected_target"] == "arm64" and found["target_match"]
