"""``edgepack distill`` on the tiny fixtures: student init, the KD loss, the teacher cache, the search
(two processes, one SQLite study) and bad input through ``main()``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgepack.cli import main
from edgepack.config import DataConfig, DistillConfig
from edgepack.errors import EdgepackError

FAST = ["--epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--threads", "1"]


@pytest.fixture(scope="module")
def data(clinc_json, tiny_model):
    from edgepack.data import load_dataset
    from edgepack.training.student import read_id2label

    return load_dataset(DataConfig(source=str(clinc_json)), read_id2label(tiny_model))


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.partial")]


# --------------------------------------------------------------------------------------------- student


def test_student_from_teacher_keeps_chosen_layers(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from edgepack.training import student as st

    teacher = st.load_teacher(tiny_model)
    student = st.from_teacher(teacher, [1])
    assert student.config.num_hidden_layers == 1 and len(student.bert.encoder.layer) == 1
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for key, value in s_sd.items():
        src = key.replace("encoder.layer.0.", "encoder.layer.1.")
        assert torch.equal(value, t_sd[src]), key
    assert torch.equal(s_sd["bert.embeddings.word_embeddings.weight"], t_sd["bert.embeddings.word_embeddings.weight"])
    student.save_pretrained(tmp_path / "s")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s")
    assert again.config.num_hidden_layers == 1 and again.config.id2label == teacher.config.id2label
    assert torch.equal(again.state_dict()["bert.encoder.layer.0.output.dense.weight"],
                       t_sd["bert.encoder.layer.1.output.dense.weight"])
    assert st.pick_layers(2, 6) == (0, 5) and st.pick_layers(3, 6) == (0, 2, 5)
    assert st.parse_layers("0,2,5") == (3, (0, 2, 5)) and st.parse_layers("2") == (2, ())
    assert st.parse_layers("0,") == (1, (0,))
    assert st.parse_layers("0") == (0, ())  # the static student; teacher layer 0 alone is "0,"
    with pytest.raises(EdgepackError, match="0 \\(the static student\\) or more"):
        st.parse_layers("-1")


# --------------------------------------------------------------------------------------------- loss


def test_kd_loss_matches_formula():
    import torch
    import torch.nn.functional as F

    from edgepack.training.distillation import DistillationTrainer

    torch.manual_seed(0)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    hooks = SimpleNamespace(alpha=0.3, temperature=2.0)
    got = DistillationTrainer.distillation_loss(hooks, s, t, y)
    pt, ls = F.softmax(t / 2, -1), F.log_softmax(s / 2, -1)
    kl = (pt * (pt.log() - ls)).sum(-1).mean()
    assert torch.allclose(got, 0.3 * F.cross_entropy(s, y) + 0.7 * 4 * kl)
    # Augmented rows (has_label 0) contribute no CE term.
    only_kd = DistillationTrainer.distillation_loss(hooks, s, t, y, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(only_kd, 0.7 * 4 * kl)


@pytest.mark.slow
def test_training_steps_reduce_the_loss(tiny_model, data, tmp_path):
    import torch

    from edgepack.training.distillation import (
        Collator,
        DistillationTrainer,
        make_rows,
        prepare,
        train_student,
    )

    cfg = DistillConfig(num_layers=1, epochs=4, learning_rate=3e-3, batch_size=16, alpha=0.5, temperature=2.0)
    prep = prepare(cfg, tiny_model, data, cache_dir=tmp_path / "cache", progress=False)
    ts = prep.trainset
    rows = make_rows(prep.tokenizer, ts.texts, ts.labels, prep.max_length, teacher_logits=ts.teacher_logits)
    batch = Collator(prep.tokenizer)([rows[i] for i in range(len(rows))])
    teacher_logits, labels = batch.pop("teacher_logits"), batch.pop("labels")
    hooks = SimpleNamespace(alpha=cfg.alpha, temperature=cfg.temperature)

    def loss(model) -> float:
        model.eval()
        with torch.no_grad():
            return float(DistillationTrainer.distillation_loss(hooks, model(**batch).logits, teacher_logits, labels))

    student = prep.fresh_student()
    # The student starts as teacher layers, already close to the teacher on these few texts; a fresh
    # head gives training something to do (the first-epoch checkpoint may be the one kept).
    torch.manual_seed(0)
    student.classifier.reset_parameters()
    before = loss(student)
    trainer = train_student(cfg, student, prep.tokenizer, ts, data["validation"], oos_id=data.oos_id, progress=False)
    assert loss(trainer.model) < before


def test_attention_relations_are_the_models_own_attention(tiny_model, data):
    """``self_relations`` recomputes the last layer's attention probabilities from its Q and K exactly
    as the model does; the loss is 0 for the teacher against itself and not for a 1-layer student."""
    import torch

    from edgepack.training import student as st
    from edgepack.training.distillation import DistillationTrainer, capture_qkv, relation_kl, self_relations

    teacher = st.load_teacher(tiny_model).eval()
    teacher.config._attn_implementation = "eager"  # so that output_attentions returns the probabilities
    tok = st.load_tokenizer(tiny_model, what="teacher")
    batch = dict(tok(data["train"].texts[:6], padding=True, return_tensors="pt"))
    assert int(batch["attention_mask"].min()) == 0  # some padding, so the mask is exercised
    qkv: dict = {}
    with torch.no_grad(), capture_qkv(teacher, qkv):
        probs = teacher(**batch, output_attentions=True).attentions[-1]
    heads = teacher.config.num_attention_heads
    att, val = self_relations(qkv, batch["attention_mask"], heads)
    assert att.shape == probs.shape == val.shape
    rows = batch["attention_mask"].bool()
    assert torch.allclose(att.exp()[rows[:, None, :].expand(-1, heads, -1)],
                          probs[rows[:, None, :].expand(-1, heads, -1)], atol=1e-5)
    assert float(relation_kl(att, att, batch["attention_mask"])) == 0.0

    trainer = SimpleNamespace(teacher_model=teacher)
    assert float(DistillationTrainer.attention_loss(trainer, qkv, batch)) < 1e-6
    student = st.from_teacher(teacher, [0]).eval()  # the first layer: other attention than the last's
    s_qkv: dict = {}
    with torch.no_grad(), capture_qkv(student, s_qkv):
        student(**batch)
    assert float(DistillationTrainer.attention_loss(trainer, s_qkv, batch)) > 1e-3


@pytest.mark.slow
def test_attention_transfer_trains_the_student_towards_the_teacher(tiny_model, data, tmp_path):
    import torch

    from edgepack.training import student as st
    from edgepack.training.distillation import DistillationTrainer, capture_qkv, prepare, train_student

    cfg = DistillConfig(layers=(0,), epochs=3, learning_rate=3e-3, batch_size=16, attention_weight=10.0, augment=0)
    prep = prepare(cfg, tiny_model, data, cache_dir=tmp_path / "cache", progress=False)
    teacher = st.load_teacher(tiny_model).eval()
    batch = dict(prep.tokenizer(data["train"].texts[:32], padding=True, return_tensors="pt"))

    def attention_loss(model) -> float:
        model.eval()
        qkv: dict = {}
        with torch.no_grad(), capture_qkv(model, qkv):
            model(**batch)
        return float(DistillationTrainer.attention_loss(SimpleNamespace(teacher_model=teacher), qkv, batch))

    before = attention_loss(prep.fresh_student())
    after = {}
    for weight in (0.0, cfg.attention_weight):  # the same run without the loss is the baseline
        trainer = train_student(cfg.replace(attention_weight=weight), prep.fresh_student(), prep.tokenizer,
                                prep.trainset, data["validation"], oos_id=data.oos_id, progress=False,
                                teacher_model=teacher)
        after[weight] = attention_loss(trainer.model)
    assert after[cfg.attention_weight] < 0.8 * before and after[cfg.attention_weight] < 0.8 * after[0.0]


def test_training_leaves_the_callers_transformers_verbosity(tiny_model, data, tmp_path):
    """The Trainer's chatter is hushed for the training only: a caller's transformers logging stays as set."""
    from transformers.utils import logging as hf_logging

    from edgepack.training.distillation import prepare, train_student

    cfg = DistillConfig(layers=(0,), epochs=1, batch_size=32, augment=0)
    prep = prepare(cfg, tiny_model, data, cache_dir=tmp_path / "cache", progress=False)
    was = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    try:
        train_student(cfg, prep.fresh_student(), prep.tokenizer, prep.trainset, data["validation"],
                      oos_id=data.oos_id, progress=False)
        assert hf_logging.get_verbosity() == hf_logging.INFO
    finally:
        hf_logging.set_verbosity(was)


def test_a_search_leaves_the_callers_optuna_verbosity(tiny_model, data, tmp_path):
    """Optuna's line per trial is hushed for the search only."""
    import optuna

    from edgepack.training.distillation import prepare
    from edgepack.training.search import run_search

    cfg = DistillConfig(layers=(0,), epochs=1, batch_size=32, augment=0, search_trials=1)
    prep = prepare(cfg, tiny_model, data, cache_dir=tmp_path / "cache", progress=False)
    was = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.DEBUG)
    try:
        result = run_search(prep, out=tmp_path / "s", progress=False)
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG and len(result.trials) == 1
    finally:
        optuna.logging.set_verbosity(was)


# --------------------------------------------------------------------------------------------- cache


def test_teacher_logits_cached_and_reused(tiny_model, data, tmp_path, monkeypatch):
    from edgepack.training import teacher_cache
    from edgepack.training.distillation import prepare

    calls = []
    real = teacher_cache.load_teacher

    def counting(path):
        model = real(path)
        forward = model.forward

        def counted(*a, **k):
            calls.append(1)
            return forward(*a, **k)
        model.forward = counted
        return model

    monkeypatch.setattr(teacher_cache, "load_teacher", counting)
    cfg = DistillConfig(num_layers=1, augment=0)
    first = prepare(cfg, tiny_model, data, cache_dir=tmp_path, progress=False)
    n = len(calls)
    assert n > 0 and len(list(tmp_path.glob("*.npz"))) == 2  # train texts; validation + test texts
    second = prepare(cfg.replace(alpha=0.9, temperature=1.0), tiny_model, data, cache_dir=tmp_path, progress=False)
    assert len(calls) == n  # the teacher never ran again
    np.testing.assert_array_equal(first.trainset.teacher_logits, second.trainset.teacher_logits)
    # Augmented texts are new texts: one more teacher pass, then cached too.
    prepare(cfg.replace(augment=1), tiny_model, data, cache_dir=tmp_path, progress=False)
    m = len(calls)
    assert m > n
    prepare(cfg.replace(augment=1), tiny_model, data, cache_dir=tmp_path, progress=False)
    assert len(calls) == m


# --------------------------------------------------------------------------------------------- stage


@pytest.mark.slow
def test_distill_cli_writes_student_and_record(tiny_model, clinc_json, tmp_path, capsys):
    out = tmp_path / "student"
    rc = main(["distill", str(tiny_model), "--data", str(clinc_json), "--out", str(out), "--layers", "1",
               "--cache-dir", str(tmp_path / "cache"), "--augment", "1", "--oos-relabel", "0.5", *FAST])
    assert rc == 0, capsys.readouterr().err
    teacher_cfg = json.loads((tiny_model / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["id2label"] == teacher_cfg["id2label"] and cfg["num_hidden_layers"] == 1
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    rec = json.loads((out / "stage.json").read_text())
    assert rec["stage"] == "distill" and rec["config"]["distill"]["augment"] == 1
    assert rec["config"]["distill"]["oos_relabel"] == 0.5
    assert {"config", "config_hash", "input_hash", "metrics", "versions", "wall_time_s", "teacher", "ablation"} <= set(rec)
    for key in ("test_accuracy", "test_accuracy_calibrated", "val_accuracy_calibrated", "oos_threshold",
                "gain_over_ablation_calibrated"):
        assert key in rec["metrics"]
    assert rec["ablation"]["alpha"] == 1.0 and rec["student"]["teacher_layers"] == [1]
    assert "student (labels only)" in capsys.readouterr().out
    assert _leftovers(tmp_path, "student") == []


def test_oos_relabel_moves_unsure_teacher_rows_to_out_of_scope():
    from edgepack.metrics import softmax
    from edgepack.training.distillation import TrainSet, relabel_unsure

    probs = np.array([[0.9, 0.05, 0.05],   # gold row, confident
                      [0.4, 0.35, 0.25],   # gold row, unsure: a gold label outranks the teacher's doubt
                      [0.9, 0.05, 0.05],   # augmented, confident
                      [0.4, 0.35, 0.25]])  # augmented, unsure: becomes out-of-scope (id 2)
    ts = TrainSet(list("abcd"), np.zeros(4, np.int64), np.array([1, 1, 0, 0]), np.log(probs).astype(np.float32))
    new, n = relabel_unsure(ts, oos_id=2, threshold=0.5, weight=0.5)
    after = softmax(new.teacher_logits.astype(np.float64))
    assert n == 1 and after.argmax(1).tolist() == [0, 0, 0, 2]
    np.testing.assert_allclose(after[:3], probs[:3], atol=1e-6)
    np.testing.assert_allclose(after[3], [0.2, 0.175, 0.625], atol=1e-6)
    assert relabel_unsure(ts, oos_id=2, threshold=0.5, weight=0.0)[1] == 0
    with pytest.raises(ValueError, match="oos_relabel"):
        DistillConfig(oos_relabel=1.5)


@pytest.mark.slow
def test_distill_into_a_given_model_with_callbacks(tiny_model, data, tmp_path):
    from transformers import TrainerCallback

    from edgepack import stages
    from edgepack.stages import distill
    from edgepack.training import student as st

    epochs = []

    class Count(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            epochs.append(state.epoch)

    model = st.from_teacher(st.load_teacher(tiny_model), [0])
    cfg = DistillConfig(epochs=2, learning_rate=1e-3, batch_size=16, ablation=False)
    rec = distill.run(cfg, tiny_model, tmp_path / "out", stages.Context(data=data, cache=tmp_path / "cache"),
                      student_model=model, callbacks=[Count()], progress=False)
    assert len(epochs) == 2 and rec["student"]["source"] == "model"
    assert "ablation" not in rec and (tmp_path / "out" / "stage.json").is_file()


@pytest.mark.slow
def test_student_checkpoint_with_its_own_tokenizer(tiny_model, corpus, clinc_json, tmp_path):
    from tiny import make_tiny_classifier

    texts = [t for t, _ in corpus["train"]]
    other = make_tiny_classifier(tmp_path / "other", texts[::-1], [0, 1] * (len(texts) // 2), ["a", "b"],
                                 layers=1, hidden=16, heads=2, intermediate=32, steps=0, seed=1)
    out = tmp_path / "student"
    rc = main(["distill", str(tiny_model), "--data", str(clinc_json), "--out", str(out), "--student", str(other),
               "--cache-dir", str(tmp_path / "cache"), "--no-ablation", *FAST])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == 16 and cfg["id2label"] == json.loads((tiny_model / "config.json").read_text())["id2label"]


# --------------------------------------------------------------------------------------------- search


@pytest.mark.slow
def test_search_sqlite_study_joined_by_a_second_process(tiny_model, clinc_json, tmp_path, capsys):
    import optuna

    url = f"sqlite:///{tmp_path / 'study.db'}"
    common = ["--data", str(clinc_json), "--layers", "1", "--cache-dir", str(tmp_path / "cache"), "--no-ablation",
              "--batch-size", "16", "--threads", "1", "--storage", url, "--study-name", "tiny"]
    rc = main(["distill", str(tiny_model), "--out", str(tmp_path / "a"), "--search", "2", "--epochs", "1", *common])
    assert rc == 0, capsys.readouterr().err
    assert "state" in capsys.readouterr().out  # the trial table
    rec = json.loads((tmp_path / "a" / "stage.json").read_text())
    assert len(rec["search"]["trials"]) == 2 and set(rec["search"]["best_params"]) == {
        "alpha", "temperature", "epochs", "learning_rate"}
    # A second worker joins the same study by name and adds the third trial.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "edgepack", "distill", str(tiny_model), "--out", str(tmp_path / "b"), "--search", "3",
         "--epochs", "1", *common], capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    study = optuna.load_study(study_name="tiny", storage=url)
    assert len(study.trials) == 3
    rec_b = json.loads((tmp_path / "b" / "stage.json").read_text())
    assert [t["number"] for t in rec_b["search"]["trials"]] == [0, 1, 2]


@pytest.mark.slow
def test_default_study_lives_with_the_output_and_resumes(tiny_model, clinc_json, tmp_path):
    import optuna

    out = tmp_path / "s"
    args = ["distill", str(tiny_model), "--data", str(clinc_json), "--out", str(out), "--layers", "1",
            "--cache-dir", str(tmp_path / "cache"), "--no-ablation", "--batch-size", "16", "--threads", "1",
            "--epochs", "1"]
    assert main([*args, "--search", "1"]) == 0
    assert (out / "search.db").is_file() and not (tmp_path / ".s.search.db").exists()
    # Asking for more trials continues the same study (kept in the output) rather than starting over.
    assert main([*args, "--search", "2", "--force"]) == 0
    study = optuna.load_study(study_name="distill", storage=f"sqlite:///{out / 'search.db'}")
    assert len(study.trials) == 2


# --------------------------------------------------------------------------------------------- bad input


def _no_labels_teacher(tiny_model, tmp_path) -> Path:
    import shutil

    d = tmp_path / "nolabels"
    shutil.copytree(tiny_model, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("id2label", None)
    cfg.pop("label2id", None)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _unclassifiable(tmp_path) -> Path:
    d = tmp_path / "vit"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 16, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "intermediate_size": 32}))
    return d


def _unknown_labels(clinc_json, tmp_path) -> Path:
    doc = json.loads(Path(clinc_json).read_text())
    doc["train"].append(["order a pizza", "pizza"])
    p = tmp_path / "unknown.json"
    p.write_text(json.dumps(doc))
    return p


@pytest.mark.parametrize("case, extra, expect", [
    ("no_id2label", [], "id2label"),
    ("unclassifiable", ["--student", "{vit}"], "sequence-classification"),
    ("unknown_labels", [], "pizza"),
    ("too_many_layers", ["--layers", "3"], "teacher"),
    ("layer_index", ["--layers", "0,7"], "0..1"),
    ("alpha", ["--alpha", "1.5"], "alpha"),
    ("temperature", ["-T", "0"], "temperature"),
])
def test_bad_input_one_line_nothing_written(case, extra, expect, tiny_model, clinc_json, tmp_path, capsys):
    teacher = _no_labels_teacher(tiny_model, tmp_path) if case == "no_id2label" else tiny_model
    data = _unknown_labels(clinc_json, tmp_path) if case == "unknown_labels" else clinc_json
    extra = [a.replace("{vit}", str(_unclassifiable(tmp_path))) if "{vit}" in a else a for a in extra]
    out = tmp_path / "out"
    rc = main(["distill", str(teacher), "--data", str(data), "--out", str(out),
               "--cache-dir", str(tmp_path / "cache"), *FAST, *extra])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and err.startswith("edgepack distill: error:") and expect in err, err
    assert not out.exists() and _leftovers(tmp_path, "out") == []
