"""The reference recipe's unstructured pruning, as ``TrainerCallback``s for distillation.

* Magnitude pruning with the cubic schedule of Zhu & Gupta 2017 ("To prune, or not to prune"):
  ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3`` for ``t0 <= t <= t0 + n * dt``; every
  ``dt`` steps the smallest-magnitude weights of each encoder Linear are masked to reach ``s_t``.
* Movement pruning (Sanh et al. 2020): a score per weight learned with the weights, here in its
  first-order form ``S = -sum_t dL/dW * W`` accumulated before every optimizer step (what the
  straight-through estimator gives the scores under SGD), and a top-k mask by score on the same
  cubic schedule. One difference from the paper: masked weights are zeroed, not kept aside, so a
  pruned weight's score stops moving and it does not come back.

Zeros do not make a dense ONNX model smaller or faster: ONNX Runtime's CPU MatMul and int8 MatMul
kernels are dense. They only help a compressed download (gzip of the bundle); ``measure_sparsity``
records the fraction actually reached.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from edgepack.errors import EdgepackError

METHODS = ("none", "magnitude", "movement")


def cubic_sparsity(step: int, *, initial: float, final: float, begin_step: int, end_step: int) -> float:
    """Zhu & Gupta's schedule: ``initial`` before ``begin_step``, ``final`` from ``end_step`` on.

    >>> cubic_sparsity(0, initial=0.0, final=0.8, begin_step=0, end_step=100)
    0.0
    >>> round(cubic_sparsity(50, initial=0.0, final=0.8, begin_step=0, end_step=100), 4)
    0.7
    """
    if end_step <= begin_step:
        return final if step >= begin_step else initial
    if step <= begin_step:
        return initial
    if step >= end_step:
        return final
    frac = (step - begin_step) / (end_step - begin_step)
    return final + (initial - final) * (1.0 - frac) ** 3


def prunable_linears(model) -> list[tuple[str, nn.Linear]]:
    """The encoder's Linear layers (attention and FFN); embeddings, pooler and classifier stay dense,
    as in the reference recipe."""
    from edgepack.stages.prune.structured import layers

    out = []
    for i, layer in enumerate(layers(model)):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                out.append((f"layer.{i}.{name}", mod))
    return out


def measure_sparsity(model) -> float:
    """Fraction of exact zeros in the prunable weights."""
    zeros = total = 0
    for _, lin in prunable_linears(model):
        zeros += int((lin.weight == 0).sum())
        total += lin.weight.numel()
    return zeros / total if total else 0.0


class MagnitudePruningCallback(TrainerCallback):
    """Mask the smallest weights of each encoder Linear on the cubic schedule.

    ``begin``/``end`` are fractions of the run's optimizer steps (t0 and t0 + n dt); ``every`` is dt.
    """

    method = "magnitude"

    def __init__(self, final_sparsity: float, *, initial_sparsity: float = 0.0, begin: float = 0.0,
                 end: float = 0.7, every: int = 10):
        if not 0.0 <= initial_sparsity <= final_sparsity < 1.0:
            raise EdgepackError(f"sparsity must satisfy 0 <= initial ({initial_sparsity}) <= final "
                                f"({final_sparsity}) < 1")
        if not 0.0 <= begin <= end <= 1.0:
            raise EdgepackError(f"pruning window begin={begin}, end={end} must satisfy 0 <= begin <= end <= 1")
        self.final, self.initial, self.begin, self.end, self.every = final_sparsity, initial_sparsity, begin, end, max(1, every)
        self.masks: dict[str, torch.Tensor] = {}
        self.linears: list[tuple[str, nn.Linear]] = []
        self.begin_step = self.end_step = 0
        self.current = 0.0
        self.history: list[tuple[int, float]] = []

    # ---- hooks the Trainer calls
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.setup(model, state.max_steps)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.observe()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.step(state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # load_best_model_at_end may have brought back an epoch from before the schedule ended; the
        # record promises the final sparsity, so prune that model to it (accuracy is measured after).
        if model is not None and self.final > 0:
            self.linears = prunable_linears(model)
            self.finish()

    def finish(self) -> None:
        """Mask every prunable Linear to exactly the final sparsity."""
        for name, lin in self.linears:
            self.masks[name] = _topk_mask(self.scores(name, lin), 1.0 - self.final)
        self.current = self.final
        self.apply()

    # ---- usable without a Trainer (tests, custom loops)
    def setup(self, model, max_steps: int) -> None:
        self.linears = prunable_linears(model)
        self.begin_step = int(self.begin * max_steps)
        self.end_step = max(self.begin_step, int(self.end * max_steps))
        self.masks = {n: torch.ones_like(lin.weight, dtype=torch.bool) for n, lin in self.linears}

    def observe(self) -> None:
        """Called with gradients present, before the optimizer step."""

    def scores(self, name: str, lin: nn.Linear) -> torch.Tensor:
        return lin.weight.detach().abs()

    def step(self, global_step: int) -> None:
        target = cubic_sparsity(global_step, initial=self.initial, final=self.final,
                                begin_step=self.begin_step, end_step=self.end_step)
        at_end = global_step >= self.end_step
        if target > 0 and (global_step % self.every == 0 or (at_end and target != self.current)):
            for name, lin in self.linears:
                self.masks[name] = _topk_mask(self.scores(name, lin), 1.0 - target)
            self.current = target
            self.history.append((global_step, round(target, 4)))
        self.apply()

    def apply(self) -> None:
        with torch.no_grad():
            for name, lin in self.linears:
                lin.weight.mul_(self.masks[name])

    def report(self, model=None) -> dict[str, Any]:
        out = {"method": self.method, "target_sparsity": self.final, "scheduled_sparsity": round(self.current, 4),
               "begin_step": self.begin_step, "end_step": self.end_step, "every": self.every}
        if model is not None:
            out["sparsity_reached"] = round(measure_sparsity(model), 4)
        return out


class MovementPruningCallback(MagnitudePruningCallback):
    """Top-k by movement score ``S = -sum dL/dW * W`` (Sanh et al. 2020), same schedule."""

    method = "movement"

    def setup(self, model, max_steps: int) -> None:
        super().setup(model, max_steps)
        self._scores = {n: torch.zeros_like(lin.weight) for n, lin in self.linears}

    def observe(self) -> None:
        with torch.no_grad():
            for name, lin in self.linears:
                if lin.weight.grad is not None:
                    self._scores[name] -= lin.weight.grad * lin.weight

    def scores(self, name: str, lin: nn.Linear) -> torch.Tensor:
        return self._scores[name]


def _topk_mask(scores: torch.Tensor, keep: float) -> torch.Tensor:
    k = max(1, int(round(keep * scores.numel())))
    flat = scores.flatten()
    idx = torch.topk(flat, k, sorted=False).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[idx] = True
    return mask.view_as(scores)


def make_callback(method: str, final_sparsity: float, **kwargs) -> MagnitudePruningCallback | None:
    if method not in METHODS:
        raise EdgepackError(f"--sparsity-method {method!r}; choose one of: {', '.join(METHODS)}")
    if method == "none" or final_sparsity <= 0:
        return None
    cls = MagnitudePruningCallback if method == "magnitude" else MovementPruningCallback
    return cls(final_sparsity, **kwargs)
