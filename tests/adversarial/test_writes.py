"""Writes that cannot hurt: ``pack``/``build --force`` replace only a bundle (or an empty directory), never an
input; writers of one output take turns; ``sign`` killed at any step leaves a whole, unsigned, re-signable
bundle; ``unpack`` stops an archive that expands past its limit before writing it, and cleans what a
killed run left."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from edgepack.cli import main as edgepack_main
from edgepack.signing import new_keypair, sign_bundle
from runtime_shim import trust as T
from runtime_shim.__main__ import main as shim_main
from runtime_shim.manifest import verify

ROOT = Path(__file__).resolve().parents[2]
PACK = ["--max-accuracy-drop", "100", "--min-agreement", "0", "--eval-rows", "20"]


@pytest.fixture(autouse=True)
def _device(monkeypatch, tmp_path):
    monkeypatch.setenv(T.STATE_ENV, str(tmp_path / "state" / "accepted.json"))
    monkeypatch.delenv(T.KEYS_ENV, raising=False)


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def one_line(code: int, capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err)
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def run_child(argv: list[str], timeout: float = 900) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in (T.KEYS_ENV, "PYTHONPATH")}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


# ------------------------------------------------------------------------------- pack/build --force


def test_force_replaces_a_bundle_or_an_empty_directory_never_an_input(tmp_path, tiny_model, clinc_json, capsys):
    model = Path(shutil.copytree(tiny_model, tmp_path / "teacher"))
    before = snapshot(model)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"not a bundle")
    (tmp_path / "notes.txt").write_text("a file")
    for out, needles in ((model, ["is an input of this run"]),
                         (tmp_path, ["the directory holding", "an input of this run"]),
                         (other, ["holds files but no edgepack manifest"]),
                         (tmp_path / "notes.txt", ["a file, not a bundle directory"])):
        code = edgepack_main(["pack", str(model), "--data", str(clinc_json), "--out", str(out), "--force", *PACK])
        one_line(code, capsys, str(out), *needles)
    code = edgepack_main(["build", str(model), "--data", str(clinc_json), "--profile", "edge-x86", "--out", str(model),
                          "--force"])
    one_line(code, capsys, "is an input of this run")
    assert snapshot(model) == before and snapshot(other) == {"holiday.jpg": b"not a bundle"}
    assert (tmp_path / "notes.txt").read_text() == "a file"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert edgepack_main(["pack", str(model), "--data", str(clinc_json), "--out", str(empty), "--force", *PACK]) == 0
    verify(empty)
    capsys.readouterr()
    assert edgepack_main(["pack", str(model), "--data", str(clinc_json), "--out", str(empty), "--force", *PACK]) == 0
    verify(empty)  # and a bundle is replaced by a bundle


@pytest.mark.slow
def test_three_packs_to_one_out_take_turns(tmp_path, tiny_model, clinc_json):
    out = tmp_path / "bundle"
    argv = [sys.executable, "-m", "edgepack", "pack", str(tiny_model), "--data", str(clinc_json), "--out", str(out), *PACK]
    procs = [run_child(argv) for _ in range(3)]
    results = [(p.wait(timeout=900), p.stderr.read()) for p in procs]
    assert [code for code, _ in results].count(0) == 1, results
    for code, err in results:
        assert "Traceback" not in err, err
        if code:  # the lock's line, or (had it started after the winner finished) the existing output's
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1, err
            assert "another process (pid" in lines[0] or "already exists" in lines[0], lines[0]
    verify(out)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".bundle.partial-", ".edgepack-pack-"))]


def test_a_held_output_is_refused_at_once_with_the_holders_pid(tmp_path, tiny_model, clinc_json, capsys):
    from runtime_shim.manifest import writer_lock

    out = tmp_path / "bundle"
    with writer_lock(out):
        started = time.monotonic()
        code = edgepack_main(["pack", str(tiny_model), "--data", str(clinc_json), "--out", str(out), *PACK])
        one_line(code, capsys, f"another process (pid {os.getpid()}) is writing it now")
        assert time.monotonic() - started < 30 and not out.exists()


# ----------------------------------------------------------------------------------------------- sign


KILL_AT = """
import os, signal, sys
from pathlib import Path
from edgepack.signing import sign_bundle

replace, calls, at = os.replace, [0], int(sys.argv[3])

def killing_replace(src, dst):  # SIGKILL as the at-th file is put into place: nothing runs after it
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst)

os.replace = killing_replace
sign_bundle(Path(sys.argv[1]), Path(sys.argv[2]), name="tiny")
print("signed")
"""


def test_sign_killed_at_each_step_leaves_a_whole_bundle_that_signs_again(tmp_path, tiny_bundle, capsys):
    private, public, _ = new_keypair(tmp_path / "keys")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(public, trusted / public.name)
    unsigned = Path(shutil.copytree(tiny_bundle, tmp_path / "unsigned", ignore=shutil.ignore_patterns("__pycache__")))
    before = snapshot(unsigned)
    for at in range(1, 10):
        bundle = Path(shutil.copytree(unsigned, tmp_path / f"b{at}"))
        proc = subprocess.run([sys.executable, "-c", KILL_AT, str(bundle), str(private), str(at)], capture_output=True,
                              text=True, cwd=ROOT, timeout=300)
        if proc.returncode == 0 and "signed" in proc.stdout:
            break  # this step is past the last write
        assert proc.returncode == -9, proc.stderr[-2000:]
        verify(bundle)  # every checksum holds: no listed file changed without the manifest
        assert not T.is_signed(bundle)
        if at == 1:  # killed as its first write was put in place: as it was, but for that write's temporary
            assert {k: v for k, v in snapshot(bundle).items() if not k.startswith(".manifest.json.")} == before
        sign_bundle(bundle, private, name="tiny")  # and it signs again, its leftovers cleared
        assert shim_main(["verify", str(bundle), "--keys", str(trusted)]) == 0, capsys.readouterr().err
    else:
        pytest.fail("sign never finished")
    assert at > 1


# --------------------------------------------------------------------------------------------- unpack


class Zeros(io.RawIOBase):
    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def bomb(path: Path, members: list[tuple[str, int]], manifest: dict | None = None) -> Path:
    """A gzip tar of zero-filled members (after ``bundle/manifest.json`` when given): tiny on disk."""
    with gzip.open(path, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        entries = [("bundle/manifest.json", json.dumps(manifest).encode())] if manifest else []
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, size in members:
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BufferedReader(Zeros(size)))
    return path


def test_unpack_stops_an_archive_that_expands_past_its_limit_before_writing_it(tmp_path, capsys):
    dest = tmp_path / "device" / "bundle"
    small = {"format": "edgepack-bundle/1", "files": {"a.bin": {"bytes": 1000, "sha256": "0" * 64}}}
    cases = [
        (bomb(tmp_path / "one.tar.gz", [("bundle/zeros.bin", 1 << 30)]), [], "50 times its own size"),
        (bomb(tmp_path / "many.tar.gz", [(f"bundle/z{i}.bin", 1 << 20) for i in range(64)], small), [],
         "twice what its manifest declares"),
        (bomb(tmp_path / "flag.tar.gz", [("bundle/zeros.bin", 1 << 20)]), ["--max-bytes", "4096"], "--max-bytes"),
    ]
    for archive, flags, basis in cases:
        assert archive.stat().st_size < 8 << 20
        started = time.monotonic()
        code = shim_main(["unpack", str(archive), str(dest), *flags])
        one_line(code, capsys, str(archive), "stopped before writing more", basis)
        assert time.monotonic() - started < 20  # a gigabyte's header is refused, not its gigabyte read
        assert not dest.exists() and list(dest.parent.iterdir()) == []


KILLED_UNPACK = """
import os, signal, sys
from runtime_shim.unpack import unpack

rename = os.rename
os.rename = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)  # killed as it moves the bundle into place
unpack(sys.argv[1], sys.argv[2])
"""


def test_a_killed_unpack_leaves_nothing_the_next_one_keeps(tmp_path, tiny_bundle, capsys):
    from edgepack.bundle_files import archive

    src = Path(shutil.copytree(tiny_bundle, tmp_path / "tiny", ignore=shutil.ignore_patterns("__pycache__")))
    arc = archive(src)
    dest = tmp_path / "device" / "tiny"
    proc = subprocess.run([sys.executable, "-c", KILLED_UNPACK, str(arc), str(dest)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = [p.name for p in dest.parent.iterdir() if p.name.startswith(".tiny.unpack-")]
    assert left and not dest.exists()  # what a kill leaves: the extracted bundle, under a temporary name
    assert shim_main(["unpack", str(arc), str(dest)]) == 0
    verify(dest)
    assert [p.name for p in dest.parent.iterdir()] == ["tiny"]
    from runtime_shim.manifest import writer_lock

    with writer_lock(dest):  # a second unpack to the same place while one runs: refused at once
        one_line(shim_main(["unpack", str(arc), str(dest), "--replace"]), capsys, f"pid {os.getpid()}")
