"""Quantization-aware training: the target's int8 rounding simulated while a student trains.

The bundle's int8 graph is ORT dynamic quantization (``edgepack.stages.quantize.formats``), so the
simulation copies what that graph computes, per target (``targets/*.toml``):

- every ``nn.Linear`` weight (a MatMul / fused Attention weight in the export) is rounded as
  ``quantize_dynamic`` stores it: qint8 symmetric (scale ``absmax / qmax``, no zero point), per
  output channel when the target is per-channel, ``qmax`` 64 with ``reduce_range`` (the AVX2
  target's 7-bit weights, ORT's [-64, 64]) and 127 without; quint8 weights asymmetric on [0, 127]
  or [0, 255];
- the input of every ``nn.Linear`` is rounded as ``DynamicQuantizeLinear`` does at run time: uint8,
  one scale and zero point per tensor from this batch's min and max (0 always inside the range);
- the word-embedding table (the quantized Gather): uint8 asymmetric, one scale for the table.

Rounding has no gradient; the straight-through estimator passes the gradient of the rounded value to
the fp32 one unchanged (``x + (q(x) - x).detach()``; the scales come from min/max and clip nothing).
Training updates the fp32 weights; the export and ORT's quantizer then round them exactly as
simulated, so the int8 graph ORT runs is the usual one. ``fake_quantized`` swaps the classes of the
model's ``Linear``/``Embedding`` modules for the simulating subclasses and back (the parameters and
``state_dict`` keys stay the same, so checkpoints and best-epoch reloading work as without it).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class Scheme:
    """The int8 rounding of one target, as ORT dynamic quantization applies it."""

    target: str
    weight_signed: bool = True  # qint8 (symmetric) or quint8 (asymmetric) weights
    weight_bits: int = 8  # 7: reduce_range ([-64, 64] or [0, 127])
    per_channel: bool = True  # one weight scale per output channel
    embedding: bool = True  # the word-embedding table is stored in 8 bits

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "activations": "uint8 per tensor, dynamic min/max"}


def scheme_for(target) -> Scheme:
    """The ``Scheme`` of an ``edgepack.targets.Target``."""
    q = target.quantize
    return Scheme(target=target.name, weight_signed=q.weight_type == "qint8", weight_bits=7 if q.reduce_range else 8,
                  per_channel=q.per_channel,
                  embedding="Gather" in q.op_types and q.embedding_bits == 8)


def target_name(name: str, profile: Any = None) -> str:
    """``name``, or for ``"auto"`` the profile's target (this CPU's without a profile)."""
    if name != "auto":
        return name
    if profile is not None and getattr(profile, "target", None):
        return str(profile.target)
    from edgepack import targets

    return targets.detect().name


def resolve(name: str, profile: Any = None) -> Scheme:
    """The scheme of the target ``name`` (``"auto"``: see ``target_name``)."""
    from edgepack import targets

    return scheme_for(targets.load(target_name(name, profile)))


# --------------------------------------------------------------------------------------------- rounding


def _round_ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x + (q - x).detach()


def quantize_weight(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """``w`` (``[out, in]``) rounded to the scheme's weight grid, in fp32 (no gradient through the rounding)."""
    if w.numel() == 0:
        return w
    with torch.no_grad():
        x = w.detach().float()
        dims = dict(dim=1, keepdim=True) if scheme.per_channel and x.dim() == 2 else {}
        if scheme.weight_signed:
            qmax = 64 if scheme.weight_bits == 7 else 127
            absmax = x.abs().amax(**dims) if dims else x.abs().max()
            scale = absmax / qmax
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = torch.clamp(torch.round(x / scale), -qmax, qmax) * scale
        else:
            q = _asymmetric(x, 127 if scheme.weight_bits == 7 else 255, dims)
    return _round_ste(w, q.to(w.dtype))


def quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded as ``DynamicQuantizeLinear`` rounds it: uint8, one scale and zero point for the tensor."""
    if x.numel() == 0:
        return x
    with torch.no_grad():
        q = _asymmetric(x.detach().float(), 255, {})
    return _round_ste(x, q.to(x.dtype))


def _asymmetric(x: torch.Tensor, qmax: int, dims: dict) -> torch.Tensor:
    lo = torch.clamp(x.amin(**dims) if dims else x.min(), max=0.0)
    hi = torch.clamp(x.amax(**dims) if dims else x.max(), min=0.0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return (torch.clamp(torch.round(x / scale) + zero, 0, qmax) - zero) * scale


# --------------------------------------------------------------------------------------------- modules


class QatLinear(nn.Linear):
    """``nn.Linear`` with its input and weight rounded as the int8 graph rounds them."""

    qat_scheme: Scheme

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(quantize_activation(x), quantize_weight(self.weight, self.qat_scheme), self.bias)


class QatEmbedding(nn.Embedding):
    """``nn.Embedding`` whose table is rounded to uint8 (one scale for the table), as the quantized Gather."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q = _asymmetric(self.weight.detach().float(), 255, {}).to(self.weight.dtype)
        return F.embedding(ids, _round_ste(self.weight, q), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


@contextlib.contextmanager
def fake_quantized(model: nn.Module, scheme: Scheme) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes with the scheme's rounding (its modules' classes swapped);
    afterwards it is a plain fp32 model again, holding the weights training left."""
    swapped: list[tuple[nn.Module, type]] = []
    try:
        for module in model.modules():
            if type(module) is nn.Linear:
                swapped.append((module, nn.Linear))
                module.__class__ = QatLinear
                module.qat_scheme = scheme
        table = model.get_input_embeddings() if scheme.embedding and hasattr(model, "get_input_embeddings") else None
        if table is not None and type(table) is nn.Embedding:
            swapped.append((table, nn.Embedding))
            table.__class__ = QatEmbedding
        yield model
    finally:
        for module, cls in swapped:
            module.__class__ = cls
            module.__dict__.pop("qat_scheme", None)


def count_quantized(model: nn.Module) -> int:
    """Modules currently computing with simulated rounding (0 outside ``fake_quantized``)."""
    return sum(isinstance(m, (QatLinear, QatEmbedding)) for m in model.modules())
