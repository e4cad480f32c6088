"""A dataset in Russian, Chinese, Japanese and a mix of them, with no out-of-scope label, built by
`edgepack build` with the default recipe: no character of its texts becomes [UNK] in the bundle's
tokenizer, the pruned vocabulary keeps a row of its own for each, the bundle predicts, and the old
Latin-only character set would have lost them."""

from __future__ import annotations

import itertools
import json
import random
import unicodedata
from pathlib import Path

import pytest

from edgepack import vocab
from edgepack.cli import main

# Cyrillic words (merged into whole-word pieces, so their letters' pieces go unused by the training
# texts), Chinese (BERT splits every Han character off alone), Japanese kana (BERT does not split them)
# and a mixed intent; 'ё' and 'й' are rewritten by the uncased normalizer (accent stripping).
INTENTS = {
    "баланс": ["какой баланс на {acct}", "сколько денег на {acct}", "покажи остаток на {acct}",
               "проверь {acct} пожалуйста", "мой баланс на {acct} сейчас"],
    "天气": ["{city}明天天气怎么样", "{city}今天会下雨吗", "{city}的气温是多少", "{city}这周天气预报",
           "{city}冷不冷"],
    "アラーム": ["{time}にアラームをセットして", "{time}に起こして", "{time}のアラームを消して",
             "アラームを{time}に変更して", "{time}に目覚ましをお願い"],
    "перевод": ["перевести {amt} на 储蓄 счёт", "отправь {amt} маме", "转账 {amt} на карту",
                "перевод {amt} в 上海", "send {amt} мой друг"],
}
FILL = {"acct": ["счёте", "карте", "вкладе", "кошельке"], "city": ["北京", "上海", "广州", "成都"],
        "time": ["七時", "正午", "六時半", "深夜"], "amt": ["100 рублей", "50 юаней", "$200", "十元"]}
# Characters the teacher's vocabulary holds that the data never uses (a multilingual teacher's).
EXTRA_ALPHABET = ["α", "β", "γ", "ß", "ש", "ก"]

def _rows() -> list[tuple[str, str]]:
    rows = []
    for label, templates in INTENTS.items():
        for t in templates:
            for i in range(4):
                rows.append((t.format(**{k: v[(i + j) % len(v)] for j, (k, v) in enumerate(FILL.items())}), label))
    random.Random(0).shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def splits() -> dict[str, list[tuple[str, str]]]:
    out = {"train": [], "validation": [], "test": []}
    rows = _rows()
    for label in INTENTS:
        mine = [r for r in rows if r[1] == label]
        out["train"] += mine[:12]
        out["validation"] += mine[12:16]
        out["test"] += mine[16:]
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, splits) -> Path:
    from tiny import make_tiny_classifier

    names = sorted(INTENTS)
    texts = [t for t, _ in splits["train"]]
    return make_tiny_classifier(tmp_path_factory.mktemp("nonlatin") / "teacher", texts,
                                [names.index(lab) for _, lab in splits["train"]], names, steps=40,
                                alphabet=EXTRA_ALPHABET)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, splits) -> Path:
    """The splits as JSON lines in UTF-8 (raw characters, not \\u escapes)."""
    root = tmp_path_factory.mktemp("nonlatin-data")
    for split, rows in splits.items():
        (root / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": t, "label": lab}, ensure_ascii=False) + "\n" for t, lab in rows),
            encoding="utf-8")
    return root


def _chars(splits) -> set[str]:
    return {c for rows in splits.values() for t, _ in rows for c in t if not c.isspace()}


def _unknown(tok, text: str) -> bool:
    return tok.token_to_id("[UNK]") in tok.encode(text).ids


def _trimmed(tok_json: dict, texts: list[str], keep_chars: str):
    from tokenizers import Tokenizer

    keep = vocab.select_tokens(tok_json, texts, keep_chars=keep_chars)
    return Tokenizer.from_str(json.dumps(vocab.remap_tokenizer_json(tok_json, keep)))


def test_the_dataset_needs_more_than_latin(splits):
    chars = _chars(splits)
    assert any("CYRILLIC" in unicodedata.name(c) for c in chars) and any("CJK" in unicodedata.name(c) for c in chars)
    assert any("KATAKANA" in unicodedata.name(c) or "HIRAGANA" in unicodedata.name(c) for c in chars)
    # Every character of validation and test is in the training texts: "data" keeps pieces for those.
    train = {c for t, _ in splits["train"] for c in t}
    assert chars <= train


def test_latin_loses_the_characters_data_keeps(teacher, splits):
    """The old default's character set, without folded rows, on this tokenizer: Cyrillic and kana
    characters whose pieces no training word used become [UNK], and so does a new word spelled with
    them; "data" keeps every one, and drops the teacher's characters the data never uses."""
    from tokenizers import Tokenizer

    tok_json = vocab.read_tokenizer_json(teacher)
    texts = [t for t, _ in splits["train"]]
    latin, data, every = (_trimmed(tok_json, texts, k) for k in ("latin", "data", "all"))
    chars = sorted(_chars(splits))
    lost = [c for c in chars if _unknown(latin, c)]
    assert any("CYRILLIC" in unicodedata.name(c) for c in lost), lost
    assert any("KATAKANA" in unicodedata.name(c) or "HIRAGANA" in unicodedata.name(c) for c in lost), lost
    assert not [c for c in chars if _unknown(data, c)]
    # Words no training text has, spelled with the training texts' letters (two words run together):
    # the ones the teacher's tokenizer spells without [UNK] keep their spelling under "data" only.
    whole = Tokenizer.from_str(json.dumps(tok_json))
    words = sorted({w for t in texts for w in t.split() if all("CYRILLIC" in unicodedata.name(c) for c in w)})
    new = [a + b for a, b in itertools.permutations(words, 2)
           if all(a + b not in t for t in texts) and not _unknown(whole, a + b)]
    assert new and not [w for w in new if _unknown(data, w)]
    assert [w for w in new if _unknown(latin, w)]
    assert not [c for c in EXTRA_ALPHABET if _unknown(every, c)]
    assert [c for c in EXTRA_ALPHABET if _unknown(data, c)] == EXTRA_ALPHABET
    assert data.get_vocab_size() < every.get_vocab_size()


def test_default_build_keeps_every_character(tmp_path_factory, teacher, data_dir, splits, capsys):
    from test_build import RECIPE, loose_profile
    from tokenizers import Tokenizer

    from runtime_shim import OnnxPipeline

    root = tmp_path_factory.mktemp("nonlatin-build")
    recipe = root / "recipe.toml"
    # test_build's recipe: the default recipe's one shape, the loose budgets, the short schedules.
    recipe.write_text(RECIPE.format(teacher=teacher, out=root / "bundle", profile=loose_profile(root), data=data_dir,
                                    recover_epochs=1, quantize_extra=""),
                      encoding="utf-8")
    assert main(["build", str(recipe)]) == 0
    out, work = root / "bundle", root / "bundle.build"
    resolved = json.loads((work / "recipe.json").read_text())
    assert resolved["recipe"] == "default" and resolved["prune"]["keep_chars"] == "data"

    # The bundle's tokenizer: no character of any split, and no text, becomes [UNK].
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    chars = sorted(_chars(splits))
    assert not [c for c in chars if _unknown(tok, c)]
    assert not [t for rows in splits.values() for t, _ in rows if _unknown(tok, t)]

    # The pruned vocabulary kept a row of its own for each (ids below rows_kept; above are folded rows).
    step = next(s for s in json.loads((work / "prune" / "stage.json").read_text())["metrics"]["steps"]
                if s["step"] == "vocab")
    assert step["keep_chars"] == "data" and step["rows_kept"] <= step["vocab_after"]
    pruned = Tokenizer.from_file(str(work / "prune" / "tokenizer.json"))
    special = {pruned.token_to_id(t) for t in ("[CLS]", "[SEP]")}
    for c in chars:
        ids = [i for i in pruned.encode(c).ids if i not in special]
        assert ids and all(i < step["rows_kept"] for i in ids), (c, ids)

    # No out-of-scope label: no threshold, and the relabelling had nothing to read.
    labels = json.loads((out / "labels.json").read_text())
    assert labels["oos_label"] is None and labels["oos_threshold"] is None
    distilled = json.loads((work / "distill" / "stage.json").read_text())["metrics"]
    assert not distilled.get("oos_relabelled_rows")

    # max_length came from the training texts, and the bundle truncates to it.
    summary = json.loads((work / "summary.json").read_text())
    chosen = summary["max_length"]["max_length"]
    assert chosen % 8 == 0 and resolved["data"]["max_length"] == chosen
    assert json.loads((out / "runtime.json").read_text())["max_length"] == chosen

    pipe = OnnxPipeline(out)
    for text in ("какой баланс на карте", "上海明天天气怎么样", "七時に起こして"):
        assert pipe(text)[0]["label"] in INTENTS


def test_noisy_copies_of_unspaced_texts_drop_and_swap_characters():
    from edgepack.training.distillation import _units, augment_texts

    assert _units("订 机票 to Paris") == ["订", "机", "票", "to", "Paris"]
    assert _units("iPhone的价格") == ["iPhone", "的", "价", "格"]
    text = "我想订一张去北京的机票"
    copies = augment_texts([text], 8, seed=0)
    # Single texts with no spaces were only ever spliced onto themselves (the text twice, a space
    # between); now their characters are dropped and swapped like words.
    assert all(" " not in c for c in copies) and any(len(c) < len(text) for c in copies)
    assert any(sorted(c) == sorted(text) and c != text for c in copies)  # a swap
    spaced = ["what is my balance", "set an alarm for noon please", "какой баланс на карте"]
    words = {w for t in spaced for w in t.split()}
    assert all(set(c.split()) <= words for c in augment_texts(spaced, 4, seed=3))  # words stay whole


def test_max_length_from_the_training_texts():
    from edgepack.config import DataConfig
    from edgepack.data import length_from_counts

    counts = [5] * 998 + [30, 200]
    chosen = length_from_counts(counts, 99.0, limit=512)
    assert chosen["max_length"] == 8 and chosen["longest"] == 200 and chosen["texts_truncated"] == 2
    assert length_from_counts(counts, 100.0, limit=128)["max_length"] == 128  # within the teacher's positions
    assert DataConfig(max_length=0).max_length == 0  # 0: from the data
    from edgepack import stages
    from edgepack.errors import EdgepackError

    with pytest.raises(EdgepackError, match="--max-length"):
        _ = stages.Context(data_config=DataConfig(max_length=0)).max_length


def test_data_keeps_a_byte_level_alphabet_whole():
    """A byte-level BPE spells every text in its 256 byte symbols and has no [UNK]: a missing symbol
    would drop characters silently, so "data" keeps the whole alphabet there."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = ["какой баланс на карте", "上海明天天气怎么样", "what is my balance"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok_json = json.loads(tok.to_str())
    kept = vocab.remap_tokenizer_json(tok_json, vocab.select_tokens(tok_json, texts[:1], keep_chars="data"))
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(kept["model"]["vocab"])
    trimmed = Tokenizer.from_str(json.dumps(kept))
    assert trimmed.decode(trimmed.encode("北京 карта").ids) == "北京 карта"
