"""Teacher outputs for every text, computed once and kept on disk.

The key is the teacher directory's content hash, a hash of the exact texts scored (so the data
fingerprint and any augmentation are in it) and the max length. The cache is by text, never by token
ids, so a student with its own tokenizer reuses it. Training never runs the teacher: distilling again
with other hyperparameters, or every trial of a search, reads the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgepack.records import atomic_file, hash_tree
from edgepack.training import student as _student

DEFAULT_CACHE = Path(os.environ.get("EDGEPACK_CACHE", Path.home() / ".cache" / "edgepack")) / "teacher"


def load_teacher(teacher_dir: Path):
    """Indirection so tests can count how often the teacher is loaded."""
    return _student.load_teacher(teacher_dir)


def cache_key(teacher_hash: str, texts: Sequence[str], max_length: int) -> str:
    h = hashlib.sha256(f"{teacher_hash}\0{max_length}\0".encode())
    h.update(json.dumps(list(texts)).encode())
    return h.hexdigest()[:32]


def teacher_outputs(
    teacher_dir: Path,
    texts: Sequence[str],
    *,
    cache_dir: Path | None = None,
    max_length: int = 64,
    hidden: bool = False,
    batch_size: int = 128,
    teacher_hash: str | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """``{"logits": (N, C) float32[, "hidden": (N, layers + 1, H) float16]}`` for ``texts``.

    ``hidden`` holds the first token's ([CLS]) state after the embeddings and after each layer.
    Read from ``cache_dir`` when present; otherwise the teacher runs once and the file is written
    atomically.
    """
    cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    teacher_hash = teacher_hash or hash_tree(teacher_dir)
    path = cache_dir / f"{cache_key(teacher_hash, texts, max_length)}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                cached = {k: z[k] for k in z.files}
            if not hidden or "hidden" in cached:
                return cached
        except (OSError, ValueError):
            pass  # a damaged cache file is recomputed
    out = _run_teacher(teacher_dir, texts, max_length=max_length, hidden=hidden, batch_size=batch_size,
                       progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb", suffix=".npz") as f:
        np.savez(f, **out)
    return out


def _run_teacher(teacher_dir: Path, texts: Sequence[str], *, max_length: int, hidden: bool, batch_size: int,
                 progress: bool) -> dict[str, np.ndarray]:
    import torch
    from tqdm.auto import tqdm

    model = load_teacher(teacher_dir)
    tok = _student.load_tokenizer(teacher_dir, what="teacher")
    enc = tok(list(texts), truncation=True, max_length=max_length)
    ids = enc["input_ids"]
    # Length-sorted batches: padding to each batch's longest row, not to max_length.
    order = np.argsort([len(x) for x in ids], kind="stable")
    logits = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    states = None
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc="teacher", disable=not progress, unit="batch"):
            idx = order[start:start + batch_size]
            batch = tok.pad({k: [enc[k][i] for i in idx] for k in enc.keys()}, return_tensors="pt")
            res = model(**batch, output_hidden_states=hidden)
            logits[idx] = res.logits.float().numpy()
            if hidden:
                cls = torch.stack([h[:, 0] for h in res.hidden_states], dim=1).float().numpy()
                if states is None:
                    states = np.zeros((len(texts), *cls.shape[1:]), dtype=np.float16)
                states[idx] = cls.astype(np.float16)
    out = {"logits": logits}
    if states is not None:
        out["hidden"] = states
    return out
