"""The static student's initialisation: the teacher's word-embedding table under a fresh head (or,
``token_outputs``, model2vec's: each token's encoder output alone).

The rows start as the teacher's input embeddings (not its contextual outputs): the student keeps the
teacher's vocabulary and tokenizer unchanged, so vocabulary trimming and folding (``edgepack prune``)
apply to it as to any student, and distillation then moves every row (the table is nearly all of the
model, so it is trained, never frozen).
"""

from __future__ import annotations

import torch

from edgepack.config import DistillConfig
from edgepack.static_model import StaticEmbeddingConfig, StaticEmbeddingForSequenceClassification


def from_teacher(teacher, cfg: DistillConfig, *, rows=None) -> StaticEmbeddingForSequenceClassification:
    """A static student over ``teacher``'s labels whose table is a copy of its word embeddings, or
    ``rows`` (one per vocabulary id, the teacher's width: ``token_outputs``)."""
    table = teacher.get_input_embeddings().weight if rows is None else rows
    tc = teacher.config
    config = StaticEmbeddingConfig(
        vocab_size=int(table.shape[0]), hidden_size=int(table.shape[1]), pooling=cfg.static_pooling,
        classifier_hidden=cfg.static_hidden, pad_token_id=tc.pad_token_id if tc.pad_token_id is not None else 0,
        num_labels=tc.num_labels, id2label=dict(tc.id2label), label2id=dict(tc.label2id),
        architectures=["StaticEmbeddingForSequenceClassification"])
    torch.manual_seed(cfg.seed)
    student = StaticEmbeddingForSequenceClassification(config)
    with torch.no_grad():
        student.word_embeddings.weight.copy_(table.detach())
    student.config.edgepack_teacher_layers = []
    return student


def token_outputs(encoder, cls_id: int | None, sep_id: int | None, *, vocab_size: int | None = None,
                  batch_size: int = 512, match_norm_of=None):
    """model2vec's initialisation of a static table: each vocabulary id alone through ``encoder`` (a
    Hugging Face model returning ``last_hidden_state``, or a classifier whose base model does), as
    ``[CLS] id [SEP]``, its outputs mean-pooled over the three positions; then centred (model2vec's PCA
    centres before rotating; a rotation of the full width changes nothing a trained head cannot
    undo, so none is applied) and scaled to ``match_norm_of``'s mean row norm (the table it replaces),
    so the learning rate tuned on that table still fits. Returns a float tensor ``[vocab, width]``.

    The encoder's contextual output for a token alone carries what the encoder learned about it, where
    its input embedding row carries only what the first layer needs: the reason model2vec starts from it.
    """
    import torch

    base = getattr(encoder, getattr(encoder, "base_model_prefix", ""), encoder)
    n = int(vocab_size or base.get_input_embeddings().weight.shape[0])
    wrap = [i for i in (cls_id,) if i is not None], [i for i in (sep_id,) if i is not None]
    out = None
    base.eval()
    with torch.no_grad():  # not inference_mode: the rows become a trainable table
        for start in range(0, n, batch_size):
            ids = torch.arange(start, min(n, start + batch_size)).unsqueeze(1)
            parts = [torch.full_like(ids, i) for i in wrap[0]] + [ids] + [torch.full_like(ids, i) for i in wrap[1]]
            x = torch.cat(parts, dim=1)
            hidden = base(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state.float().mean(1)
            out = torch.empty(n, hidden.shape[1]) if out is None else out
            out[start:start + len(ids)] = hidden
    out -= out.mean(0, keepdim=True)
    if match_norm_of is not None:
        out *= match_norm_of.detach().float().norm(dim=1).mean() / out.norm(dim=1).mean().clamp_min(1e-12)
    return out


class LazyAdamW(torch.optim.Optimizer):
    """AdamW whose sparse-gradient parameters (the static student's table) update only the rows a
    batch looked up: their moments, decay and step, as TensorFlow's LazyAdam does. Dense parameters
    get plain AdamW. A batch of 64 queries touches ~800 of 30,522 rows; dense AdamW moved and decayed
    all 11.7M weights every step, which made a step of this tiny model cost as much as a transformer's.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1
                c1, c2 = 1 - b1 ** state["step"], 1 - b2 ** state["step"]
                g = p.grad
                if g.is_sparse:  # in place where it can be: fresh row-sized tensors cost more than the math
                    g = g.coalesce()
                    idx, val = g.indices()[0], g.values()
                    m = state["m"].index_select(0, idx).mul_(b1).add_(val, alpha=1 - b1)
                    v = state["v"].index_select(0, idx).mul_(b2).addcmul_(val, val, value=1 - b2)
                    state["m"].index_copy_(0, idx, m)
                    state["v"].index_copy_(0, idx, v)
                    rows = p.index_select(0, idx).mul_(1 - lr * wd)
                    p.index_copy_(0, idx, rows.addcdiv_(m.div_(c1), v.div_(c2).sqrt_().add_(eps), value=-lr))
                else:
                    p.mul_(1 - lr * wd)
                    state["m"].mul_(b1).add_(g, alpha=1 - b1)
                    state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                    p.addcdiv_(state["m"] / c1, (state["v"] / c2).sqrt().add_(eps), value=-lr)
        return loss


def optimizer(model, cfg: DistillConfig) -> LazyAdamW:
    """The static student's optimizer, its table switched to sparse gradients (biases not decayed,
    as the Trainer's own AdamW groups them)."""
    model.word_embeddings.sparse = True
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    return LazyAdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                     lr=cfg.learning_rate)
