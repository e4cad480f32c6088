"""Typed, frozen configs: one per stage, nested in ``BuildConfig``.

Each config validates itself in ``__post_init__`` (a ``ValueError`` that names the field and the valid
choices), round-trips through ``to_dict``/``from_dict`` and loads from TOML. ``from_dict`` refuses
unknown keys, naming them and the valid ones, so a typo in a recipe never passes silently.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import tomllib

from edgepack import shapes

T = TypeVar("T", bound="ConfigBase")


def option(default: Any, help: str, *flags: str, metavar: str | None = None) -> Any:
    """A config field with its command-line help (and its flags, when not ``--field-name``): the
    commands generate their options from these (``commands._common.add_config_options``)."""
    return dataclasses.field(default=default, metadata={"help": help, "flags": flags, "metavar": metavar})


def _choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def _in_range(name: str, value: float, lo: float | None = None, hi: float | None = None, *,
              lo_open: bool = False) -> None:
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name}={value!r} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ValueError(f"{name}={value!r} must be <= {hi}")


@dataclasses.dataclass(frozen=True)
class ConfigBase:
    """Shared dict/TOML round-trip for the stage configs."""

    section: ClassVar[str] = ""
    # Fields left out of the ledger key (``key_dict``) while at their default: options added after
    # builds existed, so adding one redoes no finished stage (the stage record still shows them).
    KEY_OPTIONAL: ClassVar[tuple[str, ...]] = ()

    def key_dict(self) -> dict[str, Any]:
        """``to_dict`` for the ledger: without the ``KEY_OPTIONAL`` fields that are at their default."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in self.KEY_OPTIONAL and f.default is not dataclasses.MISSING and v == f.default:
                continue
            out[f.name] = v.key_dict() if isinstance(v, ConfigBase) else self.to_dict()[f.name]
        return out

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, ConfigBase):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Path):
                v = str(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None, *, where: str = "") -> T:
        data = dict(data or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            label = f"[{cls.section}] " if cls.section else ""
            raise ValueError(
                f"{where + ': ' if where else ''}unknown key {label}{', '.join(unknown)}; "
                f"valid keys: {', '.join(fields)}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in data.items():
            hint = hints[name]
            sub = _config_type(hint)
            if sub is not None and isinstance(value, dict):
                # A recipe's table overrides the enclosing config's default for that section (e.g. the
                # build's own prune settings), not the section class's bare defaults.
                factory = fields[name].default_factory
                base = factory() if factory is not dataclasses.MISSING else None
                if isinstance(base, ConfigBase):
                    value = {**base.to_dict(), **value}  # unknown keys stay in and are refused below
                value = sub.from_dict(value, where=where)
            elif _is_tuple(hint) and isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)

    @classmethod
    def from_toml(cls: type[T], path: Path) -> T:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
        return cls.from_dict(data, where=str(path))

    def to_toml(self) -> str:
        """This config as TOML that ``from_toml`` reads back to an equal config (``None``: left out,
        the field's default; every ``None`` default stays ``None``)."""
        import tomli_w

        def present(d: dict[str, Any]) -> dict[str, Any]:
            return {k: present(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}

        return tomli_w.dumps(present(self.to_dict()))

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)

    def merged(self: T, data: dict[str, Any] | None, *, where: str = "") -> T:
        """This config with ``data`` laid over it (tables merge key by key): how a recipe file
        overrides the recipe it starts from."""
        return type(self).from_dict(_deep_merge(self.to_dict(), dict(data or {})), where=where)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _config_type(hint: Any) -> type[ConfigBase] | None:
    if isinstance(hint, type) and issubclass(hint, ConfigBase):
        return hint
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        for arg in typing.get_args(hint):
            if isinstance(arg, type) and issubclass(arg, ConfigBase):
                return arg
    return None


def _is_tuple(hint: Any) -> bool:
    if typing.get_origin(hint) is tuple:
        return True
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(typing.get_origin(a) is tuple for a in typing.get_args(hint))
    return False


def _check_training(cfg: Any) -> None:
    """The Trainer fields distillation and fine-tuning share."""
    _in_range("epochs", cfg.epochs, 1)
    _in_range("learning_rate", cfg.learning_rate, 0.0, lo_open=True)
    _in_range("batch_size", cfg.batch_size, 1)
    _in_range("warmup_ratio", cfg.warmup_ratio, 0.0, 1.0)
    _in_range("weight_decay", cfg.weight_decay, 0.0)


@dataclasses.dataclass(frozen=True)
class DataConfig(ConfigBase):
    """Where the labelled data comes from and how to read it (see ``edgepack.data``)."""

    section: ClassVar[str] = "data"
    KEY_OPTIONAL: ClassVar[tuple[str, ...]] = ("length_percentile",)
    source: str = ""  # a file (.json CLINC-style, .jsonl, .csv, .parquet), a directory of split files, or hub id[:config]
    text_column: str = "text"
    label_column: str = "label"
    oos_label: str | None = None  # None: "oos" when the labels have it
    validation_fraction: float = 0.1  # used only when the data has no validation split
    test_fraction: float = 0.1  # used only when the data has no test split
    # Tokens per text, for every stage (training batches pad to their longest row only; the bundle
    # truncates queries to it). 0: chosen by `edgepack build` from the training texts, the
    # length_percentile-th percentile of their token counts (teacher's tokenizer, with its special
    # tokens) rounded up to a multiple of 8, within the teacher's positions; the build records it.
    max_length: int = 64
    length_percentile: float = 99.9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_length != 0:
            _in_range("max_length", self.max_length, 8, 4096)
        _in_range("length_percentile", self.length_percentile, 0.0, 100.0, lo_open=True)
        _in_range("validation_fraction", self.validation_fraction, 0.0, 0.5, lo_open=True)
        _in_range("test_fraction", self.test_fraction, 0.0, 0.5, lo_open=True)


@dataclasses.dataclass(frozen=True)
class ExportConfig(ConfigBase):
    section: ClassVar[str] = "export"
    opset: int = 17
    parity_rows: int = 64  # real rows to compare PyTorch and ONNX logits on
    atol: float = 1e-3  # max |logit difference| allowed between PyTorch and ONNX fp32
    trim_unreachable: bool = True  # drop embedding rows no input can reach (edgepack.stages.export.unreachable): exact
    # fused: write BERT straight to ORT's fused operators (edgepack.stages.export.bert_onnx); torch: torch.onnx.export;
    # auto: fused where supported, else torch
    writer: str = "auto"
    # fused writer: one EmbedLayerNormalization, or gather (Gather + Add + LayerNorm; needed to store
    # the word table in 4 bits, see QuantizeConfig.embedding_bits; in 8 bits it becomes Gather +
    # DequantizeLinear, which ran ~4 us against QEmbedLayerNormalization's ~7 us for 11 tokens)
    embedding: str = "fused"

    def __post_init__(self) -> None:
        _choice("writer", self.writer, ("auto", "fused", "torch"))
        _choice("embedding", self.embedding, ("fused", "gather"))
        _in_range("opset", self.opset, 14, 23)
        _in_range("parity_rows", self.parity_rows, 1)
        _in_range("atol", self.atol, 0.0, lo_open=True)


WEIGHT_TYPES = ("qint8", "quint8")
ACTIVATION_TYPES = ("quint8", "qint8")
QUANT_FORMATS = ("dynamic", "static-qdq", "matmul-nbits")
LATENCY_OBJECTIVES = ("p50", "mean", "p95")  # the figures a choice between models can compare (as metrics')


@dataclasses.dataclass(frozen=True)
class QuantSettings(ConfigBase):
    """ORT quantization settings; a target's ``[quantize]`` table fills these in (``targets/*.toml``)."""

    section: ClassVar[str] = "quantize"
    format: str = "dynamic"
    weight_type: str = "qint8"
    activation_type: str = "quint8"
    per_channel: bool = False
    reduce_range: bool = False
    op_types: tuple[str, ...] = ("MatMul", "Attention", "Gather", "EmbedLayerNormalization")
    fuse: bool = False  # run onnxruntime.transformers.optimizer first (measured: not always faster)
    nbits_block_size: int = 32
    # 4: the word-embedding table in 4-bit blocks (edgepack.stages.quantize.formats.quantize_embedding_4bit): on a
    # small student the table is most of the file
    embedding_bits: int = 8
    embedding_block_size: int = 96
    calibration_rows: int = 256  # for static QDQ
    session_config: dict[str, str] = dataclasses.field(default_factory=dict)  # e.g. x64quantprecision

    def __post_init__(self) -> None:
        _choice("format", self.format, QUANT_FORMATS)
        _choice("weight_type", self.weight_type, WEIGHT_TYPES)
        _choice("activation_type", self.activation_type, ACTIVATION_TYPES)
        _choice("embedding_bits", self.embedding_bits, (8, 4))
        _in_range("embedding_block_size", self.embedding_block_size, 2)
        if self.format == "dynamic" and self.activation_type != "quint8":
            raise ValueError("activation_type must be 'quint8' for dynamic quantization (ORT's only choice)")


@dataclasses.dataclass(frozen=True)
class QuantizeConfig(ConfigBase):
    """The quantize stage: the target's int8 settings (``targets/*.toml``), optionally its measured
    variants, and the accuracy gate against the fp32 model on validation."""

    section: ClassVar[str] = "quantize"
    target: str = "auto"  # a name in targets/, or "auto": the build profile's target (pack: this CPU's)
    max_accuracy_drop: float = 1.0  # points of validation accuracy the int8 model may lose vs fp32
    # Share of validation labels the int8 model must give as fp32 does: an average hides flips (on an
    # AVX2 CPU the shared teacher lost 0.29 points of validation accuracy at 97.1% agreement, and 1.44
    # points of test accuracy). With variants, a candidate below it ranks below those above it.
    min_agreement: float = 0.99
    variants: bool = False  # build and measure the target's quantization variants, keep the fastest in budget
    variant_formats: tuple[str, ...] = ("dynamic", "static-qdq", "matmul-nbits")
    embedding_bits: int | None = None  # 4: the word table in 4-bit blocks; None: the target's setting
    # The level of the paired-bootstrap interval of int8's drop against fp32 (a variant is inside the
    # gate with significance when the whole interval is). Left at this default, `edgepack build` uses
    # [search] confidence, so one build decides everything at one level.
    confidence: float = 0.95
    # The latency figure a faster variant must lead by (p50, mean or p95; the noise is that figure's
    # spread over the timing rounds). Left at this default, `edgepack build` uses [search] objective.
    objective: str = "p95"

    KEY_OPTIONAL: ClassVar[tuple[str, ...]] = ("confidence", "objective")

    def __post_init__(self) -> None:
        if self.embedding_bits is not None:
            _choice("embedding_bits", self.embedding_bits, (8, 4))
        _in_range("max_accuracy_drop", self.max_accuracy_drop, 0.0, 100.0)
        _in_range("confidence", self.confidence, 0.5, 0.999)
        _choice("objective", self.objective, LATENCY_OBJECTIVES)
        _in_range("min_agreement", self.min_agreement, 0.0, 1.0)
        for f in self.variant_formats:
            _choice("variant_formats", f, QUANT_FORMATS)


@dataclasses.dataclass(frozen=True)
class BundleConfig(ConfigBase):
    """The bundle stage: the out-of-scope threshold, the shipped eval slice, the files of the bundle."""

    section: ClassVar[str] = "bundle"
    oos_recall: float | None = None  # calibrate the threshold to reach this recall (default: the one-SE rule)
    eval_rows: int = 1000  # size of the held-out slice shipped as eval.jsonl
    archive: bool = False
    ort_format: bool = False  # also write model.ort + required_operators.config for minimal ORT builds

    def __post_init__(self) -> None:
        if self.oos_recall is not None:
            _in_range("oos_recall", self.oos_recall, 0.0, 1.0)
        _in_range("eval_rows", self.eval_rows, 1)


@dataclasses.dataclass(frozen=True)
class CascadeConfig(ConfigBase):
    """The cascade stage (``edgepack.stages.cascade``): the bundle answers the texts it is sure of and
    hands the others to a second, more accurate model shipped inside it (``fallback/``): a text goes on
    when the first model's top probability is below ``below``. Off unless ``fallback`` is set."""

    section: ClassVar[str] = "cascade"
    # "teacher": the build's teacher, exported and quantized by the build's own stages into
    # BUILD/fallback/ (its int8 bundle). "": no cascade.
    fallback: str = ""
    # Escalate under this top probability. None: the lowest on a 0.01 grid (at or above both models'
    # out-of-scope thresholds) whose validation accuracy reaches ``min_accuracy``; without a budget, the
    # most accurate one.
    below: float | None = None
    # Set by the build, not by hand: the fallback bundle's directory and, with --max-drop, the teacher's
    # validation accuracy minus the budget (points).
    fallback_bundle: str = ""
    min_accuracy: float | None = None

    def __post_init__(self) -> None:
        _choice("cascade.fallback", self.fallback, ("", "teacher"))
        if self.below is not None:
            _in_range("cascade.below", self.below, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class PackConfig(ConfigBase):
    """``edgepack pack``: the quantize and bundle stages after an export (its options are flat on the
    command line and in an old recipe's ``[pack]`` table: :meth:`of` routes each to its stage)."""

    section: ClassVar[str] = "pack"
    quantize: QuantizeConfig = dataclasses.field(default_factory=QuantizeConfig)
    bundle: BundleConfig = dataclasses.field(default_factory=BundleConfig)

    @classmethod
    def of(cls, **flat: Any) -> PackConfig:
        """``PackConfig.of(target="x86-64-avx2", eval_rows=20)``: each key to the stage config that owns it."""
        q_keys = {f.name for f in dataclasses.fields(QuantizeConfig)}
        b_keys = {f.name for f in dataclasses.fields(BundleConfig)}
        unknown = sorted(set(flat) - q_keys - b_keys)
        if unknown:
            raise ValueError(f"unknown key [pack] {', '.join(unknown)}; valid keys: {', '.join(sorted(q_keys | b_keys))}")
        return cls(QuantizeConfig(**{k: v for k, v in flat.items() if k in q_keys}),
                   BundleConfig(**{k: v for k, v in flat.items() if k in b_keys}))


@dataclasses.dataclass(frozen=True)
class DistillConfig(ConfigBase):
    """``edgepack distill``: a student from the teacher's layers (or another checkpoint) trained on
    ``alpha * CE + (1 - alpha) * T^2 * KL`` against cached teacher logits (see ``edgepack.training.distillation``)."""

    section: ClassVar[str] = "distill"
    KEY_OPTIONAL: ClassVar[tuple[str, ...]] = ("static_pooling", "static_hidden", "qat", "qat_target",
                                               "attention_weight")
    num_layers: int = 2  # teacher layers kept when ``layers`` is empty (spread by ``student.pick_layers``)
    # num_layers = 0: the static student (edgepack.static_model): the teacher's word embeddings, mean
    # pooled (or mean and max: static_pooling = "mean_max"), an optional ReLU layer of static_hidden
    # units, then the classifier. Its table is the model, so it is always trained (freeze_embeddings
    # applies to transformer students only).
    static_pooling: str = "mean"
    static_hidden: int = 0
    layers: tuple[int, ...] = ()  # explicit teacher layer indices, e.g. (0, 2, 5); overrides num_layers
    student: str | None = None  # a checkpoint directory with its own tokenizer instead of teacher layers
    # alpha 0: the out-of-scope threshold reads the student's confidence, and only the teacher's
    # soft targets teach it the teacher's; gold-label CE pushes every answer towards certainty
    # (2 layers, 5 epochs, calibrated test: alpha 0.5 87.58%, 0.1 88.80%, 0 89.56%, labels only 88.16%).
    alpha: float = option(0.0, "weight of the gold-label CE, in [0, 1] (1 - alpha goes to the teacher)")
    # T = 1: students trained hot come out under-confident and gain less from the out-of-scope
    # threshold. lr 5e-4: a 2-3 layer student cut from a fine-tuned teacher moves far from
    # its init; at 1e-4 and 5 epochs the 2-layer student reached 87.9% calibrated, at 5e-4 88.7%.
    temperature: float = option(1.0, "softmax temperature, > 0", "-T", "--temperature")
    epochs: int = option(5, "training epochs")
    learning_rate: float = option(5e-4, "peak learning rate", "--lr", "--learning-rate")
    batch_size: int = option(64, "training batch size")  # per-row cost on 2 shared cores: 12.6 ms at 32, 10.8 ms at 64
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    hidden_weight: float = option(0.0, "weight of the [CLS] hidden-state MSE against the mapped teacher layers (0: off)")
    # Weight of MiniLM's self-attention transfer (Wang et al. 2020): the KL of the student's last layer's
    # attention distributions and value relations against the teacher's last layer's, per teacher head.
    # Teacher-layer students only; the teacher runs on every batch (its outputs are not cached).
    attention_weight: float = option(0.0, "weight of MiniLM's self-attention transfer from the teacher's last layer "
                                     "(0: off; teacher-layer students only)")
    freeze_embeddings: bool = True  # the word-embedding table: 11.7M of a 2-layer student's 15.5M; fixed, steps take half the time
    # One teacher-labelled noisy copy per training text (word dropout, swap, or half spliced to half of
    # another text), and oos_relabel: on those copies where the teacher's top probability is below its
    # own out-of-scope threshold (chosen on validation), this share of the target moves to the
    # out-of-scope label, so the student learns the calibrated teacher's answer, not only its unsure
    # distribution. CLINC150 test, calibrated (one-SE, seed 0): 2 layers 90.07% plain, 90.18% with the copies,
    # 90.73% with both; 3 layers 90.56% / 90.53% / 91.24% (teacher 91.58%). Raw: 2 layers 85.44% ->
    # 89.15%, above the teacher's 87.60%. augment=0 or oos_relabel=0 turns them off.
    augment: int = option(1, "teacher-labelled noisy copies of each training text (0: off)")
    oos_relabel: float = option(0.5, "on augmented rows the teacher's threshold calls out of scope, move this share of "
                                "the target to the out-of-scope label, in [0, 1] (0: off)", metavar="W")
    ablation: bool = True  # also train the same student on labels only (alpha = 1) and record it
    search_trials: int = option(0, "run an Optuna study of N trials (over the whole study) over alpha, T, epochs "
                                "and lr before the final run", "--search", metavar="N")
    search_layers: bool = False  # let the study choose the layer count too (teacher students only)
    storage: str | None = option(None, "Optuna storage URL shared by workers (default: a SQLite file kept with "
                                 "--out)", metavar="URL")
    study_name: str = option("distill", "the Optuna study's name")
    # Quantization-aware training (edgepack.training.qat): train with the int8 rounding of qat_target
    # ("auto": the build's quantize target; the distill and prune commands: this CPU's) simulated,
    # weights per its scheme (AVX2: per-channel 7-bit), Linear inputs uint8 per tensor as ORT's
    # dynamic quantization rounds them at run time. Off by default and not offered by --variants: on
    # CLINC150 (1-layer pruned student, AVX2 and arm64 per-channel) PTQ already stayed within 0.05
    # points of fp32 and QAT changed agreement by +0.06..+0.19 points, test accuracy by -0.22..+0.12
    # (docs/results.md, "Quantization-aware training").
    qat: bool = option(False, "quantization-aware training: the int8 rounding of --qat-target simulated (see the "
                       "docs, 'Emulated CPUs')")
    qat_target: str = option("auto", "the target in targets/ whose rounding --qat simulates (default: this CPU's)",
                             metavar="TARGET")
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.qat_target:
            raise ValueError("qat_target='' is not valid; give a target name in targets/ or 'auto'")
        _in_range("alpha", self.alpha, 0.0, 1.0)
        _in_range("temperature", self.temperature, 0.0, lo_open=True)
        _in_range("num_layers", self.num_layers, 0)
        _choice("static_pooling", self.static_pooling, ("mean", "mean_max"))
        _in_range("static_hidden", self.static_hidden, 0)
        if any(i < 0 for i in self.layers):
            raise ValueError(f"layers={list(self.layers)} must be teacher layer indices >= 0")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers={list(self.layers)} repeats a layer; give each index once")
        _check_training(self)
        _in_range("hidden_weight", self.hidden_weight, 0.0)
        _in_range("attention_weight", self.attention_weight, 0.0)
        _in_range("augment", self.augment, 0, 16)
        _in_range("oos_relabel", self.oos_relabel, 0.0, 1.0)
        _in_range("search_trials", self.search_trials, 0)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(ConfigBase):
    """``edgepack finetune``: a classifier head on a pretrained encoder, trained with the HF ``Trainer``
    (see ``edgepack.stages.finetune``). The defaults take all-MiniLM-L6-v2 to 97.8% test accuracy on the demo
    data (1,050 training rows) in about a minute and a half on 2 idle cores."""

    section: ClassVar[str] = "finetune"
    epochs: int = 4  # on the demo data validation accuracy levels off at epoch 3 (97.8%)
    learning_rate: float = 2e-4
    batch_size: int = 32
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        _check_training(self)


SPARSITY_METHODS = ("none", "magnitude", "movement")
RECOVERY = DistillConfig(epochs=3, learning_rate=2e-4, alpha=0.5, temperature=2.0, augment=0, oos_relabel=0.0,
                         ablation=False)


@dataclasses.dataclass(frozen=True)
class PruneConfig(ConfigBase):
    """``edgepack prune``: vocabulary trimming, structured head/FFN/layer pruning, recovery distillation
    and, optionally, unstructured sparsity during recovery (see ``edgepack.stages.prune``)."""

    section: ClassVar[str] = "prune"
    trim_vocab: bool = True  # keep the tokens the training split uses, every character piece and specials
    keep_top: int = 0  # also keep the first K ids of the original vocabulary (roughly its most frequent)
    # character pieces kept: all (any word in any script tokenizes), data (those of the characters the
    # training texts use, in any script: a word spelled with them tokenizes) or latin
    keep_chars: str = "all"
    # > 0: the tokens trimming drops are not removed but folded into this many shared rows (k-means of
    # their embeddings), so a word the training split lacks keeps roughly its own meaning
    cluster_rest: int = 0
    max_positions: int | None = None  # keep this many position embeddings (>= the export max_length)
    keep_layers: tuple[int, ...] = ()  # encoder layers to keep, e.g. (0, 5); empty: all
    heads_per_layer: tuple[int, ...] = ()  # one value for every layer, or one per layer (uneven allowed)
    heads_fraction: float | None = None  # or: this fraction of each layer's heads (model-independent)
    ffn_size: int | None = None  # FFN neurons kept in every layer
    ffn_fraction: float | None = None  # or: this fraction of each layer's FFN neurons (model-independent)
    param_budget: int | None = None  # total parameters after pruning; heads spread by importance
    importance_rows: int = 2048  # training rows the head/FFN importance is measured on
    recover: bool = True  # distil the pruned model from the teacher afterwards
    # The recovery distillation (no labels-only ablation; the prune stage's seed). Its defaults:
    # 3 epochs at lr 2e-4, alpha 0.5, T 2, no noisy copies, no out-of-scope relabelling.
    recovery: DistillConfig = dataclasses.field(default_factory=lambda: RECOVERY)
    sparsity: str = "none"  # unstructured pruning during recovery: none, magnitude, movement
    sparsity_target: float = 0.0  # final fraction of zero weights in the encoder's Linear layers
    seed: int = 0

    def __post_init__(self) -> None:
        _in_range("keep_top", self.keep_top, 0)
        _in_range("cluster_rest", self.cluster_rest, 0)
        _choice("keep_chars", self.keep_chars, ("all", "data", "latin"))
        if self.max_positions is not None:
            _in_range("max_positions", self.max_positions, 8, 1 << 16)  # and >= [data] max_length: checked at run
        if self.param_budget is not None:
            _in_range("param_budget", self.param_budget, 1)
        if self.ffn_size is not None:
            _in_range("ffn_size", self.ffn_size, 1)
        if self.ffn_fraction is not None:
            _in_range("ffn_fraction", self.ffn_fraction, 0.0, 1.0, lo_open=True)
            if self.ffn_size is not None:
                raise ValueError("give ffn_size or ffn_fraction, not both")
        for n in self.heads_per_layer:
            _in_range("heads_per_layer", n, 0)
        if self.heads_fraction is not None:
            _in_range("heads_fraction", self.heads_fraction, 0.0, 1.0, lo_open=True)
            if self.heads_per_layer:
                raise ValueError("give heads_per_layer or heads_fraction, not both")
        for n in self.keep_layers:
            _in_range("keep_layers", n, 0)
        _in_range("importance_rows", self.importance_rows, 1)
        _choice("sparsity", self.sparsity, SPARSITY_METHODS)
        _in_range("sparsity_target", self.sparsity_target, 0.0, 0.99)
        if self.sparsity != "none" and not self.recover:
            raise ValueError("sparsity needs recover=True: it is applied during the recovery distillation")

    @property
    def structured(self) -> bool:
        return bool(self.keep_layers or self.heads_per_layer or self.heads_fraction is not None
                    or self.ffn_size is not None or self.ffn_fraction is not None or self.param_budget is not None)

    @property
    def cuts(self) -> bool:
        """Whether this removes any of the model's structure or weights: layers, heads or FFN neurons
        (a fraction of 1 keeps them all) or sparsity. Vocabulary trimming alone does not count: the
        training texts' tokens keep their rows."""
        return bool(self.keep_layers or self.heads_per_layer or self.param_budget is not None or self.ffn_size is not None
                    or self.heads_fraction not in (None, 1.0) or self.ffn_fraction not in (None, 1.0)
                    or self.sparsity != "none")

    def resolved(self, ffn_sizes: list[int], heads: list[int] | None = None) -> PruneConfig:
        """``ffn_fraction`` and ``heads_fraction`` turned into ``ffn_size`` and ``heads_per_layer`` (one
        value for every layer, at least 1) for a model whose layers have ``ffn_sizes`` neurons and
        ``heads`` attention heads."""
        out = self
        if out.ffn_fraction is not None:
            out = out.replace(ffn_fraction=None, ffn_size=max(1, round(min(ffn_sizes) * out.ffn_fraction)))
        if out.heads_fraction is not None and heads:
            out = out.replace(heads_fraction=None, heads_per_layer=(max(1, round(min(heads) * out.heads_fraction)),))
        return out


BUILD_STAGES = ("distill", "prune", "export", "quantize", "bundle", "cascade", "tune", "evaluate")


@dataclasses.dataclass(frozen=True)
class TuneConfig(ConfigBase):
    """The tune stage: thread settings measured on this CPU when it is the profile's target."""

    section: ClassVar[str] = "tune"
    runs: int = 200  # timed queries per thread-setting candidate
    gap_ms: float = 20.0  # pause between queries in the gapped (interactive traffic) mode
    texts: int = 200  # validation texts the candidates are timed on

    def __post_init__(self) -> None:
        _in_range("runs", self.runs, 1)
        _in_range("gap_ms", self.gap_ms, 0.0)
        _in_range("texts", self.texts, 1)


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(ConfigBase):
    """The evaluate stage (``[evaluate]``; ``[verify]`` in recipes before the rename): the benchmark harness on the test split, every stage's model side by side."""

    section: ClassVar[str] = "evaluate"
    split: str = "test"
    runs: int = 200  # timed single queries per model
    warmup: int = 50
    limit: int | None = None  # rows of the split (stratified); None: all
    compare: bool = True  # also measure the teacher, the student and the pruned model in PyTorch

    def __post_init__(self) -> None:
        _in_range("runs", self.runs, 1)
        _in_range("warmup", self.warmup, 0)
        if self.limit is not None:
            _in_range("limit", self.limit, 1)


_PUBLIC_SUFFIX, _PRIVATE_SUFFIX = ".pub", ".key"  # edgepack keys new writes NAME.key and NAME.pub
_BUNDLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")  # runtime_shim.trust.NAME_RE


@dataclasses.dataclass(frozen=True)
class SignConfig(ConfigBase):
    """``[sign]`` in a recipe: sign the built bundle with ``key`` (a private key file from
    ``edgepack keys new``; empty: leave the bundle unsigned). ``name`` is the bundle's name on the
    devices (empty: the output directory's name).

    Examples:
        >>> SignConfig(key="keys/signing.key").enabled
        True
        >>> SignConfig(key="keys/signing.pub")
        Traceback (most recent call last):
        ...
        ValueError: key='keys/signing.pub' is a public key; pass the private key file (.key) `edgepack keys new` wrote
    """

    section: ClassVar[str] = "sign"
    key: str = ""
    name: str = ""

    def __post_init__(self):
        if not isinstance(self.key, str):
            raise ValueError(f"key={self.key!r} must be a path to a private key file, or empty for no signature")
        if self.key.endswith(_PUBLIC_SUFFIX):
            raise ValueError(f"key={self.key!r} is a public key; pass the private key file ({_PRIVATE_SUFFIX}) "
                             "`edgepack keys new` wrote")
        if not isinstance(self.name, str) or (self.name and not _BUNDLE_NAME.fullmatch(self.name)):
            raise ValueError(f"name={self.name!r} is not a bundle name; use letters, digits and . _ + - (up to 128)")

    @property
    def enabled(self) -> bool:
        return bool(self.key)


DEFAULT_RECIPE = "default"


@dataclasses.dataclass(frozen=True)
class SearchConfig(ConfigBase):
    """The shape search of ``edgepack build`` (``edgepack.runner.search``): build student shapes in
    order, cheap first, and keep the fastest bundle whose validation accuracy is within ``max_drop``
    points of the teacher's (the same out-of-scope rule for both; plain accuracy without an
    out-of-scope label). No shapes: build the recipe's one shape."""

    section: ClassVar[str] = "search"
    # Accuracy points the bundle may lose against the teacher on validation: a profile budget
    # (max_teacher_drop) like the others, so a bundle outside it makes the build exit 3. None: no such budget.
    max_drop: float | None = None
    shapes: tuple[str, ...] = ()  # candidate shapes in the order tried ("layers=1 heads=1/3 ffn=1/2", ...)
    # Shapes built after the first one inside the budget, to draw more of the frontier (0: stop there).
    explore: int = 0
    # A shape of an earlier search (its name, e.g. "L2-h1-f0.33") to publish instead of the search's
    # choice; its bundle is already built, so nothing is retrained.
    pick: str | None = None
    latency_runs: int = 300  # timed single queries per candidate and round when the search compares them
    latency_rounds: int = 3  # interleaved rounds over the candidates; a candidate's latency is its median
    # The order shapes are tried in. "latency": each shape built untrained first (the teacher's weights
    # cut to it; prune without recovery, export, quantize with the target's format) and timed on this
    # CPU, fastest first, the order below kept where two are within their timing spread
    # (edgepack.runner.probe; frontier.json reports the model's error against the trained bundles).
    # "declared": the order of ``shapes`` as written.
    order: str = "latency"
    # The latency a shape is judged by when the search chooses: p95, since it is what a service level
    # sees; "p50" or "mean" for other traffic. Every figure is measured and shown either way.
    objective: str = "p95"
    # How sure the budget's verdict must be: a shape is inside when the paired-bootstrap interval of its
    # drop against the teacher (validation rows) is inside at this level; inside on the point estimate
    # only is said as "not significant". Also the level McNemar's test uses between shapes.
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.max_drop is not None:
            _in_range("search.max_drop", self.max_drop, 0.0)
        names = [shapes.shape_name(s) for s in self.shapes]  # parses every shape: a typo fails here
        if len(set(names)) != len(names):
            raise ValueError(f"search.shapes: the same shape twice ({', '.join(names)})")
        _in_range("search.explore", self.explore, 0)
        _in_range("search.latency_runs", self.latency_runs, 10)
        _in_range("search.latency_rounds", self.latency_rounds, 1)
        _choice("search.order", self.order, ("latency", "declared"))
        _choice("search.objective", self.objective, LATENCY_OBJECTIVES)
        _in_range("search.confidence", self.confidence, 0.5, 0.999)


@dataclasses.dataclass(frozen=True)
class BuildConfig(ConfigBase):
    """``edgepack build``: the whole chain, one table per stage ([data], [distill], [prune], [export],
    [quantize], [bundle], [tune], [evaluate]). The defaults here are plain; a build starts from a recipe
    (``recipes/<name>.toml``, :func:`edgepack.recipes.load`), which sets what was measured, with its
    reasons."""

    teacher: str = ""
    out: str = ""
    recipe: str = ""  # the recipe this config was resolved from (recorded, not read)
    profile: str = "host"  # a device profile (profiles/*.toml); host: this machine's (target from its CPU flags)
    build_dir: str = ""  # default: OUT.build beside the bundle
    domains: str | None = None  # JSON domain -> intents map for the report (CLINC150's domains.json)
    skip: tuple[str, ...] = ()  # stages to leave out: distill, prune, tune
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    quantize: QuantizeConfig = dataclasses.field(default_factory=QuantizeConfig)
    bundle: BundleConfig = dataclasses.field(default_factory=BundleConfig)
    cascade: CascadeConfig = dataclasses.field(default_factory=CascadeConfig)
    tune: TuneConfig = dataclasses.field(default_factory=TuneConfig)
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    sign: SignConfig = dataclasses.field(default_factory=SignConfig)
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)

    def __post_init__(self) -> None:
        for s in self.skip:
            _choice("skip", s, ("distill", "prune", "tune"))

    def shapes(self) -> tuple[str, ...]:
        """The student shapes the build tries (``[search] shapes``): none when distill is skipped, since a
        shape is a student; then the build is a search of one, the recipe's own."""
        return () if "distill" in self.skip else self.search.shapes

