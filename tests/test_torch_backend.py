"""The PyTorch side of the benchmark harness: fp32 and the reference recipe's dynamic int8 step."""

from __future__ import annotations

import numpy as np

from edgepack.torch_backend import TorchBackend


def test_fp32_and_dynamic_int8_backends_classify_and_report_their_size(tiny_model, corpus, label_names):
    texts = [t for t, _ in corpus["test"]]
    gold = np.array([label_names.index(lab) for _, lab in corpus["test"]])
    fp32 = TorchBackend(tiny_model, oos_label="oos")
    int8 = TorchBackend(tiny_model, oos_label="oos", dynamic_int8=True)
    assert fp32.model_bytes == sum(f.stat().st_size for f in tiny_model.glob("*.safetensors"))
    assert 0 < int8.model_bytes < fp32.model_bytes  # int8 Linear weights, as torch.save writes them
    assert "quantized" in type(int8.model.bert.encoder.layer[0].intermediate.dense).__module__
    p32, p8 = fp32.probs(texts), int8.probs(texts)
    assert p32.shape == p8.shape == (len(texts), len(label_names))
    assert (p32.argmax(1) == p8.argmax(1)).mean() >= 0.8
    assert (p32.argmax(1) == gold).mean() >= 0.5
