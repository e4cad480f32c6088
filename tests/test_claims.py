"""What the docs claim about compatibility holds: ``OnnxPipeline`` answers in the shape of transformers'
``pipeline("text-classification")`` on the teacher it was built from (labels, score keys, ``top_k``)."""

from __future__ import annotations

import pytest

TEXTS = ["what is my checking balance", "book a table for two", "tell me a joke"]


def _shape(answer):
    """The structure of an answer: nesting, dict keys and list lengths, without the values."""
    if isinstance(answer, list):
        return [_shape(a) for a in answer]
    if isinstance(answer, dict):
        assert isinstance(answer["label"], str) and isinstance(answer["score"], float), answer
        return sorted(answer)
    raise AssertionError(f"unexpected answer type {type(answer).__name__}: {answer!r}")


@pytest.fixture(scope="module")
def both(tiny_model, tiny_bundle):
    from transformers import pipeline

    from runtime_shim import OnnxPipeline

    hf = pipeline("text-classification", model=str(tiny_model), tokenizer=str(tiny_model), device="cpu")
    return hf, OnnxPipeline(tiny_bundle)


@pytest.mark.parametrize("inputs", [TEXTS[0], TEXTS], ids=["one text", "a list"])
@pytest.mark.parametrize("kwargs", [{}, {"top_k": 1}, {"top_k": 2}, {"top_k": None}],
                         ids=["default", "top_k=1", "top_k=2", "top_k=None"])
def test_answers_have_the_shape_of_transformers_pipeline(both, inputs, kwargs):
    hf, pipe = both
    theirs = hf(inputs, **kwargs)
    ours = pipe(inputs, **kwargs)
    assert _shape(ours) == _shape(theirs), (ours, theirs)
    # The same label names, and each list of several labels sorted by score, as transformers sorts it.
    names = set(hf.model.config.id2label.values())
    flat = [ours] if isinstance(ours, dict) else ours
    for entry in flat:
        entries = entry if isinstance(entry, list) else [entry]
        assert {e["label"] for e in entries} <= names
        scores = [e["score"] for e in entries]
        assert scores == sorted(scores, reverse=True)



# --- Hugging Face Optimum loads a bundle -------------------------------------------------------------

# The newest Optimum that loads ONNX models, and what it supports: optimum-onnx 0.1.0 needs optimum
# 2.1 and transformers < 4.58 (it does not import with the transformers 5 edgepack itself uses), so it
# runs in a virtual environment of its own. torch==2.13.0 is the CPU wheel on the project's machines.
OPTIMUM_PINS = ["optimum-onnx[onnxruntime]==0.1.0", "optimum==2.1.0", "transformers==4.57.6", "torch==2.13.0"]

OPTIMUM_SCRIPT = """
import json, sys
from optimum.onnxruntime import ORTModelForSequenceClassification
from transformers import AutoTokenizer, pipeline

bundle, texts = sys.argv[1], json.loads(sys.argv[2])
model = ORTModelForSequenceClassification.from_pretrained(bundle, file_name="model.quant.onnx")
tokenizer = AutoTokenizer.from_pretrained(bundle)
logits = [model(**tokenizer([t], return_tensors="pt")).logits[0].tolist() for t in texts]
labels = [a["label"] for a in pipeline("text-classification", model=model, tokenizer=tokenizer)(texts)]
print(json.dumps({"logits": logits, "labels": labels}))
"""


@pytest.fixture(scope="module")
def optimum_python(tmp_path_factory):
    from importlib import metadata

    from conftest import make_venv

    return make_venv(tmp_path_factory.mktemp("optimum") / "venv",
                     [*OPTIMUM_PINS, f"onnxruntime=={metadata.version('onnxruntime')}"])


@pytest.mark.slow
def test_optimum_loads_a_bundle_and_gives_its_logits(optimum_python, tiny_bundle, tmp_path):
    """The bundle's config.json and model.quant.onnx load in Optimum's ORTModelForSequenceClassification,
    whose logits and pipeline labels are the bundle's own, text by text."""
    import json
    import shutil
    import subprocess

    import numpy as np
    from conftest import clean_env

    from runtime_shim import OnnxPipeline

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)  # Optimum may write beside the model; the fixture stays as it is
    proc = subprocess.run([str(optimum_python), "-c", OPTIMUM_SCRIPT, str(bundle), json.dumps(TEXTS)],
                          capture_output=True, text=True, timeout=600,
                          env={**clean_env(optimum_python.parent.parent), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    pipe = OnnxPipeline(tiny_bundle)
    ours = np.stack([pipe.forward(pipe.encode([t]))[0] for t in TEXTS])
    assert np.allclose(np.array(theirs["logits"]), ours, atol=1e-4), (theirs["logits"], ours.tolist())
    assert theirs["labels"] == [pipe(t, apply_threshold=False)[0]["label"] for t in TEXTS]
