"""Peak memory of the shim's fresh process (``python -m runtime_shim rss``, what ``bench`` reports):
what it loads, what it defers, and that the deferral is worth it (docs/memory.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from runtime_shim import OnnxPipeline
from runtime_shim.bench import measure_peak_rss

ROOT = Path(__file__).resolve().parent.parent
# Modules the rss command used to import and does not need: tokenizers (the WordPiece fast path covers
# ASCII texts), importlib.metadata (email, zipfile, csv: 3.8 MB), tarfile (unpack only), subprocess,
# OpenSSL (_hashlib: 3.6 MB; the manifest is hashed with CPython's own sha256).
NOT_LOADED = ("tokenizers", "importlib.metadata", "email", "zipfile", "tarfile", "csv", "subprocess", "_hashlib")
# And, with the C API session (no numpy, which imports some of them itself): the onnxruntime package and
# numpy (35 MB), dataclasses and inspect (tune's, 1.4 MB), tempfile (unpack's and atomic writes', 1.3 MB),
# shutil (argparse's terminal width, 1.2 MB with bz2 and lzma).
NOT_LOADED_C = (*NOT_LOADED, "onnxruntime", "numpy", "dataclasses", "inspect", "tempfile", "shutil")


def _modules_after(argv: list[str]) -> tuple[list[str], str]:
    code = ("import json, sys\nfrom runtime_shim.__main__ import main\n"
            f"code = main({argv!r})\n"
            "print(json.dumps({'modules': sorted(sys.modules), 'code': code}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(ROOT), env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["code"] == 0
    return last["modules"], proc.stdout


def test_rss_command_loads_only_what_it_needs(tiny_bundle: Path):
    """With the C API session (the default on Linux) the serving process loads neither the onnxruntime
    package nor numpy; with ``session_api: python`` it loads both, as before."""
    modules, out = _modules_after(["rss", str(tiny_bundle)])
    report = json.loads(out.strip().splitlines()[0])
    assert report["peak_rss_mb"] > 0 and report["session_api"] == "c" and report["numpy_loaded"] is False
    loaded = [m for m in NOT_LOADED_C if m in modules]
    assert loaded == [], f"the rss process imported {loaded}"
    modules, out = _modules_after(["rss", str(tiny_bundle), "--overrides", '{"session_api": "python"}'])
    assert json.loads(out.strip().splitlines()[0])["session_api"] == "python"
    assert "onnxruntime" in modules and "numpy" in modules
    assert [m for m in NOT_LOADED if m in modules] == []


def test_fresh_process_peak_below_the_python_api(tiny_bundle: Path):
    """Same bundle, same fresh-process probe: the C API session peaks lower than the Python package's
    by at least numpy's import (~15 MB on x86-64; 8 MB is the margin asserted: the onnxruntime package's
    extension alone is larger than that)."""
    c = [measure_peak_rss(OnnxPipeline(tiny_bundle, verify=False).rss_argv) for _ in range(2)]
    py = [measure_peak_rss(OnnxPipeline(tiny_bundle, verify=False, overrides={"session_api": "python"}).rss_argv)
          for _ in range(2)]
    assert max(c) + 8.0 < min(py), (c, py)


def test_tokenizers_loaded_when_a_text_needs_it(tiny_bundle: Path):
    pipe = OnnxPipeline(tiny_bundle, verify=False)
    slow = OnnxPipeline(tiny_bundle, verify=False, overrides={"fast_wordpiece": False})
    assert pipe.fast_wordpiece is not None and pipe._tokenizer is None and slow._tokenizer is not None
    texts = ["what is my balance", "set an alarm for 7 am"]
    assert pipe(texts) == slow(texts) and pipe(texts[0]) == slow(texts[0])
    assert pipe._tokenizer is None  # plain ASCII, one by one and batched: the fast path alone
    assert pipe("caf\u00e9 balance") == slow("caf\u00e9 balance")  # not ASCII: tokenizers, loaded now
    assert pipe._tokenizer is not None and pipe.tokenizer is pipe._tokenizer


def test_fresh_process_peak_below_the_eager_tokenizer(tiny_bundle: Path):
    """Same bundle, same fresh-process probe, same test: deferring ``tokenizers`` (the default) peaks
    lower than loading it at start (``fast_wordpiece: false``, the old load path's tokenizer). The
    saving is at least the import of ``tokenizers`` itself (its library's pages, ~3 MB here, the same on
    every run); 1 MB is the margin asserted."""
    deferred = [measure_peak_rss(OnnxPipeline(tiny_bundle, verify=False).rss_argv) for _ in range(2)]
    eager = [measure_peak_rss(OnnxPipeline(tiny_bundle, verify=False, overrides={"fast_wordpiece": False}).rss_argv)
             for _ in range(2)]
    assert max(deferred) + 1.0 < min(eager), (deferred, eager)
    assert max(deferred) < 200, deferred  # a wide absolute bound: ~50-60 MB on x86-64 with onnxruntime 1.32


def test_manifest_hash_without_openssl_is_the_same(tmp_path, monkeypatch):
    """The manifest is hashed with CPython's own sha256 unless OpenSSL is loaded already or there is
    more than OPENSSL_PAST to hash: the same digest either way."""
    import hashlib

    from runtime_shim import manifest

    data = bytes(range(256)) * 5000  # 1.28 MB: more than one read chunk
    (tmp_path / "f.bin").write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    monkeypatch.delitem(sys.modules, "_hashlib")  # as in a device's process, which never imported hashlib
    assert type(manifest._sha256(len(data))).__module__ != "_hashlib"
    assert type(manifest._sha256(manifest.OPENSSL_PAST + 1)).__module__ == "_hashlib"
    assert manifest.sha256_file(tmp_path / "f.bin") == expected
    assert manifest.sha256_file(tmp_path / "f.bin", total_bytes=manifest.OPENSSL_PAST + 1) == expected


def test_deferred_tokenizer_loads_after_a_change_of_directory(tiny_bundle: Path, tmp_path: Path, monkeypatch):
    """A pipeline opened by a relative path still finds its tokenizer when the first text that needs
    it comes after the caller changed directory (the static-QDQ quantizer calibrates in a scratch
    directory: the demo's calibration texts with a pound sign hit this)."""
    import os

    monkeypatch.chdir(tiny_bundle.parent)
    pipe = OnnxPipeline(tiny_bundle.name, verify=False)
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / tiny_bundle.name).exists() and os.getcwd() == str(tmp_path)
    assert pipe.encode(["a pound sign \u00a3 and an \u00e9"])["input_ids"].shape[0] == 1
    assert pipe._tokenizer is not None  # the text needed the tokenizer, and it loaded


def test_the_cli_imports_only_the_optional_command_it_runs():
    """``rss`` (or ``predict``, ``bench``) leaves tune.py and unpack.py unimported; naming one of them, or
    no command at all (the help lists every command), imports it."""
    from runtime_shim.__main__ import make_parser

    def choices(parser) -> set[str]:
        return set(parser._subparsers._group_actions[0].choices)

    assert {"tune", "unpack"} <= choices(make_parser()) and {"tune", "unpack"} <= choices(make_parser("--help"))
    assert not {"tune", "unpack"} & choices(make_parser("rss"))
    assert "tune" in choices(make_parser("tune")) and "unpack" not in choices(make_parser("tune"))
    assert make_parser("tune").parse_args(["tune", "b", "--runs", "3"]).runs == 3

def test_the_formatter_reads_the_width_as_argparse_does(monkeypatch):
    """argparse's formatter without shutil: the width it would have read (COLUMNS wins), minus 2."""
    from runtime_shim.__main__ import make_parser

    monkeypatch.setenv("COLUMNS", "100")
    assert make_parser("rss")._get_formatter()._width == 98
