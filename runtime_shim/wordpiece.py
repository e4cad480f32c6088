"""An exact fast path for BERT WordPiece on one plain-ASCII query: the same ids as ``tokenizers``.

A single short query spends 15-16 us in ``Tokenizer.encode`` (normalizer, pre-tokenizer, model,
post-processor and the offsets, types and masks it also builds), against about 2 us here: one regex
split, one vocabulary lookup per word (words of several pieces are cached) and the two special ids.
On CLINC150's 1-layer bundle those 13 us are a fifth of the end-to-end single-query latency.

It is used only where it provably gives the ``tokenizers`` answer:

- the tokenizer is a BERT one: ``BertNormalizer``, ``BertPreTokenizer``, a ``WordPiece`` model and a
  ``[CLS] $A [SEP]`` post-processor (``TemplateProcessing`` or ``BertProcessing``), right truncation;
  :meth:`FastWordPiece.from_tokenizer` returns None for anything else;
- the text is printable ASCII (``str.isascii() and str.isprintable()``, so no tabs, newlines or control
  characters), possibly with the typographic punctuation in ``TYPOGRAPHIC`` (curly quotes, dashes, the
  ellipsis: 28 of CLINC150's 23,850 texts hold a curly apostrophe, and no other non-ASCII character),
  and holds none of the tokenizer's added tokens (``[CLS]``, ``[MASK]``...);
  :meth:`FastWordPiece.encode` returns None otherwise and the caller uses ``tokenizers``.

On printable ASCII the normalizer does nothing but lowercase (no accents, controls or CJK to touch),
and the pre-tokenizer splits on spaces and makes every other non-alphanumeric character a word of its
own (all 32 of them are ASCII punctuation): the regex below. The ``TYPOGRAPHIC`` characters are Unicode
punctuation (category P*) without a canonical decomposition or a lowercase form, so the normalizer
leaves them as they are and the pre-tokenizer splits each off as a word of its own, like ASCII
punctuation: the same regex. Each word then goes through WordPiece's greedy longest match, as
``tokenizers`` does it, and the result is cached per word.
"""

from __future__ import annotations

import json
import re
from typing import Any

TYPOGRAPHIC = frozenset("\u2018\u2019\u201c\u201d\u2013\u2014\u2026")  # ‘ ’ “ ” – — …
CACHE_WORDS = 65536  # words remembered; past this, new words are looked up every time
_SPLIT = {True: re.compile(r"[a-z0-9]+|[^ a-z0-9]").findall,  # after lowercasing
          False: re.compile(r"[A-Za-z0-9]+|[^ A-Za-z0-9]").findall}


def _special_pair(post: dict[str, Any] | None) -> tuple[str, str] | None:
    """The (first, last) special tokens of a ``[X] $A [Y]`` single-sequence post-processor, else None."""
    if not post:
        return None
    if post.get("type") == "BertProcessing":
        return post["cls"][0], post["sep"][0]
    if post.get("type") != "TemplateProcessing":
        return None
    single = post.get("single") or []
    if (len(single) != 3 or "SpecialToken" not in single[0] or "Sequence" not in single[1]
            or "SpecialToken" not in single[2]):
        return None
    return single[0]["SpecialToken"]["id"], single[2]["SpecialToken"]["id"]


class FastWordPiece:
    """``encode(text) -> ids`` for the texts it covers (else None); build with :meth:`from_tokenizer`.

    Example:
        >>> from tokenizers import Tokenizer  # doctest: +SKIP
        >>> tok = Tokenizer.from_file("bundle/tokenizer.json")  # doctest: +SKIP
        >>> fast = FastWordPiece.from_tokenizer(tok, max_length=64)  # doctest: +SKIP
        >>> fast.encode("what's my balance") == tok.encode("what's my balance").ids  # doctest: +SKIP
        True
    """

    def __init__(self, vocab: dict[str, int], *, unk: str, prefix: str, max_chars: int, first: int, last: int,
                 lowercase: bool, max_length: int | None, added: list[str]):
        self.vocab = vocab
        self.unk_id = vocab[unk]
        self.prefix = prefix
        self.max_chars = max_chars
        self.first, self.last = first, last
        self.lowercase = lowercase
        self.keep = None if max_length is None else max(0, max_length - 2)  # room for the two specials
        # Compared lowercased with the lowercased text: a superset of the matches tokenizers makes. Their
        # first characters are looked for first (BERT's all start with "["): one search on most texts.
        self.added = [a.lower() for a in added if a]
        self.added_first = tuple(sorted({a[0] for a in self.added}))
        # A word longer than max_chars is [UNK] for tokenizers; when no vocabulary entry is that long, the
        # whole-word lookup needs no length check (a longer word finds nothing).
        self.long_entries = any(len(t) > max_chars for t in vocab)
        self.split = _SPLIT[lowercase]
        self.cache: dict[str, list[int]] = {}

    @classmethod
    def from_tokenizer(cls, tokenizer, max_length: int | None) -> FastWordPiece | None:
        """The fast path for ``tokenizer`` (a ``tokenizers.Tokenizer``) truncating to ``max_length``
        tokens, or None when its pipeline is not the BERT one this module reproduces."""
        # get_vocab(), not the serialized model: to_str() keeps one token per id, so tokens that share
        # a row (edgepack's clustered vocabulary) would be missing from it.
        return cls._from_config(json.loads(tokenizer.to_str()), tokenizer.get_vocab(with_added_tokens=True),
                                max_length)

    @classmethod
    def from_json(cls, cfg: dict[str, Any], max_length: int | None) -> FastWordPiece | None:
        """The fast path for a ``tokenizer.json`` already parsed (``json.load``) that a ``tokenizers.Tokenizer``
        truncating to ``max_length`` would load; None when it is not the BERT pipeline, or leaves out a
        setting whose default this module would have to guess. With ``max_length`` given, the file's own
        truncation is ignored (the pipeline sets its own, as ``from_tokenizer`` sees it). Takes the vocabulary dict from ``cfg`` without copying it (the file's
        ``model.vocab`` lists every token, those sharing a row included).

        Building from the file, not from a loaded ``Tokenizer``, is what lets ``OnnxPipeline`` defer
        loading ``tokenizers`` until a text needs it: ~10 MB of peak memory (docs/memory.md).

        Example:
            >>> fast = FastWordPiece.from_json(json.load(open("bundle/tokenizer.json")), 64)  # doctest: +SKIP
            >>> tok = Tokenizer.from_file("bundle/tokenizer.json")  # doctest: +SKIP
            >>> tok.enable_truncation(max_length=64)  # doctest: +SKIP
            >>> fast.encode("what's my balance") == tok.encode("what's my balance").ids  # doctest: +SKIP
            True
        """
        model, norm = cfg.get("model"), cfg.get("normalizer")
        if not isinstance(model, dict) or not isinstance(norm, dict) or not isinstance(model.get("vocab"), dict):
            return None
        if any(key not in model for key in ("unk_token", "continuing_subword_prefix", "max_input_chars_per_word")) \
                or "lowercase" not in norm:
            return None
        vocab = model["vocab"]
        if not all(isinstance(v, int) for v in vocab.values()):
            return None
        canonical: dict[int, int] = {}
        for token, i in vocab.items():  # one int object per id: clustered tokens share rows (-0.7 MB on CLINC150)
            vocab[token] = canonical.setdefault(i, i)
        for added in cfg.get("added_tokens") or []:  # get_vocab(with_added_tokens=True): added ids win
            if not isinstance(added, dict) or not isinstance(added.get("content"), str) \
                    or not isinstance(added.get("id"), int):
                return None
            vocab[added["content"]] = added["id"]
        return cls._from_config(cfg if max_length is None else {**cfg, "truncation": None}, vocab, max_length)

    @classmethod
    def _from_config(cls, cfg: dict[str, Any], vocab: dict[str, int], max_length: int | None) -> FastWordPiece | None:
        norm, pre, model = cfg.get("normalizer") or {}, cfg.get("pre_tokenizer") or {}, cfg.get("model") or {}
        trunc = cfg.get("truncation")
        if norm.get("type") != "BertNormalizer" or pre.get("type") != "BertPreTokenizer":
            return None
        if model.get("type") != "WordPiece" or trunc and (trunc.get("direction") != "Right" or trunc.get("stride")):
            return None
        pair = _special_pair(cfg.get("post_processor"))
        if pair is None or pair[0] not in vocab or pair[1] not in vocab or model.get("unk_token") not in vocab:
            return None
        limit = (trunc or {}).get("max_length") if max_length is None else max_length
        return cls(vocab, unk=model["unk_token"], prefix=model.get("continuing_subword_prefix") or "",
                   max_chars=int(model.get("max_input_chars_per_word") or 100), first=vocab[pair[0]],
                   last=vocab[pair[1]], lowercase=bool(norm.get("lowercase", True)), max_length=limit,
                   added=[a.get("content", "") for a in cfg.get("added_tokens") or []])

    def word_ids(self, word: str) -> list[int]:
        """WordPiece's greedy longest match on one pre-tokenized word (``[UNK]`` alone if any part fails)."""
        if len(word) > self.max_chars:
            return [self.unk_id]
        vocab, ids, start, n = self.vocab, [], 0, len(word)
        while start < n:
            end, found = n, None
            while start < end:
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                found = vocab.get(piece)
                if found is not None:
                    break
                end -= 1
            if found is None:
                return [self.unk_id]
            ids.append(found)
            start = end
        return ids

    def encode(self, text: str) -> list[int] | None:
        """The ids ``tokenizers`` gives ``text`` (specials included, truncated), or None if not covered."""
        if not (text.isascii() and text.isprintable()) and not (
                text.isprintable() and all(c.isascii() or c in TYPOGRAPHIC for c in text)):
            return None
        lowered = text.lower()
        for first in self.added_first:
            if first in lowered:
                if any(token in lowered for token in self.added):
                    return None
                break
        ids = [self.first]
        append, cache, get, max_chars = ids.append, self.cache, self.vocab.get, self.max_chars
        check_length = self.long_entries
        for word in self.split(lowered if self.lowercase else text):
            whole = get(word) if not check_length or len(word) <= max_chars else None
            if whole is not None:  # most words are one piece: no cache needed, none to warm up
                append(whole)
                continue
            pieces = cache.get(word)
            if pieces is None:
                pieces = self.word_ids(word)
                if len(cache) < CACHE_WORDS:
                    cache[word] = pieces
            ids += pieces
        if self.keep is not None and len(ids) > self.keep + 1:
            del ids[self.keep + 1:]
        ids.append(self.last)
        return ids
