"""The static (zero-layer) student: token embeddings pooled over the query, then a small classifier.

    logits = classifier([hidden ->] pool(E[input_ids], attention_mask))

``pool`` is the masked mean of the rows (``mean``), or the mean and the per-dimension maximum side by
side (``mean_max``); an optional ReLU layer of ``classifier_hidden`` units sits before the head. No
positions, no attention: a bag of tokens, as static-embedding libraries (model2vec) and fastText
classify. It is the far end of edgepack's size/latency frontier, trained by the same distillation as
the transformer students (``edgepack.training.static_student`` builds it from the teacher's word
embeddings) and written to ONNX by ``edgepack.stages.export.static_onnx``.

Importing this module registers the config and model with transformers' Auto classes, so
``AutoConfig``/``AutoTokenizer``/``AutoModelForSequenceClassification.from_pretrained`` read a saved
student directory (``edgepack.modeling`` imports it).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "edgepack_static"
POOLINGS = ("mean", "mean_max")
# Padded positions before the maximum: far below any embedding value, and the same constant in the
# ONNX graph, so parity holds exactly.
MASK_FILL = -1e4


class StaticEmbeddingConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 30522, hidden_size: int = 384, pooling: str = "mean",
                 classifier_hidden: int = 0, initializer_range: float = 0.02, pad_token_id: int = 0, **kwargs):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}; choose one of: {', '.join(POOLINGS)}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.pooling = pooling
        self.classifier_hidden = classifier_hidden
        self.initializer_range = initializer_range
        self.num_hidden_layers = 0
        super().__init__(pad_token_id=pad_token_id, **kwargs)


class StaticEmbeddingForSequenceClassification(PreTrainedModel):
    """A bag-of-tokens classifier with the call signature of a Hugging Face sequence classifier."""

    config_class = StaticEmbeddingConfig
    base_model_prefix = "static"
    main_input_name = "input_ids"

    def __init__(self, config: StaticEmbeddingConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        width = config.hidden_size * (2 if config.pooling == "mean_max" else 1)
        self.hidden = nn.Linear(width, config.classifier_hidden) if config.classifier_hidden else None
        self.classifier = nn.Linear(config.classifier_hidden or width, config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, self.config.initializer_range)
            module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, self.config.initializer_range)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def pool(self, input_ids, attention_mask=None):
        x = self.word_embeddings(input_ids)
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(x.dtype).unsqueeze(-1)
        mean = (x * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if self.config.pooling == "mean":
            return mean
        top = (x + (mask - 1.0) * -MASK_FILL).amax(1)
        return torch.cat([mean, top], dim=-1)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, return_dict=None,
                **kwargs):
        h = self.pool(input_ids, attention_mask)
        if self.hidden is not None:
            h = torch.relu(self.hidden(h))
        logits = self.classifier(h)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def is_static(model_or_config) -> bool:
    """True for a static student (a model or its config)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return getattr(cfg, "model_type", None) == MODEL_TYPE


AutoConfig.register(MODEL_TYPE, StaticEmbeddingConfig, exist_ok=True)
AutoModelForSequenceClassification.register(StaticEmbeddingConfig, StaticEmbeddingForSequenceClassification,
                                            exist_ok=True)
