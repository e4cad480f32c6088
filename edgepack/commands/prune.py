"""edgepack prune MODEL_DIR --data DATA --out DIR [--teacher DIR] [--heads-per-layer N[,N...]] [--ffn-size N]"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgepack.commands._common import add_data_args, data_config


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give integers separated by commas, e.g. 4 or 6,4") from None


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prune", help="trim the vocabulary, prune heads/FFN/layers, recover by distillation",
                       description="Make a classifier physically smaller: keep only the vocabulary the training "
                       "split uses, remove the least important attention heads and FFN neurons (gradient "
                       "importance, Michel et al. 2019), then distil from the teacher to recover. Each step's "
                       "size and accuracy go to OUT/stage.json and the console.")
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="a Hugging Face classifier directory")
    add_data_args(p)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the pruned model directory to write")
    p.add_argument("--teacher", type=Path, default=None, metavar="DIR",
                   help="teacher for the recovery distillation (default: MODEL_DIR itself)")
    g = p.add_argument_group("vocabulary")
    g.add_argument("--no-trim-vocab", dest="trim_vocab", action="store_false", help="keep the full vocabulary")
    g.add_argument("--keep-top", type=int, default=0, metavar="K",
                   help="also keep the first K tokens of the original vocabulary (default: 0)")
    g.add_argument("--keep-chars", choices=("all", "data", "latin"), default="all",
                   help="character pieces kept so unseen words still tokenize: all scripts (default), the "
                        "characters the training texts use (any script), or Latin only")
    g.add_argument("--cluster-rest", type=int, default=0, metavar="K",
                   help="fold the dropped tokens into K shared rows (k-means of their embeddings) instead of "
                        "spelling unseen words in character pieces (default: 0, drop them)")
    g.add_argument("--max-positions", type=int, default=None, metavar="N",
                   help="keep only N position embeddings (at least --max-length)")
    g = p.add_argument_group("structure")
    g.add_argument("--keep-layers", type=_ints, default=(), metavar="I,J",
                   help="encoder layers to keep, e.g. 0,5")
    g.add_argument("--heads-per-layer", type=_ints, default=(), metavar="N[,N...]",
                   help="attention heads kept: one count for every layer, or one per layer")
    g.add_argument("--heads-fraction", type=float, default=None, metavar="F",
                   help="or keep this fraction of each layer's heads, e.g. 0.5")
    g.add_argument("--ffn-size", type=int, default=None, metavar="N", help="FFN neurons kept in every layer")
    g.add_argument("--ffn-fraction", type=float, default=None, metavar="F",
                   help="or keep this fraction of each layer's FFN neurons, e.g. 0.33")
    g.add_argument("--param-budget", type=int, default=None, metavar="N",
                   help="total parameters after pruning; heads are spread over layers by importance")
    g.add_argument("--importance-rows", type=int, default=2048, help="training rows for importance (default: 2048)")
    g = p.add_argument_group("recovery")
    g.add_argument("--no-recover", dest="recover", action="store_false", help="skip the recovery distillation")
    g.add_argument("--epochs", type=int, default=3, help="recovery epochs (default: 3)")
    g.add_argument("--learning-rate", type=float, default=2e-4, help="recovery learning rate (default: 2e-4)")
    g.add_argument("--oos-relabel", type=float, default=0.0, metavar="W",
                   help="as distill --oos-relabel, for the recovery: augmented rows the teacher's threshold calls "
                        "out of scope move W of their target to the out-of-scope label (0: off)")
    g.add_argument("--augment", type=int, default=0, metavar="N",
                   help="N teacher-labelled noisy copies of each training text during recovery (default: 0)")
    g.add_argument("--train-embeddings", action="store_true",
                   help="train the (trimmed) embedding table during recovery instead of freezing it")
    g.add_argument("--alpha", type=float, default=0.5, help="weight of the gold-label loss (default: 0.5)")
    g.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (default: 2)")
    g.add_argument("--qat", action="store_true",
                   help="quantization-aware recovery: train with the int8 rounding of --qat-target simulated "
                        "(per-channel weights, uint8 inputs per tensor; see the docs, 'Emulated CPUs')")
    g.add_argument("--qat-target", default="auto", metavar="TARGET",
                   help="the target in targets/ whose rounding --qat simulates (default: this CPU's)")
    g.add_argument("--sparsity", choices=("none", "magnitude", "movement"), default="none",
                   help="unstructured pruning during recovery (cubic schedule; dense kernels: no speedup)")
    g.add_argument("--sparsity-target", type=float, default=0.0, metavar="S",
                   help="final fraction of zero encoder weights (e.g. 0.8)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per query (default: 64)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    return p


def run(args: argparse.Namespace) -> int:
    from edgepack.config import RECOVERY, PruneConfig
    from edgepack.data import load_dataset
    from edgepack.errors import EdgepackError

    try:
        cfg = PruneConfig(trim_vocab=args.trim_vocab, keep_top=args.keep_top, keep_chars=args.keep_chars,
                          cluster_rest=args.cluster_rest, max_positions=args.max_positions,
                          keep_layers=args.keep_layers, heads_per_layer=args.heads_per_layer,
                          heads_fraction=args.heads_fraction, ffn_size=args.ffn_size,
                          ffn_fraction=args.ffn_fraction, param_budget=args.param_budget,
                          importance_rows=args.importance_rows, recover=args.recover,
                          recovery=RECOVERY.replace(epochs=args.epochs, augment=args.augment,
                                                    oos_relabel=args.oos_relabel,
                                                    freeze_embeddings=not args.train_embeddings,
                                                    learning_rate=args.learning_rate, alpha=args.alpha,
                                                    temperature=args.temperature, qat=args.qat,
                                                    qat_target=args.qat_target),
                          sparsity=args.sparsity, sparsity_target=args.sparsity_target, seed=args.seed)
    except ValueError as e:
        raise EdgepackError(str(e)) from None
    if not args.model_dir.is_dir():
        raise EdgepackError(f"{args.model_dir}: no such directory; pass a Hugging Face classifier directory")
    if args.out.exists() and not args.force:
        raise EdgepackError(f"{args.out} exists; pass --force to replace it or choose another --out")
    from edgepack import stages
    from edgepack.stages import prune
    from edgepack.training.student import read_id2label

    dcfg = data_config(args)
    data = load_dataset(dcfg, read_id2label(args.model_dir))
    prune.run(cfg, args.model_dir, args.out, stages.Context(data=data, data_config=dcfg, teacher=args.teacher))
    return 0
