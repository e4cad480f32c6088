"""Does an ONNX model in the bundle reference external data? A standard-library protobuf walk.

An ONNX model may keep tensors in files beside it (``data_location = EXTERNAL``), named by a path the
loader resolves: the path-traversal CVEs (CVE-2022-25882, CVE-2024-27318). A bundle's model never
needs that, so any external reference is refused. The device has no ``onnx`` package, so the walk
reads the protobuf wire format directly, following only the messages that can hold a tensor.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .manifest import BundleError

# The ONNX protobuf messages that can hold a TensorProto, and where (field number -> message kind),
# from onnx/onnx.proto (checked against onnx's generated descriptors in tests/test_trust.py).
_ONNX_FIELDS: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},  # graph, training_info, functions
    "graph": {1: "node", 5: "tensor", 15: "sparse"},  # node, initializer, sparse_initializer
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},  # values, indices
    "function": {7: "node", 11: "attribute"},  # node, attribute_proto (default values)
    "training": {1: "graph", 2: "graph"},  # initialization, algorithm
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_MAX_DEPTH = 64  # nested subgraphs (If/Loop bodies); deeper is not a model edgepack wrote


class _Malformed(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(field number, wire type, value or start, end)`` of each field of one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value, pos
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed(f"field {field} runs past its message")
            yield field, wire, pos, pos + length
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Malformed(f"field {field} runs past its message")
        else:
            raise _Malformed(f"wire type {wire} (groups are not used by ONNX)")


def onnx_external_tensors(path: str | os.PathLike) -> list[str]:
    """Names of the tensors of an ONNX model stored outside the file (``data_location = EXTERNAL`` or
    an ``external_data`` entry), found by walking the protobuf without the ``onnx`` package: the model
    messages that can hold a tensor are followed, large byte fields are skipped by their length.

    Example:
        >>> onnx_external_tensors("bundle/model.quant.onnx")  # doctest: +SKIP
        []
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise BundleError(f"{path}: empty, not an ONNX model; restore the signed bundle")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _external_tensors(buf, size)
            except _Malformed as e:
                raise BundleError(f"{path}: not a valid ONNX protobuf ({e}); restore the signed bundle or re-pack it") from None


def _external_tensors(buf, size: int) -> list[str]:
    found: list[str] = []
    stack = [("model", 0, size, 0)]
    while stack:
        kind, start, end, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise _Malformed(f"messages nested over {_MAX_DEPTH} deep")
        if kind == "tensor":
            name, external = "", False
            for field, wire, a, b in _fields(buf, start, end):
                if field == _TENSOR_NAME and wire == 2:
                    name = bytes(buf[a:b]).decode("utf-8", "replace")
                elif field == _TENSOR_EXTERNAL_DATA or (field == _TENSOR_DATA_LOCATION and (wire != 0 or a != 0)):
                    external = True
            if external:
                found.append(name or "<unnamed tensor>")
            continue
        children = _ONNX_FIELDS[kind]
        for field, wire, a, b in _fields(buf, start, end):
            child = children.get(field)
            if child is not None and wire == 2:
                stack.append((child, a, b, depth + 1))
    return found


def check_onnx_files(root: Path, listed: Mapping[str, Any]) -> None:
    """Refuse any listed ``.onnx`` model whose tensors live in external files: ONNX Runtime opens such
    paths relative to the model (``../`` included, CVE-2022-25882, CVE-2024-27318), outside anything
    the manifest covers. edgepack's bundles keep every weight inside the model file."""
    for rel in sorted(listed):
        if rel.lower().endswith(".onnx"):
            names = onnx_external_tensors(root / rel)
            if names:
                shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                raise BundleError(f"{root / rel}: tensor {shown} is stored in an external data file, which no manifest "
                                  "covers; re-export the model with its weights inside the .onnx file and re-pack")
