"""Structured pruning: remove whole attention heads, FFN neurons and layers so the dense weights, and
the exported ONNX MatMuls, really shrink.

Importance is gradient based, as in Michel et al. 2019 ("Are Sixteen Heads Really Better than One?"):
a gate xi_h = 1 multiplies each head's context vector (and each FFN neuron's activation, the same idea
TextPruner uses for the FFN); the importance of a gate is E_x |dL/dxi|, accumulated over batches of
the training set. Head scores are normalised per layer (L2) before heads of different layers are
compared, as Michel et al. do.

transformers 5 removed ``prune_heads`` and ``config.pruned_heads``, so heads are cut here by slicing
the query/key/value rows and the attention output columns. The number of heads kept per layer may
differ; it is stored as ``config.edgepack_heads`` and the model is saved with a small self-contained
``modeling_edgepack_bert.py`` (``auto_map``), so it reloads with
``AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)`` (or
``load_classifier(dir)`` here, which needs no remote code). FFN sizes are kept uniform across layers
on purpose: ``config.intermediate_size`` then describes them, and a model pruned in its FFN only
stays a plain ``BertForSequenceClassification``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from edgepack.errors import EdgepackError


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    """Where an architecture keeps the parts structured pruning cuts (attribute paths from the model)."""

    layers: str  # the ModuleList of encoder layers
    query: str = "attention.self.query"
    key: str = "attention.self.key"
    value: str = "attention.self.value"
    attn_out: str = "attention.output.dense"
    ffn_in: str = "intermediate.dense"
    ffn_out: str = "output.dense"


SPECS: dict[str, PruneSpec] = {"bert": PruneSpec(layers="bert.encoder.layer")}


def spec_for(model) -> PruneSpec:
    kind = getattr(model.config, "model_type", None)
    if kind not in SPECS:
        raise EdgepackError(f"structured pruning supports {', '.join(SPECS)} models; this one is {kind!r}")
    return SPECS[kind]


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj, path: str, value) -> None:
    *head, last = path.split(".")
    for part in head:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def layers(model) -> nn.ModuleList:
    return _get(model, spec_for(model).layers)


def head_size(model) -> int:
    return model.config.hidden_size // model.config.num_attention_heads


def heads_per_layer(model) -> list[int]:
    spec, d = spec_for(model), head_size(model)
    return [_get(layer, spec.query).out_features // d for layer in layers(model)]


def ffn_sizes(model) -> list[int]:
    spec = spec_for(model)
    return [_get(layer, spec.ffn_in).out_features for layer in layers(model)]


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ importance


def encode(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Pad/truncate ``texts`` with a ``tokenizers.Tokenizer`` into model inputs."""
    tokenizer.no_padding()  # a saved tokenizer.json may pad on its own; pad here, to the batch's longest
    tokenizer.enable_truncation(max_length)
    encs = tokenizer.encode_batch(list(texts))
    n = max(len(e.ids) for e in encs)
    ids = np.zeros((len(encs), n), dtype=np.int64)
    mask = np.zeros((len(encs), n), dtype=np.int64)
    pad = tokenizer.token_to_id("[PAD]") or 0
    ids[:] = pad
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "token_type_ids": torch.zeros_like(torch.from_numpy(ids))}


def importance(model, tokenizer, texts: Sequence[str], labels: np.ndarray, *, batch_size: int = 32,
               max_length: int = 64) -> tuple[np.ndarray, list[np.ndarray]]:
    """Michel et al. head importance ``[layers, heads]`` and per-layer FFN neuron importance.

    Gates multiply each head's slice of the attention output input and each FFN neuron's activation;
    both are 1, so the forward pass is unchanged and only their gradients are read.
    """
    spec, d = spec_for(model), head_size(model)
    gates, hooks = [], []
    for layer in layers(model):
        hg = torch.ones(_get(layer, spec.query).out_features // d, requires_grad=True)
        fg = torch.ones(_get(layer, spec.ffn_in).out_features, requires_grad=True)
        gates.append((hg, fg))
        hooks.append(_get(layer, spec.attn_out).register_forward_pre_hook(
            lambda m, a, g=hg: (a[0] * g.repeat_interleave(d),)))
        hooks.append(_get(layer, spec.ffn_out).register_forward_pre_hook(lambda m, a, g=fg: (a[0] * g,)))
    head_imp = [torch.zeros_like(h) for h, _ in gates]
    ffn_imp = [torch.zeros_like(f) for _, f in gates]
    was_training = model.training
    model.eval()  # dropout off: importance of the deployed network
    try:
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        for i in range(0, len(texts), batch_size):
            enc = encode(tokenizer, texts[i:i + batch_size], max_length)
            logits = model(**enc).logits
            loss = nn.functional.cross_entropy(logits, y[i:i + batch_size])
            grads = torch.autograd.grad(loss, [g for pair in gates for g in pair])
            for j in range(len(gates)):
                head_imp[j] += grads[2 * j].abs()
                ffn_imp[j] += grads[2 * j + 1].abs()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    heads = [h.numpy() for h in head_imp]
    width = max(len(h) for h in heads)
    out = np.zeros((len(heads), width), dtype=np.float64)  # ragged when heads were already pruned
    for j, h in enumerate(heads):
        out[j, : len(h)] = h / (np.linalg.norm(h) or 1.0)
    return out, [f.numpy().astype(np.float64) for f in ffn_imp]


# ---------------------------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class Plan:
    heads: list[list[int]]  # head indices kept per layer (of the current heads)
    ffn: list[list[int]]  # FFN neuron indices kept per layer

    def to_dict(self) -> dict[str, Any]:
        return {"heads_per_layer": [len(h) for h in self.heads], "ffn_size": [len(f) for f in self.ffn]}


def _costs(model) -> tuple[int, int]:
    hidden, d = model.config.hidden_size, head_size(model)
    per_head = 4 * hidden * d + 3 * d  # q, k, v rows and biases, attention output columns
    per_neuron = 2 * hidden + 1  # intermediate row and bias, output column
    return per_head, per_neuron


def make_plan(model, head_imp: np.ndarray, ffn_imp: list[np.ndarray], *, heads: Sequence[int] = (),
              ffn_size: int | None = None, param_budget: int | None = None) -> Plan:
    """Which heads and neurons to keep, by importance, for one of the three kinds of target."""
    cur_heads, cur_ffn = heads_per_layer(model), ffn_sizes(model)
    n_layers = len(cur_heads)
    if param_budget is not None and (heads or ffn_size is not None):
        raise EdgepackError("give either --param-budget or --heads-per-layer/--ffn-size, not both")
    if param_budget is not None:
        heads_n, ffn_n = _budget_targets(model, head_imp, cur_heads, cur_ffn, param_budget)
    else:
        if heads and len(heads) not in (1, n_layers):
            raise EdgepackError(f"--heads-per-layer gives {len(heads)} values; give one, or one per layer ({n_layers})")
        want = list(heads) * n_layers if len(heads) == 1 else list(heads)
        heads_n = want or list(cur_heads)
        for i, (n, c) in enumerate(zip(heads_n, cur_heads, strict=True)):
            if n < 1:
                raise EdgepackError(f"--heads-per-layer would remove every head of layer {i}; keep at least 1")
            if n > c:
                raise EdgepackError(f"--heads-per-layer {n} for layer {i} is larger than the model's {c} heads there")
        ffn_n = [ffn_size] * n_layers if ffn_size is not None else list(cur_ffn)
        for i, (n, c) in enumerate(zip(ffn_n, cur_ffn, strict=True)):
            if n < 1:
                raise EdgepackError("--ffn-size must keep at least 1 neuron per layer")
            if n > c:
                raise EdgepackError(f"--ffn-size {n} is larger than the model's FFN ({c}) in layer {i}")
    keep_heads = [sorted(np.argsort(-head_imp[i, : cur_heads[i]], kind="stable")[: heads_n[i]].tolist())
                  for i in range(n_layers)]
    keep_ffn = [sorted(np.argsort(-ffn_imp[i], kind="stable")[: ffn_n[i]].tolist()) for i in range(n_layers)]
    return Plan(keep_heads, keep_ffn)


def _budget_targets(model, head_imp, cur_heads, cur_ffn, budget: int) -> tuple[list[int], list[int]]:
    total = count_params(model)
    if budget >= total:
        raise EdgepackError(f"--param-budget {budget:,} is not smaller than the model ({total:,} parameters); "
                            "give a smaller budget")
    per_head, per_neuron = _costs(model)
    prunable = sum(cur_heads) * per_head + sum(cur_ffn) * per_neuron
    fixed = total - prunable
    n_layers = len(cur_heads)
    if budget < fixed + n_layers * (per_head + per_neuron):
        raise EdgepackError(
            f"--param-budget {budget:,} would remove every head of a layer: embeddings, norms and classifier "
            f"alone hold {fixed:,} parameters; give at least {fixed + n_layers * (per_head + per_neuron):,}")
    # Shrink attention and FFN by the same fraction; heads are then chosen across layers by importance.
    frac = (budget - fixed) / prunable
    n_heads = max(n_layers, int(frac * sum(cur_heads)))
    order = [(-head_imp[i, h], i, h) for i in range(n_layers) for h in range(cur_heads[i])]
    counts = [1] * n_layers  # every layer keeps its most important head
    taken = {(i, int(np.argmax(head_imp[i, : cur_heads[i]]))) for i in range(n_layers)}
    for _, i, h in sorted(order):
        if sum(counts) >= n_heads:
            break
        if (i, h) not in taken:
            taken.add((i, h))
            counts[i] += 1
    left = budget - fixed - sum(counts) * per_head
    ffn = max(1, min(max(cur_ffn), left // (n_layers * per_neuron)))
    return counts, [min(ffn, c) for c in cur_ffn]


# --------------------------------------------------------------------------------------------- apply


def _slice_linear(lin: nn.Linear, idx: torch.Tensor, dim: int) -> nn.Linear:
    w = lin.weight.index_select(dim, idx).detach().clone()
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias if dim == 1 else lin.bias.index_select(0, idx))
    return new


def apply_plan(model, plan: Plan) -> None:
    """Cut the model (in place) to the heads and neurons of ``plan``; update its config."""
    spec, d = spec_for(model), head_size(model)
    for layer, keep_h, keep_f in zip(layers(model), plan.heads, plan.ffn, strict=True):
        if not keep_h:
            raise EdgepackError("a plan may not remove every head of a layer")
        rows = torch.as_tensor([h * d + k for h in keep_h for k in range(d)], dtype=torch.long)
        for path in (spec.query, spec.key, spec.value):
            _set(layer, path, _slice_linear(_get(layer, path), rows, 0))
        _set(layer, spec.attn_out, _slice_linear(_get(layer, spec.attn_out), rows, 1))
        att = _get(layer, spec.query.rsplit(".", 1)[0])
        att.num_attention_heads = len(keep_h)
        att.all_head_size = len(keep_h) * d
        neurons = torch.as_tensor(keep_f, dtype=torch.long)
        _set(layer, spec.ffn_in, _slice_linear(_get(layer, spec.ffn_in), neurons, 0))
        _set(layer, spec.ffn_out, _slice_linear(_get(layer, spec.ffn_out), neurons, 1))
    sizes = ffn_sizes(model)
    if len(set(sizes)) != 1:
        raise EdgepackError("FFN sizes must be the same in every layer (config.intermediate_size)")
    model.config.intermediate_size = sizes[0]
    _sync_heads(model)


def keep_layers(model, keep: Sequence[int]) -> None:
    """Keep only the encoder layers ``keep`` (indices, in order)."""
    spec = spec_for(model)
    mods = layers(model)
    n = len(mods)
    if not keep or any(not 0 <= i < n for i in keep) or len(set(keep)) != len(keep):
        raise EdgepackError(f"--keep-layers must name distinct layers among 0..{n - 1}")
    new = nn.ModuleList([mods[i] for i in keep])
    for j, layer in enumerate(new):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = j
    _set(model, spec.layers, new)
    model.config.num_hidden_layers = len(keep)
    _sync_heads(model)


def _sync_heads(model) -> None:
    heads = heads_per_layer(model)
    cfg = model.config
    if all(h == cfg.num_attention_heads for h in heads):
        if hasattr(cfg, "edgepack_heads"):
            del cfg.edgepack_heads
        return
    cfg.edgepack_heads = heads
