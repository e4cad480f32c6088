"""A PyTorch classifier behind the benchmark harness's backend interface, so the teacher (or any
Hugging Face model directory) is measured by the same code, in the same run, as a bundle.

``python -m edgepack.torch_backend rss MODEL_DIR`` loads the model in a fresh process, runs a few
queries and prints its peak resident memory (the harness's ``rss_argv``).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from edgepack.metrics import calibrate_threshold
from edgepack.modeling import load_with_tokenizer as load_classifier
from edgepack.modeling import read_model_info


@contextlib.contextmanager
def threads_kept() -> Iterator[None]:
    """torch's intra-op thread count after the block as before it: a ``TorchBackend`` sets its own for
    the whole process (a teacher measured at one thread would leave every later training on one)."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class TorchBackend:
    """``encode``/``forward`` over a Hugging Face classifier, with an optional out-of-scope threshold."""

    def __init__(self, model_dir: Path, *, threads: int = 1, max_length: int = 64, oos_label: str | None = None,
                 name: str | None = None, dynamic_int8: bool = False):
        import torch

        torch.set_num_threads(threads)
        self.model_dir = Path(model_dir)
        info = read_model_info(self.model_dir)
        self.model, self.tokenizer = load_classifier(self.model_dir)
        if dynamic_int8:
            # The reference recipe's PyTorch step: int8 weights for every Linear, activations
            # quantized on the fly (torch.ao dynamic quantization, fbgemm on x86).
            self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        self.label_names = list(info.label_names)
        self.oos_label = oos_label if oos_label in self.label_names else None
        self.oos_threshold: float | None = None
        self.max_length = max_length
        self.name = name or f"{self.model_dir.name} (PyTorch {'dynamic int8' if dynamic_int8 else 'fp32'})"
        self.settings = {"intra_op_num_threads": threads, "framework": f"torch {torch.__version__}",
                         "max_length": max_length}
        if dynamic_int8:  # what torch.save of the quantized model writes (the book's size column)
            import io

            buf = io.BytesIO()
            torch.save(self.model.state_dict(), buf)
            self.model_bytes = buf.tell()
        else:
            self.model_bytes = sum(f.stat().st_size for f in self.model_dir.glob("*.safetensors")) or sum(
                f.stat().st_size for f in self.model_dir.glob("pytorch_model*.bin"))
        self.bundle_bytes = sum(f.stat().st_size for f in self.model_dir.rglob("*") if f.is_file())
        self.rss_argv = [sys.executable, "-m", "edgepack.torch_backend", "rss", str(self.model_dir),
                         "--threads", str(threads), *(["--dynamic-int8"] if dynamic_int8 else [])]

    def encode(self, texts: Sequence[str]):
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def forward(self, encoded) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(**encoded).logits.numpy()

    def probs(self, texts: Sequence[str]) -> np.ndarray:
        from runtime_shim.bench import predict_probs

        return predict_probs(self, texts)

    def calibrate(self, texts: Sequence[str], labels: np.ndarray) -> float | None:
        """Set the out-of-scope threshold from validation rows, as ``pack`` does for a bundle."""
        if self.oos_label is None:
            return None
        self.oos_threshold = calibrate_threshold(self.probs(texts), labels, self.label_names.index(self.oos_label))
        return self.oos_threshold


def _rss(argv: Sequence[str]) -> int:
    import argparse

    from runtime_shim.bench import peak_rss_mb

    p = argparse.ArgumentParser(prog="python -m edgepack.torch_backend rss")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dynamic-int8", action="store_true")
    args = p.parse_args(argv)
    backend = TorchBackend(args.model_dir, threads=args.threads, dynamic_int8=args.dynamic_int8)
    queries = ["what is my account balance", "book a table for two at eight tonight"] * 16
    for q in queries[:20]:
        backend.forward(backend.encode([q]))
    backend.forward(backend.encode(queries))
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "rss":
        sys.exit("usage: python -m edgepack.torch_backend rss MODEL_DIR [--threads N]")
    sys.exit(_rss(sys.argv[2:]))
