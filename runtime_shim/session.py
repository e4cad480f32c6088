"""ONNX Runtime sessions from a bundle's ``runtime.json``: every thread and graph setting goes through
``SessionOptions`` (never environment variables: the PyPI onnxruntime wheel has not used OpenMP since
1.7, so ``OMP_NUM_THREADS`` does not reach it).

``check_runtime`` checks the keys the pipeline reads itself (``model`` and ``tokenizer``: files of the
bundle its manifest lists; ``max_length``, ``pad_id``, ``fast_wordpiece``, ``answer``; ``env``, no longer applied).
Session keys read here (others in ``runtime.json`` are kept in the settings and ignored):

- ``intra_op_num_threads``: 0 lets ORT use one thread per physical core (pinned); N uses N-1
  workers plus the calling thread. For short sequences one thread often beats two.
- ``inter_op_num_threads`` and ``execution_mode`` (``sequential``/``parallel``): BERT is a chain of
  layers, so ``parallel`` buys nothing; ``sequential`` is the default.
- ``graph_optimization_level``: ``disable``, ``basic``, ``extended``, ``all`` (``layout`` too when
  the installed onnxruntime has it).
- ``session_config``: string entries for ``add_session_config_entry``, e.g.
  ``session.intra_op.allow_spinning`` or ``session.x64quantprecision``.
- ``enable_cpu_mem_arena``, ``enable_mem_pattern`` (booleans) and ``log_severity_level`` (0-4).
- ``disabled_optimizers``: names of ORT graph transformers not to run at load. The default turns off
  ``SkipLayerNormFusion``: its fused CPU kernel took 18 us on 9 x 384 rows where the Add and
  LayerNormalization it replaces took 7 us (onnxruntime 1.31, x86-64, one thread), and edgepack's
  graphs keep that pair on purpose (``edgepack.stages.export.bert_onnx``). ``[]`` runs every transformer.
- ``session_api``: ``auto`` (default), ``c`` or ``python``: whether the session is made through ONNX
  Runtime's C API (``runtime_shim.capi``: the wheel's own C library, without importing the package or
  numpy, 14-15 MB less peak memory on every bundle measured; docs/memory.md) or through the package.
  ``auto`` takes the C API on Linux when the wheel has the library (``session.use_c_api``).
"""

from __future__ import annotations

import copy
import os
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import capi, csession
from .cpu import BundleWarning
from .manifest import MANIFEST, BundleError, bad_path

if TYPE_CHECKING:
    import onnxruntime as ort

# The setting names and ONNX Runtime's values for them (GraphOptimizationLevel, ExecutionMode): the same
# integers in the Python package and the C API. "layout" needs onnxruntime >= 1.22.
GRAPH_LEVELS = capi.GRAPH_LEVELS
EXECUTION_MODES = capi.EXECUTION_MODES
SESSION_APIS = ("auto", "c", "python")
MAX_THREADS = 256  # more than any device's cores; an absurd count made ORT start that many threads and hang
MAX_OUTPUT_NAME = 128  # an output name, as runtime.json's "answer" gives it
_FILE_KEY = re.compile(r"file|path|folder|dir", re.IGNORECASE)

DEFAULTS: dict[str, Any] = {
    "intra_op_num_threads": 1,
    "inter_op_num_threads": 1,
    "execution_mode": "sequential",
    "graph_optimization_level": "all",
    "session_config": {},
    # ORT warns at level 2 about initializers it folds away: noise on a device's console.
    "log_severity_level": 3,
    "disabled_optimizers": ["SkipLayerNormFusion"],
}


def effective_settings(settings: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``DEFAULTS`` updated by ``settings`` (a ``runtime.json`` dict) and then by ``overrides``.

    ``session_config`` tables are merged entry by entry; every other key is replaced.

    Examples:
        >>> s = effective_settings({"intra_op_num_threads": 1, "session_config": {"a": "1"}},
        ...                        {"intra_op_num_threads": 2, "session_config": {"b": "0"}})
        >>> s["intra_op_num_threads"], s["session_config"]
        (2, {'a': '1', 'b': '0'})
    """
    out = copy.deepcopy(DEFAULTS)
    for layer in (settings or {}), (overrides or {}):
        for key, value in layer.items():
            if key == "session_config" and isinstance(value, Mapping):
                out["session_config"] = {**out["session_config"], **{str(k): str(v) for k, v in value.items()}}
            else:
                out[key] = copy.deepcopy(value)
    return out


def _int(settings: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    value = settings[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BundleError(f"runtime.json: {key}={str(value)[:40]} is not valid; use an integer {lo}..{hi}")
    return value


def _choice(settings: Mapping[str, Any], key: str, choices: Mapping[str, Any]) -> Any:
    value = settings[key]
    if value not in choices:
        raise BundleError(f"runtime.json: {key}={value!r} is not valid; choose one of: {', '.join(choices)}")
    return choices[value]


def checked_options(settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The session settings of a ``runtime.json`` dict (missing keys take ``DEFAULTS``), checked, with
    ONNX Runtime's integers for the named choices: what both session APIs are built from.

    Raises ``BundleError`` naming the key and the valid values when a setting is wrong.

    Examples:
        >>> o = checked_options({"graph_optimization_level": "basic"})
        >>> o["graph_optimization_level"], o["intra_op_num_threads"], o["disabled_optimizers"]
        (1, 1, ['SkipLayerNormFusion'])
    """
    s = effective_settings(settings)
    out: dict[str, Any] = {
        "intra_op_num_threads": _int(s, "intra_op_num_threads", 0, MAX_THREADS),
        "inter_op_num_threads": _int(s, "inter_op_num_threads", 0, MAX_THREADS),
        "execution_mode": _choice(s, "execution_mode", EXECUTION_MODES),
        "graph_optimization_level": _choice(s, "graph_optimization_level", GRAPH_LEVELS),
        "log_severity_level": _int(s, "log_severity_level", 0, 4),
    }
    for key in ("enable_cpu_mem_arena", "enable_mem_pattern"):
        if key in s:
            if not isinstance(s[key], bool):
                raise BundleError(f"runtime.json: {key}={s[key]!r} is not valid; use true or false")
            out[key] = s[key]
    config = s["session_config"]
    if not isinstance(config, Mapping):
        raise BundleError(f"runtime.json: session_config={str(config)[:80]} is not valid; use a table of string entries")
    out["session_config"] = {str(k): str(v) for k, v in config.items()}
    for key, value in out["session_config"].items():
        # ORT's limits on an entry; and no entry that names a file to read or write (external initializers'
        # folder, a context or statistics file) or configures an execution provider: a bundle's files are
        # those its manifest lists.
        if len(key) > 128 or len(value) > 1024 or _FILE_KEY.search(key) or key.startswith("ep."):
            raise BundleError(f"runtime.json: session_config entry {key[:128]!r} is not accepted (one naming a file "
                              "or an execution provider, or longer than ORT allows); remove it")
    disabled = s.get("disabled_optimizers") or []
    if not isinstance(disabled, list) or not all(isinstance(d, str) for d in disabled):
        raise BundleError(f"runtime.json: disabled_optimizers={disabled!r} is not valid; use a list of "
                          "ORT graph transformer names, e.g. [\"SkipLayerNormFusion\"], or []")
    out["disabled_optimizers"] = list(disabled)
    api = s.get("session_api", "auto")
    if api not in SESSION_APIS:
        raise BundleError(f"runtime.json: session_api={api!r} is not valid; choose one of: {', '.join(SESSION_APIS)}")
    out["session_api"] = api
    return out


# runtime.json settings that are numbers: (lowest, highest). max_length beyond any encoder's positions,
# pad_id within int32 ids.
_INT_SETTINGS = {"max_length": (1, 1 << 15), "pad_id": (0, (1 << 31) - 1)}
# ``env`` is no longer applied (ONNX Runtime's threads are SessionOptions, and numpy's BLAS does no work
# in the shim): older tuned bundles' BLAS thread entries are accepted and ignored, anything else refused.
_OLD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def check_runtime(path: Path, runtime: Mapping[str, Any], listed: Mapping[str, Any] | None) -> None:
    """Refuse ``runtime.json`` settings that name a file outside the bundle (or one ``listed``, the
    manifest's files, does not hold), numbers out of range, and an ``env`` table beyond old thread entries;
    one line naming the file and the setting. The session's own settings are ``session.checked_options``'.

    Examples:
        >>> check_runtime(Path("b/runtime.json"), {"model": "/etc/passwd"}, None)
        Traceback (most recent call last):
        ...
        runtime_shim.readers.BundleError: b/runtime.json: model='/etc/passwd' is a path outside the bundle; name a file of the bundle (default 'model.quant.onnx') and re-pack
    """
    for key, default in (("model", "model.quant.onnx"), ("tokenizer", "tokenizer.json")):
        rel = runtime.get(key, default)
        why = bad_path(rel) or (None if listed is None or rel in listed else f"not listed in {MANIFEST}")
        if why:
            raise BundleError(f"{path}: {key}={str(rel)[:120]!r} is {why}; name a file of the bundle (default {default!r}) "
                              "and re-pack")
    check_values(path, runtime)
    env = runtime.get("env") or {}
    if not isinstance(env, Mapping) or any(k not in _OLD_ENV or not str(v).isdigit() or len(str(v)) > 4
                                           for k, v in env.items()):
        raise BundleError(f"{path}: env={str(env)[:120]} is not applied by this runtime and may hold only "
                          f"{', '.join(_OLD_ENV)} (old bundles'); remove it: thread settings are "
                          "intra_op_num_threads and inter_op_num_threads")


def check_values(where: str | os.PathLike, settings: Mapping[str, Any]) -> None:
    """Refuse ``max_length``, ``pad_id``, ``fast_wordpiece`` or ``answer`` values that are not what they must be
    (``answer``: null or the name of a model output, ``OnnxPipeline`` checks that the model declares it).

    Examples:
        >>> check_values("overrides", {"max_length": 0})
        Traceback (most recent call last):
        ...
        runtime_shim.readers.BundleError: overrides: max_length=0 is not valid; use an integer 1..32768
    """
    for key, (lo, hi) in _INT_SETTINGS.items():
        value = settings.get(key, lo)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise BundleError(f"{where}: {key}={str(value)[:40]} is not valid; use an integer {lo}..{hi}")
    if not isinstance(settings.get("fast_wordpiece", True), bool):
        raise BundleError(f"{where}: fast_wordpiece={str(settings['fast_wordpiece'])[:40]} is not valid; use true or false")
    answer = settings.get("answer")
    if answer is not None and (not isinstance(answer, str) or not 0 < len(answer) <= MAX_OUTPUT_NAME):
        raise BundleError(f"{where}: answer={str(answer)[:40]!r} is not valid; name the model's answer output "
                          f"(at most {MAX_OUTPUT_NAME} characters, edgepack writes \"answer\") or null for the logits")


def answer_output(runtime_json: Path, model: Path, outputs: Mapping[str, Any], name: str | None) -> str | None:
    """``name`` (``runtime.json``'s ``answer``, checked by ``check_values``) when ``outputs`` (the session's,
    by name) declare it as float64 ``[batch, 2]``, the answer edgepack's bundle stage appends; None for
    none (older bundles, or ``{"answer": null}``). Refused otherwise, naming both files.

    Examples:
        >>> answer_output(Path("b/runtime.json"), Path("b/model.quant.onnx"), {}, "answer")
        Traceback (most recent call last):
        ...
        runtime_shim.readers.BundleError: b/runtime.json: answer='answer' names a model output, but model.quant.onnx declares no such output: expected tensor(double) [batch, 2]; re-run `edgepack pack` (or set answer to null)
    """
    if name is None:
        return None
    out = outputs.get(name)
    if out is None or out.type != "tensor(double)" or len(out.shape or ()) != 2 or out.shape[-1] != 2:
        declared = "no such output" if out is None else f"{out.type} {out.shape}"
        raise BundleError(f"{runtime_json}: answer={name!r} names a model output, but {model.name} declares "
                          f"{declared}: expected tensor(double) [batch, 2]; re-run `edgepack pack` (or set answer to null)")
    return name


def session_options(settings: Mapping[str, Any] | None = None) -> ort.SessionOptions:
    """``onnxruntime.SessionOptions`` for a ``runtime.json`` dict (missing keys take ``DEFAULTS``).

    Raises ``BundleError`` naming the key and the valid values when a setting is wrong.

    Examples:
        >>> so = session_options({"intra_op_num_threads": 2, "session_config": {"session.intra_op.allow_spinning": "0"}})
        >>> so.intra_op_num_threads, so.get_session_config_entry("session.intra_op.allow_spinning")
        (2, '0')
    """
    import onnxruntime as ort

    o = checked_options(settings)
    so = ort.SessionOptions()
    so.intra_op_num_threads = o["intra_op_num_threads"]
    so.inter_op_num_threads = o["inter_op_num_threads"]
    so.execution_mode = ort.ExecutionMode(o["execution_mode"])
    check_level(o["graph_optimization_level"], ort.__version__)
    so.graph_optimization_level = ort.GraphOptimizationLevel(o["graph_optimization_level"])
    so.log_severity_level = o["log_severity_level"]
    for key in ("enable_cpu_mem_arena", "enable_mem_pattern"):
        if key in o:
            setattr(so, key, o[key])
    for key, value in o["session_config"].items():
        try:
            so.add_session_config_entry(key, value)
        except Exception as e:  # ORT raises a bare RuntimeError/Fail for a bad entry
            raise BundleError(f"runtime.json: session_config entry {key}={value!r} was refused by onnxruntime "
                              f"({str(e).splitlines()[0]}); fix or remove it") from None
    return so


LAYOUT_SINCE = (1, 22)


def check_level(level: int, version: str) -> None:
    """Refuse "layout" on an onnxruntime before 1.22, alike for both APIs: the Python package's enum takes
    any integer there, and the C library refused it only when the session was made.

    Examples:
        >>> check_level(GRAPH_LEVELS["layout"], "1.19.0")
        Traceback (most recent call last):
        ...
        runtime_shim.readers.BundleError: runtime.json: graph_optimization_level='layout' is not offered by onnxruntime 1.19.0; use disable, basic, extended or all
    """
    if level == GRAPH_LEVELS["layout"] and release(version) < LAYOUT_SINCE:
        raise BundleError(f"runtime.json: graph_optimization_level='layout' is not offered by onnxruntime {version}; "
                          "use disable, basic, extended or all")


def use_c_api(choice: str) -> capi._Api | None:
    """The C API handle when a session should be made through it (``runtime_shim.capi``), else None.

    ``"python"``: never. ``"c"``: always (``BundleError`` when the wheel has no usable C library).
    ``"auto"``: on Linux (where it is tested) when the library is there, also in a process that has
    imported the ``onnxruntime`` package (edgepack's own: its timings then measure the path a device
    serves). Such a process holds both copies of the runtime; ``"python"`` keeps it to one.

    Examples:
        >>> use_c_api("python") is None
        True
    """
    if choice == "python":
        return None
    if choice == "auto" and not sys.platform.startswith("linux"):
        return None
    api = capi.library()
    if api is None and choice == "c":
        raise BundleError(f"runtime.json: session_api='c' but the onnxruntime wheel's C library "
                          f"({capi.library_path() or 'capi/libonnxruntime.*'}) is missing or older than ORT "
                          f"{'.'.join(map(str, capi.MIN_ORT))}; set session_api to 'auto' or 'python'")
    return api


def make_session(model_path: str | os.PathLike, settings: Mapping[str, Any] | None = None,
                 overrides: Mapping[str, Any] | None = None) -> ort.InferenceSession | csession.CSession:
    """A CPU session for an ``.onnx`` or ``.ort`` model with the given settings: an ``InferenceSession``,
    or a ``runtime_shim.csession.CSession`` when ``session_api`` picks the C API (``use_c_api``).

    Examples:
        >>> sess = make_session("bundle/model.quant.onnx", {"intra_op_num_threads": 1})  # doctest: +SKIP
        >>> [i.name for i in sess.get_inputs()]  # doctest: +SKIP
        ['input_ids', 'attention_mask', 'token_type_ids']
    """
    s = effective_settings(settings, overrides)
    o = checked_options(s)
    path = os.fspath(model_path)
    if not os.path.isfile(path):
        raise BundleError(f"{path}: missing; check the 'model' entry of runtime.json or re-run `edgepack pack`")
    api = use_c_api(o["session_api"])
    if api is not None:
        check_level(o["graph_optimization_level"], api.version)
        if o["disabled_optimizers"]:
            o["session_config"] = {"optimization.disable_specified_optimizers": ",".join(o["disabled_optimizers"]),
                                   **o["session_config"]}
        try:
            return csession.CSession(path, o, api)
        except capi.OrtError as e:
            raise BundleError(f"{path}: onnxruntime {api.version} (C API) cannot load it "
                              f"({_first_line(e)[:200]}); re-run `edgepack pack` or install the onnxruntime "
                              "version in manifest.json") from None
    import onnxruntime as ort

    so = session_options(s)
    try:
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=o["disabled_optimizers"])
    except Exception as e:  # ORT raises InvalidGraph, Fail, NotImplemented... for a file it cannot load
        raise BundleError(f"{path}: onnxruntime {ort.__version__} cannot load it ({_first_line(e)[:200]}); "
                          "re-run `edgepack pack` or install the onnxruntime version in manifest.json") from None


class OrtVersionWarning(BundleWarning):
    """The installed onnxruntime is older than the one the bundle was built and measured with (its
    manifest's ``versions``): its kernels, fusions and int8 paths were not the ones checked."""


def installed_version(session: Any) -> str:
    """The ONNX Runtime version a session runs on: the C library's own for a C API session (without
    importing the package), else the ``onnxruntime`` package's.

    Examples:
        >>> installed_version(make_session("bundle/model.quant.onnx"))  # doctest: +SKIP
        '1.32.0'
    """
    api = getattr(session, "api", None)
    if api is not None:
        return api.version
    import onnxruntime as ort

    return ort.__version__


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string (up to three parts; pre-release and local tags dropped).

    Examples:
        >>> release("1.32.0"), release("1.20.0.dev20240101+cpu"), release("1.9")
        ((1, 32, 0), (1, 20, 0), (1, 9))
    """
    out = []
    for part in str(version).split("+")[0].split(".")[:3]:
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        out.append(int(digits.group()))
    return tuple(out)


def ort_version_warning(manifest: Mapping[str, Any], installed: str) -> str | None:
    """One line when ``installed`` is older than the onnxruntime the bundle was built and measured with
    (``manifest["versions"]["onnxruntime"]``, as its ``requirements.txt`` asks), else None.

    Examples:
        >>> ort_version_warning({"versions": {"onnxruntime": "1.32.0"}}, "1.19.0")  # doctest: +ELLIPSIS
        "bundle built and measured with onnxruntime 1.32.0, but this is onnxruntime 1.19.0: ..."
        >>> ort_version_warning({"versions": {"onnxruntime": "1.32.0"}}, "1.32.1") is None
        True
    """
    versions = manifest.get("versions") if isinstance(manifest, Mapping) else None
    built = versions.get("onnxruntime") if isinstance(versions, Mapping) else None
    if not isinstance(built, str) or not release(built) or not release(installed):
        return None
    if release(installed) >= release(built):
        return None
    return (f"bundle built and measured with onnxruntime {built}, but this is onnxruntime {installed}: its answers "
            f"and latency were not checked on this version; install onnxruntime>={built} (the bundle's "
            "requirements.txt)")


_warned: set[str] = set()


def warn_ort_once(manifest: Mapping[str, Any], session: Any, *, stacklevel: int = 3) -> str | None:
    """Issue ``ort_version_warning`` as an ``OrtVersionWarning`` the first time this process sees it;
    return the message (None when the installed onnxruntime is as new as the build's). Called when a
    bundle is loaded.

    Examples:
        >>> warn_ort_once({}, None)  # no version recorded: nothing to say
    """
    if not isinstance(manifest, Mapping) or not manifest.get("versions"):
        return None
    msg = ort_version_warning(manifest, installed_version(session))
    if msg is not None and msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, OrtVersionWarning, stacklevel=stacklevel)
    return msg


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
