"""Evaluation data for the device, read with the standard library: JSON lines, CSV/TSV, a JSON list
of records, and the CLINC150 layout (``{"test": [[text, label], ...], "oos_test": [...]}``).

On a device there is no ``datasets`` library; these are the formats ``edgepack`` writes
(``eval.jsonl``) or a user is likely to copy there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# CLINC150 calls the validation split "val"; the datasets library calls it "validation".
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation", "eval": "validation"}


class DataError(ValueError):
    """Evaluation data that cannot be read. ``str(err)`` is one line naming the file and the fix.

    Example:
        >>> read_labelled("rows.jsonl", text_column="query")  # doctest: +SKIP
        Traceback (most recent call last):
        DataError: rows.jsonl: row 1 has no column 'query' (columns: text, label); pass --text-column
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def _split_name(name: str) -> str:
    return SPLIT_ALIASES.get(name, name)


def read_labelled(path: str | os.PathLike, *, split: str = "test", text_column: str = "text",
                  label_column: str = "label") -> tuple[list[str], list[str]]:
    """``(texts, labels)`` from a labelled file; labels are returned as strings.

    ``split`` only matters for the CLINC150 layout, whose ``oos_<split>`` rows are folded into
    ``<split>``; ``val`` and ``validation`` name the same split.

    Example:
        >>> texts, labels = read_labelled("bundle/eval.jsonl")  # doctest: +SKIP
        >>> texts[0], labels[0]  # doctest: +SKIP
        ('what is my checking balance', 'balance')
        >>> texts, labels = read_labelled("data_oos_plus.json", split="test")  # doctest: +SKIP
        >>> len(texts)  # doctest: +SKIP
        5500
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass an existing .jsonl, .csv or CLINC150 .json file with --data")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        records = _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix == ".json":
        data = _read_json_document(path)
        if isinstance(data, dict):
            return _read_clinc(path, data, split)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a CLINC150-style object or a list of records; convert it to JSON lines")
        records = data
    else:
        records = _read_jsonl(path)
    return _columns(path, records, text_column, label_column)


def read_rows(path: str | os.PathLike, **kwargs: Any) -> list[tuple[str, str]]:
    """``[(text, label), ...]`` from a labelled file; ``kwargs`` as for :func:`read_labelled`.

    Example:
        >>> read_rows("bundle/eval.jsonl")[:1]  # doctest: +SKIP
        [('what is my checking balance', 'balance')]
    """
    texts, labels = read_labelled(path, **kwargs)
    return list(zip(texts, labels, strict=True))


def _read_json_document(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # A .json file holding JSON lines is common enough to accept.
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON or JSON lines ({e.msg} at line {e.lineno}); fix the file") from None


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not JSON ({e.msg}); fix the line or remove it") from None
    return rows


def _read_csv(path: Path, *, delimiter: str) -> list[dict[str, str]]:
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def _columns(path: Path, records: list[Any], text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    if not records:
        raise DataError(f"{path}: no rows; give a file with labelled rows")
    texts, labels = [], []
    for i, row in enumerate(records):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i + 1} is not an object with '{text_column}' and '{label_column}'; "
                            "fix the file")
        for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
            if col not in row:
                cols = ", ".join(map(str, row)) or "none"
                raise DataError(f"{path}: row {i + 1} has no column '{col}' (columns: {cols}); pass {flag}")
        texts.append(str(row[text_column]))
        labels.append(str(row[label_column]))
    return texts, labels


def _read_clinc(path: Path, data: dict[str, Any], split: str) -> tuple[list[str], list[str]]:
    want = _split_name(split)
    texts: list[str] = []
    labels: list[str] = []
    found = []
    for key, rows in data.items():
        base = key[4:] if key.startswith("oos_") else key
        if _split_name(base) != want:
            continue
        if not isinstance(rows, list):
            raise DataError(f"{path}: '{key}' is not a list of [text, label] rows; fix the file")
        found.append(key)
        for i, row in enumerate(rows):
            if not (isinstance(row, list) and len(row) == 2):
                raise DataError(f"{path}: row {i} of '{key}' is not [text, label]; fix the file")
            texts.append(str(row[0]))
            labels.append(str(row[1]))
    if not found:
        splits = sorted({_split_name(k[4:] if k.startswith("oos_") else k) for k in data})
        raise DataError(f"{path}: no split '{split}' (splits: {', '.join(splits)}); pass --split")
    if not texts:
        raise DataError(f"{path}: split '{split}' is empty; pass another --split")
    return texts, labels


def read_reference(path: str | os.PathLike, n: int | None = None) -> list[str]:
    """Reference labels (e.g. a teacher's predictions), one per evaluation row, in the same order.

    Accepts a benchmark result saved with ``bench --json`` (its ``predictions``), JSON lines of strings
    or of objects with ``prediction`` or ``label``, or plain text with one label per line. With ``n``,
    the count must match.

    Example:
        >>> ref = read_reference("teacher.json", n=5500)  # doctest: +SKIP
        >>> ref[:2]  # doctest: +SKIP
        ['oos', 'translate']
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass the JSON that `bench --json` wrote for the reference model")
    text = path.read_text(encoding="utf-8")
    labels: list[str] | None = None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("predictions"), list):
        labels = [str(x) for x in doc["predictions"]]
    elif isinstance(doc, list):
        labels = [_reference_item(path, x) for x in doc]
    else:
        labels = []
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                item = line
            labels.append(_reference_item(path, item))
    if not labels:
        raise DataError(f"{path}: holds no reference labels; pass the JSON that `bench --json` wrote")
    if n is not None and len(labels) != n:
        raise DataError(f"{path}: {len(labels)} reference labels for {n} evaluation rows; "
                        "benchmark the reference on the same data and split")
    return labels


def _reference_item(path: Path, item: Any) -> str:
    if isinstance(item, dict):
        for key in ("prediction", "label"):
            if key in item:
                return str(item[key])
        raise DataError(f"{path}: a reference row has neither 'prediction' nor 'label'; fix the file")
    return str(item)
