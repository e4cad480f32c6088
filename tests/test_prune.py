"""edgepack prune: vocabulary trimming, structured pruning, sparsity schedules, the stage and its CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepack import modeling, vocab
from edgepack.cli import main
from edgepack.stages.prune import sparsity, structured


def _texts(corpus, split="train"):
    return [t for t, _ in corpus[split]]


def _load(tiny_model):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(tiny_model).eval()


def _logits(model, tok, texts):
    with torch.no_grad():
        return model(**structured.encode(tok, texts, 64)).logits.numpy()


@pytest.fixture(autouse=True)
def _teacher_cache(tmp_path, monkeypatch):
    # The teacher-logit cache defaults to ~/.cache/edgepack: keep tests inside tmp_path.
    import edgepack.training.teacher_cache as tc

    monkeypatch.setattr(tc, "DEFAULT_CACHE", tmp_path / "cache")


# --------------------------------------------------------------------------------------------- vocab


def test_trimmed_tokenizer_and_model_match_untrimmed(tiny_model, corpus, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = _texts(corpus)
    model = _load(tiny_model)
    tok_json = vocab.read_tokenizer_json(tiny_model)
    keep = vocab.select_tokens(tok_json, texts[:20])  # a sub-corpus, so that some tokens really go
    new_json = vocab.remap_tokenizer_json(tok_json, keep)
    old_tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    new_tok = Tokenizer.from_str(json.dumps(new_json))
    assert len(keep) < old_tok.get_vocab_size()
    for text in texts[:20]:
        old, new = old_tok.encode(text), new_tok.encode(text)
        assert new.tokens == old.tokens
        assert keep[new.ids].tolist() == old.ids  # one id remap for every token
    # Words the sub-corpus never used still tokenize (more finely), never into [UNK].
    unk = new_tok.token_to_id("[UNK]")
    for text in texts[20:]:
        assert unk not in new_tok.encode(text).ids or unk in old_tok.encode(text).ids

    reference = _logits(model, old_tok, texts[:20])
    vocab.trim_embeddings(model, keep)
    assert model.get_input_embeddings().weight.shape[0] == len(keep)
    np.testing.assert_allclose(_logits(model, new_tok, texts[:20]), reference, atol=1e-5)

    # Saved, both load: the model with transformers, the tokenizer with transformers and `tokenizers`.
    out = tmp_path / "trimmed"
    model.save_pretrained(out)
    vocab.save_tokenizer(tiny_model, out, new_json)
    again = AutoModelForSequenceClassification.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok(texts[0])["input_ids"] == Tokenizer.from_file(str(out / "tokenizer.json")).encode(texts[0]).ids
    np.testing.assert_allclose(_logits(again, new_tok, texts[:20]), reference, atol=1e-5)


def test_trim_vocab_reports_sizes_and_keeps_char_pieces(tiny_model, corpus):
    model = _load(tiny_model)
    tok_json = vocab.read_tokenizer_json(tiny_model)
    new_json, report = vocab.trim_vocab(model, tok_json, _texts(corpus)[:10])
    assert report["vocab_after"] < report["vocab_before"]
    assert report["embedding_params_after"] == report["vocab_after"] * model.config.hidden_size
    kept = set(new_json["model"]["vocab"])
    chars = {t for t in tok_json["model"]["vocab"] if len(t) == 1 or (t.startswith("##") and len(t) == 3)}
    assert chars <= kept
    assert {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"} <= kept
    assert new_json["model"]["vocab"]["[PAD]"] == 0 == model.config.pad_token_id


def test_cluster_rest_folds_dropped_tokens_into_shared_rows(tiny_model, corpus, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    texts = _texts(corpus)
    model = _load(tiny_model)
    old_emb = model.get_input_embeddings().weight.detach().clone()
    tok_json = vocab.read_tokenizer_json(tiny_model)
    new_json, report = vocab.trim_vocab(model, tok_json, texts[:10], clusters=4)
    kept = len(vocab.select_tokens(tok_json, texts[:10]))
    assert report["vocab_after"] == kept + 4 and report["tokens_folded"] > 0
    old_tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    new_tok = Tokenizer.from_str(json.dumps(new_json))
    emb = model.get_input_embeddings().weight.detach()
    folded = 0
    for text in texts[10:]:  # words the sub-corpus never used: split exactly as before, ids remapped
        old, new = old_tok.encode(text), new_tok.encode(text)
        assert new.tokens == old.tokens and max(new.ids) < emb.shape[0]
        for o, n in zip(old.ids, new.ids, strict=True):
            if n >= kept:  # a folded token: its row is its cluster's centroid, near its own embedding
                folded += 1
                centroids = emb[kept:]
                assert torch.argmin(((centroids - old_emb[o]) ** 2).sum(1)).item() == n - kept
            else:
                assert torch.equal(emb[n], old_emb[o])
    assert folded > 0
    out = tmp_path / "folded"
    model.save_pretrained(out)
    vocab.save_tokenizer(tiny_model, out, new_json)
    assert not (out / "vocab.txt").exists()  # several tokens share an id: no vocab.txt form
    assert AutoTokenizer.from_pretrained(out)(texts[12])["input_ids"] == new_tok.encode(texts[12]).ids
    # Export keeps the folded tokens (tokenizers' own re-serialisation would drop all but one per id).
    from edgepack.config import ExportConfig
    from edgepack.stages.export import export_onnx

    export_onnx(ExportConfig(), out, tmp_path / "export", texts[10:])  # raises on a parity miss
    exported = json.loads((tmp_path / "export" / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(exported) > len(set(exported.values()))


def test_bpe_tokenizer_trims_with_its_merges(corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = _texts(corpus)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "[PAD]"]))
    tok_json = json.loads(tok.to_str())
    keep = vocab.select_tokens(tok_json, texts[:15])
    new = Tokenizer.from_str(json.dumps(vocab.remap_tokenizer_json(tok_json, keep)))
    assert new.get_vocab_size() < tok.get_vocab_size()
    for text in texts[:15]:
        assert new.encode(text).tokens == tok.encode(text).tokens


def test_positions_trimmed(tiny_model, corpus):
    from tokenizers import Tokenizer

    model = _load(tiny_model)
    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    ref = _logits(model, tok, _texts(corpus)[:8])
    vocab.trim_positions(model, 40)
    assert model.config.max_position_embeddings == 40
    np.testing.assert_allclose(_logits(model, tok, _texts(corpus)[:8]), ref, atol=1e-5)


# ---------------------------------------------------------------------------------------- structured


def test_structured_pruning_shrinks_linears_and_onnx_matmuls(tiny_model, corpus, label_names, tmp_path):
    import onnx
    from tokenizers import Tokenizer
    from transformers import AutoModelForSequenceClassification

    model = _load(tiny_model)  # 2 layers, hidden 32, 4 heads of 8, FFN 64
    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    texts, labels = _texts(corpus), np.array([label_names.index(lab) for _, lab in corpus["train"]])
    head_imp, ffn_imp = structured.importance(model, tok, texts, labels)
    assert head_imp.shape == (2, 4) and len(ffn_imp) == 2 and ffn_imp[0].shape == (64,)
    assert np.allclose(np.linalg.norm(head_imp, axis=1), 1.0)  # Michel et al.: normalised per layer
    plan = structured.make_plan(model, head_imp, ffn_imp, heads=(3, 1), ffn_size=16)
    structured.apply_plan(model, plan)
    layer0, layer1 = model.bert.encoder.layer
    assert layer0.attention.self.query.weight.shape == (24, 32)
    assert layer1.attention.self.key.weight.shape == (8, 32)
    assert layer1.attention.output.dense.weight.shape == (32, 8)
    assert layer0.intermediate.dense.weight.shape == (16, 32) and layer0.output.dense.weight.shape == (32, 16)
    assert model.config.intermediate_size == 16 and model.config.edgepack_heads == [3, 1]
    ref = _logits(model, tok, texts[:8])
    assert np.isfinite(ref).all()

    out = tmp_path / "pruned"
    modeling.save_model(model, out)
    np.testing.assert_allclose(_logits(modeling.load_classifier(out).eval(), tok, texts[:8]), ref, atol=1e-5)
    remote = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
    np.testing.assert_allclose(_logits(remote, tok, texts[:8]), ref, atol=1e-5)

    enc = structured.encode(tok, texts[:2], 64)
    path = tmp_path / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]), str(path),
                          input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["logits"],
                          dynamic_axes={k: {0: "b", 1: "s"} for k in ("input_ids", "attention_mask", "token_type_ids")},
                          opset_version=17, dynamo=False)
    graph = onnx.load(str(path)).graph
    inits = {i.name: tuple(i.dims) for i in graph.initializer}
    shapes = [inits[n] for node in graph.node if node.op_type == "MatMul" for n in node.input if n in inits]
    assert (32, 24) in shapes and (32, 8) in shapes and (8, 32) in shapes  # q/k/v and attention output
    assert (32, 16) in shapes and (16, 32) in shapes  # FFN
    assert (32, 64) not in shapes and (64, 32) not in shapes


def test_param_budget_spreads_heads_and_refuses_empty_layers(tiny_model):
    model = _load(tiny_model)
    total = structured.count_params(model)
    imp = np.array([[0.9, 0.1, 0.1, 0.1], [0.5, 0.5, 0.5, 0.5]])
    ffn = [np.arange(64.0), np.arange(64.0)]
    plan = structured.make_plan(model, imp, ffn, param_budget=total - 6000)
    assert all(1 <= len(h) <= 4 for h in plan.heads)
    structured.apply_plan(model, plan)
    assert structured.count_params(model) <= total - 6000
    from edgepack.errors import EdgepackError

    with pytest.raises(EdgepackError, match="every head of a layer"):
        structured.make_plan(_load(tiny_model), imp, ffn, param_budget=1000)
    with pytest.raises(EdgepackError, match="every head of layer 1"):
        structured.make_plan(_load(tiny_model), imp, ffn, heads=(2, 0))
    with pytest.raises(EdgepackError, match="larger than the model"):
        structured.make_plan(_load(tiny_model), imp, ffn, ffn_size=65)


def test_keep_layers(tiny_model, corpus):
    model = _load(tiny_model)
    structured.keep_layers(model, [1])
    assert model.config.num_hidden_layers == 1 and len(model.bert.encoder.layer) == 1


# ------------------------------------------------------------------------------------------ sparsity


def test_cubic_schedule_values():
    kw = dict(initial=0.1, final=0.9, begin_step=10, end_step=110)
    assert sparsity.cubic_sparsity(0, **kw) == pytest.approx(0.1)
    assert sparsity.cubic_sparsity(10, **kw) == pytest.approx(0.1)  # t0
    assert sparsity.cubic_sparsity(60, **kw) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5 ** 3)  # mid: 0.8
    assert sparsity.cubic_sparsity(110, **kw) == pytest.approx(0.9)  # t0 + n dt
    assert sparsity.cubic_sparsity(500, **kw) == pytest.approx(0.9)
    values = [sparsity.cubic_sparsity(t, **kw) for t in range(10, 111)]
    assert values == sorted(values)  # monotone: pruning only grows


def _train_with(callback, tiny_model, corpus, label_names, tmp_path, steps=6):
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    model = _load(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{**tok(t, truncation=True, max_length=32), "labels": label_names.index(lab)} for t, lab in corpus["train"]]
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tok),
            callbacks=[callback]).train()
    return model


@pytest.mark.parametrize("method", ["magnitude", "movement"])
def test_sparsity_callback_reaches_target(method, tiny_model, corpus, label_names, tmp_path):
    cb = sparsity.make_callback(method, 0.6, begin=0.0, end=0.5, every=1)
    model = _train_with(cb, tiny_model, corpus, label_names, tmp_path)
    reached = sparsity.measure_sparsity(model)
    assert reached == pytest.approx(0.6, abs=0.01)
    assert cb.report(model)["sparsity_reached"] == pytest.approx(reached, abs=1e-4)
    assert model.classifier.weight.ne(0).all()  # the head and embeddings stay dense


# ------------------------------------------------------------------------------------- stage and CLI


def test_prune_cli_end_to_end(tiny_model, clinc_json, tmp_path, capsys):
    from edgepack.stages.prune import read_steps

    out = tmp_path / "pruned"
    code = main(["prune", str(tiny_model), "--data", str(clinc_json), "--out", str(out), "--heads-per-layer", "3,2",
                 "--ffn-size", "32", "--epochs", "1", "--sparsity", "magnitude", "--sparsity-target", "0.5",
                 "--max-positions", "64", "--importance-rows", "32", "--cluster-rest", "8", "--augment", "1",
                 "--train-embeddings"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    for step in ("input", "vocab", "structured", "recover"):
        assert f"[prune] {step}" in printed
    record = json.loads((out / "stage.json").read_text())
    assert record["stage"] == "prune" and record["config"]["prune"]["ffn_size"] == 32
    steps = read_steps(out)
    assert [s["step"] for s in steps] == ["input", "vocab", "structured", "recover"]
    for s in steps:
        assert {"parameters", "embedding_params", "test_accuracy", "val_accuracy", "test_agreement_with_input",
                "heads_per_layer", "ffn_size", "wall_time_s"} <= set(s)
    assert steps[2]["heads_per_layer"] == [3, 2] and steps[2]["ffn_size"] == [32, 32]
    assert steps[1]["clusters"] == 8 and steps[1]["tokens_folded"] > 0
    recover = steps[-1]["distill"]
    assert recover["augment"] == 1 and recover["freeze_embeddings"] is False
    assert steps[-1]["train_rows"] == 2 * 60  # the 60 training rows and one teacher-labelled copy of each
    assert steps[-1]["parameters"] < steps[0]["parameters"]
    assert record["metrics"]["sparsity"]["sparsity_reached"] == pytest.approx(0.5, abs=0.01)
    model = modeling.load_classifier(out)
    assert structured.heads_per_layer(model) == [3, 2]
    assert sparsity.measure_sparsity(model) == pytest.approx(0.5, abs=0.01)
    assert {"config.json", "model.safetensors", "stage.json", "tokenizer.json", modeling.REMOTE_CODE_FILE} <= {
        p.name for p in out.iterdir()}


def _bad(argv, capsys, out):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("edgepack prune: error:"), err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    return err


def test_bad_inputs_one_line_nothing_written(tiny_model, clinc_json, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["prune", str(tiny_model), "--data", str(clinc_json), "--out", str(out)]
    assert "every head of layer 1" in _bad(base + ["--heads-per-layer", "2,0"], capsys, out)
    assert "larger than the model" in _bad(base + ["--heads-per-layer", "5"], capsys, out)
    assert "larger than the model" in _bad(base + ["--ffn-size", "4096"], capsys, out)
    assert "every head of a layer" in _bad(base + ["--param-budget", "100", "--no-recover"], capsys, out)
    assert "not smaller than the model" in _bad(base + ["--param-budget", "10000000", "--no-recover"], capsys, out)

    unigram = tmp_path / "unigram"
    shutil.copytree(tiny_model, unigram)
    tj = json.loads((unigram / "tokenizer.json").read_text())
    tj["model"] = {"type": "Unigram", "unk_id": 0, "vocab": [["[UNK]", 0.0]]}
    (unigram / "tokenizer.json").write_text(json.dumps(tj))
    assert "WordPiece and BPE" in _bad(["prune", str(unigram)] + base[2:], capsys, out)
    (unigram / "tokenizer.json").write_text("not json")
    assert "not a `tokenizers` JSON" in _bad(["prune", str(unigram)] + base[2:], capsys, out)

    empty = tmp_path / "empty.json"
    data = json.loads(Path(clinc_json).read_text())
    data["train"] = [["   ", lab] for _, lab in data["train"]]
    data["oos_train"] = [["", lab] for _, lab in data["oos_train"]]
    empty.write_text(json.dumps(data))
    assert "training corpus is empty" in _bad(["prune", str(tiny_model), "--data", str(empty), "--out", str(out)],
                                               capsys, out)


def test_keep_chars_latin_drops_other_scripts(tiny_model, corpus):
    tok_json = vocab.read_tokenizer_json(tiny_model)
    n = len(vocab._full_vocab(tok_json))
    tok_json["model"]["vocab"].update({"ж": n, "##ж": n + 1, "é": n + 2, "##é": n + 3})
    kept_all = vocab.remap_tokenizer_json(tok_json, vocab.select_tokens(tok_json, _texts(corpus)))["model"]["vocab"]
    kept_latin = vocab.remap_tokenizer_json(
        tok_json, vocab.select_tokens(tok_json, _texts(corpus), keep_chars="latin"))["model"]["vocab"]
    assert {"ж", "##ж", "é", "##é"} <= set(kept_all)
    assert {"é", "##é"} <= set(kept_latin) and not {"ж", "##ж"} & set(kept_latin)
