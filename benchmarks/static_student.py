"""The static (zero-layer) student on CLINC150: distillation variants, measured in one process.

    nice python benchmarks/static_student.py --cache /tmp/teacher-cache --out /tmp/static-variants.json

Each variant is one ``edgepack.training.distillation.run_once`` (the distill stage's training, the same
loss, noisy copies and out-of-scope relabelling as the transformer students) from the same prepared
teacher outputs; the table gives validation and test accuracy, raw and with the out-of-scope
threshold chosen on validation, and the training time. ``frozen`` trains with the word table fixed
(what ``freeze_embeddings`` does to a transformer student), to show why the static student trains it.
Skips politely without ../shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
TEACHER = SHARED / "models" / "clinc150-minilm-l6"
DATA = SHARED / "data" / "clinc150" / "data_oos_plus.json"

# name -> DistillConfig changes over the default recipe's [distill] with num_layers = 0
VARIANTS = {
    "recipe (lr 5e-4, 5 ep)": {},
    "lr 5e-3": {"learning_rate": 5e-3},
    "lr 2e-2": {"learning_rate": 2e-2},
    "frozen table, lr 5e-3": {"learning_rate": 5e-3, "_frozen": True},
    "mean_max, lr 5e-3": {"learning_rate": 5e-3, "static_pooling": "mean_max"},
    "hidden 512, lr 5e-3": {"learning_rate": 5e-3, "static_hidden": 512},
    "lr 5e-3, 15 ep": {"learning_rate": 5e-3, "epochs": 15},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, required=True, help="teacher-output cache (a build's BUILD/cache works)")
    p.add_argument("--out", type=Path, required=True, help="where to write the results (JSON)")
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    p.add_argument("--teacher", type=Path, default=TEACHER)
    p.add_argument("--data", type=Path, default=DATA)
    args = p.parse_args(argv)
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
    prep = distillation.prepare(base, args.teacher, data, cache_dir=args.cache, progress=False)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name, changes in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        changes = dict(changes)
        frozen = changes.pop("_frozen", False)
        cfg = base.replace(**changes)
        model = None
        if cfg.static_pooling != base.static_pooling or cfg.static_hidden != base.static_hidden:
            from edgepack.training import static_student
            from edgepack.training.student import load_teacher

            model = static_student.from_teacher(load_teacher(args.teacher), cfg)
        if frozen:
            model = model or prep.fresh_student()
            model.word_embeddings.weight.requires_grad_(False)
        _, m = distillation.run_once(prep, cfg, model=model, progress=False)
        results[name] = {"changes": changes | ({"frozen": True} if frozen else {}), **m}
        print(f"{name:<26} val {m['val_accuracy']:.2%} (cal {m['val_accuracy_calibrated']:.2%})  test "
              f"{m['test_accuracy']:.2%} (cal {m['test_accuracy_calibrated']:.2%})  best epoch {m['best_epoch']}  "
              f"{m['wall_time_s']:.0f} s", flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
