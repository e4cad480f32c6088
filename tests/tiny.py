"""Tiny BERT classifiers built from scratch: a WordPiece tokenizer trained on the data and a random
2-layer, 32-wide encoder trained for a few steps. The test suite's fixtures use them, so every stage
runs on real models in seconds, with no download.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: Sequence[str], vocab_size: int = 400, alphabet: Sequence[str] = ()):
    """A lower-casing BERT WordPiece ``tokenizers.Tokenizer`` trained on ``texts``: its vocabulary holds
    every character of ``texts`` (any script) and of ``alphabet`` (characters the texts lack, as a
    multilingual teacher's vocabulary has), each as a piece of its own."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                        initial_alphabet=list(alphabet))
    tok.train_from_iterator(list(texts), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tok


def make_tiny_classifier(
    out_dir: Path,
    texts: Sequence[str],
    labels: Sequence[int],
    label_names: Sequence[str],
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    intermediate: int = 64,
    steps: int = 60,
    seed: int = 0,
    alphabet: Sequence[str] = (),
) -> Path:
    """Save a trained tiny ``BertForSequenceClassification`` and its tokenizer into ``out_dir``
    (``alphabet``: characters the tokenizer holds beyond those of ``texts``, see :func:`train_wordpiece`)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    tok = train_wordpiece(texts, alphabet=alphabet)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=128,
    )
    config = BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=128, num_labels=len(label_names),
        id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)},
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    if steps:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        rng = np.random.default_rng(seed)
        y_all = torch.tensor(np.asarray(labels), dtype=torch.long)
        model.train()
        for _ in range(steps):
            idx = rng.choice(len(texts), size=min(32, len(texts)), replace=False)
            enc = fast([texts[i] for i in idx], padding=True, truncation=True, max_length=32, return_tensors="pt")
            loss = model(**enc, labels=y_all[idx]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
    model.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir
