"""Accuracy, in-scope accuracy, out-of-scope recall and agreement: the one implementation.

The device computes them in ``bench``; edgepack's build side imports this same module (it ships
inside every bundle, and the build already depends on the shim), so a figure in a stage record and
the figure the device reports cannot drift apart. numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def label_metrics(pred: Sequence[Any] | np.ndarray, gold: Sequence[Any] | np.ndarray,
                  oos: Any | None) -> dict[str, float | None]:
    """``accuracy``, ``in_scope_accuracy`` and ``oos_recall`` of predictions against gold labels.

    Labels may be ids or names (anything ``==`` compares). ``in_scope_accuracy`` and ``oos_recall``
    are ``None`` without an out-of-scope label or without rows of that kind; ``accuracy`` is ``None``
    for no rows.

    Example:
        >>> label_metrics(["a", "oos", "b"], ["a", "oos", "oos"], "oos")
        {'accuracy': 0.6666666666666666, 'in_scope_accuracy': 1.0, 'oos_recall': 0.5}
    """
    p = np.asarray(pred, dtype=object)
    g = np.asarray(gold, dtype=object)
    hit = p == g
    out: dict[str, float | None] = {"accuracy": float(hit.mean()) if len(g) else None,
                                    "in_scope_accuracy": None, "oos_recall": None}
    if oos is not None:
        is_oos = g == oos
        if (~is_oos).any():
            out["in_scope_accuracy"] = float(hit[~is_oos].mean())
        if is_oos.any():
            out["oos_recall"] = float(hit[is_oos].mean())
    return out


def agreement(a: Sequence[Any] | np.ndarray, b: Sequence[Any] | np.ndarray) -> float | None:
    """Share of rows on which two label sequences agree (``None`` for none).

    Example:
        >>> agreement([1, 2, 3], [1, 2, 0])
        0.6666666666666666
    """
    a, b = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
    if len(a) != len(b):
        raise ValueError(f"agreement of {len(a)} and {len(b)} rows")
    return float((a == b).mean()) if len(a) else None
