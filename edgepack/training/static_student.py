"""The static student's initialisation: the teacher's word-embedding table under a fresh head.

The rows start as the teacher's input embeddings (not its contextual outputs): the student keeps the
teacher's vocabulary and tokenizer unchanged, so vocabulary trimming and folding (``edgepack prune``)
apply to it as to any student, and distillation then moves every row (the table is nearly all of the
model, so it is trained, never frozen).
"""

from __future__ import annotations

import torch

from edgepack.config import DistillConfig
from edgepack.static_model import StaticEmbeddingConfig, StaticEmbeddingForSequenceClassification


def from_teacher(teacher, cfg: DistillConfig) -> StaticEmbeddingForSequenceClassification:
    """A static student over ``teacher``'s labels whose table is a copy of its word embeddings."""
    table = teacher.get_input_embeddings().weight
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
