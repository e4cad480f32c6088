"""Student initialisation: a copy of the teacher that keeps some of its layers (and its embeddings and
head), or another small checkpoint with its own tokenizer and a fresh head over the teacher's labels.

DistilBERT took every other layer of BERT; here ``pick_layers`` spreads the kept layers over the
teacher's depth and always keeps the first and the last, so the embeddings still feed the layer they
were trained with and the classifier head still reads the representation it was trained on.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from edgepack.errors import EdgepackError


def parse_layers(spec: str) -> tuple[int, tuple[int, ...]]:
    """``"2"`` -> ``(2, ())`` (a count); ``"0,2,5"`` -> ``(3, (0, 2, 5))`` (explicit indices); ``"0"`` ->
    ``(0, ())``, the static student (no layers: ``edgepack.static_model``).

    >>> parse_layers("0,2,5"), parse_layers("0")
    ((3, (0, 2, 5)), (0, ()))
    """
    spec = spec.strip()
    try:
        if "," in spec:
            idx = tuple(int(s) for s in spec.split(",") if s.strip())
            return len(idx), idx
        count = int(spec)
    except ValueError:
        raise EdgepackError(f"--layers {spec!r}: give a layer count (2) or teacher layer indices (0,2,5)") from None
    if count < 0:
        raise EdgepackError(f"--layers {spec!r}: a layer count is 0 (the static student) or more")
    return count, ()


def pick_layers(n: int, depth: int) -> tuple[int, ...]:
    """``n`` of ``depth`` layer indices, evenly spread, first and last kept.

    >>> pick_layers(2, 6), pick_layers(3, 6), pick_layers(6, 6)
    ((0, 5), (0, 2, 5), (0, 1, 2, 3, 4, 5))
    """
    if n > depth:
        raise EdgepackError(f"--layers {n} is more than the teacher's {depth} layers; choose 1..{depth}")
    if n == 1:
        return (depth - 1,)
    return tuple(sorted({round(i * (depth - 1) / (n - 1)) for i in range(n)}))


def read_id2label(model_dir: Path) -> dict[int, str]:
    """The teacher's ``id2label`` from ``config.json``; refuses the placeholder ``LABEL_0..``."""
    from edgepack.modeling import read_model_info

    return dict(enumerate(read_model_info(model_dir).label_names))

def layer_list(model):
    """(parent module, attribute name, ModuleList) of the transformer blocks of ``model``."""
    import torch

    depth = _depth(model.config)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == depth and depth > 0:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attr, module
    raise EdgepackError(f"{type(model).__name__}: could not find its layer list; use --student DIR instead of --layers")


def _depth(config) -> int:
    for attr in ("num_hidden_layers", "n_layers", "n_layer", "num_layers"):
        v = getattr(config, attr, None)
        if isinstance(v, int):
            return v
    return 0


def from_teacher(teacher, layers: Sequence[int]):
    """A deep copy of ``teacher`` keeping only ``layers`` (in order), with its embeddings and head."""
    import torch

    depth = _depth(teacher.config)
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise EdgepackError(f"--layers {','.join(map(str, layers))}: the teacher has layers 0..{depth - 1} only")
    student = copy.deepcopy(teacher)
    parent, attr, blocks = layer_list(student)
    setattr(parent, attr, torch.nn.ModuleList([blocks[i] for i in layers]))
    for attr_name in ("num_hidden_layers", "n_layers", "n_layer", "num_layers"):
        if isinstance(getattr(student.config, attr_name, None), int):
            setattr(student.config, attr_name, len(layers))
            break
    # Layer indices stored in the blocks (BERT's attention keeps one for its KV cache) follow the new order.
    for new_i, block in enumerate(getattr(parent, attr)):
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_i
    student.config.edgepack_teacher_layers = list(layers)
    return student


def teacher_depth(teacher_dir: Path) -> int:
    """The teacher's layer count from its config (without loading weights)."""
    raw = json.loads((Path(teacher_dir) / "config.json").read_text())
    for attr in ("num_hidden_layers", "n_layers", "n_layer", "num_layers"):
        if isinstance(raw.get(attr), int):
            return raw[attr]
    return 0


def load_teacher(teacher_dir: Path):
    """The teacher classifier, in eval mode (``id2label`` checked first)."""
    from transformers import AutoModelForSequenceClassification

    read_id2label(teacher_dir)
    from edgepack.modeling import no_load_bars

    try:
        with no_load_bars():
            model = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    except (OSError, ValueError, KeyError) as e:
        raise EdgepackError(f"{teacher_dir}: cannot load as a sequence classifier ({_first_line(e)})") from None
    return model.eval()


def load_tokenizer(model_dir: Path, *, what: str = "model"):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EdgepackError(f"{model_dir}: no usable tokenizer for the {what} ({_first_line(e)}); save one with it") from None


def from_checkpoint(student_dir: Path, id2label: Mapping[int, str]):
    """A small checkpoint of any architecture ``AutoModelForSequenceClassification`` knows, with a new
    head over the teacher's labels (an existing head of the same labels is kept)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    student_dir = Path(student_dir)
    if not (student_dir / "config.json").is_file():
        raise EdgepackError(f"--student {student_dir}: no config.json; pass a Hugging Face checkpoint directory")
    try:
        config = AutoConfig.from_pretrained(student_dir)
    except (OSError, ValueError, KeyError) as e:
        raise EdgepackError(f"--student {student_dir}: unreadable config ({_first_line(e)})") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise EdgepackError(
            f"--student {student_dir}: a '{config.model_type}' model has no sequence-classification head in "
            "transformers; pick an encoder checkpoint (bert, distilbert, roberta, ...)"
        )
    labels = {int(k): str(v) for k, v in id2label.items()}
    from edgepack.modeling import no_load_bars

    try:
        with no_load_bars():
            model = AutoModelForSequenceClassification.from_pretrained(
                student_dir, num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()},
                ignore_mismatched_sizes=True,
            )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise EdgepackError(f"--student {student_dir}: cannot load as a sequence classifier ({_first_line(e)})") from None
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
