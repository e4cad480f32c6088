"""An ONNX Runtime session through ORT's C API (``ctypes``), without importing the ``onnxruntime`` package.

The PyPI ``onnxruntime`` wheel ships two copies of the runtime: the Python extension
(``onnxruntime_pybind11_state``) and the C library (``capi/libonnxruntime.so.<version>``). Importing the
package loads the extension and numpy (which it imports itself): 35 MB resident before any model, where
opening the C library costs 5 MB (docs/memory.md). ``CSession`` opens the C library of the installed
wheel (found with ``importlib.util.find_spec``, which does not import the package), so a process that
serves a bundle this way never loads numpy or the extension. Same package, same version, same kernels:
the logits equal ``InferenceSession``'s bit for bit (tests/test_capi.py).

Hand-written, not a library: no maintained Python binding of ORT's C API exists on PyPI, and the shim
needs about forty entries of it. The function table (``OrtApi``) is append-only across ORT releases, so the
positions below, taken from ``onnxruntime_c_api.h``, hold for every version that has them (API 13 =
ORT 1.13 has all of them); ``CSession`` asks for API 13. The one later feature used,
``optimization.disable_specified_optimizers`` (the shim's ``disabled_optimizers``), is a session config
key, and ``library()`` refuses libraries older than ORT 1.17, where the key appeared.

``session.make_session`` picks this class when ``runtime.json``'s ``session_api`` is ``"c"``, or
``"auto"`` (the default) on Linux when the C library is there (``session.use_c_api``).
Standard library only.
"""

from __future__ import annotations

import ctypes as C
import importlib.util
import sys
import threading
from pathlib import Path
from typing import Any

API_VERSION = 13
MIN_ORT = (1, 17)

# OrtApi's entries used here, by position (onnxruntime_c_api.h, struct OrtApi; append-only).
_INDEX = {
    "GetErrorMessage": 2, "CreateEnv": 3, "CreateSession": 7, "Run": 9, "CreateSessionOptions": 10,
    "SetOptimizedModelFilePath": 11,
    "SetSessionExecutionMode": 13, "EnableMemPattern": 16, "DisableMemPattern": 17,
    "EnableCpuMemArena": 18, "DisableCpuMemArena": 19, "SetSessionLogSeverityLevel": 22,
    "SetSessionGraphOptimizationLevel": 23, "SetIntraOpNumThreads": 24, "SetInterOpNumThreads": 25,
    "SessionGetInputCount": 30, "SessionGetOutputCount": 31, "SessionGetInputTypeInfo": 33,
    "SessionGetOutputTypeInfo": 34, "SessionGetInputName": 36, "SessionGetOutputName": 37,
    "CreateTensorWithDataAsOrtValue": 49, "GetTensorMutableData": 51, "CastTypeInfoToTensorInfo": 55,
    "GetTensorElementType": 60, "GetDimensionsCount": 61, "GetDimensions": 62, "GetTensorTypeAndShape": 65,
    "CreateCpuMemoryInfo": 69, "AllocatorFree": 76, "GetAllocatorWithDefaultOptions": 78,
    "ReleaseEnv": 92, "ReleaseStatus": 93, "ReleaseMemoryInfo": 94, "ReleaseSession": 95, "ReleaseValue": 96,
    "ReleaseTypeInfo": 98, "ReleaseTensorTypeAndShapeInfo": 99, "ReleaseSessionOptions": 100,
    "AddSessionConfigEntry": 130,
}
_P, _PP, _SZ = C.c_void_p, C.POINTER(C.c_void_p), C.c_size_t
_I64P = C.POINTER(C.c_int64)
_PTR = C.sizeof(C.c_void_p)
_SIGNATURES: dict[str, tuple[Any, ...]] = {  # (restype, *argtypes); restype _P is an OrtStatus* (NULL = ok)
    "GetErrorMessage": (C.c_char_p, _P),
    "CreateEnv": (_P, C.c_int, C.c_char_p, _PP),
    "CreateSession": (_P, _P, C.c_char_p, _P, _PP),
    "Run": (_P, _P, _P, C.POINTER(C.c_char_p), _PP, _SZ, C.POINTER(C.c_char_p), _SZ, _PP),
    "CreateSessionOptions": (_P, _PP),
    "SetOptimizedModelFilePath": (_P, _P, C.c_char_p),
    "SetSessionExecutionMode": (_P, _P, C.c_int),
    "EnableMemPattern": (_P, _P), "DisableMemPattern": (_P, _P),
    "EnableCpuMemArena": (_P, _P), "DisableCpuMemArena": (_P, _P),
    "SetSessionLogSeverityLevel": (_P, _P, C.c_int),
    "SetSessionGraphOptimizationLevel": (_P, _P, C.c_int),
    "SetIntraOpNumThreads": (_P, _P, C.c_int), "SetInterOpNumThreads": (_P, _P, C.c_int),
    "SessionGetInputCount": (_P, _P, C.POINTER(_SZ)), "SessionGetOutputCount": (_P, _P, C.POINTER(_SZ)),
    "SessionGetInputTypeInfo": (_P, _P, _SZ, _PP), "SessionGetOutputTypeInfo": (_P, _P, _SZ, _PP),
    "SessionGetInputName": (_P, _P, _SZ, _P, C.POINTER(C.c_char_p)),
    "SessionGetOutputName": (_P, _P, _SZ, _P, C.POINTER(C.c_char_p)),
    "CreateTensorWithDataAsOrtValue": (_P, _P, _P, _SZ, _I64P, _SZ, C.c_int, _P),  # out: an address
    "GetTensorMutableData": (_P, _P, _PP),
    "CastTypeInfoToTensorInfo": (_P, _P, _PP),
    "GetTensorElementType": (_P, _P, C.POINTER(C.c_int)),
    "GetDimensionsCount": (_P, _P, C.POINTER(_SZ)),
    "GetDimensions": (_P, _P, _I64P, _SZ),
    "GetTensorTypeAndShape": (_P, _P, _PP),
    "CreateCpuMemoryInfo": (_P, C.c_int, C.c_int, _PP),
    "AllocatorFree": (_P, _P, _P),
    "GetAllocatorWithDefaultOptions": (_P, _PP),
    "AddSessionConfigEntry": (_P, _P, C.c_char_p, C.c_char_p),
    **{name: (None, _P) for name in ("ReleaseEnv", "ReleaseStatus", "ReleaseMemoryInfo", "ReleaseSession",
                                     "ReleaseValue", "ReleaseTypeInfo", "ReleaseTensorTypeAndShapeInfo",
                                     "ReleaseSessionOptions")},
}

# ONNXTensorElementDataType: the ones a classifier's inputs and logits use, and names for the rest
# (what a message says a model declares or returned).
FLOAT, INT32, INT64, DOUBLE = 1, 6, 7, 11
TYPE_NAMES = {i: f"tensor({name})" for i, name in enumerate(
    ("undefined", "float", "uint8", "int8", "uint16", "int16", "int32", "int64", "string", "bool", "float16",
     "double", "uint32", "uint64", "complex64", "complex128", "bfloat16"))}
GRAPH_LEVELS = {"disable": 0, "basic": 1, "extended": 2, "all": 99, "layout": 3}
EXECUTION_MODES = {"sequential": 0, "parallel": 1}
_LOG_ERROR = 3  # the environment logs errors only, like the sessions (log_severity_level 3)


class OrtError(RuntimeError):
    """An ``OrtStatus`` error: the message ONNX Runtime returned."""


class _Api:
    """The C library and its function table, opened once per process (``library()``)."""

    def __init__(self, path: str):
        self.lib = C.CDLL(path)

        class _Base(C.Structure):
            _fields_ = [("GetApi", C.CFUNCTYPE(_P, C.c_uint32)), ("GetVersionString", C.CFUNCTYPE(C.c_char_p))]

        self.lib.OrtGetApiBase.restype = C.POINTER(_Base)
        base = self.lib.OrtGetApiBase().contents
        self.version: str = base.GetVersionString().decode()
        table = base.GetApi(API_VERSION)
        if not table:
            raise OrtError(f"{path}: ONNX Runtime {self.version} does not offer C API version {API_VERSION}")
        funcs = C.cast(table, C.POINTER(_P))
        # ctypes releases the GIL around these calls, so threads run sessions concurrently as with pybind.
        self.f = {name: C.CFUNCTYPE(*_SIGNATURES[name])(funcs[i]) for name, i in _INDEX.items()}
        self._env: Any = None
        self._cpu: Any = None
        self._lock = threading.Lock()

    def check(self, status: Any) -> None:
        if status:
            message = self.f["GetErrorMessage"](status).decode(errors="replace")
            self.f["ReleaseStatus"](status)
            raise OrtError(message)

    def out(self, name: str, *args: Any) -> Any:
        """Call ``name`` with ``args`` plus one output pointer; return what it wrote."""
        value = _P()
        self.check(self.f[name](*args, C.byref(value)))
        return value

    @property
    def env(self) -> Any:
        with self._lock:  # one OrtEnv per process (ORT's rule), made on first use
            if self._env is None:
                self._env = self.out("CreateEnv", _LOG_ERROR, b"edgepack")
                self._cpu = self.out("CreateCpuMemoryInfo", 0, 0)  # device allocator, default memory
            return self._env


_API: _Api | None = None
_API_LOCK = threading.Lock()


def library_path() -> str | None:
    """The C library of the installed ``onnxruntime`` wheel, without importing the package (or None).

    Example:
        >>> library_path()  # doctest: +SKIP
        '/venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.32.0'
    """
    try:
        spec = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    capi = Path(next(iter(spec.submodule_search_locations))) / "capi"
    if sys.platform.startswith("linux"):
        found = sorted(capi.glob("libonnxruntime.so.*"))
    elif sys.platform == "darwin":
        found = sorted(capi.glob("libonnxruntime.*.dylib"))
    else:
        found = [capi / "onnxruntime.dll"]
    found = [p for p in found if p.is_file()]
    return str(found[-1]) if found else None


def _version_tuple(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def library() -> _Api | None:
    """The process's C API handle, opened on first call; None when the wheel has no usable C library
    (not found, not loadable, or older than ORT 1.17).

    Example:
        >>> library().version  # doctest: +SKIP
        '1.32.0'
    """
    global _API
    with _API_LOCK:
        if _API is None:
            path = library_path()
            if path is None:
                return None
            try:
                api = _Api(path)
            except (OSError, OrtError, AttributeError):
                return None
            if _version_tuple(api.version) < MIN_ORT:
                return None
            _API = api
        return _API
