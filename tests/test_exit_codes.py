"""One exit-code table (``runtime_shim.exitcodes``) for ``edgepack`` and ``python -m runtime_shim``: shown
in every ``--help``, and each code a command documents is one it returns in a real case."""

from __future__ import annotations

import ast
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack import cli
from edgepack.errors import BudgetError, EdgepackError
from runtime_shim import __main__ as shim
from runtime_shim import exitcodes
from runtime_shim.exitcodes import COMMON, ExitCode

ROOT = Path(__file__).resolve().parents[1]
N = "/nonexistent/edgepack-exit-codes"


def _parsers(parser, prog):
    """``(prog, parser)`` for a parser and every nested subcommand."""
    yield prog, parser
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prog} {name}")


def _listed(help_text: str) -> list[int]:
    table = help_text[help_text.index(exitcodes.HEADING) :]
    return [int(m) for m in re.findall(r"^  (\d+) ", table, flags=re.M)]


def test_one_table_for_every_command():
    from edgepack import errors

    assert errors.ExitCode is ExitCode and shim.ExitCode is ExitCode
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 130] and set(exitcodes.MEANING) == set(ExitCode)
    assert EdgepackError.exit_code == ExitCode.USAGE and BudgetError.exit_code == ExitCode.BUDGET
    # No second enum of exit codes anywhere in the tree.
    others = [
        str(p.relative_to(ROOT))
        for d in ("edgepack", "runtime_shim")
        for p in (ROOT / d).rglob("*.py")
        if "IntEnum" in p.read_text() and p.name != "exitcodes.py"
    ]
    assert others == []


def test_every_help_shows_the_codes_its_command_returns(capsys):
    parser = cli.make_parser()
    seen = 0
    for prog, p in _parsers(parser, "edgepack"):
        name = prog.split()[1] if " " in prog else None
        want = sorted(int(c) for c in (ExitCode if name is None else cli.exit_codes(name)))
        assert _listed(p.format_help()) == want, prog
        seen += 1
    assert seen > len(cli.COMMANDS)  # nested ones too (emulate accuracy, fleet bench)
    for prog, p in _parsers(shim.make_parser(), "python -m runtime_shim"):
        assert _listed(p.format_help()) == sorted(int(c) for c in COMMON), prog
    # The top-level help names the commands behind 3 and 4, and keeps the table's lines whole.
    top = parser.format_help()
    assert "       from: build, demo, pack, quantize, bench, rollout, fleet" in top
    assert "       from: devices, deploy, rollout, fleet" in top
    # And the real entry points print it.
    for argv in (["-m", "edgepack", "--help"], ["-m", "runtime_shim", "--help"]):
        out = subprocess.run(
            [sys.executable, *argv], capture_output=True, text=True, timeout=120, cwd=ROOT
        ).stdout
        assert exitcodes.HEADING in out and "  130  interrupted" in out, out


# A failing call of each command with bad input: exit 2 and one line naming what to fix.
BAD_EDGEPACK = {
    "build": ["build", N + ".toml"],
    "demo": ["demo", "--out", "FILE/demo"],
    "finetune": ["finetune", N, "--data", N, "--out", "OUT"],
    "distill": ["distill", N, "--data", N, "--out", "OUT"],
    "prune": ["prune", N, "--teacher", N, "--data", N, "--out", "OUT"],
    "pack": ["pack", N, "--data", N, "--out", "OUT"],
    "quantize": ["quantize", N + ".onnx", "--out", "OUT"],
    "tune": ["tune", N],
    "bench": ["bench", N],
    "verify": ["verify", N],
    "report": ["report", "OUT", N + ".json"],
    "devices": ["devices", "--inventory", N + ".toml"],
    "deploy": ["deploy", N, "--inventory", N + ".toml"],
    "rollout": ["rollout", N, "--to", "all", "--inventory", N + ".toml"],
    "fleet": ["fleet", "bench", N, "--inventory", N + ".toml"],
    "runtime": ["runtime", "wheel", "--out", "FILE/dist"],
    "keys": ["keys", "new", "--out", "FILE/keys"],
    "sign": ["sign", N, "--key", N + ".key"],
    "emulate": ["emulate", "accuracy", N, "--target", "x86-64-avx2"],
    "targets": ["targets", "--no-such-flag"],
    "profiles": ["profiles", "no-such-profile"],
    "recipes": ["recipes", "no-such-recipe"],
}
BAD_SHIM = {
    "predict": ["predict", N, "hi"],
    "bench": ["bench", N],
    "verify": ["verify", N],
    "rss": ["rss", N],
    "tune": ["tune", N],
    "unpack": ["unpack", N + ".tar.gz", "OUT"],
    "serve": ["serve", N],
}


def _run(main, argv, tmp_path) -> int:
    (tmp_path / "FILE").write_text("a file where a directory is needed")
    argv = [str(tmp_path / a) if a in ("OUT",) or a.startswith("FILE/") else a for a in argv]
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own refusal of a flag
        return e.code


def test_every_command_has_a_bad_input_case():
    assert set(BAD_EDGEPACK) == set(cli.COMMANDS)
    assert set(BAD_SHIM) == set(shim.make_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize(
    ("program", "command"), [("edgepack", c) for c in BAD_EDGEPACK] + [("runtime_shim", c) for c in BAD_SHIM]
)
def test_bad_input_exits_2_with_one_line(program, command, tmp_path, capsys):
    main, argv = (
        (cli.main, BAD_EDGEPACK[command]) if program == "edgepack" else (shim.main, BAD_SHIM[command])
    )
    assert _run(main, argv, tmp_path) == ExitCode.USAGE == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err) and "error:" in err[-1], err


def test_a_bug_exits_1_with_a_traceback(tmp_path):
    """An unexpected exception is not dressed up as bad input: Python's own exit 1 and its traceback."""
    code = (
        "import sys; from {mod} import {fn} as main; import {cmd} as m; "
        "m.{attr} = lambda *a, **k: 1 / 0; sys.exit(main({argv!r}))"
    )
    for mod, fn, cmd, attr, argv in (
        ("edgepack.cli", "main", "edgepack.commands.targets", "run", ["targets"]),
        ("runtime_shim.__main__", "main", "runtime_shim.unpack", "run", ["unpack", "a.tar.gz", "b"]),
    ):
        proc = subprocess.run(
            [sys.executable, "-c", code.format(mod=mod, fn=fn, cmd=cmd, attr=attr, argv=argv)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert proc.returncode == ExitCode.ERROR == 1 and "ZeroDivisionError" in proc.stderr, proc.stderr


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_ctrl_c_exits_130_in_every_command(command, monkeypatch, tmp_path, capsys):
    import importlib

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(f"edgepack.commands.{command}"), "run", interrupted)
    argv = {
        "fleet": ["fleet", "compare", "a", "b"],
        "emulate": ["emulate", "status"],
        "runtime": ["runtime", "wheel"],
        "keys": ["keys", "new", "--out", "k"],
    }.get(command, [command])
    positional = {
        "build": [N],
        "finetune": [N, "--data", N, "--out", N],
        "distill": [N, "--data", N, "--out", N],
        "prune": [N, "--teacher", N, "--data", N, "--out", N],
        "pack": [N, "--data", N, "--out", N],
        "quantize": [N, "--out", N],
        "tune": [N],
        "bench": [N],
        "verify": [N],
        "report": [N, N],
        "deploy": [N],
        "rollout": [N, "--to", "all"],
        "sign": [N, "--key", N],
    }
    argv = argv + positional.get(command, [])
    if command == "distill":
        (tmp_path / "t").mkdir()
        argv[1] = str(tmp_path / "t")  # distill checks its TEACHER_DIR while parsing
    assert cli.main(argv) == ExitCode.INTERRUPTED == 130
    assert "interrupted" in capsys.readouterr().err


def test_sigint_stops_the_device_runtime_with_130(tiny_bundle, tmp_path):
    """A real Ctrl-C (SIGINT) in the middle of ``python -m runtime_shim tune``: one line, exit 130, the
    bundle unchanged (tune writes runtime.json only when it finishes)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle, ignore=shutil.ignore_patterns("__pycache__"))
    before = (bundle / "runtime.json").read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime_shim", "tune", str(bundle), "--runs", "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        first = proc.stderr.readline()  # tune's first progress line: it is measuring now
        assert first, proc.stdout.read()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == ExitCode.INTERRUPTED == 130, err
    assert err.strip().splitlines()[-1] == "python -m runtime_shim tune: interrupted"
    assert (bundle / "runtime.json").read_bytes() == before


def test_a_missed_budget_exits_3_from_bench(tiny_bundle, tmp_path, capsys):
    """``edgepack bench --profile``: every figure measured and written, a budget missed, exit 3."""
    profile = (ROOT / "profiles" / "edge-x86-2core.toml").read_text()
    tight = tmp_path / "tight.toml"
    tight.write_text(re.sub(r"bundle_size_mb = [\d.]+", "bundle_size_mb = 0.001", profile))
    out = tmp_path / "bench.json"
    code = cli.main(
        [
            "bench",
            str(tiny_bundle),
            "--profile",
            str(tight),
            "--runs",
            "3",
            "--warmup",
            "0",
            "--json",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == ExitCode.BUDGET == 3, err
    assert "bundle_size_mb" in err and out.is_file()


# Where each code beyond COMMON is made to happen, per command (a test that runs the real command).
WITNESSES = {
    ("build", ExitCode.BUDGET): "tests/test_build.py::test_missed_budget_finishes_and_names_it",
    # demo runs the same build (edgepack/commands/demo.py calls runner.build) on the shipped data.
    ("demo", ExitCode.BUDGET): "tests/test_build.py::test_missed_budget_finishes_and_names_it",
    ("pack", ExitCode.BUDGET): "tests/test_pack.py::test_accuracy_gate_refuses_and_writes_nothing",
    ("quantize", ExitCode.BUDGET): "tests/test_quantize_command.py::test_quantize_gate_missed_exits_3",
    ("bench", ExitCode.BUDGET): "tests/test_exit_codes.py::test_a_missed_budget_exits_3_from_bench",
    ("fleet", ExitCode.BUDGET): "tests/test_fleet.py::test_accuracy_regression_fails_the_fleet",
    ("fleet", ExitCode.PARTIAL): "tests/test_fleet.py::test_device_down_others_complete",
    ("devices", ExitCode.PARTIAL): "tests/test_fleet.py::test_devices_list_and_check",
    ("rollout", ExitCode.BUDGET): "tests/test_fleet.py::test_rollout_good_passes_bad_stops_at_the_canary",
    ("rollout", ExitCode.PARTIAL): "tests/test_fleet.py::test_rollout_with_a_device_down_is_partial",
    (
        "deploy",
        ExitCode.PARTIAL,
    ): "tests/adversarial/test_deploy_path.py::test_the_device_checks_again_with_its_own_keys",
}


def test_every_documented_code_beyond_the_common_ones_has_a_test_that_makes_it():
    wanted = {(name, code) for name, codes in cli.EXIT_CODES.items() for code in codes}
    assert set(WITNESSES) == wanted
    for (_name, code), node in WITNESSES.items():
        path, _, func = node.partition("::")
        source = (ROOT / path).read_text()
        tree = ast.parse(source)
        body = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == func), None)
        assert body is not None, node
        text = ast.get_source_segment(source, body)
        assert re.search(rf"== (ExitCode\.{code.name}|{int(code)})\b", text), (node, code)
