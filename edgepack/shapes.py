"""Student shapes, the shape search's mini-language: ``"layers=1 heads=1/3 ffn=1/2"``.

A shape names the fields of a build that differ between candidates: depth, the share of heads and
FFN neurons kept, the word table's bits, a cascade's fallback, and optionally a recipe whose distill
and prune tables it starts from. :func:`apply` lays one over a ``BuildConfig``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgepack.config import BuildConfig

# A shape's keys and the config fields they set (stage table, field).
SHAPE_KEYS = {
    "layers": ("distill", "num_layers"),
    "heads": ("prune", "heads_fraction"),
    "ffn": ("prune", "ffn_fraction"),
    "embedding_bits": ("quantize", "embedding_bits"),
    "fallback": ("cascade", "fallback"),
}


def parse_shape(text: str) -> dict[str, Any]:
    """A student shape, ``"layers=1 heads=1/3 ffn=1/2"``: its keys (layers, heads and ffn as fractions
    of the teacher's, embedding_bits) to numbers; keys left out keep the recipe's value.
    ``recipe=NAME``: the shape's distill and prune tables come from that recipe (e.g. ``static``, the
    zero-layer student with its own learning rate), the other keys applied over them.

    >>> parse_shape("layers=1 heads=1/3 ffn=0.5")
    {'layers': 1, 'heads': 0.3333333333333333, 'ffn': 0.5}
    """
    out: dict[str, Any] = {}
    for part in str(text).split():
        key, sep, value = part.partition("=")
        if not sep or (key not in SHAPE_KEYS and key != "recipe"):
            raise ValueError(
                f"shape {text!r}: {part!r} is not KEY=VALUE with KEY one of "
                f"{', '.join((*SHAPE_KEYS, 'recipe'))}"
            )
        if key == "recipe":
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
                raise ValueError(f"shape {text!r}: recipe={value!r} is not a recipe name")
            out[key] = value
            continue
        if (
            key == "fallback"
        ):  # a cascade: the shape's bundle, then the teacher's int8 for what it is unsure of
            if value != "teacher":
                raise ValueError(f"shape {text!r}: fallback={value!r} is not known; write fallback=teacher")
            out[key] = value
            continue
        try:
            num, _, den = value.partition("/")
            x = float(num) / float(den or 1)
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"shape {text!r}: {key}={value!r} is not a number or a fraction like 1/3"
            ) from None
        if key in ("layers", "embedding_bits"):
            if x != int(x) or x < 0:
                raise ValueError(f"shape {text!r}: {key} must be a whole number >= 0")
            out[key] = int(x)
        else:
            if not 0 < x <= 1:
                raise ValueError(f"shape {text!r}: {key}={value} must be a fraction in (0, 1]")
            out[key] = x
    if not out:
        raise ValueError(f"shape {text!r} is empty; write e.g. 'layers=1 heads=1/3 ffn=1/2'")
    return out


def shape_name(text: str) -> str:
    """A shape's short name, used for its build directory and by ``--pick``.

    >>> shape_name("layers=1 heads=1/3 ffn=1/2")
    'L1-h0.33-f0.5'
    """
    letters = {"layers": "L", "heads": "h", "ffn": "f", "embedding_bits": "e"}
    shape = parse_shape(text)
    name = "-".join(
        ([shape["recipe"]] if "recipe" in shape else [])
        + [
            f"{letters[k]}{shape[k]:.2g}" if isinstance(shape[k], float) else f"{letters[k]}{shape[k]}"
            for k in letters
            if k in shape
        ]
    )  # one order, however the shape was written
    return name + (f"+{shape['fallback']}" if "fallback" in shape else "")


def apply(build: BuildConfig, shape: str) -> BuildConfig:
    """``build`` with ``shape``'s fields set (``recipe=NAME`` is laid under it by the runner)."""
    changes: dict[str, dict[str, Any]] = {}
    for key, value in parse_shape(shape).items():
        if key == "recipe":
            continue
        table, field = SHAPE_KEYS[key]
        changes.setdefault(table, {})[field] = value
    if changes.get("distill", {}).get("num_layers") is not None:
        changes["distill"]["layers"] = ()  # the shape's depth, not the recipe's explicit layers
    return build.replace(**{t: getattr(build, t).replace(**c) for t, c in changes.items()})
