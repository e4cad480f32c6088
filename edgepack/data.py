"""Labelled text datasets: read a file, a directory of split files or a hub dataset, bind its labels
to a model's ``id2label``, and make any missing split by a stratified, seeded split.

Formats (all read with the ``datasets`` library's loaders, except the CLINC150 JSON layout, which
needs glue): CLINC150-style JSON (``{"train": [[text, label], ...], "val": ..., "oos_train": ...}``),
JSON lines, CSV, Parquet, a directory holding ``train.*``/``validation.*``/``test.*`` files, or a hub
id with an optional config (``clinc_oos:plus``) when online.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edgepack.config import DataConfig
from edgepack.errors import EdgepackError

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation", "eval": "validation"}
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".tsv": "csv"}
DEFAULT_OOS_LABELS = ("oos", "out_of_scope", "out-of-scope")


@dataclasses.dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: np.ndarray  # int64 label ids

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx: Sequence[int] | np.ndarray) -> Split:
        idx = np.asarray(idx, dtype=np.int64)
        return Split([self.texts[i] for i in idx], self.labels[idx])


@dataclasses.dataclass(frozen=True)
class LabelledData:
    splits: dict[str, Split]
    label_names: list[str]  # index = label id
    oos_label: str | None
    source: str
    made_splits: tuple[str, ...] = ()  # splits that were carved out of train here

    def __getitem__(self, name: str) -> Split:
        return self.splits[name]

    @property
    def oos_id(self) -> int | None:
        return None if self.oos_label is None else self.label_names.index(self.oos_label)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    def fingerprint(self) -> str:
        """A content hash of texts, labels and label names (for caches and stage records)."""
        import hashlib

        h = hashlib.sha256(json.dumps(self.label_names).encode())
        for name in sorted(self.splits):
            s = self.splits[name]
            h.update(name.encode())
            h.update(json.dumps(s.texts).encode())
            h.update(s.labels.astype(np.int64).tobytes())
        return h.hexdigest()


# --------------------------------------------------------------------------------------------- read


def read_raw(cfg: DataConfig) -> dict[str, tuple[list[str], list]]:
    """Read the source into ``{split: (texts, raw_labels)}`` with split names normalised."""
    src = cfg.source
    if not src:
        raise EdgepackError("no dataset given: pass --data FILE (CLINC150 JSON, .jsonl, .csv, .parquet) or a hub id")
    path = Path(src).expanduser()
    if path.is_file() and path.suffix == ".json" and _is_clinc_layout(path):
        return _read_clinc(path)
    if path.is_file():
        return _read_files(cfg, {"train": [str(path)]}, where=str(path))
    if path.is_dir():
        files: dict[str, list[str]] = {}
        for f in sorted(path.iterdir()):
            split = _SPLIT_ALIASES.get(f.stem, f.stem)
            if f.suffix in _FORMATS and split in SPLITS:
                files.setdefault(split, []).append(str(f))
        if not files:
            raise EdgepackError(f"{path}: no train/validation/test files (.jsonl, .json, .csv, .parquet) in this directory")
        return _read_files(cfg, files, where=str(path))
    if os.sep in src or src.startswith(".") or Path(src).suffix in _FORMATS:
        raise EdgepackError(f"{src}: no such file or directory; pass an existing dataset file or directory")
    return _read_hub(cfg)


def _is_clinc_layout(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(2048).lstrip()
    if not head.startswith(b"{"):
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EdgepackError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix the file or convert it to JSON lines") from None
    return isinstance(data, dict) and any(_SPLIT_ALIASES.get(k, k) in SPLITS for k in data) and all(
        isinstance(v, list) for v in data.values()
    )


def _read_clinc(path: Path) -> dict[str, tuple[list[str], list]]:
    # CLINC150 keeps out-of-scope rows apart (oos_train, oos_val, oos_test): fold them into their split.
    data = json.loads(path.read_text(encoding="utf-8"))
    out: dict[str, tuple[list[str], list]] = {}
    for key, rows in data.items():
        base = key[4:] if key.startswith("oos_") else key
        split = _SPLIT_ALIASES.get(base, base)
        if split not in SPLITS:
            continue
        texts, labels = out.setdefault(split, ([], []))
        for i, row in enumerate(rows):
            if not (isinstance(row, list) and len(row) == 2):
                raise EdgepackError(f"{path}: row {i} of '{key}' is not [text, label]; fix the file")
            texts.append(str(row[0]))
            labels.append(row[1])
    return out


def _read_files(cfg: DataConfig, files: Mapping[str, list[str]], *, where: str) -> dict[str, tuple[list[str], list]]:
    import datasets

    ext = Path(next(iter(files.values()))[0]).suffix
    builder = _FORMATS.get(ext)
    if builder is None:
        raise EdgepackError(f"{where}: unknown format '{ext}'; use .json (CLINC150 layout or JSON lines), .jsonl, .csv or .parquet")
    kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
    empty = [f for fs in files.values() for f in fs if not Path(f).read_text(errors="replace").strip()]
    if empty:
        raise EdgepackError(f"{empty[0]}: the file is empty; give a file with labelled rows")
    try:
        dd = datasets.load_dataset(builder, data_files=dict(files), **kwargs)
    except Exception as e:  # datasets raises many types for malformed files
        raise EdgepackError(f"{where}: could not read as {builder} ({type(e).__name__}: {_first_line(e)})") from None
    return {split: _columns(ds, cfg, where) for split, ds in dd.items()}


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else "no details"


def _read_hub(cfg: DataConfig) -> dict[str, tuple[list[str], list]]:
    import datasets

    name, _, config = cfg.source.partition(":")
    try:
        dd = datasets.load_dataset(name, config or None)
    except Exception as e:
        raise EdgepackError(
            f"{cfg.source}: could not load from the hub ({type(e).__name__}); offline, pass a local file with --data"
        ) from None
    out = {}
    for split, ds in dd.items():
        split = _SPLIT_ALIASES.get(split, split)
        if split in SPLITS:
            out[split] = _columns(ds, cfg, cfg.source)
    return out


def _columns(ds, cfg: DataConfig, where: str) -> tuple[list[str], list]:
    cols = ds.column_names
    for col, flag in ((cfg.text_column, "--text-column"), (cfg.label_column, "--label-column")):
        if col not in cols:
            raise EdgepackError(f"{where}: no column '{col}' (columns: {', '.join(cols)}); pass {flag}")
    labels = list(ds[cfg.label_column])
    feature = ds.features[cfg.label_column]
    names = getattr(feature, "names", None)  # a ClassLabel: ints that stand for names
    if names:
        labels = [names[i] for i in labels]
    return [str(t) for t in ds[cfg.text_column]], labels


# --------------------------------------------------------------------------------------------- bind


def load_dataset(cfg: DataConfig, id2label: Mapping[int, str] | None = None, *,
                 min_validation_rows: int = 0) -> LabelledData:
    """Read ``cfg.source`` and bind its labels to ``id2label`` (the model's), or to the sorted
    label set of the training split when no model labels are given (fine-tuning a new head).
    A validation split carved from train takes ``cfg.validation_fraction`` of it, or
    ``min_validation_rows`` when that is more (never more than half of train)."""
    raw = read_raw(cfg)
    where = cfg.source
    raw = {k: v for k, v in raw.items() if len(v[0])}
    if not raw:
        raise EdgepackError(f"{where}: the dataset is empty; give a file with labelled rows")
    if id2label is None:
        seen = sorted({str(lab) for _, labels in raw.values() for lab in labels})
        label_names = seen
    else:
        label_names = [str(id2label[i]) for i in sorted(int(k) for k in id2label)]
    label2id = {name: i for i, name in enumerate(label_names)}
    splits: dict[str, Split] = {}
    for split, (texts, labels) in raw.items():
        ids = []
        unknown: Counter[str] = Counter()
        for lab in labels:
            key = str(lab)
            if key in label2id:
                ids.append(label2id[key])
            elif isinstance(lab, (int, np.integer)) and 0 <= int(lab) < len(label_names) and id2label is not None \
                    and not any(isinstance(x, str) for x in labels):
                ids.append(int(lab))  # integer labels already are the model's ids
            else:
                unknown[key] += 1
        if unknown:
            shown = ", ".join(f"'{k}'" for k, _ in unknown.most_common(5))
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise EdgepackError(
                f"{where}: {split} has labels the model does not know: {shown}{more} "
                f"(the model's {len(label_names)} labels: {_preview(label_names)}); relabel the data or use a model trained on these labels"
            )
        splits[split] = Split(list(texts), np.asarray(ids, dtype=np.int64))
    if "train" not in splits:
        first = next(iter(splits))
        splits["train"] = splits.pop(first)
    made = []
    for split, frac in (("test", cfg.test_fraction), ("validation", cfg.validation_fraction)):
        if split not in splits:
            if split == "validation" and min_validation_rows:
                frac = min(0.5, max(frac, min_validation_rows / max(len(splits["train"]), 1)))
            splits["train"], splits[split] = _stratified_split(splits["train"], frac, cfg.seed, where)
            made.append(split)
    oos = cfg.oos_label
    if oos is None:
        oos = next((c for c in DEFAULT_OOS_LABELS if c in label2id), None)
    elif oos not in label2id:
        raise EdgepackError(f"{where}: out-of-scope label '{oos}' is not among the labels ({_preview(label_names)}); fix --oos-label")
    return LabelledData(splits, label_names, oos, str(where), tuple(made))


def _preview(names: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def length_from_counts(counts: Sequence[int], percentile: float, *, limit: int) -> dict[str, float | int]:
    """``max_length`` from the token counts of the training texts: the ``percentile``-th percentile
    rounded up to a multiple of 8 (at least 8), at most ``limit`` (the teacher's positions). Returns
    the choice with what it was chosen from, for the build's record.

    Example:
        >>> length_from_counts([5, 7, 9, 30], 50.0, limit=512)["max_length"]
        8
        >>> length_from_counts([5, 7, 9, 30], 100.0, limit=512)["max_length"]
        32
        >>> length_from_counts([600], 99.0, limit=512)["max_length"]
        512
    """
    if not len(counts):
        raise EdgepackError("no training texts to choose max_length from; give [data] max_length or training rows")
    at = float(np.percentile(np.asarray(counts, dtype=np.float64), percentile))
    chosen = min(max(8, -(-int(np.ceil(at)) // 8) * 8), int(limit))
    arr = np.asarray(counts)
    return {"max_length": int(chosen), "percentile": float(percentile), "tokens_at_percentile": round(at, 2),
            "longest": int(arr.max()), "texts": int(len(arr)), "texts_truncated": int((arr > chosen).sum()),
            "limit": int(limit)}


def _stratified_split(split: Split, frac: float, seed: int, where: str) -> tuple[Split, Split]:
    from sklearn.model_selection import train_test_split

    n = len(split)
    n_out = max(1, int(round(n * frac)))
    if n - n_out < 1:
        raise EdgepackError(f"{where}: only {n} rows; too few to split off a validation/test set, add rows or give the splits")
    idx = np.arange(n)
    counts = np.bincount(split.labels)
    stratify = split.labels if counts[counts > 0].min() >= 2 and n_out >= len(counts[counts > 0]) else None
    keep, out = train_test_split(idx, test_size=n_out, random_state=seed, stratify=stratify)
    return split.take(np.sort(keep)), split.take(np.sort(out))


def stratified_slice(split: Split, n: int, seed: int = 0) -> Split:
    """At most ``n`` rows of ``split``, every label kept in proportion (for eval.jsonl)."""
    if len(split) <= n:
        return split
    _, out = _stratified_split(split, n / len(split), seed, "slice")
    return out


def write_jsonl(split: Split, label_names: Sequence[str], path: Path) -> None:
    """``{"text", "label"}`` lines: the format the runtime shim reads."""
    with open(path, "w") as f:
        for text, lab in zip(split.texts, split.labels, strict=True):
            f.write(json.dumps({"text": text, "label": label_names[int(lab)]}) + "\n")
