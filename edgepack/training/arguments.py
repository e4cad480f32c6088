"""The Hugging Face ``TrainingArguments`` every edgepack training run uses (fine-tuning a teacher,
distilling a student, the prune stage's recovery): one epoch-wise schedule, CPU only, the best
epoch's weights kept, nothing reported to a tracker."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def training_arguments(output_dir: Path, *, epochs: int, learning_rate: float, batch_size: int, eval_batch_size: int,
                       warmup_steps: int, weight_decay: float, metric: str, seed: int, progress: bool = True,
                       **extra: Any):
    """``TrainingArguments`` for one run: evaluate and save every epoch, keep the best by ``metric``
    (higher is better), a linear schedule after ``warmup_steps`` (an int: transformers 4.x reads a
    float as a step count, 5.x as a ratio). ``extra`` goes to ``TrainingArguments`` as it is."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=eval_batch_size,
        warmup_steps=int(warmup_steps),
        weight_decay=weight_decay,
        lr_scheduler_type="linear",
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model=metric,
        greater_is_better=True,
        save_total_limit=1,  # with load_best_model_at_end the best checkpoint is kept as well
        save_only_model=True,  # no optimizer state: a run is never resumed from a checkpoint
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        report_to=[],
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        **extra,
    )
