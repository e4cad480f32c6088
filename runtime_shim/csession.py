"""``CSession``: a CPU session on a model file through ONNX Runtime's C API (``runtime_shim.capi``), with
the methods of ``InferenceSession`` the shim uses and ``run_rows``, which needs no numpy.
Standard library only (numpy is imported inside ``run``, for callers that feed numpy arrays).
"""

from __future__ import annotations

import ctypes as C
import os
import threading
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

from .capi import _P, _PTR, _SZ, DOUBLE, FLOAT, INT32, INT64, TYPE_NAMES, OrtError, _Api, library
from .manifest import BundleError


class NodeArg:
    """An input's or output's name, type and shape, read like ``onnxruntime.NodeArg``."""

    __slots__ = ("name", "type", "shape", "elem")

    def __init__(self, name: str, elem: int, shape: list[int | None]):
        self.name, self.elem, self.shape = name, elem, shape
        self.type = TYPE_NAMES.get(elem, f"tensor(type {elem})")

    def __repr__(self) -> str:
        return f"NodeArg(name={self.name!r}, type={self.type!r}, shape={self.shape})"


class CSession:
    """A CPU session on a model file through the C API, with the methods of ``InferenceSession`` the shim
    uses (``get_inputs``, ``get_outputs``, ``run`` on numpy arrays), ``run_rows``, which feeds token
    id rows and returns logits rows without numpy, and ``run_one``, one row's output as Python floats
    (a float or double output: edgepack's ``answer``).

    Example:
        >>> sess = CSession("bundle/model.quant.onnx", {"intra_op_num_threads": 1, "graph_optimization_level": 99})
        ... # doctest: +SKIP
        >>> sess.run_rows([[101, 7592, 102]], pad_id=0)[0][:3]  # doctest: +SKIP
        array('f', [-1.2, 0.3, 4.1])
    """

    def __init__(self, path: str | os.PathLike, options: Mapping[str, Any], api: _Api | None = None):
        api = api or library()
        if api is None:
            raise OrtError("the onnxruntime wheel's C library was not found")
        self.api, f = api, api.f
        self.path = os.fspath(path)
        self.options = dict(options)  # what it was made with (session.checked_options' keys)
        so = api.out("CreateSessionOptions")
        try:
            api.check(f["SetIntraOpNumThreads"](so, options["intra_op_num_threads"]))
            api.check(f["SetInterOpNumThreads"](so, options["inter_op_num_threads"]))
            api.check(f["SetSessionExecutionMode"](so, options["execution_mode"]))
            api.check(f["SetSessionGraphOptimizationLevel"](so, options["graph_optimization_level"]))
            api.check(f["SetSessionLogSeverityLevel"](so, options["log_severity_level"]))
            for key, on, off in (("enable_cpu_mem_arena", "EnableCpuMemArena", "DisableCpuMemArena"),
                                 ("enable_mem_pattern", "EnableMemPattern", "DisableMemPattern")):
                if key in options:
                    api.check(f[on if options[key] else off](so))
            for key, value in options.get("session_config", {}).items():
                api.check(f["AddSessionConfigEntry"](so, str(key).encode(), str(value).encode()))
            if options.get("optimized_model_filepath"):  # SessionOptions.optimized_model_filepath: the graph ORT runs
                api.check(f["SetOptimizedModelFilePath"](so, os.fsencode(options["optimized_model_filepath"])))
            self._ptr = api.out("CreateSession", api.env, os.fsencode(os.fspath(path)), so)
        finally:
            f["ReleaseSessionOptions"](so)
        self._inputs = [self._arg(i, "Input") for i in range(self._count("SessionGetInputCount"))]
        self._outputs = [self._arg(i, "Output") for i in range(self._count("SessionGetOutputCount"))]
        self._prepare()

    # ------------------------------------------------------------------------------ introspection

    def _count(self, name: str) -> int:
        n = _SZ()
        self.api.check(self.api.f[name](self._ptr, C.byref(n)))
        return n.value

    def _arg(self, index: int, kind: str) -> NodeArg:
        api, f = self.api, self.api.f
        allocator = api.out("GetAllocatorWithDefaultOptions")
        raw = C.c_char_p()
        api.check(f[f"SessionGet{kind}Name"](self._ptr, index, allocator, C.byref(raw)))
        name = (raw.value or b"").decode()
        api.check(f["AllocatorFree"](allocator, C.cast(raw, _P)))
        info = api.out(f"SessionGet{kind}TypeInfo", self._ptr, index)
        try:
            elem, dims = self._type_and_dims(api.out("CastTypeInfoToTensorInfo", info))  # owned by info
        finally:
            f["ReleaseTypeInfo"](info)
        return NodeArg(name, elem, [d if d >= 0 else None for d in dims])

    def _type_and_dims(self, tensor_info: Any) -> tuple[int, list[int]]:
        """An ``OrtTensorTypeAndShapeInfo``'s element type and dimensions (-1 where symbolic)."""
        api, f = self.api, self.api.f
        elem, ndim = C.c_int(), _SZ()
        api.check(f["GetTensorElementType"](tensor_info, C.byref(elem)))
        api.check(f["GetDimensionsCount"](tensor_info, C.byref(ndim)))
        dims = (C.c_int64 * max(ndim.value, 1))()
        api.check(f["GetDimensions"](tensor_info, dims, ndim.value))
        return elem.value, list(dims[:ndim.value])

    def get_inputs(self) -> list[NodeArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self._outputs)

    # -------------------------------------------------------------------------------------- runs
    # A single query's whole cost here is a few microseconds of Python around ORT's own work, so the run
    # path keeps to what it must do per call: names, element types, the output's width and the bound
    # functions are looked up once (``_prepare``), and nothing is shared between calls but those (threads
    # run one session at once).

    def _prepare(self) -> None:
        f = self.api.f
        self._create, self._run_c = f["CreateTensorWithDataAsOrtValue"], f["Run"]
        self._data, self._release = f["GetTensorMutableData"], f["ReleaseValue"]
        self._in_c = (C.c_char_p * len(self._inputs))(*[a.name.encode() for a in self._inputs])
        self._elems = [a.elem for a in self._inputs]
        self._out_c = {o.name: (C.c_char_p * 1)(o.name.encode()) for o in self._outputs}
        self._width = {o.name: (o.shape[-1] if o.elem == FLOAT and len(o.shape) == 2 and o.shape[-1] else None)
                       for o in self._outputs}
        # run_one reads a [batch, width] output of either float type, by its declared one.
        self._one = {o.name: (o.elem, o.shape[-1]) for o in self._outputs
                     if o.elem in (FLOAT, DOUBLE) and len(o.shape) == 2 and o.shape[-1]}
        self._n_in = len(self._inputs)
        self._codes = ["q" if a.elem == INT64 else "i" for a in self._inputs]
        self._np_types: list[tuple[str, Any]] | None = None  # run()'s numpy dtypes, made on first use
        self._local = threading.local()  # per thread: the single-query tensors below, by length

    def _single_entry(self, width: int, output: str, fed: bool = False) -> _Single | None:
        """This thread's tensors for one unpadded row of ``width`` tokens (``_Single``), once a row of that
        width went through the checked path (``_keep_single``); else None. An output has one element type
        here: ``run_rows`` keeps only float outputs, ``run_one`` each output's declared type."""
        cache = getattr(self._local, "single", None)
        return None if cache is None else cache.get((width, output, fed))

    def _keep_single(self, width: int, output: str, fed: bool = False, elem: int = FLOAT) -> None:
        """After a row of ``width`` tokens came back with the declared shape (``_checked_shape``): keep input
        buffers with OrtValues over them (mask ones, token types zeros, written once) and an output buffer
        of ``elem`` (float, or double for ``run_one``) ORT writes into. A single query then costs one ``Run`` call and two copies: without it,
        creating and releasing the tensors took ~10 us a query, more than ``InferenceSession.run``'s whole
        overhead. ``fed``: ``run()``'s copies of every input, kept apart from ``run_rows``' constants."""
        cache = getattr(self._local, "single", None)
        if cache is None:
            cache = self._local.single = {}
        cols = self._width.get(output) if elem == FLOAT else self._one.get(output, (None, None))[1]
        if cols and len(cache) < _SINGLE_CACHE:
            cache[(width, output, fed)] = _Single(self, width, output, cols, elem)

    def _run_single(self, entry: _Single) -> array:
        status = self._run_c(self._ptr, None, self._in_c, entry.values, len(self._inputs), entry.out_name, 1,
                             entry.outs)
        if status:
            self._single_failed(entry, status)
        flat = array("f")
        flat.frombytes(entry.out_bytes)
        return flat

    def _single_failed(self, entry: _Single, status: Any) -> None:
        """Raise for a failed single run. ORT writes into the entry's output only when the shape and type it
        computed are those of the buffer it was handed (a model whose output shape depends on the values
        fed can change it after the checked first run); the general path then names the mismatch."""
        try:
            self.api.check(status)
        except OrtError:
            self._run(entry.output, 1, entry.width, [(b.buffer_info()[0], b.buffer_info()[1] * b.itemsize)
                                                     for b in entry.buffers], entry.elem)
            raise

    def _run(self, output: str, n: int, width: int, buffers: Sequence[tuple[int, int]],
             elem: int = FLOAT) -> tuple[bytes, list[int]]:
        """Run on every model input (``buffers``: address and byte size, in ``get_inputs()`` order, each
        ``[n, width]``); the output's bytes and shape, refused unless of type ``elem`` (float or double).
        The caller keeps the buffers alive."""
        api = self.api
        out_c = self._out_c.get(output)
        if out_c is None:
            raise OrtError(f"the model has no output {output!r}")
        dims = (C.c_int64 * 2)(n, width)
        k = len(buffers)
        values = (_P * k)()
        outs = (_P * 1)()
        try:
            create, elems, mem, base = self._create, self._elems, api._cpu, C.addressof(values)
            for i, (address, nbytes) in enumerate(buffers):
                status = create(mem, address, nbytes, dims, 2, elems[i], base + i * _PTR)
                if status:
                    api.check(status)
            status = self._run_c(self._ptr, None, self._in_c, values, k, out_c, 1, outs)
            if status:
                api.check(status)
            shape = self._checked_shape(outs[0], output, n, elem)
            data = _P()
            status = self._data(outs[0], C.byref(data))
            if status:
                api.check(status)
            return C.string_at(data, (8 if elem == DOUBLE else 4) * shape[0] * shape[1]), shape
        finally:
            release = self._release
            for v in (*values, outs[0]):
                if v:
                    release(v)

    def _checked_shape(self, value: Any, output: str, n: int, want: int = FLOAT) -> list[int]:
        """The output's type and shape as ONNX Runtime reports them for this run, refused unless of type
        ``want`` (float for ``run_rows``) and ``[n, declared width]``: the declared shape is the model's
        claim, and reading by it reads past the buffer ORT allocated when the model computes fewer values."""
        info = self.api.out("GetTensorTypeAndShape", value)
        try:
            elem, dims = self._type_and_dims(info)
        finally:
            self.api.f["ReleaseTensorTypeAndShapeInfo"](info)
        cols = self._width.get(output) if want == FLOAT else self._one.get(output, (None, None))[1]
        if elem != want or len(dims) != 2 or dims[0] != n or dims[1] < 1 or (cols and dims[1] != cols):
            declared = next(o for o in self._outputs if o.name == output)
            raise BundleError(
                f"{self.path}: output {output!r} came back as {TYPE_NAMES.get(elem, f'tensor(type {elem})')} "
                f"{dims} for {n} row(s) where the model declares {declared.type} {declared.shape}; the model "
                "does not compute what it declares: re-export it or re-run `edgepack pack`")
        return dims

    def run_rows(self, rows: Sequence[Sequence[int]], pad_id: int = 0, output: str | None = None) -> list[array]:
        """Logits rows (``array('f')``) for token id rows, padded on the right with ``pad_id`` (mask 0)
        to the longest row; ``token_type_ids`` zeros. No numpy.

        Example:
            >>> [len(r) for r in sess.run_rows([[101, 102], [101, 2, 3, 102]])]  # doctest: +SKIP
            [151, 151]
        """
        n = len(rows)
        width = len(rows[0]) if n == 1 else max(len(r) for r in rows)
        output = output or self._outputs[0].name
        if n == 1 and width:
            entry = self._single_entry(width, output)
            if entry is not None and entry.elem == FLOAT:  # a double output's (run_one's) goes the checked way
                entry.ids[:] = array(entry.ids.typecode, rows[0])
                return [self._run_single(entry)]
        keep = self._buffers(rows, width, pad_id)
        raw, shape = self._run(output, n, width, [(b.buffer_info()[0], len(b) * b.itemsize) for b in keep])
        flat = array("f")
        flat.frombytes(raw)
        if n == 1:
            if width:
                self._keep_single(width, output)
            return [flat]
        cols = shape[-1]
        return [flat[i * cols:(i + 1) * cols] for i in range(n)]

    def run_one(self, ids: Sequence[int], output: str | None = None) -> list[float]:
        """One unpadded row's ``output`` row as Python floats, for a ``[batch, width]`` float or double output
        (edgepack's ``answer``: top probability and label id, in float64). The first row of each length is
        run on fresh tensors and its output's type and shape checked; later rows of that length reuse its
        bound buffers (``_keep_single``): one ``Run`` call, the ids copied in, the floats read out.

        Example:
            >>> sess.run_one([101, 7592, 102], "answer")  # doctest: +SKIP
            [0.97, 12.0]
        """
        output = output or self._outputs[0].name
        cache = getattr(self._local, "single", None)
        entry = None if cache is None else cache.get((len(ids), output, False))
        if entry is None:
            elem, width = self._one.get(output, (FLOAT,))[0], len(ids)
            keep = self._buffers([ids], width, 0)
            raw, _ = self._run(output, 1, width, [(b.buffer_info()[0], len(b) * b.itemsize) for b in keep], elem)
            if width:
                self._keep_single(width, output, False, elem)
            flat = array("d" if elem == DOUBLE else "f")
            flat.frombytes(raw)
            return flat.tolist()
        entry.ids[:] = array(entry.ids.typecode, ids)
        status = self._run_c(self._ptr, None, self._in_c, entry.values, self._n_in, entry.out_name, 1, entry.outs)
        if status:
            self._single_failed(entry, status)
        return entry.out[:]

    def _buffers(self, rows: Sequence[Sequence[int]], width: int, pad_id: int) -> list[array]:
        """Every model input for ``rows`` (``get_inputs()`` order, ``[len(rows), width]``): the ids padded on
        the right with ``pad_id``, the mask 1 over each row's tokens, token types 0."""
        n, out = len(rows), []
        for arg, code in zip(self._inputs, self._codes, strict=True):
            if arg.name == "input_ids":
                if n == 1:
                    buf = array(code, rows[0])
                else:
                    buf = array(code, [pad_id]) * (n * width)
                    for i, r in enumerate(rows):
                        buf[i * width:i * width + len(r)] = array(code, r)
            elif arg.name == "attention_mask":
                if n == 1:
                    buf = array(code, [1]) * width
                else:
                    buf = array(code, [0]) * (n * width)
                    for i, r in enumerate(rows):
                        buf[i * width:i * width + len(r)] = array(code, [1]) * len(r)
            else:
                buf = array(code, [0]) * (n * width)
            out.append(buf)
        return out

    def run(self, output_names: Sequence[str] | None, feed: Mapping[str, Any]) -> list[Any]:
        """``InferenceSession.run`` for one float output and ``[batch, seq]`` integer numpy inputs, every
        model input fed (numpy is imported here).

        Example:
            >>> sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0].shape  # doctest: +SKIP
            (1, 151)
        """
        import numpy as np

        types = self._np_types
        if types is None:
            types = self._np_types = [(a.name, np.int64 if a.elem == INT64 else np.int32 if a.elem == INT32
                                       else np.float32) for a in self._inputs]
        try:
            arrays = [np.ascontiguousarray(feed[name], dtype=t) for name, t in types]
        except KeyError:
            arrays = []
        shape = arrays[0].shape if arrays else ()
        if len(arrays) != len(feed) or len(shape) != 2 or any(a.shape != shape for a in arrays):
            raise OrtError(f"feed {sorted(feed)} (shapes {[getattr(v, 'shape', None) for v in feed.values()]}) "
                           f"does not match the model's [batch, seq] inputs {[a.name for a in self._inputs]}")
        n, width = shape
        output = (list(output_names or []) or [self._outputs[0].name])[0]
        entry = self._single_entry(width, output, fed=True) if n == 1 and width else None
        if entry is not None:
            for view, a in zip(entry.views, arrays, strict=True):
                view[:] = a.data.cast("B")
            return [np.frombuffer(self._run_single(entry), dtype=np.float32).reshape(1, -1)]
        buffers = [(a.ctypes.data, a.nbytes) for a in arrays]
        raw, shape = self._run(output, n, width, buffers)
        if n == 1 and width:
            self._keep_single(width, output, fed=True)
        return [np.frombuffer(raw, dtype=np.float32).reshape(shape).copy()]

    def __del__(self):
        ptr = getattr(self, "_ptr", None)
        if ptr:
            self.api.f["ReleaseSession"](ptr)
            self._ptr = None


_SINGLE_CACHE = 256  # lengths kept per thread and output (max_length is at most 512 for BERT-like models)


class _Single:
    """One thread's tensors for single rows of one length (``CSession._single_entry``)."""

    __slots__ = ("buffers", "views", "ids", "values", "out", "out_bytes", "outs", "out_name", "output", "width",
                 "elem", "_release")

    def __init__(self, sess: CSession, width: int, output: str, cols: int, elem: int = FLOAT):
        api = sess.api
        self._release = api.f["ReleaseValue"]  # the values go with the entry (its thread's cache)
        dims = (C.c_int64 * 2)(1, width)
        self.buffers: list[array] = []
        self.values = (_P * len(sess._inputs))()
        self.ids = array("i")
        for i, (arg, code) in enumerate(zip(sess._inputs, sess._codes, strict=True)):
            buf = array(code, [1 if arg.name == "attention_mask" else 0]) * width
            if arg.name == "input_ids":
                self.ids = buf  # refilled per query in place: same length, so its address stays
            self.buffers.append(buf)
            address, length = buf.buffer_info()
            api.check(sess._create(api._cpu, address, length * buf.itemsize, dims, 2, sess._elems[i],
                                   C.addressof(self.values) + i * _PTR))
        self.views = [memoryview(b).cast("B") for b in self.buffers]
        self.out = ((C.c_double if elem == DOUBLE else C.c_float) * cols)()
        self.out_bytes = memoryview(self.out).cast("B")
        out_dims = (C.c_int64 * 2)(1, cols)
        self.outs = (_P * 1)()
        api.check(sess._create(api._cpu, C.addressof(self.out), C.sizeof(self.out), out_dims, 2, elem,
                               C.addressof(self.outs)))
        self.out_name = sess._out_c[output]
        self.output, self.width, self.elem = output, width, elem

    def __del__(self):
        for v in (*getattr(self, "values", ()), *getattr(self, "outs", ())):
            if v:
                self._release(v)
