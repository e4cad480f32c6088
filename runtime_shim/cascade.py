"""Cascades: a bundle that answers the texts it is sure of and sends the others to a second model.

``runtime.json`` ``"cascade": {"fallback": "fallback", "below": 0.6}`` names a bundle directory inside
this one (its files covered by this bundle's manifest) and the top probability under which a text goes
to it. The cascade answers under the fallback's out-of-scope threshold; ``below`` is at least both
models' thresholds, so a text the first model keeps is never turned out of scope by it.

The fallback answers each text it gets alone, whatever batch the text came in: dynamic int8
quantization scales activations over a batch, so an answer that depended on which other texts were
sent on would differ between the build's measurement and a device's traffic (on CLINC150 two
cascades' validation accuracy moved by 0.03 and 0.06 points that way). The texts sent on are the unsure
few; the first model still runs batches, so a text whose score sits at ``below`` can be sent on in a
batch and kept alone (or the reverse): the batch-mate effect the pipeline's scores have, on the route.
``runtime_shim.OnnxPipeline`` loads the fallback and routes every call; this module holds the rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .manifest import BundleError, bad_path
from .scores import softmax, top_of_row


class Encoded(dict):
    """A cascade's encoded batch: the model's inputs, and the texts they came from (for the fallback)."""

    def __init__(self, arrays: Mapping[str, Any], *, texts: list[str]):
        super().__init__(arrays)
        self.texts = texts


def read_setting(bundle_dir: Path, cascade: Any) -> tuple[Path, float]:
    """The fallback's directory and ``below`` from runtime.json's ``cascade``, checked (one line each)."""
    where = bundle_dir / "runtime.json"
    if not isinstance(cascade, Mapping) or not isinstance(cascade.get("fallback"), str):
        raise BundleError(f'{where}: cascade must be {{"fallback": DIR, "below": P}}; re-run `edgepack build`')
    below = cascade.get("below")
    if isinstance(below, bool) or not isinstance(below, (int, float)) or not 0.0 <= below <= 1.0:
        raise BundleError(f"{where}: cascade below={below!r} is not a probability; set a number in [0, 1]")
    why = bad_path(cascade["fallback"])
    if why:
        raise BundleError(f"{where}: cascade fallback {cascade['fallback'][:120]!r} is not a directory inside the bundle "
                          f"({why}); re-run `edgepack build`")
    sub = (bundle_dir / cascade["fallback"]).resolve()
    if bundle_dir.resolve() not in sub.parents:
        raise BundleError(f"{where}: cascade fallback {cascade['fallback']!r} is not a directory inside the bundle")
    return sub, float(below)


def check_pair(bundle_dir: Path, first: Any, fallback: Any, below: float) -> None:
    """Both models answer with one label set, and ``below`` is not under either's threshold."""
    if fallback.label_names != first.label_names or fallback.oos_label != first.oos_label:
        raise BundleError(f"{fallback.bundle_dir / 'labels.json'}: the fallback's labels differ from "
                          f"{bundle_dir / 'labels.json'}; re-run `edgepack build`")
    for t in (first.oos_threshold, fallback.oos_threshold):
        if t is not None and below < t:
            raise BundleError(f"{bundle_dir / 'runtime.json'}: cascade below={below} is under an out-of-scope "
                              f"threshold ({t:.3f}); re-run `edgepack build`")


def unsure_rows(logits: Any, below: float) -> list[int]:
    """Rows of ``logits`` whose top probability is under ``below``: the texts sent on. A single row
    takes ``top_of_row`` (~3 us; the softmax of the batch took 22 us a query in the timing harness).

    Example:
        >>> import numpy as np
        >>> unsure_rows(np.array([[0.0, 3.0], [0.0, 0.1]], dtype=np.float32), 0.6)
        [1]
    """
    if len(logits) == 1:
        return [0] if top_of_row(logits[0])[1] < below else []
    return [i for i, top in enumerate(softmax(logits).max(axis=-1)) if top < below]


def merged(logits: Any, rows: Sequence[int], fallback_rows: Sequence[Any]) -> Any:
    """``logits`` with ``rows`` replaced by the fallback's rows (their softmax is the fallback's probabilities)."""
    out = logits.astype("float32", copy=True)
    for i, row in zip(rows, fallback_rows, strict=True):
        out[i] = row
    return out
