"""The pipeline's stages, one module (or package) each, every one with the same entry point::

    run(cfg, src: Path, out: Path, ctx: Context) -> StageRecord

``cfg`` is the stage's own frozen config (``edgepack.config``), ``src`` the directory it reads (the
previous stage's output, or the user's model), ``out`` the directory it writes, atomically, with its
``stage.json`` last; ``ctx`` is what the whole build shares (the data, the teacher, the profile).

    finetune  a classifier head on a pretrained encoder           stages/finetune.py
    distill   a smaller student from the teacher                  stages/distill.py
    prune     vocabulary, heads, FFN, sparsity, then recovery     stages/prune/
    export    fp32 ONNX, parity-checked against PyTorch           stages/export/
    quantize  int8 for the target (variants, accuracy gate)       stages/quantize/
    bundle    threshold, eval slice, shim, manifest               stages/bundle/
    cascade   a fallback model inside the bundle for unsure texts  stages/cascade.py
    tune      thread settings measured on this CPU                stages/tune.py
    evaluate  benchmark beside the teacher, budgets, report       stages/evaluate.py

Stages do not import each other (a test holds the rule); what two stages share sits below them
(``edgepack.training``, ``edgepack.metrics``, ``edgepack.records``...). This module imports none of them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgepack.config import DataConfig
from edgepack.console import Log, Progress
from edgepack.errors import EdgepackError
from edgepack.records import STAGE_RECORD

STAGES = ("finetune", "distill", "prune", "export", "quantize", "bundle", "cascade", "tune", "evaluate")


@dataclasses.dataclass(frozen=True)
class Context:
    """What every stage of one build may read besides its ``src``."""

    data: Any = None  # edgepack.data.LabelledData: the splits, bound to the teacher's labels
    data_config: DataConfig = dataclasses.field(default_factory=DataConfig)
    teacher: Path | None = None  # the fine-tuned teacher (distillation targets, recovery)
    profile: Any = None  # edgepack.profiles.Profile of the device the bundle is for
    cache: Path | None = None  # the teacher-output cache shared by distill and prune
    log: Log = dataclasses.field(default_factory=Progress)  # progress lines: edgepack.<stage> loggers
    # evaluate: earlier models to measure beside the bundle, as (name, directory), and the report's
    # title, domain -> intents map and the shape search's frontier
    compare: tuple[tuple[str, Path], ...] = ()
    title: str = ""
    domains: Mapping[str, Any] | None = None
    frontier: Mapping[str, Any] | None = None
    # distill: the shape search's stop rule (edgepack.training.reach) for this candidate, {"target":
    # points, "name": shape, "log": callable}; None (no budget): every epoch is trained
    reach: Mapping[str, Any] | None = None

    @property
    def max_length(self) -> int:
        if not self.data_config.max_length:
            # 0 means "from the training texts", which `edgepack build` resolves before any stage runs.
            raise EdgepackError("max_length 0 (chosen from the training texts) is resolved by `edgepack build`; "
                                "give --max-length N (8 or more) to a single stage")
        return self.data_config.max_length


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """A finished stage: its output directory and the ``stage.json`` it wrote there."""

    out: Path
    record: Mapping[str, Any]

    @property
    def stage(self) -> str:
        return str(self.record.get("stage", ""))

    @property
    def metrics(self) -> Mapping[str, Any]:
        return self.record.get("metrics", {})

    def __getitem__(self, key: str) -> Any:
        return self.record[key]

    def keys(self):
        return self.record.keys()

    def __iter__(self):
        return iter(self.record)

    @classmethod
    def read(cls, out: Path) -> StageRecord:
        """The record a stage left in ``out`` (a bundle's record is its ``manifest.json``)."""
        path = Path(out) / STAGE_RECORD
        if not path.is_file() and (Path(out) / "manifest.json").is_file():
            manifest = json.loads((Path(out) / "manifest.json").read_text())
            return cls(Path(out), {"stage": "bundle", "metrics": manifest.get("metrics", {}), "manifest": manifest})
        return cls(Path(out), json.loads(path.read_text()))
