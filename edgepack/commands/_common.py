"""Arguments several commands share, so each flag means the same everywhere."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgepack.config import DataConfig


def add_data_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required, metavar="DATA",
                   help="CLINC150-style JSON, .jsonl/.csv/.parquet file, a directory of split files, or a hub id[:config]")
    g.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    g.add_argument("--label-column", default="label", help="column holding the label (default: label)")
    g.add_argument("--oos-label", default=None, help="the out-of-scope label (default: 'oos' when present)")
    g.add_argument("--seed", type=int, default=0, help="seed for splits and training (default: 0)")


def add_gate_args(p: argparse.ArgumentParser, *, when: str = "") -> None:
    """The quantize stage's accuracy gate against fp32 (``pack`` and ``quantize``)."""
    p.add_argument("--max-accuracy-drop", type=float, default=1.0, metavar="POINTS",
                   help=f"{when}refuse an int8 model that loses more validation accuracy than this vs fp32 (default: 1.0)")
    p.add_argument("--min-agreement", type=float, default=0.99, metavar="SHARE",
                   help=f"{when}refuse an int8 model that gives another label than fp32 on more validation rows than "
                        "this allows (with --variants: rank it below the others; default: 0.99)")


def data_config(args: argparse.Namespace) -> DataConfig:
    extra = {"max_length": args.max_length} if getattr(args, "max_length", None) is not None else {}
    return DataConfig(source=str(args.data), text_column=args.text_column, label_column=args.label_column,
                      oos_label=args.oos_label, seed=args.seed, **extra)


def existing_dir(value: str) -> Path:
    p = Path(value)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: no such directory")
    return p


def add_config_options(group, cls, *names: str) -> None:
    """One option per config field in ``names``, from the field's ``config.option`` metadata (help,
    flags, metavar) and its type; each defaults to None (unset: the config file's or the field's value)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        meta, hint = fields[name].metadata, hints[name]
        flags = meta.get("flags") or (f"--{name.replace('_', '-')}",)
        kwargs = {"dest": name, "default": None, "help": meta["help"]}
        if hint is bool:
            group.add_argument(*flags, action="store_true", **kwargs)
            continue
        scalar = next((t for t in (int, float, str) if t is hint or t in typing.get_args(hint)), str)
        group.add_argument(*flags, type=scalar, metavar=meta.get("metavar"), **kwargs)


def config_options(args, cls) -> dict:
    """The fields of ``cls`` whose generated options were given (``add_config_options``)."""
    import dataclasses

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if "help" in f.metadata and getattr(args, f.name, None) is not None}
