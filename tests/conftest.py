"""Offline, tiny fixtures: a small intent corpus, a WordPiece tokenizer trained on it and a 2-layer,
32-wide BERT classifier trained for a few steps, all built into pytest's temporary directories."""

from __future__ import annotations

import itertools
import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
INTENTS = {
    "balance": ["what is my {acct} balance", "how much money is in my {acct}", "show the balance of my {acct}",
                "tell me my {acct} balance please", "check {acct} funds"],
    "transfer": ["move {amt} from my {acct} to savings", "send {amt} to my {acct}", "transfer {amt} into {acct}",
                 "wire {amt} from {acct}", "please transfer {amt} to my {acct}"],
    "weather": ["what is the weather in {city}", "will it rain in {city} tomorrow", "is it sunny in {city}",
                "forecast for {city} this week", "how cold is it in {city}"],
    "alarm": ["set an alarm for {time}", "wake me up at {time}", "alarm at {time} please",
              "cancel my {time} alarm", "change the alarm to {time}"],
    "oos": ["who won the {thing} game", "tell me a joke about {thing}", "what is the meaning of {thing}",
            "how do i bake {thing}", "recommend a movie about {thing}"],
}
FILL = {
    "acct": ["checking", "savings", "joint", "business"], "amt": ["ten dollars", "50 euros", "$200", "a hundred"],
    "city": ["paris", "boston", "tokyo", "lima"], "time": ["7 am", "noon", "6:30", "midnight"],
    "thing": ["football", "bread", "life", "cats"],
}


def _rows() -> list[tuple[str, str]]:
    rows = []
    for label, templates in INTENTS.items():
        for t in templates:
            for i in range(4):
                rows.append((t.format(**{k: vals[(i + j) % len(vals)] for j, (k, vals) in enumerate(FILL.items())}), label))
    random.Random(0).shuffle(rows)
    return rows


@pytest.fixture(scope="session")
def corpus() -> dict[str, list[tuple[str, str]]]:
    rows = _rows()  # 100 rows: 20 per label
    by_label = {lab: [r for r in rows if r[1] == lab] for lab in INTENTS}
    split = {"train": [], "val": [], "test": []}
    for lab_rows in by_label.values():
        split["train"] += lab_rows[:12]
        split["val"] += lab_rows[12:16]
        split["test"] += lab_rows[16:]
    return split


@pytest.fixture(scope="session")
def clinc_json(tmp_path_factory, corpus) -> Path:
    """The corpus in the CLINC150 layout: in-scope and out-of-scope rows in separate keys."""
    data = {}
    for split, rows in corpus.items():
        data[split] = [list(r) for r in rows if r[1] != "oos"]
        data[f"oos_{split}"] = [list(r) for r in rows if r[1] == "oos"]
    path = tmp_path_factory.mktemp("data") / "tiny_clinc.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="session")
def label_names() -> list[str]:
    return sorted(INTENTS)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, corpus, label_names) -> Path:
    """A trained 2-layer, 32-wide BertForSequenceClassification with its WordPiece tokenizer."""
    from tiny import make_tiny_classifier

    texts = [t for t, _ in corpus["train"]]
    labels = [label_names.index(lab) for _, lab in corpus["train"]]
    return make_tiny_classifier(tmp_path_factory.mktemp("tiny") / "model", texts, labels, label_names, steps=80)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "models" / "clinc150-minilm-l6").is_dir():
        pytest.skip("../shared is absent (CLINC150 data and teachers)")
    return SHARED


def all_rows(corpus) -> list[tuple[str, str]]:
    return list(itertools.chain.from_iterable(corpus.values()))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_model, clinc_json) -> Path:
    """``edgepack pack`` of the tiny model on the tiny CLINC-style data (a real bundle)."""
    from edgepack.config import DataConfig, PackConfig
    from edgepack.runner.pack import pack

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    # The tiny model is trained for seconds: its int8 copy may wander; the gates are tested on their own.
    pack(PackConfig.of(target="auto", max_accuracy_drop=100.0, min_agreement=0.0, eval_rows=20), tiny_model,
         DataConfig(source=str(clinc_json)), out, log=lambda *a: None)
    return out
