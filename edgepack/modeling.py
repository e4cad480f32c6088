"""What every stage knows about a classifier directory: its labels and shape (``ModelInfo``), and how
to load and save it, pruned heads included (``PrunedBertForSequenceClassification``).

transformers 5 removed ``prune_heads`` and ``config.pruned_heads``, so structured pruning
(``edgepack.stages.prune.structured``) cuts heads by slicing; the number kept per layer may differ and
is stored as ``config.edgepack_heads``. The model is saved with a small self-contained
``modeling_edgepack_bert.py`` (``auto_map``), so it reloads with
``AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)``, or with
``load_classifier(dir)`` here, which needs no remote code. The static (zero-layer) student,
``edgepack.static_model``, is registered with the Auto classes on import, so it loads the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
from collections.abc import Iterator
from pathlib import Path

from torch import nn
from transformers import BertForSequenceClassification

from edgepack import static_model  # noqa: F401  (registers the static student with the Auto classes)
from edgepack.errors import EdgepackError

REMOTE_CODE_FILE = "modeling_edgepack_bert.py"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What later stages need to know about a classifier (from its config.json)."""

    model_type: str
    num_labels: int
    label_names: tuple[str, ...]
    hidden_size: int
    num_heads: int
    num_layers: int
    input_names: tuple[str, ...]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_model_info(model_dir: Path) -> ModelInfo:
    """Check ``model_dir`` is a sequence classifier with real labels; one-line errors otherwise."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise EdgepackError(f"{model_dir}: no config.json; pass a Hugging Face classifier directory (save_pretrained output)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EdgepackError(f"{cfg_path}: not valid JSON ({e.msg}); re-save the model") from None
    archs = cfg.get("architectures") or []
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise EdgepackError(
            f"{cfg_path}: architecture {', '.join(archs)} has no sequence-classification head; "
            "fine-tune a classifier first (edgepack finetune BASE_DIR --data DATA --out DIR)")
    id2label = cfg.get("id2label") or {}
    names = [str(id2label[k]) for k in sorted(id2label, key=int)] if id2label else []
    if not names or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        raise EdgepackError(
            f"{cfg_path}: no id2label (or only LABEL_0, LABEL_1, ...); set config.id2label/label2id to the class names and re-save")
    inputs = ["input_ids", "attention_mask"]
    if cfg.get("type_vocab_size", 0) and cfg.get("model_type") not in ("distilbert", "roberta", "xlm-roberta"):
        inputs.append("token_type_ids")
    return ModelInfo(
        model_type=cfg.get("model_type", "bert"),
        num_labels=len(names),
        label_names=tuple(names),
        hidden_size=int(cfg.get("hidden_size") or cfg.get("dim") or 0),
        num_heads=int(cfg.get("num_attention_heads") or cfg.get("n_heads") or 0),
        num_layers=int(cfg.get("num_hidden_layers") or cfg.get("n_layers") or 0),
        input_names=tuple(inputs),
    )


class PrunedBertForSequenceClassification(BertForSequenceClassification):
    """A BERT classifier whose layers keep ``config.edgepack_heads[i]`` attention heads each."""

    def __init__(self, config):
        super().__init__(config)
        heads = getattr(config, "edgepack_heads", None) or []
        size = config.hidden_size // config.num_attention_heads
        for layer, n in zip(self.bert.encoder.layer, heads, strict=False):
            if n == config.num_attention_heads:
                continue
            att, width = layer.attention, n * size
            for name in ("query", "key", "value"):
                setattr(att.self, name, nn.Linear(config.hidden_size, width))
            att.self.num_attention_heads = n
            att.self.all_head_size = width
            att.output.dense = nn.Linear(width, config.hidden_size)


# ------------------------------------------------------------------------------------------ save/load


def save_model(model, out: Path) -> None:
    """``save_pretrained`` plus, when heads were pruned, the remote code that rebuilds the shapes."""
    out = Path(out)
    cfg = model.config
    if getattr(cfg, "edgepack_heads", None):
        cfg.architectures = ["PrunedBertForSequenceClassification"]
        cfg.auto_map = {"AutoModelForSequenceClassification":
                        f"{REMOTE_CODE_FILE[:-3]}.PrunedBertForSequenceClassification"}
    model.save_pretrained(out)
    if getattr(cfg, "edgepack_heads", None):
        src = inspect.getsource(PrunedBertForSequenceClassification)
        (out / REMOTE_CODE_FILE).write_text(
            '"""Written by edgepack: BERT with fewer attention heads per layer (config.edgepack_heads)."""\n\n'
            "from torch import nn\nfrom transformers import BertForSequenceClassification\n\n\n" + src)


def load_classifier(path: Path, **kwargs):
    """Load a classifier saved by any edgepack stage, pruned heads or not, without remote code.
    ``kwargs`` go to ``from_pretrained`` (e.g. ``attn_implementation="eager"`` for export)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    with no_load_bars():
        if cfg.get("edgepack_heads"):
            config = AutoConfig.from_pretrained(path)
            return PrunedBertForSequenceClassification.from_pretrained(path, config=config, **kwargs)
        return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)


@contextlib.contextmanager
def no_load_bars() -> Iterator[None]:
    """transformers' progress bars off for the block (it draws a "Loading weights" bar on every load:
    noise around one-line errors), then as the caller had them: the switch is the process's, not ours."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_with_tokenizer(model_dir: Path):
    """The PyTorch model (eager attention: it exports to plain ONNX ops) and its fast tokenizer."""
    from transformers import AutoTokenizer

    try:
        model = load_classifier(model_dir, attn_implementation="eager")
        tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    except (OSError, ValueError) as e:
        raise EdgepackError(f"{model_dir}: could not load the classifier or its tokenizer ({str(e).splitlines()[0][:200]})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise EdgepackError(f"{model_dir}: no fast tokenizer (tokenizer.json); the bundle needs a `tokenizers` file")
    return model.eval(), tokenizer


def resolve_teacher(spec: str | Path) -> tuple[Path, dict[str, str] | None]:
    """A teacher directory, or a Hugging Face hub id (``org/name``, ``org/name@revision``) resolved with
    ``huggingface_hub.snapshot_download``: the directory and, for a hub id, ``{"hub_id", "revision"}``
    (the commit the snapshot is) for the build's records. With ``HF_HUB_OFFLINE=1`` only the local hub
    cache is read. A name that is neither is one line saying so."""
    path = Path(spec)
    text = str(spec)
    if path.is_dir() or path.is_absolute() or text.startswith(".") or text.count("/") != 1:
        if not path.is_dir():
            raise EdgepackError(f"{spec}: no such directory; pass a fine-tuned Hugging Face classifier (a directory "
                                "or a hub id org/name)")
        return path, None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, _, revision = text.partition("@")
    try:
        local = Path(snapshot_download(repo_id, revision=revision or None))
    except (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, OSError) as e:
        raise EdgepackError(f"{spec}: no such directory, and not a hub model this machine can get "
                            f"({type(e).__name__}); pass a directory, or download it first") from None
    return local, {"hub_id": repo_id, "revision": local.name}
