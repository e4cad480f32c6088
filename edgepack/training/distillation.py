"""Knowledge distillation: a small student trained on the teacher's cached logits.

The loss is the reference recipe (NLP with Transformers, ch. 8)::

    alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

(``nn.KLDivLoss(log_softmax(z_s / T), softmax(z_t / T))``: the teacher's distribution is the target),
plus, optionally, an MSE between the student's and the mapped teacher layers' first-token states
(TinyBERT's intermediate-layer loss, reduced to [CLS] so the cache stays small), and MiniLM's
self-attention transfer (``self_relations``: the last layer's attention distributions and value
relations, with the teacher run on each batch).

``DistillationTrainer`` is a ``transformers.Trainer`` that overrides only what differs from plain
fine-tuning: where the teacher's outputs come from (``teacher_targets``: the batch, filled from the
on-disk cache) and the loss (``distillation_loss``). ``train_student`` runs it on any student model
with extra ``TrainerCallback``s (pruning reuses it for recovery); ``distill`` is the stage: it builds
the student, trains it and the labels-only ablation, measures both and writes the output directory
atomically with its ``stage.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.config import DistillConfig
from edgepack.console import quiet_trainer
from edgepack.data import LabelledData, Split
from edgepack.errors import EdgepackError
from edgepack.metrics import agreement, apply_threshold, calibrate_threshold, label_metrics, softmax
from edgepack.records import hash_tree
from edgepack.static_model import is_static
from edgepack.training.arguments import training_arguments

STAGE = "distill"

try:  # a Trainer subclass needs transformers at import; the CLI imports this module lazily
    from transformers import Trainer
except ImportError:  # pragma: no cover
    Trainer = object  # type: ignore[assignment,misc]


# --------------------------------------------------------------------------------------------- trainer


class DistillationTrainer(Trainer):
    """``Trainer`` whose loss mixes gold labels with the teacher's soft targets.

    Batches carry ``teacher_logits`` (and ``teacher_hidden`` when the hidden-state loss is on) next to
    the token ids, and ``has_label`` (0 for teacher-labelled augmented rows, which get no CE term).
    Evaluation batches carry none of them and are scored with plain cross-entropy.
    """

    def __init__(self, *args, alpha: float = 0.5, temperature: float = 2.0, hidden_weight: float = 0.0,
                 hidden_map: Sequence[int] | None = None, attention_weight: float = 0.0, teacher_model=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = alpha
        self.temperature = temperature
        self.hidden_weight = hidden_weight
        self.hidden_map = list(hidden_map) if hidden_map is not None else None
        self.attention_weight = attention_weight if teacher_model is not None else 0.0
        self.teacher_model = teacher_model.eval() if teacher_model is not None else None

    def teacher_targets(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Remove and return the teacher's outputs for this batch (here: read from the cache)."""
        return {k: inputs.pop(k) for k in ("teacher_logits", "teacher_hidden", "has_label") if k in inputs}

    def distillation_loss(self, student_logits, teacher_logits, labels, has_label=None):
        import torch.nn.functional as F

        t = self.temperature
        mask = has_label.bool() if has_label is not None else None
        if teacher_logits is None:  # evaluation batches: plain cross-entropy, whatever alpha is
            return F.cross_entropy(student_logits, labels)
        if self.alpha > 0 and labels is not None:
            if mask is None:
                ce = F.cross_entropy(student_logits, labels)
            elif mask.any():
                ce = F.cross_entropy(student_logits[mask], labels[mask])
            else:
                ce = student_logits.sum() * 0.0
        else:
            ce = student_logits.sum() * 0.0
        if self.alpha >= 1:
            return ce
        kd = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.softmax(teacher_logits / t, dim=-1),
                      reduction="batchmean") * t * t
        return self.alpha * ce + (1 - self.alpha) * kd

    def hidden_loss(self, student_hidden, teacher_hidden):
        import torch
        import torch.nn.functional as F

        s = torch.stack([student_hidden[j][:, 0] for j in range(len(student_hidden))], dim=1)
        t = teacher_hidden[:, self.hidden_map].to(s.dtype)
        return F.mse_loss(s, t)

    def _get_grad_norm(self, model, grad_norm=None):
        # transformers 5 takes the gradient norm for its logs on every step; clip_grad_norm_ has no kernel
        # for the sparse gradient of the static student's table (trained unclipped), so log none.
        if grad_norm is None and any(p.grad is not None and p.grad.is_sparse for p in model.parameters()):
            return None
        return super()._get_grad_norm(model, grad_norm)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import contextlib

        targets = self.teacher_targets(inputs)
        labels = inputs.pop("labels", None)
        want_hidden = (self.hidden_weight > 0 and self.hidden_map is not None and "teacher_hidden" in targets)
        want_attention = self.attention_weight > 0 and "teacher_logits" in targets  # training batches only
        student_qkv: dict[str, Any] = {}
        with capture_qkv(model, student_qkv) if want_attention else contextlib.nullcontext():
            outputs = model(**inputs, output_hidden_states=want_hidden) if want_hidden else model(**inputs)
        loss = self.distillation_loss(outputs.logits, targets.get("teacher_logits"), labels, targets.get("has_label"))
        if want_hidden:
            loss = loss + self.hidden_weight * self.hidden_loss(outputs.hidden_states, targets["teacher_hidden"])
        if want_attention:
            loss = loss + self.attention_weight * self.attention_loss(student_qkv, inputs)
        return (loss, outputs) if return_outputs else loss

    def attention_loss(self, student_qkv: dict[str, Any], inputs: dict[str, Any]):
        """MiniLM's loss: KL(teacher || student) of the last layer's attention distributions plus that of
        its value relations, both split into the teacher's head count."""
        import torch

        teacher_qkv: dict[str, Any] = {}
        with torch.no_grad(), capture_qkv(self.teacher_model, teacher_qkv):
            self.teacher_model(**inputs)
        heads = self.teacher_model.config.num_attention_heads
        mask = inputs["attention_mask"]
        t = self_relations(teacher_qkv, mask, heads)
        s = self_relations(student_qkv, mask, heads)
        return sum(relation_kl(ti, si, mask) for ti, si in zip(t, s, strict=True))


# Where the last self-attention layer's query, key and value projections are, by architecture:
# BERT-like models (BERT, RoBERTa, MiniLM) and DistilBERT.
_QKV_NAMES = (("attention.self.query", "attention.self.key", "attention.self.value"),
              ("attention.q_lin", "attention.k_lin", "attention.v_lin"))


def qkv_modules(model) -> tuple[Any, Any, Any]:
    """The query, key and value ``Linear`` modules of ``model``'s last self-attention layer."""
    modules = dict(model.named_modules())
    for names in _QKV_NAMES:
        prefixes = [n[: -len(names[0])] for n in modules if n.endswith("." + names[0])]
        if prefixes:
            last = max(prefixes, key=lambda n: int((re.findall(r"\d+", n) or ["-1"])[-1]))  # the deepest layer
            return tuple(modules[last + n] for n in names)  # type: ignore[return-value]
    raise EdgepackError(f"{type(model).__name__}: no self-attention layer found for the attention loss "
                        "(BERT-like and DistilBERT models only); set attention_weight = 0")


class capture_qkv:
    """Within the block, ``out["q"|"k"|"v"]`` are the last self-attention layer's projections (batch,
    tokens, width) from the model's most recent forward pass."""

    def __init__(self, model, out: dict[str, Any]):
        self.modules, self.out, self.hooks = qkv_modules(model), out, []

    def __enter__(self):
        for key, module in zip("qkv", self.modules, strict=True):
            self.hooks.append(module.register_forward_hook(
                lambda _m, _inp, output, key=key: self.out.__setitem__(key, output)))
        return self.out

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


def self_relations(qkv: Mapping[str, Any], mask, heads: int):
    """MiniLM's self-attention relations, as log-probabilities (batch, heads, tokens, tokens): the
    attention distribution ``softmax(Q K^T / sqrt(d))`` and the value relation ``softmax(V V^T / sqrt(d))``,
    each projection split into ``heads`` relation heads (MiniLMv2's trick: the student's own head
    count and width need not match the teacher's), padded keys masked."""
    import torch

    q, k, v = qkv["q"], qkv["k"], qkv["v"]
    b, n, width = q.shape
    if width % heads:
        raise EdgepackError(f"the attention loss splits a {width}-wide projection into {heads} heads; "
                            "it needs a width divisible by the teacher's head count")

    def split(x):
        return x.view(b, n, heads, width // heads).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    scale = (width // heads) ** -0.5
    pad = (1.0 - mask[:, None, None, :].to(q.dtype)) * -1e4
    return (torch.log_softmax(q @ k.transpose(-1, -2) * scale + pad, dim=-1),
            torch.log_softmax(v @ v.transpose(-1, -2) * scale + pad, dim=-1))


def relation_kl(teacher_log, student_log, mask):
    """KL(teacher || student) per query row, averaged over the heads and the unpadded rows."""
    rows = (teacher_log.exp() * (teacher_log - student_log)).sum(-1)  # batch, heads, tokens
    m = mask[:, None, :].to(rows.dtype)
    return (rows * m).sum() / (m.sum() * rows.shape[1])


# --------------------------------------------------------------------------------------------- data


# Scripts written without spaces between words (Han, Hiragana, Katakana, Thai, Lao, Myanmar, Khmer):
# their characters are the units noisy copies drop and swap, as words are elsewhere.
_UNSPACED = re.compile("[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf"
                       "\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0002fa1f]")


def _units(text: str) -> list[str]:
    """Words split on whitespace, and each character of an unspaced script a unit of its own
    (``"订 机票 to Paris"`` -> ``订, 机, 票, to, Paris``): what word dropout and swaps move."""
    out: list[str] = []
    for word in text.split():
        if not _UNSPACED.search(word):
            out.append(word)
            continue
        run = ""
        for ch in word:
            if _UNSPACED.match(ch):
                if run:
                    out.append(run)
                    run = ""
                out.append(ch)
            else:
                run += ch
        if run:
            out.append(run)
    return out


def _join(units: Sequence[str]) -> str:
    """Units back into text: a space between two units unless both are unspaced-script characters."""
    out = ""
    for u in units:
        if out and not (_UNSPACED.match(out[-1]) and _UNSPACED.match(u[0])):
            out += " "
        out += u
    return out


def augment_texts(texts: Sequence[str], copies: int, seed: int = 0) -> list[str]:
    """``copies`` noisy variants of each text: word dropout, a swap of two words, or the first half of
    the text spliced to the second half of another. The teacher labels them (soft targets only): the
    spliced ones are ambiguous on purpose, teaching the student where the teacher is unsure, which is
    what the out-of-scope threshold reads.

    A "word" is a whitespace-separated one, or one character of a script written without spaces
    (Chinese, Japanese, Thai...), so texts in those scripts get dropouts and swaps too, not only
    splices. Texts without such characters get exactly the copies they always did.

    Example:
        >>> augment_texts(["我想订一张去北京的机票"], 1, seed=3)  # two characters dropped
        ['我想订一北京的机票']
    """
    rng = random.Random(seed)
    out = []
    for _ in range(copies):
        for text in texts:
            words = _units(text)
            op = rng.random()
            if len(words) < 3 or op < 0.2:
                other = _units(texts[rng.randrange(len(texts))])
                words = words[: max(1, len(words) // 2)] + other[len(other) // 2:]
            elif op < 0.6:
                kept = [w for w in words if rng.random() > 0.2]
                words = kept or [rng.choice(words)]
            else:
                i, j = rng.sample(range(len(words)), 2)
                words[i], words[j] = words[j], words[i]
            out.append(_join(words))
    return out


class _Rows:
    """A map-style dataset of pre-tokenised rows (dicts of lists / arrays)."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def _encode(tokenizer, texts: Sequence[str], max_length: int) -> list[dict[str, list[int]]]:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(texts))]


def make_rows(tokenizer, texts: Sequence[str], labels: np.ndarray | None, max_length: int, *,
              teacher_logits: np.ndarray | None = None, teacher_hidden: np.ndarray | None = None,
              has_label: np.ndarray | None = None) -> _Rows:
    rows = _encode(tokenizer, texts, max_length)
    for i, row in enumerate(rows):
        if labels is not None:
            row["labels"] = int(labels[i])
        if teacher_logits is not None:
            row["teacher_logits"] = teacher_logits[i]
        if teacher_hidden is not None:
            row["teacher_hidden"] = teacher_hidden[i]
        if has_label is not None:
            row["has_label"] = int(has_label[i])
    return _Rows(rows)


class Collator:
    """Pads token ids to the longest row of the batch (not to max_length); stacks the rest."""

    _TOKENS = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        tokens = [{k: f[k] for k in self._TOKENS if k in f} for f in features]
        batch = dict(self.tokenizer.pad(tokens, return_tensors="pt"))
        first = features[0]
        if "labels" in first:
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        if "has_label" in first:
            batch["has_label"] = torch.tensor([f["has_label"] for f in features], dtype=torch.long)
        for k in ("teacher_logits", "teacher_hidden"):
            if k in first:
                batch[k] = torch.from_numpy(np.stack([f[k] for f in features]).astype(np.float32))
        return batch


# --------------------------------------------------------------------------------------------- train


@dataclasses.dataclass
class TrainSet:
    """Training texts with gold labels (``has_label`` 0 for augmented rows) and the teacher's outputs."""

    texts: list[str]
    labels: np.ndarray
    has_label: np.ndarray
    teacher_logits: np.ndarray
    teacher_hidden: np.ndarray | None = None

    def labels_only(self) -> TrainSet:
        """The gold-labelled rows alone (what the labels-only ablation sees)."""
        keep = np.flatnonzero(self.has_label)
        return TrainSet([self.texts[i] for i in keep], self.labels[keep], self.has_label[keep],
                        self.teacher_logits[keep], None if self.teacher_hidden is None else self.teacher_hidden[keep])


def build_trainset(cfg: DistillConfig, teacher_dir: Path, train: Split, *, cache_dir: Path | None,
                   teacher_hash: str, max_length: int = 64, progress: bool = True) -> TrainSet:
    from edgepack.training.teacher_cache import teacher_outputs

    aug = augment_texts(train.texts, cfg.augment, seed=cfg.seed) if cfg.augment else []
    texts = list(train.texts) + aug
    out = teacher_outputs(teacher_dir, texts, cache_dir=cache_dir, max_length=max_length,
                          hidden=cfg.hidden_weight > 0, teacher_hash=teacher_hash, progress=progress)
    # Augmented rows get the teacher's top label only as a placeholder: has_label=0 keeps them out of CE.
    labels = np.concatenate([train.labels, out["logits"][len(train.texts):].argmax(axis=1)]).astype(np.int64)
    has_label = np.concatenate([np.ones(len(train.texts), np.int64), np.zeros(len(aug), np.int64)])
    return TrainSet(texts, labels, has_label, out["logits"], out.get("hidden"))


def relabel_unsure(trainset: TrainSet, oos_id: int, threshold: float, weight: float) -> tuple[TrainSet, int]:
    """The calibrated teacher's targets: on rows without a gold label whose top teacher probability is
    below ``threshold``, the target becomes ``(1 - weight) * p + weight * onehot(oos_id)`` (stored as
    its log, so the loss's temperature applies to it like to any teacher logits). Returns the new set
    and the number of rows changed.

    >>> ts = TrainSet(["a", "b"], np.array([0, 0]), np.array([1, 0]), np.log(np.array([[.4, .3, .3]] * 2, np.float32)))
    >>> new, n = relabel_unsure(ts, oos_id=2, threshold=0.5, weight=0.5)
    >>> n, np.exp(new.teacher_logits.astype(np.float64)).round(2).tolist()
    (1, [[0.4, 0.3, 0.3], [0.2, 0.15, 0.65]])
    """
    if weight <= 0:
        return trainset, 0
    p = softmax(trainset.teacher_logits)  # float64
    unsure = (trainset.has_label == 0) & (p.max(axis=1) < threshold)
    if not unsure.any():
        return trainset, 0
    q = p[unsure] * (1.0 - weight)
    q[:, oos_id] += weight
    new = np.array(trainset.teacher_logits, dtype=np.float32)  # a copy
    new[unsure] = np.log(np.maximum(q, 1e-12)).astype(np.float32)
    return dataclasses.replace(trainset, teacher_logits=new), int(unsure.sum())


def _metrics_fn(oos_id: int | None):
    def compute(pred) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        labels = pred.label_ids
        probs = softmax(np.asarray(logits, dtype=np.float64))
        m = {"accuracy": label_metrics(probs.argmax(1), labels, None)["accuracy"]}
        if oos_id is not None:
            th = calibrate_threshold(probs, labels, oos_id)
            m["cal_accuracy"] = label_metrics(apply_threshold(probs, oos_id, th), labels, None)["accuracy"]
        return m
    return compute


def train_student(
    cfg: DistillConfig,
    model,
    tokenizer,
    trainset: TrainSet,
    validation: Split,
    *,
    oos_id: int | None = None,
    work_dir: Path | None = None,
    callbacks: Iterable[Any] = (),
    hidden_map: Sequence[int] | None = None,
    max_length: int = 64,
    progress: bool = True,
    qat=None,
    teacher_model=None,
):
    """Train ``model`` in place with ``DistillationTrainer``; evaluate on ``validation`` each epoch and
    end with the best epoch's weights. Returns the trainer (``trainer.model`` is the student).

    ``cfg.alpha == 1`` is plain fine-tuning on the labelled rows. ``callbacks`` are extra
    ``transformers.TrainerCallback``s (pruning schedules, Optuna's pruning hook). ``qat``: an
    ``edgepack.training.qat.Scheme`` to train (and pick the best epoch) with the target's int8
    rounding simulated; the model comes back plain fp32. ``teacher_model``: the teacher, run on each
    batch for ``cfg.attention_weight``'s loss (without it that loss is off).
    """
    import contextlib

    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the Trainer's chatter, for this training only
    tmp = None
    if work_dir is None:
        tmp = tempfile.mkdtemp(prefix="edgepack-distill-")
        work_dir = Path(tmp)
    try:
        if cfg.alpha >= 1:
            trainset = trainset.labels_only()
        use_hidden = cfg.hidden_weight > 0 and hidden_map is not None and trainset.teacher_hidden is not None
        train_rows = make_rows(tokenizer, trainset.texts, trainset.labels, max_length,
                               teacher_logits=trainset.teacher_logits,
                               teacher_hidden=trainset.teacher_hidden if use_hidden else None,
                               has_label=trainset.has_label)
        val_rows = make_rows(tokenizer, validation.texts, validation.labels, max_length)
        best_metric = "cal_accuracy" if oos_id is not None else "accuracy"
        if cfg.freeze_embeddings and not is_static(model):  # a static student's table is the model
            # The word-embedding table holds most of a 2-layer student's weights (11.7M of 15.5M for
            # MiniLM): fixing it skips its gradient and AdamW update on every step.
            model.get_input_embeddings().weight.requires_grad_(False)
        static, optimizers = is_static(model), (None, None)
        if static:  # lazy row updates of the table (sparse gradients: no norm clipping)
            from edgepack.training import static_student

            optimizers = (static_student.optimizer(model, cfg), None)
        args = training_arguments(
            work_dir, epochs=cfg.epochs, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size,
            eval_batch_size=128, warmup_steps=int(cfg.warmup_ratio * cfg.epochs * -(-len(train_rows) // cfg.batch_size)),
            weight_decay=cfg.weight_decay, metric=best_metric, seed=cfg.seed, progress=progress,
            remove_unused_columns=False, **({"max_grad_norm": 0.0} if static else {}))
        trainer = DistillationTrainer(
            model=model, args=args, train_dataset=train_rows, eval_dataset=val_rows,
            data_collator=Collator(tokenizer), compute_metrics=_metrics_fn(oos_id),
            callbacks=list(callbacks), alpha=cfg.alpha, temperature=cfg.temperature,
            hidden_weight=cfg.hidden_weight if use_hidden else 0.0, hidden_map=hidden_map, optimizers=optimizers,
            attention_weight=cfg.attention_weight, teacher_model=teacher_model,
        )
        quiet_trainer(trainer)  # the per-epoch metric dicts go to the log file, not between progress bars
        if qat is not None:
            from edgepack.training.qat import fake_quantized

            simulated = fake_quantized(model, qat)
        else:
            simulated = contextlib.nullcontext()
        with simulated:
            trainer.train()
        trainer.model.eval()
        if static:
            trainer.model.word_embeddings.sparse = False
        return trainer
    finally:
        transformers.logging.set_verbosity(verbosity)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------- measure


def predict_logits(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 128) -> np.ndarray:
    """Logits for ``texts`` in length-sorted batches (little padding)."""
    import torch

    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    order = np.argsort([len(x) for x in enc["input_ids"]], kind="stable")
    out = None
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer.pad({k: [enc[k][i] for i in idx] for k in enc.keys()}, return_tensors="pt")
            logits = model(**batch).logits.float().numpy()
            if out is None:
                out = np.zeros((len(texts), logits.shape[1]), dtype=np.float32)
            out[idx] = logits
    return out if out is not None else np.zeros((0, 0), np.float32)


def score(val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray, test_labels: np.ndarray,
          oos_id: int | None, *, teacher_test_logits: np.ndarray | None = None) -> dict[str, float | None]:
    """Validation and test accuracy, raw and with the out-of-scope threshold chosen on validation."""
    pv, pt = softmax(val_logits.astype(np.float64)), softmax(test_logits.astype(np.float64))
    raw_t = pt.argmax(1)
    m: dict[str, float | None] = {
        "val_accuracy": label_metrics(pv.argmax(1), val_labels, None)["accuracy"],
        "test_accuracy": label_metrics(raw_t, test_labels, None)["accuracy"],
    }
    if oos_id is not None:
        th = calibrate_threshold(pv, val_labels, oos_id)
        cal = label_metrics(apply_threshold(pt, oos_id, th), test_labels, oos_id)
        m.update({
            "oos_threshold": th,
            "val_accuracy_calibrated": label_metrics(apply_threshold(pv, oos_id, th), val_labels, None)["accuracy"],
            "test_accuracy_calibrated": cal["accuracy"],
            "test_in_scope_accuracy_calibrated": cal["in_scope_accuracy"],
            "test_oos_recall_calibrated": cal["oos_recall"],
            "test_oos_recall": label_metrics(raw_t, test_labels, oos_id)["oos_recall"],
        })
    if teacher_test_logits is not None:
        m["test_agreement_with_teacher"] = agreement(raw_t, teacher_test_logits.argmax(1))
    return {k: (None if v is None else round(v, 6)) for k, v in m.items()}


# --------------------------------------------------------------------------------------------- stage


@dataclasses.dataclass
class Prepared:
    """Everything a training run needs, built once (a search reuses it for every trial)."""

    cfg: DistillConfig
    teacher_dir: Path
    teacher_hash: str
    data: LabelledData
    tokenizer: Any
    student_init: Any  # the untrained student (copied for each run)
    hidden_map: list[int] | None
    trainset: TrainSet
    teacher_val: np.ndarray
    teacher_test: np.ndarray
    cache_dir: Path | None
    max_length: int = 64  # tokens per text (the build's [data] max_length)

    @functools.cached_property
    def teacher_model(self):
        """The teacher itself, loaded once (the attention loss runs it on every batch of every run)."""
        from edgepack.training import student as st

        return st.load_teacher(self.teacher_dir)

    @functools.cached_property
    def teacher_threshold(self) -> float | None:
        """The teacher's out-of-scope threshold on validation (None without an out-of-scope label)."""
        if self.data.oos_id is None:
            return None
        return calibrate_threshold(softmax(self.teacher_val), self.data["validation"].labels, self.data.oos_id)

    def targets(self, trainset: TrainSet, cfg: DistillConfig) -> tuple[TrainSet, int]:
        """``trainset`` with ``cfg.oos_relabel`` applied (see ``relabel_unsure``)."""
        if cfg.oos_relabel <= 0 or self.teacher_threshold is None:
            return trainset, 0
        return relabel_unsure(trainset, self.data.oos_id, self.teacher_threshold, cfg.oos_relabel)

    def fresh_student(self):
        return copy.deepcopy(self.student_init)


def check_labels(teacher_id2label: Mapping[int, str], data: LabelledData) -> None:
    names = [teacher_id2label[i] for i in sorted(teacher_id2label)]
    if list(data.label_names) != names:
        extra = sorted(set(data.label_names) - set(names))
        raise EdgepackError(
            f"{data.source}: labels differ from the teacher's id2label"
            + (f" (unknown to the teacher: {', '.join(extra[:5])})" if extra else "")
            + "; load the data with the teacher's labels"
        )


def build_student(cfg: DistillConfig, teacher_dir: Path, id2label: Mapping[int, str] | None = None):
    """The untrained student ``cfg`` describes: ``(model, tokenizer, hidden_map)``. Teacher layers
    (``layers`` or ``num_layers`` spread by ``student.pick_layers``), the static student
    (``num_layers = 0``) or ``cfg.student``'s checkpoint with a fresh head. ``hidden_map``: student hidden
    state j (0 = embeddings) -> the teacher's, for the hidden-state loss (teacher layers only)."""
    from edgepack.training import student as st

    teacher_dir = Path(teacher_dir)
    id2label = id2label if id2label is not None else st.read_id2label(teacher_dir)
    hidden_map = None
    if cfg.student:
        model = st.from_checkpoint(Path(cfg.student), id2label)
        tokenizer = st.load_tokenizer(Path(cfg.student), what="student")
    elif cfg.num_layers == 0 and not cfg.layers:
        from edgepack.training import static_student

        teacher = st.load_teacher(teacher_dir)
        model = static_student.from_teacher(teacher, cfg)
        del teacher
        tokenizer = st.load_tokenizer(teacher_dir, what="teacher")
    else:
        depth = st.teacher_depth(teacher_dir)
        layers = tuple(cfg.layers) or st.pick_layers(cfg.num_layers, depth)
        if len(layers) > depth or any(i >= depth for i in layers):
            raise EdgepackError(
                f"--layers {','.join(map(str, layers)) if cfg.layers else cfg.num_layers}: the teacher has "
                f"{depth} layers (0..{depth - 1})"
            )
        teacher = st.load_teacher(teacher_dir)
        model = st.from_teacher(teacher, layers)
        del teacher
        tokenizer = st.load_tokenizer(teacher_dir, what="teacher")
        # Student hidden state j (0 = embeddings) matches teacher state layers[j-1] + 1.
        hidden_map = [0] + [i + 1 for i in layers]
    return model, tokenizer, hidden_map


def prepare(cfg: DistillConfig, teacher_dir: Path, data: LabelledData, *, student_model=None,
            student_tokenizer=None, cache_dir: Path | None = None, max_length: int = 64,
            progress: bool = True) -> Prepared:
    """Check the inputs, build the student and fill the teacher cache (no training, nothing written
    but the cache)."""
    from edgepack.training import student as st
    from edgepack.training.teacher_cache import teacher_outputs

    teacher_dir = Path(teacher_dir)
    id2label = st.read_id2label(teacher_dir)
    check_labels(id2label, data)
    for split in ("train", "validation", "test"):
        if split not in data.splits or not len(data.splits[split]):
            raise EdgepackError(f"{data.source}: no {split} rows; distillation needs train, validation and test")
    if student_model is not None:
        model = student_model
        tokenizer = student_tokenizer or st.load_tokenizer(teacher_dir, what="teacher")
        hidden_map = None
    else:
        model, tokenizer, hidden_map = build_student(cfg, teacher_dir, id2label)
    if model.config.num_labels != len(id2label):
        raise EdgepackError(f"the student has {model.config.num_labels} outputs, the teacher {len(id2label)} labels")
    teacher_hash = hash_tree(teacher_dir)
    trainset = build_trainset(cfg, teacher_dir, data["train"], cache_dir=cache_dir, teacher_hash=teacher_hash,
                              max_length=max_length, progress=progress)
    evalset = teacher_outputs(teacher_dir, data["validation"].texts + data["test"].texts, cache_dir=cache_dir,
                              max_length=max_length, teacher_hash=teacher_hash, progress=progress)["logits"]
    n_val = len(data["validation"])
    return Prepared(cfg, teacher_dir, teacher_hash, data, tokenizer, model, hidden_map, trainset,
                    evalset[:n_val], evalset[n_val:], cache_dir, max_length)


def run_once(prep: Prepared, cfg: DistillConfig, *, model=None, callbacks: Iterable[Any] = (),
             progress: bool = True):
    """Train one student with ``cfg`` (a copy of the prepared init unless ``model`` is given) and
    measure it. Returns ``(model, metrics)``."""
    t0 = time.time()
    if cfg.augment != prep.cfg.augment or (cfg.hidden_weight > 0) != (prep.cfg.hidden_weight > 0):
        trainset = build_trainset(cfg, prep.teacher_dir, prep.data["train"], cache_dir=prep.cache_dir,
                                  teacher_hash=prep.teacher_hash, max_length=prep.max_length, progress=progress)
    else:
        trainset = prep.trainset
    trainset, relabelled = prep.targets(trainset, cfg)
    model = model if model is not None else prep.fresh_student()
    scheme = None
    if cfg.qat:
        from edgepack.training.qat import resolve

        scheme = resolve(cfg.qat_target)
    # The attention loss needs a student of teacher layers (the teacher's tokenizer and depth map).
    teacher = prep.teacher_model if cfg.attention_weight > 0 and prep.hidden_map is not None else None
    trainer = train_student(cfg, model, prep.tokenizer, trainset, prep.data["validation"], oos_id=prep.data.oos_id,
                            callbacks=callbacks, hidden_map=prep.hidden_map, max_length=prep.max_length,
                            progress=progress, qat=scheme, teacher_model=teacher)
    model = trainer.model
    val, test = prep.data["validation"], prep.data["test"]
    metrics = score(predict_logits(model, prep.tokenizer, val.texts, prep.max_length), val.labels,
                    predict_logits(model, prep.tokenizer, test.texts, prep.max_length), test.labels,
                    prep.data.oos_id, teacher_test_logits=prep.teacher_test)
    metrics["train_rows"] = len(trainset.texts) if cfg.alpha < 1 else int(trainset.has_label.sum())
    metrics["best_epoch"] = _best_epoch(trainer)
    # The scores above are the plain fp32 model's; with QAT, the int8 graph is measured after export.
    metrics["qat"] = scheme.to_dict() if scheme is not None else None
    if relabelled:
        metrics["oos_relabelled_rows"] = relabelled
        metrics["teacher_oos_threshold"] = round(float(prep.teacher_threshold), 6)
    metrics["wall_time_s"] = round(time.time() - t0, 1)
    return model, metrics


def _best_epoch(trainer) -> float | None:
    best = trainer.state.best_model_checkpoint
    if not best:
        return None
    step = int(Path(best).name.rsplit("-", 1)[-1])
    for entry in trainer.state.log_history:
        if entry.get("step") == step and "epoch" in entry:
            return float(entry["epoch"])
    return None
