"""A bundle is data: an attacker who can write one (or a careless tool) gets one line naming the file and
the field, exit 2, and nothing else: no file outside the bundle opened, no variable handed to a child
process, no hang on a pipe, no memory filled by a huge file, no traceback from a deep or odd value."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.signing import load_private_key, new_keypair, sign_bundle, write_signature
from runtime_shim import trust as T
from runtime_shim.__main__ import main as shim_main
from runtime_shim.manifest import update_manifest

ROOT = Path(__file__).resolve().parents[2]  # the shim under test: children run with it as their cwd


@pytest.fixture(autouse=True)
def _device(monkeypatch, tmp_path):
    monkeypatch.setenv(T.STATE_ENV, str(tmp_path / "state" / "accepted.json"))
    monkeypatch.delenv(T.KEYS_ENV, raising=False)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    """(private key, trusted keys directory holding its .pub)."""
    d = tmp_path_factory.mktemp("keys")
    private, public, _ = new_keypair(d / "build")
    (d / "trusted").mkdir()
    shutil.copy(public, d / "trusted" / public.name)
    return private, d / "trusted"


@pytest.fixture
def bundle(tmp_path, tiny_bundle) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns("__pycache__")))


def edit(path: Path, **fields) -> None:
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


def child(args: list[str], *, env: dict[str, str | None] | None = None, timeout: float = 60,
          code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m runtime_shim ARGS`` (or ``code``) in a child process: a hang is a timeout, a memory
    blow-up is the child's own."""
    run_env = {k: v for k, v in os.environ.items() if k != T.KEYS_ENV}
    run_env.update(env or {})
    run_env = {k: v for k, v in run_env.items() if v is not None}  # None: unset there
    argv = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "runtime_shim", *args]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=run_env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"runtime_shim {' '.join(args)} hung for {timeout} s")


def one_line(proc_or_code, capsys=None, *needles: str) -> str:
    """Exit 2 and exactly one line on stderr holding every needle (a child, or an in-process exit code)."""
    if isinstance(proc_or_code, subprocess.CompletedProcess):
        code, err = proc_or_code.returncode, proc_or_code.stderr.strip().splitlines()
    else:
        code, err = proc_or_code, capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err)
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


# ------------------------------------------------------------------ fields that name files or processes


@pytest.mark.parametrize("setting, needles", [
    ({"model": "OUTSIDE"}, ["runtime.json: model=", "a path outside the bundle"]),
    ({"tokenizer": "../tokenizer.json"}, ["runtime.json: tokenizer=", "a path outside the bundle"]),
    ({"model": "extra.onnx"}, ["runtime.json: model='extra.onnx'", "not listed in manifest.json"]),
    ({"session_config": {"session.model_external_initializers_file_folder_path": "/tmp"}},
     ["session_config entry", "naming a file"]),
])
def test_runtime_json_names_only_the_bundles_own_files(bundle, tmp_path, capsys, setting, needles):
    outside = shutil.copy(bundle / "model.quant.onnx", tmp_path / "outside.onnx")
    shutil.copy(bundle / "tokenizer.json", tmp_path / "tokenizer.json")
    edit(bundle / "runtime.json", **{k: (str(outside) if v == "OUTSIDE" else v) for k, v in setting.items()})
    update_manifest(bundle)  # the checksums hold: the lie is in a field
    shutil.copy(outside, bundle / "extra.onnx")  # a file beside the listed ones, which nothing checked
    one_line(shim_main(["predict", str(bundle), "hi"]), capsys, *needles)


def test_a_signed_runtime_json_naming_an_outside_model_is_refused_too(bundle, tmp_path, keys, capsys):
    """A key holder's mistake (or a stolen key's bundle) still cannot point a device at another file."""
    outside = shutil.copy(bundle / "model.quant.onnx", tmp_path / "outside.onnx")
    edit(bundle / "runtime.json", model=str(outside))
    update_manifest(bundle, name="tiny", version=1)
    write_signature(bundle, load_private_key(keys[0]))
    assert shim_main(["verify", str(bundle), "--keys", str(keys[1])]) == 0  # signed and whole: a valid bundle
    capsys.readouterr()
    one_line(shim_main(["predict", str(bundle), "hi", "--keys", str(keys[1])]), capsys, "model=", "outside the bundle")


def test_env_is_not_applied_and_holds_only_old_thread_entries(bundle, capsys):
    edit(bundle / "runtime.json", env={"LD_PRELOAD": "/nonexistent/evil.so"})
    update_manifest(bundle)
    one_line(shim_main(["bench", str(bundle), "--runs", "1", "--warmup", "0"]), capsys,
             "runtime.json: env=", "LD_PRELOAD", "intra_op_num_threads")
    # An older tune's BLAS entry loads, and reaches neither this process nor its children.
    edit(bundle / "runtime.json", env={"OMP_NUM_THREADS": "7"})
    update_manifest(bundle)
    code = ("import os, sys; from runtime_shim.__main__ import main; rc = main(['predict', sys.argv[1], 'hi']); "
            "print(rc, os.environ.get('OMP_NUM_THREADS'))")
    proc = child([str(bundle)], code=code, env={"OMP_NUM_THREADS": None})
    assert proc.stdout.split()[-2:] == ["0", "None"], proc.stdout + proc.stderr


# ------------------------------------------------------------------------- files that are not files


@pytest.mark.parametrize("name, kind, args", [
    ("runtime.json", "fifo", []),
    ("labels.json", "fifo", ["--no-verify"]),
    ("tokenizer.json", "fifo", ["--no-verify"]),
    ("tokenizer.json", "zero", ["--no-verify"]),
    ("manifest.json", "zero", []),
])
def test_pipes_and_devices_neither_hang_nor_fill_memory(bundle, name, kind, args):
    if kind == "zero" and os.geteuid() != 0:
        pytest.skip("making a device node needs root (CI runs as root)")
    (bundle / name).unlink()
    if kind == "fifo":
        os.mkfifo(bundle / name)
    else:
        os.mknod(bundle / name, 0o644 | 0o020000, os.makedev(1, 5))  # a character device reading as /dev/zero
    one_line(child(["predict", str(bundle), "hi", *args]), None, f"{name}: not a regular file")


def test_with_keys_a_listed_file_with_two_links_is_refused(bundle, tmp_path, keys, capsys):
    sign_bundle(bundle, keys[0], name="tiny")
    # Another name for the model, outside the bundle: whoever holds it changes the bytes after the check.
    os.link(bundle / "model.quant.onnx", tmp_path / "handle.onnx")
    for argv in (["verify", str(bundle)], ["predict", str(bundle), "hi"]):
        one_line(shim_main([*argv, "--keys", str(keys[1])]), capsys, "model.quant.onnx: has 2 hard links")


# ----------------------------------------------------------------------------------- parser limits


DEEP = "[" * 50000 + "]" * 50000


@pytest.mark.parametrize("name, args", [
    ("runtime.json", ["--no-verify"]),
    ("labels.json", ["--no-verify"]),
    ("manifest.json", []),
    ("manifest.sig", ["KEYS"]),  # with keys: the envelope is read before any signature is checked
])
def test_deep_json_is_one_line(bundle, keys, capsys, name, args):
    sign_bundle(bundle, keys[0], name="tiny")
    if name == "manifest.sig":
        (bundle / name).write_text(DEEP[:30000] + DEEP[-30000:])  # under the envelope's 64 KiB
    else:
        (bundle / name).write_text(json.dumps({"x": 1})[:-1] + f', "deep": {DEEP}}}')
    argv = ["predict", str(bundle), "hi", *[a for a in args if a != "KEYS"]]
    if "KEYS" in args:
        argv += ["--keys", str(keys[1])]
    one_line(shim_main(argv), capsys, f"{name}: nested deeper than")


# The child's own peak (VmHWM: ru_maxrss would carry the forking test process's across exec).
PEAK = ("import sys; from runtime_shim.__main__ import main; rc = main(sys.argv[1:]); "
        "print(rc, next(ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')))")


@pytest.mark.parametrize("name", ["manifest.sig", "runtime.json"])
def test_a_huge_file_is_refused_unread(bundle, keys, name):
    """A sparse gigabyte: refused by its size, with the memory of a process that never read it."""
    sign_bundle(bundle, keys[0], name="tiny")
    with open(bundle / name, "r+b" if (bundle / name).exists() else "wb") as f:
        f.truncate(1 << 30)
    args = ["verify", str(bundle), "--keys", str(keys[1])] if name == "manifest.sig" else \
        ["predict", str(bundle), "hi", "--no-verify"]
    proc = child(args, code=PEAK, timeout=120)
    rc, peak_kib = (int(x) for x in proc.stdout.split()[-2:])
    assert rc == 2 and f"{name}: 1073741824 bytes, more than" in proc.stderr, proc.stderr[-500:]
    assert peak_kib < 300 * 1024, f"peak {peak_kib} KiB: the file was read"


def test_names_longer_than_a_file_system_allows_are_one_line(bundle, capsys):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["a" * 300] = {"sha256": "0" * 64, "bytes": 1}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    one_line(shim_main(["verify", str(bundle)]), capsys, "manifest.json: lists 'aaaa", "longer than a bundle's may be")
    manifest["files"] = {"model.quant.onnx": {"sha256": "0" * 64}}  # an entry without its size
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    one_line(shim_main(["verify", str(bundle)]), capsys, "the entry of 'model.quant.onnx' needs its 'bytes'")


# ------------------------------------------------------------------------- values that make no sense


@pytest.mark.parametrize("file, field, value", [
    ("labels.json", "oos_threshold", 1.5),
    ("labels.json", "oos_threshold", -0.1),
    ("labels.json", "oos_threshold", "NaN"),
    ("runtime.json", "max_length", 0),
    ("runtime.json", "max_length", -3),
    ("runtime.json", "max_length", 10**30),
    ("runtime.json", "max_length", 1.5),
    ("runtime.json", "pad_id", "x"),
    ("runtime.json", "pad_id", -1),
    ("runtime.json", "pad_id", 1 << 40),
    ("runtime.json", "intra_op_num_threads", 100000),
    ("runtime.json", "inter_op_num_threads", True),
    ("runtime.json", "fast_wordpiece", "yes"),
    ("runtime.json", "answer", 3),
    ("runtime.json", "answer", ""),
    ("runtime.json", "answer", "a" * 4096),
    ("runtime.json", "answer", "logits"),  # an output, but not an answer: [batch, labels] floats
    ("runtime.json", "answer", "no_such_output"),
])
def test_values_that_make_no_sense_are_one_line(bundle, file, field, value):
    text = json.dumps({**json.loads((bundle / file).read_text()), field: value})
    (bundle / file).write_text(text.replace('"NaN"', "NaN"))  # JSON has no NaN; Python's parser took one
    update_manifest(bundle)
    # A child: 100000 intra-op threads hung the loading process.
    one_line(child(["predict", str(bundle), "hi"]), None, f"{file}: ", field)


# -------------------------------------------------------------------------- keys in the environment


def test_configured_keys_are_never_skipped(bundle, keys, capsys, monkeypatch):
    (bundle / "labels.json").write_text((bundle / "labels.json").read_text().replace("alarm", "alarn"))
    update_manifest(bundle)  # an attacker's bundle, checksums rewritten, never signed
    monkeypatch.setenv(T.KEYS_ENV, str(keys[1]))
    one_line(shim_main(["predict", str(bundle), "hi", "--no-verify"]), capsys, "--no-verify", str(keys[1]))
    one_line(shim_main(["tune", str(bundle), "--no-verify", "--dry-run"]), capsys, "--no-verify")
    monkeypatch.setenv(T.KEYS_ENV, "")  # set, to nothing: a typo, not a choice to check checksums only
    one_line(shim_main(["predict", str(bundle), "hi"]), capsys, "EDGEPACK_TRUSTED_KEYS is empty")
    monkeypatch.delenv(T.KEYS_ENV)
    one_line(shim_main(["predict", str(bundle), "hi", "--keys", ""]), capsys, "--keys is empty")


def test_every_test_the_threat_table_names_exists():
    """docs/TRUST.md's threat table points each row at its test: each of them is there."""
    import re

    text = (ROOT / "docs" / "TRUST.md").read_text().split("## Threat model", 1)[1]
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| Threat")]
    named = 0
    for row in rows:
        current = None
        for ref in re.findall(r"`([^`]+)`", row.rstrip().rstrip("|").rsplit("|", 1)[-1]):
            if "::" not in ref and not ref.endswith(".py"):
                continue  # a path the row mentions, not a test
            file, _, test = ref.partition("::")
            current = {"adversarial/": "adversarial/test_deploy_path.py"}.get(file, file) or current
            source = (ROOT / "tests" / current).read_text()
            assert not test or re.search(rf"def {re.escape(test.split('[')[0])}\(", source), ref
            named += 1
    assert named >= 30
