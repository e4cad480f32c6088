"""Vocabulary trimming: keep only the tokens a task uses, rewrite the embedding matrix and
``tokenizer.json`` together with one id remap.

On a small student most bytes are the embedding table (30,522 x 384 for an uncased BERT vocabulary:
11.7M of MiniLM-L6's 22.7M parameters). A task corpus uses a few thousand of those rows. We keep:

* every token the training corpus produces (after the tokenizer's own post-processing),
* every added/special token and the unknown token,
* single-character pieces and their continuation forms (``a`` and ``##a`` for WordPiece; the base
  alphabet for BPE) so a word the corpus lacks still tokenizes, only more finely, instead of becoming
  ``[UNK]``: every one (``keep_chars="all"``), those of the characters the corpus itself uses after
  the tokenizer's normalizer and pre-tokenizer (``"data"``, any script) or those of Latin script
  (``"latin"``, for a corpus in a Latin-script language),
* optionally the first ``keep_top`` tokens of the original vocabulary order (BERT's WordPiece and BPE
  vocabularies are ordered roughly by frequency), for robustness to words the corpus lacks.

New ids keep the original relative order, so ``[PAD]`` (id 0 in BERT) stays 0. Only ``tokenizers``
JSON with a WordPiece or BPE model is accepted: a Unigram/WordLevel vocabulary has no character
fallback with the same guarantee.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import EdgepackError

SUPPORTED_MODELS = ("WordPiece", "BPE")
_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_PLACEHOLDER = re.compile(r"^\[unused\d+\]$")


def read_tokenizer_json(model_dir: Path) -> dict[str, Any]:
    """The parsed ``tokenizer.json`` of ``model_dir``; refuses anything but WordPiece/BPE ``tokenizers`` JSON."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise EdgepackError(f"{model_dir}: no tokenizer.json; vocabulary trimming needs a `tokenizers` "
                            "(fast) tokenizer, save one with tokenizer.save_pretrained() or pass --no-trim-vocab")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgepackError(f"{path}: not a `tokenizers` JSON file ({type(e).__name__}); "
                            "give a WordPiece or BPE tokenizer.json or pass --no-trim-vocab") from None
    kind = data.get("model", {}).get("type") if isinstance(data, dict) and isinstance(data.get("model"), dict) else None
    if kind not in SUPPORTED_MODELS:
        raise EdgepackError(f"{path}: tokenizer model is {kind or 'unknown'}; vocabulary trimming supports "
                            f"{' and '.join(SUPPORTED_MODELS)} `tokenizers` JSON only (or pass --no-trim-vocab)")
    return data


def _tokenizer(tok_json: dict[str, Any]):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(tok_json))


def _full_vocab(tok_json: dict[str, Any]) -> dict[str, int]:
    vocab = dict(tok_json["model"]["vocab"])
    for t in tok_json.get("added_tokens") or ():
        vocab[t["content"]] = t["id"]
    return vocab


def _merge_pairs(merges: Iterable[Any]) -> list[tuple[str, str]]:
    out = []
    for m in merges:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        out.append((a, b))
    return out


def _merged(model: dict[str, Any], a: str, b: str) -> str:
    prefix = model.get("continuing_subword_prefix") or ""
    return a + (b[len(prefix):] if prefix and b.startswith(prefix) else b)


CHAR_SETS = ("all", "data", "latin")
_LATIN_END = 0x250  # ASCII, Latin-1 Supplement, Latin Extended-A and -B


def corpus_chars(tok_json: dict[str, Any], texts: Iterable[str]) -> set[str]:
    """The characters of ``texts`` as the tokenizer's model sees them: after its normalizer (BERT's
    lowercases and strips accents) and pre-tokenizer (a byte-level one maps every byte to one of 256
    symbols), so they compare with the vocabulary's character pieces in any script.

    Example (BERT's uncased normalizer: 'Ё' becomes 'е'):
        >>> from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
        >>> tok = Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]"))
        >>> tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        >>> tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        >>> sorted(corpus_chars(json.loads(tok.to_str()), ["Ёлка в 北京"]))
        ['а', 'в', 'е', 'к', 'л', '京', '北']
    """
    tok = _tokenizer(tok_json)
    norm, pre = tok.normalizer, tok.pre_tokenizer
    chars: set[str] = set()
    for text in set(texts):
        s = norm.normalize_str(text) if norm is not None else text
        for word, _ in (pre.pre_tokenize_str(s) if pre is not None else [(s, None)]):
            chars.update(word)
    return chars


def _byte_level(tok_json: dict[str, Any]) -> bool:
    """True when a ByteLevel pre-tokenizer maps text to bytes: its 256-symbol alphabet spells every
    text, so all of it is kept (a missing byte symbol would silently drop characters, no [UNK])."""
    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(walk(v) for v in node.values())
        return isinstance(node, list) and any(walk(v) for v in node)

    return walk(tok_json.get("pre_tokenizer"))


def _char_pieces(model: dict[str, Any], which: str = "all", chars: set[str] | None = None) -> set[str]:
    """Tokens that let any word still tokenize: single characters and their continuation forms
    (``which="latin"``: only those of Latin script, for a corpus in a Latin-script language;
    ``"data"``: only those of ``chars``, the corpus's own characters in any script)."""
    prefix = model.get("continuing_subword_prefix") or ""
    suffix = model.get("end_of_word_suffix") or ""
    keep = set()
    for tok in model["vocab"]:
        core = tok
        if prefix and core.startswith(prefix):
            core = core[len(prefix):]
        if suffix and core.endswith(suffix):
            core = core[: -len(suffix)]
        wanted = len(core) == 1 and (which == "all" or (which == "latin" and ord(core) < _LATIN_END)
                                     or (which == "data" and chars is not None and core in chars))
        if wanted or _BYTE_FALLBACK.match(tok):
            keep.add(tok)
    return keep


def select_tokens(tok_json: dict[str, Any], texts: Sequence[str], *, keep_top: int = 0, keep_chars: str = "all",
                  batch: int = 4096) -> np.ndarray:
    """Old ids to keep, ascending (the new id of a kept token is its index in this array).

    ``keep_chars="data"`` keeps the character pieces of the characters ``texts`` use (any script; a
    byte-level BPE keeps its whole 256-symbol alphabet): a new word spelled with them still tokenizes,
    one with a character the corpus never has becomes ``[UNK]``. ``"latin"`` keeps Latin-script
    pieces: a word in another script becomes ``[UNK]``, and BERT's uncased vocabulary saves ~1,770
    rows against ``"all"``."""
    if not texts:
        raise EdgepackError("the training corpus is empty; vocabulary trimming needs the texts the model will see")
    model = tok_json["model"]
    vocab = _full_vocab(tok_json)
    if keep_top < 0 or keep_top > len(vocab):
        raise EdgepackError(f"--keep-top {keep_top} is outside the vocabulary (0..{len(vocab)})")
    tok = _tokenizer(tok_json)
    used: set[int] = set()
    for i in range(0, len(texts), batch):
        for enc in tok.encode_batch(list(texts[i:i + batch])):
            used.update(enc.ids)
    keep = set(used)
    if keep_chars not in CHAR_SETS:
        raise EdgepackError(f"--keep-chars {keep_chars!r}; choose one of: {', '.join(CHAR_SETS)}")
    which = "all" if keep_chars == "data" and _byte_level(tok_json) else keep_chars
    chars = corpus_chars(tok_json, texts) if which == "data" else None
    keep.update(vocab[t] for t in _char_pieces(model, which, chars))
    keep.update(t["id"] for t in tok_json.get("added_tokens") or ())
    unk = model.get("unk_token")
    if unk is not None and unk in vocab:
        keep.add(vocab[unk])
    # BERT's [unused0]..[unused993] sit among the first ids but no text ever produces them.
    keep.update(i for t, i in vocab.items() if i < keep_top and not _PLACEHOLDER.match(t))
    if model["type"] == "BPE":
        keep = _bpe_closure(model, keep, vocab)
    return np.asarray(sorted(keep), dtype=np.int64)


def _bpe_closure(model: dict[str, Any], keep: set[int], vocab: dict[str, int]) -> set[int]:
    # A BPE token is built by a chain of merges; every intermediate must survive or the chain breaks.
    # Merges that never fire on kept tokens may go: the lowest-ranked applicable merge at each step is
    # then the same as before, so kept words tokenize identically.
    parents = {}
    for a, b in _merge_pairs(model.get("merges") or ()):
        parents.setdefault(_merged(model, a, b), (a, b))
    inv = {i: t for t, i in vocab.items()}
    todo = [inv[i] for i in keep if i in inv]
    out = set(keep)
    while todo:
        t = todo.pop()
        for p in parents.get(t, ()):
            if p in vocab and vocab[p] not in out:
                out.add(vocab[p])
                todo.append(p)
    return out


def remap_tokenizer_json(tok_json: dict[str, Any], keep_ids: np.ndarray) -> dict[str, Any]:
    """A copy of ``tok_json`` holding only ``keep_ids``, renumbered ``0..len(keep_ids)-1``."""
    remap = {int(old): new for new, old in enumerate(keep_ids)}
    out = json.loads(json.dumps(tok_json))
    model = out["model"]
    model["vocab"] = {t: remap[i] for t, i in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if i in remap}
    if model["type"] == "BPE":
        kept = set(model["vocab"])
        merges = []
        for m in model.get("merges") or ():
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            if a in kept and b in kept and _merged(model, a, b) in kept:
                merges.append(m)
        model["merges"] = merges
    added = []
    for t in out.get("added_tokens") or ():
        t = dict(t)
        t["id"] = remap[t["id"]]
        added.append(t)
    out["added_tokens"] = added
    if out.get("post_processor"):
        out["post_processor"] = _remap_processor(out["post_processor"], remap)
    if isinstance(out.get("padding"), dict) and "pad_id" in out["padding"]:
        out["padding"]["pad_id"] = remap.get(out["padding"]["pad_id"], 0)
    return out


def _remap_processor(proc: Any, remap: dict[int, int]) -> Any:
    if isinstance(proc, list):
        return [_remap_processor(p, remap) for p in proc]
    if not isinstance(proc, dict):
        return proc
    proc = dict(proc)
    kind = proc.get("type")
    if kind == "TemplateProcessing":
        proc["special_tokens"] = {
            k: {**v, "ids": [remap[i] for i in v["ids"]]} for k, v in proc.get("special_tokens", {}).items()
        }
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            tok, i = proc[key]
            proc[key] = [tok, remap[i]]
    elif kind == "Sequence":
        proc["processors"] = _remap_processor(proc.get("processors", []), remap)
    return proc


def trim_embeddings(model, keep_ids: np.ndarray) -> None:
    """Keep rows ``keep_ids`` of the input (and, if any, output) embedding; update the config."""
    import torch

    emb = model.get_input_embeddings()
    idx = torch.as_tensor(keep_ids, dtype=torch.long)
    remap = {int(old): new for new, old in enumerate(keep_ids)}
    pad = model.config.pad_token_id
    new_pad = remap.get(int(pad)) if pad is not None else None
    new = torch.nn.Embedding(len(keep_ids), emb.embedding_dim, padding_idx=new_pad)
    with torch.no_grad():
        new.weight.copy_(emb.weight[idx])
    model.set_input_embeddings(new)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None and out_emb.weight.shape[0] == emb.weight.shape[0]:
        with torch.no_grad():
            out_emb.weight = torch.nn.Parameter(out_emb.weight[idx].clone())
            if getattr(out_emb, "bias", None) is not None:
                out_emb.bias = torch.nn.Parameter(out_emb.bias[idx].clone())
        out_emb.out_features = len(keep_ids)
    model.config.vocab_size = len(keep_ids)
    model.config.pad_token_id = new_pad
    for name in ("bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
        v = getattr(model.config, name, None)
        if isinstance(v, int) and v in remap:
            setattr(model.config, name, remap[v])


def trim_positions(model, max_positions: int) -> None:
    """Keep the first ``max_positions`` rows of absolute position embeddings (queries are short)."""
    import torch

    emb = model.base_model.embeddings
    pos = emb.position_embeddings
    if max_positions > pos.num_embeddings:
        raise EdgepackError(f"--max-positions {max_positions} is larger than the model's "
                            f"{pos.num_embeddings} positions; give at most {pos.num_embeddings}")
    new = torch.nn.Embedding(max_positions, pos.embedding_dim)
    with torch.no_grad():
        new.weight.copy_(pos.weight[:max_positions])
    emb.position_embeddings = new
    for buf in ("position_ids", "token_type_ids"):
        b = getattr(emb, buf, None)
        if isinstance(b, torch.Tensor) and b.dim() == 2 and b.shape[1] > max_positions:
            emb.register_buffer(buf, b[:, :max_positions].clone(), persistent=False)
    model.config.max_position_embeddings = max_positions


def cluster_rest(weights: np.ndarray, dropped: np.ndarray, clusters: int, *, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """k-means of the dropped tokens' embedding rows: ``(centroids [k, d], cluster of each dropped id)``.

    A dropped word then keeps (approximately) its own embedding, one row shared with similar words,
    instead of being spelled out in character pieces the model rarely saw: the tokenizer still splits
    it the same way, only its id changes. Plain Lloyd iterations from a seeded sample, in numpy; every
    dropped token ends up on its nearest final centroid."""
    x = weights[dropped].astype(np.float32)
    k = min(clusters, len(dropped))
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(len(x), size=k, replace=False)].copy()
    sq = (x * x).sum(1)

    def nearest() -> np.ndarray:
        return (sq[:, None] - 2.0 * (x @ centroids.T) + (centroids * centroids).sum(1)[None, :]).argmin(1)

    assign = nearest()
    for _ in range(20):
        counts = np.bincount(assign, minlength=k)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        new = nearest()
        if np.array_equal(new, assign):
            break
        assign = new
    return centroids, assign


def trim_vocab(model, tok_json: dict[str, Any], texts: Sequence[str], *, keep_top: int = 0, keep_chars: str = "all",
               clusters: int = 0, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trim ``model`` (in place) and return ``(new tokenizer JSON, report)``.

    ``clusters > 0`` folds the dropped tokens into that many shared rows (:func:`cluster_rest`)
    instead of removing them from the tokenizer."""
    import torch

    keep = select_tokens(tok_json, texts, keep_top=keep_top, keep_chars=keep_chars)
    emb = model.get_input_embeddings()
    if emb.weight.shape[0] < int(keep.max()) + 1:
        raise EdgepackError(f"the tokenizer has ids up to {int(keep.max())} but the model's embedding has "
                            f"{emb.weight.shape[0]} rows; model and tokenizer do not belong together")
    before = tuple(emb.weight.shape)
    new_json = remap_tokenizer_json(tok_json, keep)
    pieces = _char_pieces(tok_json["model"], "all")
    kept_pieces = sum(1 for t in pieces if t in new_json["model"]["vocab"])
    folded = 0
    if clusters > 0:
        vocab = tok_json["model"]["vocab"]
        kept = set(int(i) for i in keep)
        dropped_tokens = [(t, i) for t, i in vocab.items()
                          if i not in kept and not _PLACEHOLDER.match(t) and i < emb.weight.shape[0]]
        if dropped_tokens:
            dropped = np.asarray([i for _, i in dropped_tokens], dtype=np.int64)
            centroids, assign = cluster_rest(emb.weight.detach().float().numpy(), dropped, clusters, seed=seed)
            base = len(keep)
            for (tok, _), c in zip(dropped_tokens, assign, strict=True):
                new_json["model"]["vocab"][tok] = base + int(c)
            folded = len(dropped_tokens)
    trim_embeddings(model, keep)
    if folded:
        old = model.get_input_embeddings()
        new = torch.nn.Embedding(old.num_embeddings + len(centroids), old.embedding_dim, padding_idx=old.padding_idx)
        with torch.no_grad():
            new.weight[: old.num_embeddings].copy_(old.weight)
            new.weight[old.num_embeddings:].copy_(torch.as_tensor(centroids, dtype=old.weight.dtype))
        model.set_input_embeddings(new)
        model.config.vocab_size = new.num_embeddings
    after = tuple(model.get_input_embeddings().weight.shape)
    report = {
        "vocab_before": before[0], "vocab_after": after[0],
        "embedding_params_before": before[0] * before[1], "embedding_params_after": after[0] * after[1],
        "embedding_reduction": round(1 - after[0] / before[0], 4),
        "keep_top": keep_top, "keep_chars": keep_chars, "clusters": clusters, "tokens_folded": folded,
        # rows_kept: the tokens that keep their own row (ids below it); the rest of vocab_after are folded rows
        "rows_kept": len(keep), "char_pieces_kept": kept_pieces, "char_pieces_before": len(pieces),
    }
    return new_json, report


def save_tokenizer(src: Path, out: Path, new_json: dict[str, Any], *, model_max_length: int | None = None) -> None:
    """Write the trimmed ``tokenizer.json`` into ``out`` with the companion files of ``src`` made consistent."""
    out = Path(out)
    # UTF-8 whatever the locale: the vocabulary holds every script the teacher's does.
    (out / "tokenizer.json").write_text(json.dumps(new_json, ensure_ascii=False, indent=2), encoding="utf-8")
    vocab = new_json["model"]["vocab"]
    inv = sorted(vocab, key=vocab.get)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = Path(src) / name
        if not p.is_file():
            continue
        data = json.loads(p.read_text(encoding="utf-8"))
        if name == "tokenizer_config.json":
            added = {t["content"]: t["id"] for t in new_json.get("added_tokens") or ()}
            dec = data.get("added_tokens_decoder")
            if isinstance(dec, dict):
                data["added_tokens_decoder"] = {str(added[v["content"]]): v for v in dec.values() if v.get("content") in added}
            if model_max_length is not None:
                data["model_max_length"] = min(int(data.get("model_max_length") or model_max_length), model_max_length)
        (out / name).write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    # Slow-tokenizer files would silently disagree with the new ids: rewrite them from the new vocabulary.
    # Folded vocabularies (several tokens on one id) have no vocab.txt form: tokenizer.json only.
    if (Path(src) / "vocab.txt").is_file() and new_json["model"]["type"] == "WordPiece" \
            and len(set(vocab.values())) == len(vocab):
        (out / "vocab.txt").write_text("".join(t + "\n" for t in inv), encoding="utf-8")
    if new_json["model"]["type"] == "BPE":
        if (Path(src) / "vocab.json").is_file():
            (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        if (Path(src) / "merges.txt").is_file():
            lines = [m if isinstance(m, str) else " ".join(m) for m in new_json["model"].get("merges") or ()]
            (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in lines), encoding="utf-8")
