"""The inputs: rows from benchmark JSON files, the evaluation data that goes with them, the host notes,
and budgets in either shape."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import EdgepackError
from .tables import _num

_UNITS = (("_ms", "ms"), ("_mb", "MB"), ("_bytes", "bytes"), ("_drop", "points"), ("_qps", "qps"))


def _budget(b: Any) -> dict[str, Any]:
    """A budget as ``{"name", "limit", "measured", "unit", "passed"}``; also takes ``edgepack.profiles``'
    ``BudgetCheck`` (``budget``, ``limit``, ``value``, ``ok``) or its dict, guessing the unit from the name."""
    if dataclasses.is_dataclass(b) and not isinstance(b, type):
        b = dataclasses.asdict(b)
    b = dict(b)
    name = b.get("name", b.get("budget"))
    unit = b.get("unit")
    if unit is None and isinstance(name, str):
        unit = next((u for suffix, u in _UNITS if name.endswith(suffix)), None)
    return {"name": name, "limit": b.get("limit"), "measured": b.get("measured", b.get("value")), "unit": unit,
            "passed": b.get("passed", b.get("ok"))}


def attach_eval_data(rows: list[dict], texts: Sequence[str], gold: Sequence[str]) -> int:
    """Give ``texts`` and ``gold`` to the rows whose ``predictions`` have their length (the harness JSON
    holds predictions only); return how many rows got them. A row whose ``accuracy`` (the thresholded
    predictions' score) disagrees with its predictions scored against ``gold`` raises: the file is not the one
    the row was measured on, or its order differs, and per-domain figures would be wrong."""
    attached = 0
    for row in rows:
        preds = row.get("predictions")
        if not isinstance(preds, list) or len(preds) != len(gold):
            continue
        acc = sum(p == g for p, g in zip(preds, gold, strict=True)) / len(gold)
        stored = _num(row.get("accuracy"))
        if stored is not None and abs((stored if stored <= 1 else stored / 100) - acc) > 1e-6:
            raise EdgepackError(f"row {row.get('name')}: its predictions score {acc:.4f} against the given data"
                                f" but it reports accuracy {stored:.4f}; pass the file and split it was measured on")
        row.setdefault("texts", list(texts))
        row.setdefault("gold", list(gold))
        attached += 1
    return attached


def host_notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Notes from the ``host`` block the harness writes: machine, CPU count, versions (once each)."""
    out: list[str] = []
    for r in rows:
        host = r.get("host")
        if not isinstance(host, Mapping):
            continue
        machine = " ".join(str(host[k]) for k in ("system", "machine") if host.get(k))
        line = f"machine: {machine}" + (f", {host['cpus']} CPUs" if host.get("cpus") else "")
        versions = host.get("versions")
        if isinstance(versions, Mapping) and versions:
            line += " · " + ", ".join(f"{k} {v}" for k, v in versions.items())
        line += f" ({r.get('name')})"
        if not any(line.rsplit(" (", 1)[0] == o.rsplit(" (", 1)[0] for o in out):
            out.append(line)
    if len(out) == 1:
        out[0] = out[0].rsplit(" (", 1)[0]
    return out


def load_rows(paths: Iterable[Path | str]) -> list[dict]:
    """Rows from benchmark JSON files: one row (a dict), a list of rows, ``{"rows": [...]}``, or a stage
    record (``stage.json``: its ``metrics`` with the stage as name). A row without ``name`` is named
    after its file."""
    rows: list[dict] = []
    for path in map(Path, paths):
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise EdgepackError(f"{path}: no such file; pass the JSON written by `edgepack bench --json`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EdgepackError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, Mapping) and isinstance(data.get("rows"), list):
            items = data["rows"]
        elif isinstance(data, Mapping) and isinstance(data.get("metrics"), Mapping) and "accuracy" not in data:
            items = [{"name": data.get("stage"), **data["metrics"]}]
        elif isinstance(data, list):
            items = data
        else:
            items = [data]
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise EdgepackError(f"{path}: expected an object per row, found {type(item).__name__} at index {i}")
            row = dict(item)
            if not row.get("name"):
                row["name"] = path.stem if len(items) == 1 else f"{path.stem}[{i}]"
            rows.append(row)
    return rows
