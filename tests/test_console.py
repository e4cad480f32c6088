"""Library noise goes to the log file, edgepack's own lines to the console (real ONNX Runtime, real
descriptor 2, in a subprocess so pytest's capture does not stand in for the terminal)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import os, sys, warnings
    from pathlib import Path
    import onnx, onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np
    from edgepack.console import quiet
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    unused = numpy_helper.from_array(np.zeros(2, np.float32), "never_used")
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y], [unused])
    path = Path(sys.argv[1]).parent.parent / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with quiet(Path(sys.argv[1]), verbose=sys.argv[2] == "verbose"):
        so = ort.SessionOptions()
        so.log_severity_level = 1  # ORT's C++ logger writes its warnings to descriptor 2
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        os.write(2, b"native line on fd 2\\n")
        warnings.warn("a library warning")
        print("edgepack progress line", file=sys.stderr)
    print("after the block", file=sys.stderr)
""")


def _run(tmp_path: Path, mode: str) -> tuple[str, str]:
    log = tmp_path / mode / "build.log"
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(log), mode], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr, log.read_text()


def test_library_output_goes_to_the_log_not_the_console(tmp_path):
    console, log = _run(tmp_path, "quiet")
    assert "edgepack progress line" in console and "after the block" in console
    assert "native line on fd 2" not in console and "a library warning" not in console
    assert "never_used" not in console  # ORT's unused-initializer warning
    assert "native line on fd 2" in log and "a library warning" in log and "never_used" in log


def test_verbose_shows_everything_and_still_logs(tmp_path):
    console, log = _run(tmp_path, "verbose")
    assert "native line on fd 2" in console and "a library warning" in console and "edgepack progress line" in console
    assert "a library warning" in log


@pytest.mark.parametrize("progress", [True, False])
def test_trainer_metric_dicts_go_to_the_log(progress, tmp_path, capsys, caplog):
    """With a progress bar or without one (the stock PrinterCallback prints every dict raw), the
    per-epoch dicts are log records, not console lines."""
    import logging

    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from edgepack.console import quiet_trainer

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 2)

        def forward(self, x, labels=None):
            logits = self.w(x)
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

    rows = [{"x": torch.tensor([float(i % 2), 1.0]), "labels": i % 2} for i in range(8)]
    args = TrainingArguments(str(tmp_path), num_train_epochs=1, learning_rate=0.1, per_device_train_batch_size=4,
                             logging_strategy="epoch", save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=not progress, dataloader_num_workers=0)
    trainer = Trainer(model=Tiny(), args=args, train_dataset=rows)
    quiet_trainer(trainer)
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert not any(isinstance(cb, PrinterCallback) for cb in trainer.callback_handler.callbacks)
    assert ("LoggedProgress" in names) == progress and ("LoggedOnly" in names) == (not progress)
    assert progress or not any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks)
    capsys.readouterr()
    with caplog.at_level(logging.DEBUG, logger="edgepack"):
        trainer.train()
    out = capsys.readouterr()
    assert "'loss'" not in out.out and "'train_runtime'" not in out.out and "'loss'" not in out.err
    assert any("trainer:" in r.getMessage() and "loss" in r.getMessage() for r in caplog.records)
