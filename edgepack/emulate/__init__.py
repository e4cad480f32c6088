"""Check a bundle's answers on another CPU's int8 kernels, without that CPU.

ONNX Runtime picks its int8 kernels from the CPU it runs on (MLAS reads CPUID or the auxiliary vector
at load), so the build machine's accuracy is not the device's. QEMU user mode runs the target's kernels:

- ``x86-64-avx2``: ``qemu-x86_64 -cpu Haswell`` runs this machine's Python and onnxruntime on a CPU
  with AVX2 and no AVX-512 or VNNI, so MLAS takes its AVX2 U8S8 path (VPMADDUBSW, saturating s16).
  QEMU 7.2 cannot emulate AVX-512, so the VNNI, AVX-512 and AMX targets cannot be checked this way.
- ``arm64`` (``cortex-a72``: NEON only), ``arm64-dotprod`` (``neoverse-n1``), ``arm64-i8mm``
  (``max``): an arm64 Debian root (``edgepack emulate setup arm64``) with Python and the three runtime
  packages in a venv, entered with ``chroot`` and ``qemu-aarch64-static``. The host's ``/proc`` and
  ``/sys`` stay out of it: ONNX Runtime's cpuinfo would read the x86 host's description and crash.

The same worker (``emulate/worker.py``) runs natively for the host's predictions, so both sides batch
the rows alike and only the kernels differ. Emulation is tens of times slower: answers, never latency.

    >>> from edgepack import emulate
    >>> emulate.available("x86-64-avx2")  # doctest: +SKIP
    (True, 'qemu-x86_64-static -cpu Haswell (QEMU 7.2.22)')
    >>> emulate.check_bundle(Path("bundle"), "x86-64-avx2")["agreement_with_host"]  # doctest: +SKIP
    1.0
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..console import Progress
from ..errors import EdgepackError

QUIET = Progress("emulate")  # a library call's default log: edgepack.emulate's INFO records, nothing printed

WORKER = Path(__file__).with_name("worker.py")
ROOT_ENV = "EDGEPACK_ARM64_ROOT"  # where the arm64 root is (default: DEFAULT_ARM64_ROOT)
DEFAULT_ARM64_ROOT = Path("~/.cache/edgepack/emulate/arm64")
ROOT_PYTHON = "/opt/edgepack/venv/bin/python"  # inside the arm64 root
ROOT_READY = "opt/edgepack/ready.json"  # written last by the setup: the root is complete
ROOT_QEMU = "usr/bin/qemu-aarch64-static"
INSTALL_QEMU = "apt-get install qemu-user-static"
_ROWS = re.compile(r"(\d+)/(\d+) rows")
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclasses.dataclass(frozen=True)
class Emulated:
    """A target this machine can emulate: the QEMU CPU model that has its kernels and the flags that
    CPU reports (passed to the shim as ``EDGEPACK_CPU_FLAGS``: QEMU leaves ``/proc/cpuinfo`` the host's)."""

    target: str
    arch: str  # x86_64 or arm64
    qemu_cpu: str
    flags: tuple[str, ...]
    kernels: str  # which int8 kernels MLAS runs there

    @property
    def qemu_names(self) -> tuple[str, ...]:
        return ("qemu-x86_64-static", "qemu-x86_64") if self.arch == "x86_64" else \
            ("qemu-aarch64-static", "qemu-aarch64")


_HASWELL = ("sse", "sse2", "ssse3", "sse4_1", "sse4_2", "popcnt", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2",
            "movbe")
_A72 = ("fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "cpuid")
_N1 = _A72 + ("atomics", "fphp", "asimdhp", "asimdrdm", "lrcpc", "dcpop", "asimddp", "ssbs")
EMULATED: dict[str, Emulated] = {e.target: e for e in (
    Emulated("x86-64-avx2", "x86_64", "Haswell", _HASWELL, "AVX2 U8S8 (VPMADDUBSW into saturating s16) / U8U8"),
    Emulated("arm64", "arm64", "cortex-a72", _A72, "NEON widening multiplies, s32 accumulation"),
    Emulated("arm64-dotprod", "arm64", "neoverse-n1", _N1, "SDOT/UDOT, s32 accumulation"),
    Emulated("arm64-i8mm", "arm64", "max", _N1 + ("i8mm", "bf16"), "SMMLA/UMMLA, s32 accumulation"),
)}
ALIASES = {"avx2": "x86-64-avx2", "haswell": "x86-64-avx2", "aarch64": "arm64", "arm64-neon": "arm64"}
NOT_EMULATED = {
    "x86-64-avx512": "QEMU 7.2's user-mode emulation has no AVX-512; check it on such a CPU",
    "x86-64-vnni": "QEMU 7.2's user-mode emulation has no AVX-512 VNNI or AVX-VNNI; check it on such a CPU",
    "x86-64-amx": "QEMU 7.2's user-mode emulation has no AMX; check it on such a CPU",
}


def resolve(target: str) -> Emulated:
    """The emulation of ``target`` (a targets/ name or an alias such as ``avx2``), or a one-line error.

    Example:
        >>> resolve("avx2").qemu_cpu
        'Haswell'
    """
    name = ALIASES.get(target.lower(), target)
    if name in EMULATED:
        return EMULATED[name]
    if name in NOT_EMULATED:
        raise EdgepackError(f"target '{name}' cannot be emulated here: {NOT_EMULATED[name]}")
    raise EdgepackError(f"unknown emulation target '{target}'; choose one of: {', '.join(EMULATED)}")


def arm64_root(root: str | os.PathLike | None = None) -> Path:
    """The arm64 root: ``root``, else ``$EDGEPACK_ARM64_ROOT``, else ``~/.cache/edgepack/emulate/arm64``."""
    return Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ARM64_ROOT).expanduser()


def _host_arch() -> str:
    m = platform.machine().lower()
    return "arm64" if m in ("arm64", "aarch64") else "x86_64" if m in ("x86_64", "amd64") else m


def qemu_binary(emu: Emulated) -> str | None:
    """The QEMU user-mode binary for ``emu``'s architecture on this machine, or None."""
    return next((p for p in map(shutil.which, emu.qemu_names) if p), None)


def qemu_version(binary: str) -> str:
    """``7.2.22`` from ``qemu-x86_64-static --version`` ("" when it cannot be read)."""
    try:
        first = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    except (OSError, subprocess.TimeoutExpired):
        return ""
    words = first.split()
    return words[words.index("version") + 1] if "version" in words[:-1] else first.strip()


def cpu_model_name() -> str:
    """This machine's CPU model (``lscpu``'s "Model name", from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model name", "Hardware"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available(target: str, *, root: str | os.PathLike | None = None) -> tuple[bool, str]:
    """Whether ``target``'s kernels can be emulated here, and a one-line reason: the emulator that
    will run, or what is missing and the command that installs it.

    Example:
        >>> ok, why = available("arm64")  # doctest: +SKIP
        >>> ok, why  # doctest: +SKIP
        (False, 'no arm64 root at /root/.cache/edgepack/emulate/arm64; prepare it: edgepack emulate setup arm64')
    """
    try:
        emu = resolve(target)
    except EdgepackError as e:
        return False, str(e)
    host = _host_arch()
    if emu.arch == "x86_64":
        if host != "x86_64":
            return False, f"emulating {emu.target} needs an x86-64 host (this one is {host})"
        qemu = qemu_binary(emu)
        if qemu is None:
            return False, f"qemu-x86_64 is not installed; install it: {INSTALL_QEMU}"
        return True, f"{Path(qemu).name} -cpu {emu.qemu_cpu} (QEMU {qemu_version(qemu)})"
    if host == "arm64":
        return False, f"this host is arm64: run the bundle natively instead of emulating {emu.target}"
    base = arm64_root(root)
    if not (base / ROOT_READY).is_file():
        hint = f" --root {base}" if root or os.environ.get(ROOT_ENV) else ""
        return False, f"no arm64 root at {base}; prepare it: edgepack emulate setup arm64{hint}"
    if shutil.which("chroot") is None or os.geteuid() != 0:
        return False, "running the arm64 root needs chroot as root (sudo); run edgepack as root or in a container"
    qemu = base / ROOT_QEMU
    if not qemu.is_file():
        if qemu_binary(emu) is None:
            return False, f"qemu-aarch64-static is not installed; install it: {INSTALL_QEMU}"
        qemu = Path(qemu_binary(emu) or "")
    if (base / ROOT_QEMU).is_file():  # the command that runs there, as it can be typed
        return True, f"chroot {base} /{ROOT_QEMU} -cpu {emu.qemu_cpu} (QEMU {qemu_version(str(qemu))})"
    return True, (f"QEMU_CPU={emu.qemu_cpu} chroot {base} (binfmt_misc runs {qemu.name}; "
                  f"QEMU {qemu_version(str(qemu))})")


# --------------------------------------------------------------------------------------- running


def _bundle_files(bundle_dir: Path) -> list[str]:
    """What the worker needs of a bundle: settings, labels, tokenizer, the model, the manifest (its
    target, for the shim's warning) and the shim itself."""
    runtime = json.loads((bundle_dir / "runtime.json").read_text())
    names = ["runtime.json", "labels.json", str(runtime.get("tokenizer", "tokenizer.json")),
             str(runtime.get("model", "model.quant.onnx")), "manifest.json"]
    return [n for n in dict.fromkeys(names) if (bundle_dir / n).is_file()]


def _place(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)  # same filesystem: no copy of a large model
    except OSError:
        shutil.copy2(src, dest)


def predictions(target: str | None, bundle_dir: str | os.PathLike, texts: Sequence[str],
                models: Sequence[Mapping[str, Any]] | None = None, *, root: str | os.PathLike | None = None,
                log: Callable[[str], Any] = QUIET, timeout: float | None = None) -> dict[str, Any]:
    """Run the bundle's shim on ``texts`` under ``target``'s emulation (None: natively on this CPU).

    ``models`` lists ``{"name", "overrides"}``: each is the bundle loaded with those ``runtime.json``
    overrides (``{"model": PATH}`` runs another ONNX file with the bundle's tokenizer and labels,
    ``{"session_config": {...}}`` other session settings); default: the bundle as it is. Every run uses
    one intra-op thread. Returns the worker's output: ``models[name]`` holds ``ids`` (argmax label
    ids) and ``top`` (top softmax probabilities), plus the CPU and versions the process saw.

    Example:
        >>> out = predictions("x86-64-avx2", "bundle", ["set an alarm"])  # doctest: +SKIP
        >>> out["models"]["bundle"]["ids"], out["flags"][:3]  # doctest: +SKIP
        ([0], ['avx', 'avx2', 'bmi1'])
    """
    bundle_dir = Path(bundle_dir).resolve()
    models = [dict(m) for m in (models or [{"name": "bundle", "overrides": {}}])]
    emu = None if target is None else resolve(target)
    if emu is not None:
        ok, why = available(emu.target, root=root)
        if not ok:
            raise EdgepackError(why)
    in_root = emu is not None and emu.arch == "arm64"
    base = arm64_root(root) if in_root else None
    parent = (base / "tmp") if base is not None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgepack-emulate-", dir=parent) as tmp_s:
        tmp = Path(tmp_s)
        inside = (lambda p: "/" + str(Path(p).relative_to(base))) if base is not None else (lambda p: str(p))
        if in_root:
            # The root cannot see the host's files: the bundle's pieces, each model and the shim are
            # placed (hard-linked where possible) inside it.
            bundle = tmp / "bundle"
            for name in _bundle_files(bundle_dir):
                _place(bundle_dir / name, bundle / name)
            shim = bundle_dir / "runtime_shim"
            if not shim.is_dir():
                import runtime_shim

                shim = Path(runtime_shim.__file__).parent
            shutil.copytree(shim, bundle / "runtime_shim", ignore=shutil.ignore_patterns("__pycache__"))
            for i, m in enumerate(models):
                over = dict(m.get("overrides") or {})
                if "model" in over:
                    src = (bundle_dir / str(over["model"])).resolve()
                    _place(src, tmp / "models" / f"{i}-{src.name}")
                    over["model"] = inside(tmp / "models" / f"{i}-{src.name}")
                m["overrides"] = over
            shutil.copy2(WORKER, tmp / "worker.py")
            worker, shim_parent, bundle_path = tmp / "worker.py", bundle, bundle
        else:
            bundle_path = bundle_dir
            shim_parent = bundle_dir if (bundle_dir / "runtime_shim").is_dir() else Path(
                __import__("runtime_shim").__file__).parent.parent
            worker = WORKER
        for m in models:
            m["overrides"] = {"intra_op_num_threads": 1, **(m.get("overrides") or {})}
            if not in_root and "model" in m["overrides"]:
                m["overrides"]["model"] = str((bundle_dir / str(m["overrides"]["model"])).resolve())
        (tmp / "texts.json").write_text(json.dumps(list(texts)))
        job = {"bundle": inside(bundle_path), "shim_parent": inside(shim_parent), "texts": inside(tmp / "texts.json"),
               "out": inside(tmp / "out.json"), "models": models, "batch_size": 32}
        (tmp / "job.json").write_text(json.dumps(job))
        argv, env = _command(emu, base, inside(worker), inside(tmp / "job.json"))
        where = "natively" if emu is None else f"under {emu.target} emulation ({emu.qemu_cpu})"
        log(f"[emulate] {len(texts)} rows x {len(models)} model(s) {where}")
        _run(argv, env, log, timeout=timeout, label="host" if emu is None else emu.target)
        out = json.loads((tmp / "out.json").read_text())
    out["emulated"] = None if emu is None else {"target": emu.target, "qemu_cpu": emu.qemu_cpu,
                                                "kernels": emu.kernels, "how": available(emu.target, root=root)[1]}
    return out


def _command(emu: Emulated | None, base: Path | None, worker: str, job: str) -> tuple[list[str], dict[str, str]]:
    if emu is None:
        return [sys.executable, worker, job], {**os.environ, "OMP_NUM_THREADS": "1"}
    fake = {"EDGEPACK_CPU_FLAGS": f"{emu.arch}:{' '.join(emu.flags)}", "OMP_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1", "QEMU_CPU": emu.qemu_cpu}
    if emu.arch == "x86_64":
        return [qemu_binary(emu) or "qemu-x86_64", "-cpu", emu.qemu_cpu, sys.executable, worker, job], {**os.environ, **fake}
    assert base is not None
    # A clean environment: the host's PATH and virtualenv mean nothing inside the root.
    env = {"PATH": ROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8", **fake}
    if (base / ROOT_QEMU).is_file():
        return ["chroot", str(base), "/" + ROOT_QEMU, "-cpu", emu.qemu_cpu, ROOT_PYTHON, worker, job], env
    return ["chroot", str(base), ROOT_PYTHON, worker, job], env  # binfmt_misc runs QEMU (QEMU_CPU picks the core)


def _run(argv: list[str], env: Mapping[str, str], log: Callable[[str], Any], *, timeout: float | None,
         label: str) -> None:
    started = time.time()
    tail: list[str] = []
    proc = subprocess.Popen(argv, env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    last = 0.0
    try:
        for line in proc.stderr:
            line = line.rstrip()
            if line.startswith("progress "):
                done = _ROWS.search(line)
                if time.time() - last > 10 or (done and done.group(1) == done.group(2)):
                    log(f"[emulate] {label}: {line[len('progress '):]}")
                    last = time.time()
            elif line:
                tail = (tail + [line])[-20:]
            if timeout is not None and time.time() - started > timeout:
                proc.kill()
                raise EdgepackError(f"{label}: the run took over {timeout:.0f} s; pass fewer rows (--limit)")
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        detail = next((t for t in reversed(tail) if "Error" in t or "error" in t), tail[-1] if tail else f"exit {rc}")
        raise EdgepackError(f"{label}: the shim failed ({detail.strip()[:300]}); command: {' '.join(argv[:6])} ...")


# -------------------------------------------------------------------------------------- scoring


def score(ids: Sequence[int], top: Sequence[float], gold: Sequence[int] | None, *, oos_id: int | None,
          threshold: float | None) -> dict[str, float | None]:
    """Accuracy raw (argmax) and with the out-of-scope threshold, in-scope accuracy and out-of-scope
    recall (thresholded), from label ids and top probabilities (``runtime_shim``'s threshold rule).

    Example:
        >>> score([0, 1, 0], [0.9, 0.8, 0.2], [0, 1, 2], oos_id=2, threshold=0.5)["accuracy"]
        1.0
    """
    import numpy as np

    ids_a, top_a = np.asarray(ids), np.asarray(top, dtype=np.float64)
    final = ids_a if oos_id is None or threshold is None else np.where(top_a < threshold, oos_id, ids_a)
    if gold is None:
        return {"accuracy": None, "accuracy_raw": None, "in_scope_accuracy": None, "oos_recall": None}
    g = np.asarray(gold)
    out: dict[str, float | None] = {"accuracy": float((final == g).mean()) if len(g) else None,
                                    "accuracy_raw": float((ids_a == g).mean()) if len(g) else None,
                                    "in_scope_accuracy": None, "oos_recall": None}
    if oos_id is not None:
        is_oos = g == oos_id
        if (~is_oos).any():
            out["in_scope_accuracy"] = float((final[~is_oos] == g[~is_oos]).mean())
        if is_oos.any():
            out["oos_recall"] = float((final[is_oos] == oos_id).mean())
    return out


def final_labels(run: Mapping[str, Any], oos_id: int | None, threshold: float | None) -> list[int]:
    """Label ids after the out-of-scope threshold, from a ``predictions`` model entry."""
    return [oos_id if oos_id is not None and threshold is not None and t < threshold else i
            for i, t in zip(run["ids"], run["top"], strict=True)]


def check_bundle(bundle_dir: Path, target: str, *, texts: Sequence[str] | None = None,
                 labels: Sequence[str | int] | None = None, log: Callable[[str], Any] = QUIET,
                 root: str | os.PathLike | None = None, json_path: str | os.PathLike | None = None,
                 timeout: float | None = None) -> dict[str, Any]:
    """Run the bundle on ``target``'s kernels under emulation and natively on this CPU, on ``texts``
    (default: the bundle's ``eval.jsonl``); report accuracy, in-scope accuracy and out-of-scope recall
    of both (when ``labels`` are known: names or label ids) and their agreement. No latency: emulated
    time means nothing. Writes the result to ``json_path`` when given; raises ``EdgepackError`` (one
    line, with the install command) when the emulator is missing.

    Example:
        >>> r = check_bundle(Path("bundle"), "x86-64-avx2", log=lambda m: None)  # doctest: +SKIP
        >>> r["agreement_with_host"], r["emulated"]["accuracy"]  # doctest: +SKIP
        (1.0, 0.902)
    """
    from runtime_shim.datafiles import read_labelled
    from runtime_shim.manifest import write_json_atomic

    bundle_dir = Path(bundle_dir)
    emu = resolve(target)
    ok, why = available(emu.target, root=root)
    if not ok:
        raise EdgepackError(why)
    if not (bundle_dir / "labels.json").is_file():
        raise EdgepackError(f"{bundle_dir}: not a bundle (no labels.json); pass the directory `edgepack pack` wrote")
    meta = json.loads((bundle_dir / "labels.json").read_text())
    names = list(meta["labels"])
    oos_label = meta.get("oos_label")
    oos_id = names.index(oos_label) if oos_label in names else None
    threshold = meta.get("oos_threshold") if oos_id is not None else None
    data = "given texts"
    if texts is None:
        data = str(bundle_dir / "eval.jsonl")
        texts, labels = read_labelled(bundle_dir / "eval.jsonl")
    texts = list(texts)
    gold = None
    if labels is not None:
        unknown = sorted({str(x) for x in labels if not isinstance(x, int) and x not in names})
        if unknown:
            raise EdgepackError(f"labels {', '.join(unknown[:5])} are not among the bundle's labels (labels.json)")
        gold = [x if isinstance(x, int) else names.index(x) for x in labels]
        if len(gold) != len(texts):
            raise EdgepackError(f"{len(texts)} texts but {len(gold)} labels; pass one label per text")
    started = time.time()
    host = predictions(None, bundle_dir, texts, log=log)["models"]["bundle"]
    emu_out = predictions(emu.target, bundle_dir, texts, root=root, log=log, timeout=timeout)
    run = emu_out["models"]["bundle"]
    host_final, emu_final = final_labels(host, oos_id, threshold), final_labels(run, oos_id, threshold)
    flips = [i for i, (a, b) in enumerate(zip(host_final, emu_final, strict=True)) if a != b]
    n = len(texts)
    result = {
        "bundle": str(bundle_dir), "target": emu.target, "data": data, "rows": n,
        "emulator": emu_out["emulated"], "host_cpu": cpu_model_name(),
        "host": score(host["ids"], host["top"], gold, oos_id=oos_id, threshold=threshold),
        "emulated": score(run["ids"], run["top"], gold, oos_id=oos_id, threshold=threshold),
        "agreement_with_host": (n - len(flips)) / n if n else None,
        "agreement_with_host_raw": sum(a == b for a, b in zip(host["ids"], run["ids"], strict=True)) / n if n else None,
        "flips": len(flips),
        "flipped": [{"text": texts[i], "host": names[host_final[i]], "emulated": names[emu_final[i]],
                     **({"label": names[gold[i]]} if gold is not None else {})} for i in flips[:20]],
        "emulated_warnings": run.get("warnings", []),
        "versions": emu_out.get("versions"),
        "seconds": round(time.time() - started, 1),
        "latency": "not measured: emulated time says nothing about the device",
    }
    if json_path is not None:
        write_json_atomic(json_path, result)
    return result


def summary(result: Mapping[str, Any]) -> str:
    """Two lines for the console from a ``check_bundle`` result.

    Example:
        >>> print(summary({"target": "arm64", "rows": 2, "agreement_with_host": 1.0, "flips": 0,
        ...                "host": {"accuracy": 0.5}, "emulated": {"accuracy": 0.5},
        ...                "emulator": {"how": "chroot ROOT qemu-aarch64 -cpu cortex-a72"}}))
        arm64 (chroot ROOT qemu-aarch64 -cpu cortex-a72): 2 rows, agreement with this CPU 100.00% (0 flips)
          accuracy: here 50.00%, emulated 50.00%
    """
    def pct(x: Any) -> str:
        return "-" if x is None else f"{100 * x:.2f}%"

    lines = [f"{result['target']} ({(result.get('emulator') or {}).get('how', '')}): {result['rows']} rows, "
             f"agreement with this CPU {pct(result['agreement_with_host'])} ({result['flips']} flips)"]
    for key in ("accuracy", "accuracy_raw", "in_scope_accuracy", "oos_recall"):
        h, e = result["host"].get(key), result["emulated"].get(key)
        if h is not None or e is not None:
            lines.append(f"  {key.replace('_', ' ')}: here {pct(h)}, emulated {pct(e)}")
    return "\n".join(lines)
