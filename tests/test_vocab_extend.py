"""`tokenizer extend`: a domain corpus's frequent split words added as whole tokens (no downloads: the model is made
here)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
import transformers

from bertforge.cli import main
from bertforge.config import ModelConfig
from bertforge.data.corpus import CorpusStats
from bertforge.data.dataset import PretrainData
from bertforge.errors import BertforgeError
from bertforge.heads import BertForPreTraining
from bertforge.hf import export_hf
from bertforge.model_folder import load_model
from bertforge.tokenizer import Tokenizer, load_tokenizer
from bertforge.vocab_extend import count_words, extend_vocabulary, split_words

LETTERS = list(string.ascii_lowercase)
VOCAB = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused2]",
         "the", "film", "was", "is", "and", "not", ".", ",", "!",
         "bo", "##ring", "aw", "##ful", "mo", "##vie", "gr", "##eat", "##ly", *LETTERS, *(f"##{c}" for c in LETTERS)]
SLOTS = [1, 2, 7]   # the [unusedX] ids, in order
# Lower-cased by the uncased model: "Boring" and "boring" are one word. Counts: boring 6, awful 5, movie 4,
# great 3, plot 2 (p ##l ##o ##t), zz 1; every other word is in the vocabulary.
CORPUS = """The film was Boring. The film was boring!
Boring, boring, boring and awful.
The movie was awful, awful, awful.

A movie is a movie. The movie is not great.
Great, great film. Awful plot, boring plot.
zz
"""
EXPECTED = ["boring", "awful", "movie", "great", "plot", "zz"]


def make_model(folder: Path, vocab: list[str] = VOCAB, seed: int = 0) -> Path:
    """A tiny random-weight BertForPreTraining with a non-zero MLM bias, exported with `vocab`."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64)
    model = BertForPreTraining(config)
    with torch.no_grad():
        model.mlm.bias.normal_()
    export_hf(model, Tokenizer(vocab), folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "reviews.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("source") / "model")


@pytest.fixture(scope="module")
def extended(tmp_path_factory, source, corpus):
    out = tmp_path_factory.mktemp("extended") / "model"
    return out, extend_vocabulary(source, [corpus], 4, out)


def state_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_model(folder).model.state_dict()


def test_most_frequent_split_words_go_into_unused_slots_then_grow(extended):
    out, report = extended
    assert [word.word for word in report.added] == EXPECTED[:4]
    assert [word.id for word in report.added] == [*SLOTS, len(VOCAB)]
    assert [word.count for word in report.added] == [6, 5, 4, 3]
    assert report.added[0].pieces == ("bo", "##ring")
    assert (report.slots_used, report.grown, report.vocab_size, report.split_words) == (3, 1, len(VOCAB) + 1, 6)
    vocab = (out / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab == [*VOCAB[:1], "boring", "awful", *VOCAB[3:7], "movie", *VOCAB[8:], "great"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(VOCAB) + 1


def test_each_added_word_encodes_as_one_piece_and_old_tokens_keep_their_ids(extended):
    out, report = extended
    tokenizer = load_tokenizer(out)
    backend = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    for word in report.added:
        assert tokenizer.encode(word.word) == [word.id]
        assert tokenizer.encode(word.word.upper()) == [word.id]   # the model's lower-casing applies
        assert backend[word.word] == word.id
    replaced = {word.id for word in report.added}
    for index, token in enumerate(VOCAB):
        if index not in replaced:
            assert tokenizer.token_to_id(token) == index and backend[token] == index
    assert tokenizer.tokenize("The movie was boringly awful, plot!") == [
        "the", "movie", "was", "boring", "##ly", "awful", ",", "p", "##l", "##o", "##t", "!"]


def test_new_rows_are_the_mean_of_the_pieces_and_old_rows_are_kept(source, extended):
    out, report = extended
    old, new = state_of(source), state_of(out)
    embeddings = "bert.embeddings.word_embeddings.weight"
    replaced = [word.id for word in report.added]
    kept = [index for index in range(len(VOCAB)) if index not in replaced]
    torch.testing.assert_close(new[embeddings][kept], old[embeddings][kept], rtol=0, atol=0)
    torch.testing.assert_close(new["mlm.bias"][kept], old["mlm.bias"][kept], rtol=0, atol=0)
    for word in report.added:
        pieces = [VOCAB.index(piece) for piece in word.pieces]
        torch.testing.assert_close(new[embeddings][word.id], old[embeddings][pieces].mean(dim=0))
        torch.testing.assert_close(new["mlm.bias"][word.id], old["mlm.bias"][pieces].mean())
    for key in old:
        if key not in (embeddings, "mlm.bias"):
            torch.testing.assert_close(new[key], old[key], rtol=0, atol=0)


def test_a_vocabulary_without_unused_slots_grows(tmp_path, corpus):
    vocab = [token for token in VOCAB if not token.startswith("[unused")]
    source = make_model(tmp_path / "source", vocab)
    report = extend_vocabulary(source, [corpus], 10, tmp_path / "out")
    assert [word.word for word in report.added] == EXPECTED   # fewer candidates than asked for: all of them
    assert [word.id for word in report.added] == list(range(len(vocab), len(vocab) + len(EXPECTED)))
    assert (report.slots_used, report.grown) == (0, len(EXPECTED))
    assert load_tokenizer(tmp_path / "out").vocab == vocab + EXPECTED


def test_transformers_loads_the_folder_and_reproduces_our_logits(extended):
    out, report = extended
    text_a, text_b = "The movie was boring and awful.", "Great film, boring plot!"
    ours = load_model(out).model
    ours_tokenizer = load_tokenizer(out)
    hf_model = transformers.BertForPreTraining.from_pretrained(out).eval()
    for cls in (transformers.AutoTokenizer, transformers.BertTokenizerFast, transformers.BertTokenizer):
        hf_tokenizer = cls.from_pretrained(out)
        encoded = hf_tokenizer(text_a, text_b, return_tensors="pt")
        expected = [ours_tokenizer.cls_id, *ours_tokenizer.encode(text_a), ours_tokenizer.sep_id,
                    *ours_tokenizer.encode(text_b), ours_tokenizer.sep_id]
        assert encoded["input_ids"][0].tolist() == expected
        assert {word.id for word in report.added} <= set(expected)
    with torch.no_grad():
        hf_out = hf_model(**encoded)
        our_out = ours(encoded["input_ids"], encoded["token_type_ids"], encoded["attention_mask"])
    assert hf_model.config.vocab_size == report.vocab_size
    torch.testing.assert_close(our_out.mlm_logits, hf_out.prediction_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(our_out.nsp_logits, hf_out.seq_relationship_logits, rtol=0, atol=1e-5)


def test_prepare_and_pretrain_take_the_extended_folder(extended, corpus, tmp_path):
    out, report = extended
    data = tmp_path / "DATA"
    assert main(["prepare", str(corpus), "--tokenizer", str(out), "--out", str(data), "--dupe-factor", "2",
                 "--max-seq-len", "32", "--validation-fraction", "0", "--quiet"]) == 0
    prepared = PretrainData(data)
    assert prepared.vocab_size == report.vocab_size
    assert prepared.vocab_hash == load_tokenizer(out).vocab_hash
    store = prepared.split("train")
    seen = {int(i) for index in range(len(store)) for i in store[index]["original_ids"]}
    assert {word.id for word in report.added} <= seen
    assert main(["pretrain", "--data", str(data), "--init", str(out), "--out", str(tmp_path / "RUN"),
                 "--max-steps", "2", "--batch-size", "2", "--warmup-steps", "1"]) == 0
    assert load_model(tmp_path / "RUN").config.vocab_size == report.vocab_size


def test_cli_prints_a_summary(source, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["tokenizer", "extend", "--model", str(source), "--corpus", str(corpus), "--add", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "added 2 whole-word tokens: 2 into [unused] slots, 0 by growing the embedding matrix" in printed
    assert f"vocabulary {len(VOCAB)} -> {len(VOCAB)}" in printed
    assert "boring (bo ##ring; 6×), awful (aw ##ful; 5×)" in printed
    assert load_tokenizer(out).encode("boring") == [1]
    # Replacing needs --overwrite, and then works.
    assert main(["tokenizer", "extend", "--model", str(source), "--corpus", str(corpus), "--add", "5",
                 "--out", str(out), "--overwrite"]) == 0
    assert len(load_tokenizer(out)) == len(VOCAB) + 2


def copy_without_vocabulary(source: Path, folder: Path) -> Path:
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((source / name).read_bytes())
    return folder


@pytest.mark.parametrize("case, message", [
    ("add 0", "--add must be at least 1 (got 0)"),
    ("missing corpus", "no such file or directory"),
    ("no vocabulary", "has no vocabulary"),
    ("covered corpus", "no word of the corpus is split into several known pieces by the vocabulary; nothing to add"),
    ("foreign out", "exists and is not a model folder"),
    ("existing model", "already holds a model; add --overwrite"),
    ("out is the model", "is the model being extended"),
    ("empty corpus", "the corpus holds no text"),
])
def test_cli_errors_are_one_line(case, message, source, corpus, tmp_path, capsys):
    model, files, add, out = source, [str(corpus)], "3", tmp_path / "out"
    if case == "add 0":
        add = "0"
    elif case == "missing corpus":
        files = [str(tmp_path / "nowhere.txt")]
    elif case == "no vocabulary":
        model = copy_without_vocabulary(source, tmp_path / "bare")
    elif case == "covered corpus":
        (tmp_path / "covered.txt").write_text("The film was not a film.\n", encoding="utf-8")
        files = [str(tmp_path / "covered.txt")]
    elif case == "foreign out":
        out.mkdir()
        (out / "todo.txt").write_text("mine\n", encoding="utf-8")
    elif case == "existing model":
        make_model(out)
    elif case == "out is the model":
        out = source
    elif case == "empty corpus":
        (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
        files = [str(tmp_path / "empty.txt")]
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    code = main(["tokenizer", "extend", "--model", str(model), "--corpus", *files, "--add", add, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("bertforge: error: ") and message in err, err
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


ZH_VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused1]", "[unused2]",
            *"我买了一个手机。很好用，屏幕也这的不电池"]
# jieba: 手机 3, 不好 2, 屏幕 2, then 一个, 这个, 电池, 手机电池 once each; 耐用 has a character the vocabulary lacks.
ZH_CORPUS = "我买了一个手机。\n手机很好用，屏幕也很好。\n这个手机的屏幕不好，电池也不好。\n手机电池很耐用。\n"


def test_chinese_words_from_jieba_become_whole_tokens(tmp_path):
    corpus = tmp_path / "reviews.txt"
    corpus.write_text(ZH_CORPUS, encoding="utf-8")
    source = make_model(tmp_path / "source", ZH_VOCAB)
    with pytest.raises(BertforgeError, match="nothing to add"):   # without jieba every word is one character
        extend_vocabulary(source, [corpus], 3, tmp_path / "plain")
    out = tmp_path / "out"
    report = extend_vocabulary(source, [corpus], 3, out, chinese_words=True)
    assert [(word.word, word.id, word.pieces, word.count) for word in report.added] == [
        ("手机", 1, ("手", "机"), 3), ("不好", 6, ("不", "好"), 2), ("屏幕", 7, ("屏", "幕"), 2)]
    assert "耐用" not in [word for word, _ in split_words(count_words(
        [corpus], load_tokenizer(source), None, CorpusStats(), chinese_words=True), load_tokenizer(source))]
    tokenizer = load_tokenizer(out)
    text = "这个手机的屏幕不好，手机电池很好。"
    assert tokenizer.tokenize(text) == ["这", "个", "手机", "的", "屏幕", "不好", "，", "手机", "电", "池", "很", "好",
                                        "。"]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer(text)["input_ids"] == [tokenizer.cls_id, *tokenizer.encode(text), tokenizer.sep_id]
    old, new = state_of(source), state_of(out)
    embeddings = "bert.embeddings.word_embeddings.weight"
    torch.testing.assert_close(new[embeddings][1], old[embeddings][[ZH_VOCAB.index("手"), ZH_VOCAB.index("机")]].mean(0))
    data = tmp_path / "DATA"
    assert main(["prepare", str(corpus), "--tokenizer", str(out), "--out", str(data), "--chinese-wwm",
                 "--max-seq-len", "32", "--validation-fraction", "0", "--quiet"]) == 0
    store = PretrainData(data).split("train")
    assert 1 in {int(i) for index in range(len(store)) for i in store[index]["original_ids"]}


def test_chinese_words_need_a_vocabulary_that_splits_cjk_characters(tmp_path, corpus):
    source = tmp_path / "source"
    make_model(source, ZH_VOCAB)
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    (source / "tokenizer_config.json").write_text(json.dumps(config | {"tokenize_chinese_chars": False}))
    with pytest.raises(BertforgeError, match="--chinese-words needs a vocabulary that splits CJK characters"):
        extend_vocabulary(source, [corpus], 3, tmp_path / "out", chinese_words=True)
