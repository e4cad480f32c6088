"""The static (zero-layer) student: distilled from the tiny teacher, pruned, exported, parity-checked,
quantized and run by the shim; and ``edgepack build --layers 0`` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgepack.config import DataConfig, DistillConfig, ExportConfig, PruneConfig, QuantizeConfig
from edgepack.errors import EdgepackError

pytestmark = pytest.mark.slow

FAST = dict(epochs=1, batch_size=16, learning_rate=1e-2, ablation=False)


@pytest.fixture(scope="module")
def data(tiny_model, clinc_json):
    from edgepack.data import load_dataset
    from edgepack.training.student import read_id2label

    return load_dataset(DataConfig(source=str(clinc_json)), read_id2label(tiny_model))


def _ctx(data, tmp, teacher=None, log=lambda line: None):
    from edgepack import stages

    return stages.Context(data=data, cache=tmp / "cache", teacher=teacher, log=log)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_model, data):
    from edgepack.stages import distill

    tmp = tmp_path_factory.mktemp("static")
    rec = distill.run(DistillConfig(num_layers=0, **FAST), tiny_model, tmp / "distill", _ctx(data, tmp),
                      progress=False)
    return tmp, rec


def test_static_student_starts_from_the_teacher_table_and_trains_it(tiny_model, data):
    import torch

    from edgepack.training.distillation import prepare, run_once
    from edgepack.training.student import load_teacher

    teacher = load_teacher(tiny_model)
    cfg = DistillConfig(num_layers=0, **FAST)
    prep = prepare(cfg, tiny_model, data, progress=False)
    init = prep.fresh_student()
    assert init.config.model_type == "edgepack_static" and init.config.num_labels == teacher.config.num_labels
    assert torch.equal(init.word_embeddings.weight, teacher.get_input_embeddings().weight)
    assert sum(p.numel() for p in init.parameters()) < sum(p.numel() for p in teacher.parameters()) / 2
    # freeze_embeddings is on by default; the static student's table trains anyway (it is the model).
    model, metrics = run_once(prep, cfg, progress=False)
    assert cfg.freeze_embeddings and not torch.equal(model.word_embeddings.weight, init.word_embeddings.weight)
    assert metrics["train_rows"] == 2 * len(data["train"])  # the augment copies are in


def test_token_outputs_are_each_tokens_encoder_output_alone(tiny_model, data):
    """model2vec's initialisation: row i is the encoder's mean output over ``[CLS] i [SEP]``, centred and
    scaled to the replaced table's mean norm; a static student starts from those rows and trains."""
    import torch

    from edgepack.training import static_student
    from edgepack.training.distillation import prepare, run_once
    from edgepack.training.student import load_teacher, load_tokenizer

    teacher = load_teacher(tiny_model).eval()
    tok = load_tokenizer(tiny_model, what="teacher")
    table = teacher.get_input_embeddings().weight
    rows = static_student.token_outputs(teacher, tok.cls_token_id, tok.sep_token_id, batch_size=7,
                                        match_norm_of=table)
    assert rows.shape == table.shape
    with torch.no_grad():  # by hand, for two ids, then centred and scaled as the function does
        raw = torch.stack([teacher.bert(input_ids=torch.tensor([[tok.cls_token_id, i, tok.sep_token_id]]))
                           .last_hidden_state.mean(1)[0] for i in range(table.shape[0])])
    raw -= raw.mean(0, keepdim=True)
    raw *= table.norm(dim=1).mean() / raw.norm(dim=1).mean()
    assert torch.allclose(rows, raw, atol=1e-4)
    assert rows.mean(0).abs().max() < 1e-4 and torch.isclose(rows.norm(dim=1).mean(), table.norm(dim=1).mean())

    cfg = DistillConfig(num_layers=0, **FAST)
    student = static_student.from_teacher(teacher, cfg, rows=rows)
    assert torch.equal(student.word_embeddings.weight, rows)
    model, _ = run_once(prepare(cfg, tiny_model, data, progress=False), cfg, model=student, progress=False)
    assert not torch.equal(model.word_embeddings.weight, rows)


def test_distilled_directory_reloads_and_names_its_shape(distilled):
    from edgepack.modeling import load_with_tokenizer, read_model_info

    tmp, rec = distilled
    out = tmp / "distill"
    info = read_model_info(out)
    assert info.model_type == "edgepack_static" and info.num_layers == 0
    assert info.input_names == ("input_ids", "attention_mask")
    model, tok = load_with_tokenizer(out)
    assert rec.metrics["test_accuracy"] is not None and rec.record["student"]["teacher_layers"] == []
    assert rec.record["student"]["source"].startswith("static")
    enc = tok(["what is my checking balance", "hi"], padding=True, return_tensors="pt")
    assert model(**enc).logits.shape == (2, info.num_labels)
    from edgepack.torch_backend import TorchBackend  # what verify measures the PyTorch student with

    assert TorchBackend(out).probs(["what is my checking balance", "hi"]).shape == (2, info.num_labels)


@pytest.mark.parametrize("pooling,hidden", [("mean", 0), ("mean_max", 16)])
def test_export_matches_pytorch_and_quantizes_and_runs_in_the_shim(pooling, hidden, tmp_path, tiny_model, data):
    import onnx
    import torch

    from edgepack.stages import export, quantize
    from edgepack.training import static_student
    from edgepack.training.student import load_teacher
    from runtime_shim import OnnxPipeline

    model = static_student.from_teacher(load_teacher(tiny_model),
                                        DistillConfig(num_layers=0, static_pooling=pooling, static_hidden=hidden))
    with torch.no_grad():  # move the rows off the teacher's so parity tests the student's own weights
        model.word_embeddings.weight.add_(torch.randn_like(model.word_embeddings.weight))
    src = tmp_path / "student"
    model.save_pretrained(src)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(src)
    ctx = _ctx(data, tmp_path)
    rec = export.run(ExportConfig(), src, tmp_path / "export", ctx)
    assert rec.metrics["writer"] == "static" and rec.metrics["parity_max_abs_diff"] < 1e-4
    assert rec.metrics["input_names"] == ["input_ids", "attention_mask"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "export" / "model.onnx")).graph.node}
    assert "Gather" in ops and ("ReduceMax" in ops) == (pooling == "mean_max") and ("Relu" in ops) == bool(hidden)
    # Padding must not move a row's logits: one query alone and beside a much longer one.
    pipe = OnnxPipeline(tmp_path / "export", verify=False)
    short = "check my savings balance"
    alone = pipe.forward(pipe.encode([short]))
    padded = pipe.forward(pipe.encode([short, "please move fifty euros from my joint account into savings today"]))
    np.testing.assert_allclose(alone[0], padded[0], atol=1e-5)

    qrec = quantize.run(QuantizeConfig(target="x86-64-avx2", max_accuracy_drop=100.0, min_agreement=0.0,
                                       variants=True, variant_formats=("dynamic", "static-qdq", "matmul-nbits"),
                                       objective="mean"),
                        tmp_path / "export", tmp_path / "quant", ctx)
    rows = qrec.metrics["variants"]["rows"]
    assert qrec.metrics["variants"]["objective"] == "mean" and qrec["config"]["objective"] == "mean"  # ranked by mean
    assert qrec.metrics["variants"]["chosen"] and all("fused" not in r["name"] for r in rows)
    assert not [r for r in rows if r.get("error")], [r.get("error") for r in rows]
    # Every format stores the table in 8 bits, so none is an fp32 model by another name.
    assert all(r["model_mb"] < rows[0]["model_mb"] / 2 for r in rows[1:]), [(r["name"], r["model_mb"]) for r in rows]
    assert qrec.metrics["ops"].get("DequantizeLinear")
    got = OnnxPipeline(tmp_path / "quant", verify=False)(["what is my checking balance", "wake me up at noon"])
    assert len(got) == 2 and all(r["label"] in data.label_names for r in got)


def test_embedding_in_4_bits_finds_the_static_table(distilled, tmp_path, data):
    from edgepack.stages import export, quantize

    tmp, _ = distilled
    ctx = _ctx(data, tmp_path)
    export.run(ExportConfig(), tmp / "distill", tmp_path / "export", ctx)
    rec = quantize.run(QuantizeConfig(target="x86-64-avx2", embedding_bits=4, max_accuracy_drop=100.0,
                                      min_agreement=0.0), tmp_path / "export", tmp_path / "quant", ctx)
    assert rec.metrics["ops"].get("BitShift") == 1


def test_prune_trims_the_table_skips_structure_and_recovers(distilled, tiny_model, data, tmp_path):
    from edgepack.stages import prune

    tmp, _ = distilled
    lines = []
    ctx = _ctx(data, tmp_path, teacher=tiny_model, log=lines.append)
    cfg = PruneConfig(heads_fraction=0.5, ffn_fraction=0.5, cluster_rest=4,
                      recovery=DistillConfig(epochs=1, batch_size=16, learning_rate=1e-2, ablation=False))
    rec = prune.run(cfg, tmp / "distill", tmp_path / "prune", ctx)
    steps = [s["step"] for s in rec.metrics["steps"]]
    assert steps == ["input", "vocab", "recover"]
    assert rec.metrics["embedding_params_after"] <= rec.metrics["embedding_params_before"]
    assert any("static student" in line for line in lines)
    cfg_json = json.loads((tmp_path / "prune" / "config.json").read_text())
    assert cfg_json["model_type"] == "edgepack_static"
    assert cfg_json["vocab_size"] == rec.metrics["steps"][-1]["vocab_size"]


def test_config_and_flags_for_zero_layers():
    from edgepack.training.student import parse_layers

    assert parse_layers("0") == (0, ()) and DistillConfig(num_layers=0).num_layers == 0
    with pytest.raises(ValueError, match="static_pooling"):
        DistillConfig(num_layers=0, static_pooling="sum")
    with pytest.raises(EdgepackError):
        parse_layers("-1")


def test_build_with_zero_layers_end_to_end(tmp_path, tiny_model, clinc_json):
    from test_build import write_recipe

    from edgepack.cli import main
    from runtime_shim import OnnxPipeline

    recipe = write_recipe(tmp_path / "recipe.toml", teacher=tiny_model, out=tmp_path / "bundle", data=clinc_json)
    # --max-drop 100: how close a one-epoch tiny static student gets to the teacher is luck.
    assert main(["build", str(recipe), "--layers", "0", "--max-drop", "100"]) == 0
    out, work = tmp_path / "bundle", tmp_path / "bundle.build"
    assert json.loads((work / "distill" / "config.json").read_text())["model_type"] == "edgepack_static"
    assert json.loads((work / "export" / "stage.json").read_text())["metrics"]["writer"] == "static"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verified"]["profile"] == "tiny-box"
    assert OnnxPipeline(out)("what is my checking balance")[0]["label"]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["budget_failures"] == []


def test_distill_command_with_zero_layers(tmp_path, tiny_model, clinc_json, capsys):
    from edgepack.cli import main

    out = tmp_path / "student"
    assert main(["distill", str(tiny_model), "--data", str(clinc_json), "--out", str(out), "--layers", "0",
                 "--no-ablation", "--epochs", "1", "--batch-size", "16", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "edgepack_static"
    assert "student (distilled)" in capsys.readouterr().out


def test_lazy_adamw_is_adamw_on_the_rows_it_touches():
    import torch

    from edgepack.training.static_student import LazyAdamW

    torch.manual_seed(0)
    lazy, dense = torch.nn.Embedding(6, 3, sparse=True), torch.nn.Embedding(6, 3)
    dense.load_state_dict(lazy.state_dict())
    before = lazy.weight.detach().clone()
    o1 = LazyAdamW(lazy.parameters(), lr=1e-2, weight_decay=0.1)
    o2 = torch.optim.AdamW(dense.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.tensor([[0, 1, 2, 3, 4, 1]])  # every row but 5, every step
    for _ in range(5):
        for emb, opt in ((lazy, o1), (dense, o2)):
            opt.zero_grad()
            emb(ids).pow(2).sum().backward()
            opt.step()
    torch.testing.assert_close(lazy.weight[:5], dense.weight[:5], atol=1e-6, rtol=0)
    assert torch.equal(lazy.weight[5], before[5]) and not torch.equal(dense.weight[5], before[5])  # decay only
