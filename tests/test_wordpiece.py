"""The shim's WordPiece fast path gives exactly the ids of ``tokenizers`` on every text it covers."""

from __future__ import annotations

import json
import random
import shutil
import string
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from runtime_shim import OnnxPipeline
from runtime_shim.manifest import update_manifest
from runtime_shim.wordpiece import TYPOGRAPHIC, FastWordPiece

HARD = ["", " ", "   leading and trailing   ", "don't stop!!", "$200.50, please?", "a-b_c/d\\e|f~g`h^i",
        "UPPER Case MiXed", "##x ## #", "x" * 100, "y" * 101, "balance" * 20, "12:30pm 6:30 7am", "@#%&*()[]{}<>",
        "set an alarm for 7 am " * 20, "what\u2019s my balance", "\u2018quoted\u2019 \u201cdouble\u201d",
        "a\u2013b \u2014 c\u2026", "it\u2019s\u2019\u2019s", "\u2026"]
UNCOVERED = ["caf\u00e9 au lait", "tab\there", "two\nlines", "[CLS] balance", "my [mask] balance", "\x00", "\u4e2d\u6587"]


def _tokenizer(bundle: Path, max_length: int | None = 64) -> Tokenizer:
    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    if max_length:
        tok.enable_truncation(max_length=max_length)
    return tok


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "     "
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]


def _check(tok: Tokenizer, fast: FastWordPiece, texts: list[str]) -> int:
    covered = 0
    for text in texts:
        ids = fast.encode(text)
        if ids is not None:
            covered += 1
            assert ids == tok.encode(text).ids, text
    return covered


@pytest.mark.parametrize("max_length", [64, 8, 3])
def test_same_ids_as_tokenizers(tiny_bundle: Path, corpus, max_length):
    tok = _tokenizer(tiny_bundle, max_length)
    fast = FastWordPiece.from_tokenizer(tok, max_length)
    assert fast is not None
    texts = [t for rows in corpus.values() for t, _ in rows] + HARD + _random_texts(1500)
    assert _check(tok, fast, texts) == len(texts)  # every one of these is printable ASCII (+ TYPOGRAPHIC)


@pytest.mark.parametrize("max_length", [64, 3])
def test_from_the_file_same_ids(tiny_bundle: Path, corpus, max_length):
    """Built from tokenizer.json itself (what OnnxPipeline does, so tokenizers need not load): the ids of
    the tokenizers library on every covered text, and exactly the texts from_tokenizer covers."""
    tok = _tokenizer(tiny_bundle, max_length)
    fast = FastWordPiece.from_json(json.loads((tiny_bundle / "tokenizer.json").read_text()), max_length)
    assert fast is not None
    texts = [t for rows in corpus.values() for t, _ in rows] + HARD + _random_texts(500, seed=1)
    assert _check(tok, fast, texts) == len(texts)
    assert [fast.encode(t) for t in UNCOVERED] == [None] * len(UNCOVERED)
    assert fast.vocab == tok.get_vocab(with_added_tokens=True)


def test_from_the_file_refuses_what_it_would_guess(tiny_bundle: Path):
    cfg = json.loads((tiny_bundle / "tokenizer.json").read_text())
    assert FastWordPiece.from_json(json.loads(json.dumps(cfg)), 64) is not None
    for part, key in (("model", "continuing_subword_prefix"), ("model", "max_input_chars_per_word"),
                      ("model", "unk_token"), ("normalizer", "lowercase")):
        broken = json.loads(json.dumps(cfg))
        del broken[part][key]  # tokenizers would fill in its default; the fast path does not guess it
        assert FastWordPiece.from_json(broken, 64) is None, key
    assert FastWordPiece.from_json({**cfg, "pre_tokenizer": {"type": "Whitespace"}}, 64) is None


def test_uncovered_texts_fall_back(tiny_bundle: Path):
    fast = FastWordPiece.from_tokenizer(_tokenizer(tiny_bundle), 64)
    assert [fast.encode(t) for t in UNCOVERED] == [None] * len(UNCOVERED)


def test_tokens_sharing_a_row(tiny_bundle: Path, tmp_path):
    """Vocabulary pruning with clustering maps many tokens to one id; those tokens must still be found."""
    cfg = json.loads((tiny_bundle / "tokenizer.json").read_text())
    vocab = cfg["model"]["vocab"]
    shared = vocab["balance"]
    for word in ("zebra", "quokka", "##ish", *TYPOGRAPHIC):  # typographic punctuation found, not [UNK]
        vocab[word] = shared
    (tmp_path / "tokenizer.json").write_text(json.dumps(cfg))
    tok = _tokenizer(tmp_path)
    fast = FastWordPiece.from_tokenizer(tok, 64)
    texts = ["zebra balance", "a quokka", "quokkaish zebras", "zebra\u2019s \u201cquokka\u201d\u2026", *HARD]
    assert _check(tok, fast, texts) == len(texts)
    assert fast.encode("zebra")[1] == shared
    from_file = FastWordPiece.from_json(json.loads((tmp_path / "tokenizer.json").read_text()), 64)
    assert _check(tok, from_file, texts) == len(texts)


def test_other_tokenizers_are_not_claimed(tiny_bundle: Path):
    tok = _tokenizer(tiny_bundle)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # splits differently from BertPreTokenizer
    assert FastWordPiece.from_tokenizer(tok, 64) is None
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    assert FastWordPiece.from_tokenizer(bpe, 64) is None


def test_pipeline_uses_it_and_can_turn_it_off(tiny_bundle: Path, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    fast = OnnxPipeline(bundle)
    slow = OnnxPipeline(bundle, overrides={"fast_wordpiece": False})
    assert fast.fast_wordpiece is not None and slow.fast_wordpiece is None
    for text in HARD + UNCOVERED:
        a, b = fast.encode([text]), slow.encode([text])
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name].dtype == b[name].dtype and a[name].tolist() == b[name].tolist(), (text, name)
        assert fast(text) == slow(text)
    for batch in (HARD, HARD[:3] + UNCOVERED[:1], ["hi", "set an alarm for 7 am " * 20]):  # padded batches too
        a, b = fast.encode(batch), slow.encode(batch)
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name].dtype == b[name].dtype and a[name].tolist() == b[name].tolist(), (batch, name)
        assert fast(batch) == slow(batch)
    runtime = json.loads((bundle / "runtime.json").read_text())
    (bundle / "runtime.json").write_text(json.dumps({**runtime, "fast_wordpiece": False}))
    update_manifest(bundle)
    assert OnnxPipeline(bundle).fast_wordpiece is None
