"""WordPiece tokenizer: parity with transformers' BertTokenizer, training, loading, saving, the CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, BertTokenizer, BertTokenizerFast

from bertforge import load_tokenizer, train_tokenizer
from bertforge.cli import main
from bertforge.errors import BertforgeError
from bertforge.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILES, Tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REFERENCE = DATA / "reference"
GUTENBERG = DATA / "en_pretrain" / "nltk_gutenberg"
EDGE_CASES = [
    "Héllo\x07 WÖRLD ﬁne naïve Ångström \u200b x\ufeffy \x00tab\there",
    "ＡＢＣ　全角，中文字符。한국어 日本語のテキスト",
    "\u00a0a\u3000b  [MASK] the man went to [MASK] store.",
    "pneumonoultramicroscopicsilicovolcanoconiosis" * 3,        # longer than 100 chars: one [UNK]
    "",
]


def _lines(path: Path, encoding: str = "utf-8", every: int = 1) -> list[str]:
    with gzip.open(path, "rt", encoding=encoding) as stream:
        return [line.rstrip("\n") for index, line in enumerate(stream) if index % every == 0]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """A shared test corpus: English and Chinese Wikipedia samples, a Latin-1 Gutenberg book, edge cases."""
    return (_lines(REFERENCE / "en_wiki_sample.txt.gz", every=2) + _lines(REFERENCE / "zh_wiki_sample.txt.gz")
            + _lines(GUTENBERG / "chesterton-ball.txt.gz", "latin-1", every=3) + EDGE_CASES)


def _vocab_only_folder(vocab: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(vocab, folder / "vocab.txt")
    return folder


@pytest.fixture(scope="module")
def cased_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cased") / "tok"
    train_tokenizer([str(GUTENBERG / "austen-emma.txt.gz"), str(REFERENCE / "zh_wiki_sample.txt.gz")], out,
                    vocab_size=3000, cased=True, fmt="text", show_progress=False)
    return out


@pytest.mark.parametrize("vocab_name", ["en_vocab_8k.txt", "zh_vocab_6k.txt"])
def test_ids_equal_transformers_on_reference_vocabs(vocab_name: str, texts: list[str], tmp_path: Path) -> None:
    folder = _vocab_only_folder(REFERENCE / vocab_name, tmp_path / "vocab_only")
    ours = load_tokenizer(folder)
    reference = BertTokenizer.from_pretrained(str(folder))
    assert ours.encode_batch(texts) == reference(texts, add_special_tokens=False)["input_ids"]
    assert ours.do_lower_case and len(ours) == len(reference)
    assert load_tokenizer(REFERENCE / vocab_name).vocab_hash == ours.vocab_hash   # a vocab.txt path works too


def test_ids_equal_transformers_for_a_trained_cased_vocab(cased_dir: Path, texts: list[str], tmp_path: Path) -> None:
    ours = load_tokenizer(cased_dir)
    assert not ours.do_lower_case
    folder = _vocab_only_folder(cased_dir / "vocab.txt", tmp_path / "cased_vocab_only")
    reference = BertTokenizer.from_pretrained(str(folder), do_lower_case=False)
    assert ours.encode_batch(texts) == reference(texts, add_special_tokens=False)["input_ids"]
    assert load_tokenizer(folder, cased=True).encode_batch(texts) == ours.encode_batch(texts)


def test_trained_folder_loads_in_transformers(cased_dir: Path) -> None:
    vocab = (cased_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert vocab[:5] == list(SPECIAL_TOKENS) and vocab[-1] == ""
    assert 2900 <= len(vocab) - 1 <= 3000 and len(set(vocab[:-1])) == len(vocab) - 1
    config = json.loads((cased_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BertTokenizer" and config["do_lower_case"] is False
    assert config["model_max_length"] == 512
    ours = load_tokenizer(cased_dir)
    for cls in (BertTokenizerFast, AutoTokenizer):
        hf = cls.from_pretrained(str(cased_dir))
        encoded = hf("Emma was happy.", "她很高兴。")
        a = ours.encode_batch(["Emma was happy."])[0]
        b = ours.encode_batch(["她很高兴。"])[0]
        assert encoded["input_ids"] == [ours.cls_id, *a, ours.sep_id, *b, ours.sep_id]
        assert encoded["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
        assert hf.convert_ids_to_tokens(encoded["input_ids"])[0] == "[CLS]"
        assert hf.pad_token_id == 0 and hf.mask_token_id == ours.mask_id == 4


def test_normalisation(cased_dir: Path) -> None:
    uncased = load_tokenizer(REFERENCE / "en_vocab_8k.txt")
    cased = load_tokenizer(cased_dir)
    assert uncased.tokenize("Café\x07\x00 NAÏVE") == uncased.tokenize("cafe naive")      # controls dropped
    assert "\x07" not in "".join(cased.tokenize("a\x07b"))
    assert cased.tokenize("Emma") == ["Emma"] and uncased.tokenize("Emma")[0].islower()
    assert cased.tokenize("é") != cased.tokenize("e")                                   # accents kept when cased
    chinese = load_tokenizer(REFERENCE / "zh_vocab_6k.txt")
    assert chinese.tokenize("中华人民共和国") == list("中华人民共和国")                   # one token per ideograph
    assert uncased.tokenize("the [MASK] store")[1] == "[MASK]"
    assert uncased.encode("x" * 150) == [uncased.unk_id]


def test_tokenizer_api(tmp_path: Path) -> None:
    tok = load_tokenizer(REFERENCE / "en_vocab_8k.txt")
    vocab = (REFERENCE / "en_vocab_8k.txt").read_text(encoding="utf-8").splitlines()
    assert tok.vocab == vocab and len(tok) == 8000
    assert tok.vocab_hash == hashlib.sha256("\n".join(vocab).encode()).hexdigest()
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    ids = tok.encode_batch(["The city of Paris.", "unbelievable"])
    assert tok.convert_ids_to_tokens(ids[0]) == tok.tokenize("The city of Paris.")
    assert tok.token_to_id("the") == vocab.index("the") and tok.token_to_id("no-such-token") is None
    assert tok.decode(ids[1]) == "unbelievable"
    encoding = tok.backend.encode("The city", add_special_tokens=False)    # offsets for fine-tuning
    assert encoding.offsets[0] == (0, 3) and encoding.ids == tok.encode("The city")
    assert tok.backend.encode("x").ids == tok.encode("x")                  # the backend adds no [CLS]/[SEP]
    assert tok.encode_batch([]) == [] and tok.encode_batch(["", " \t"]) == [[], []]


def test_save_is_byte_deterministic_and_round_trips(tmp_path: Path) -> None:
    for name in ("a", "b"):
        load_tokenizer(REFERENCE / "zh_vocab_6k.txt").save(tmp_path / name)
    for name in TOKENIZER_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    reloaded = load_tokenizer(tmp_path / "a")
    reloaded.save(tmp_path / "c")
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "c" / n).read_bytes() for n in TOKENIZER_FILES)
    (tmp_path / "a" / "vocab.txt").unlink()                                # tokenizer.json alone is enough
    assert load_tokenizer(tmp_path / "a").vocab_hash == reloaded.vocab_hash
    assert load_tokenizer(tmp_path / "a" / "tokenizer.json").vocab == reloaded.vocab


def test_hugging_face_model_folder(tmp_path: Path) -> None:
    folder = _vocab_only_folder(REFERENCE / "en_vocab_8k.txt", tmp_path / "hf_model")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 8000}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    ours = load_tokenizer(folder)
    assert not ours.do_lower_case
    reference = BertTokenizer.from_pretrained(str(folder))
    texts = ["The Big City of Paris", "Ça va?"]
    assert ours.encode_batch(texts) == reference(texts, add_special_tokens=False)["input_ids"]
    assert load_tokenizer(folder, cased=False).tokenize("The") == ["the"]   # an explicit flag wins

    # Special tokens with other names are honoured when the folder says so.
    vocab = (REFERENCE / "en_vocab_8k.txt").read_text(encoding="utf-8").replace("[UNK]\n", "<unk>\n", 1)
    (folder / "vocab.txt").write_text(vocab, encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({"unk_token": {"content": "<unk>"}}))
    renamed = load_tokenizer(folder)
    assert renamed.unk_id == 1 and renamed.encode("☃") == [1]


def test_vocab_without_special_tokens_is_refused(tmp_path: Path) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\nthe\n##s\n", encoding="utf-8")
    with pytest.raises(BertforgeError, match=r"\[SEP\] \[MASK\]"):
        load_tokenizer(vocab)
    with pytest.raises(BertforgeError, match="neither vocab.txt nor tokenizer.json"):
        load_tokenizer(tmp_path / "..")
    with pytest.raises(BertforgeError, match="no such tokenizer"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(BertforgeError, match="lacks"):
        Tokenizer(["a", "b"])


def test_training_learns_specials_chinese_characters_and_refuses_bad_outputs(tmp_path: Path) -> None:
    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n".join(["中文维基百科是维基百科的中文版本。", "The quick brown fox jumps.", ""] * 30),
                      encoding="utf-8")
    tok = train_tokenizer([str(corpus)], tmp_path / "tok", vocab_size=200, min_frequency=1, show_progress=False)
    assert tok.vocab[:5] == list(SPECIAL_TOKENS)
    assert set("中文维基百科是的版本") <= set(tok.vocab)
    assert "quick" in tok.vocab and tok.tokenize("中文维基") == ["中", "文", "维", "基"]
    assert "##q" in tok.vocab and "##中" not in tok.vocab and "##." not in tok.vocab
    with pytest.raises(BertforgeError, match="--overwrite"):
        train_tokenizer([str(corpus)], tmp_path / "tok", vocab_size=200, show_progress=False)
    train_tokenizer([str(corpus)], tmp_path / "tok", vocab_size=200, cased=True, overwrite=True,
                    show_progress=False)
    assert not load_tokenizer(tmp_path / "tok").do_lower_case
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok", "zh.txt"]     # no temporary folders left


def test_training_is_deterministic(tmp_path: Path) -> None:
    corpus = [str(GUTENBERG / "austen-persuasion.txt.gz")]
    for name in ("a", "b"):
        train_tokenizer(corpus, tmp_path / name, vocab_size=3000, fmt="text", show_progress=False)
    for name in TOKENIZER_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    status = main(["tokenizer", "train", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_train_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(GUTENBERG / "chesterton-ball.txt.gz", corpus)
    (corpus / "more.jsonl").write_text(json.dumps({"text": "Naïve Café owners. They smile."}) + "\n")
    status, out, err = run_cli(capsys, str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "2000",
                               "--cased")
    assert status == 0, err
    assert "2 files (jsonl ×1, lines ×1)" in out and "non-UTF-8 bytes replaced (chesterton-ball.txt.gz" in out
    assert "of 2,000 entries" in out and str(tmp_path / "tok") in out
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == sorted(TOKENIZER_FILES)
    tok = load_tokenizer(tmp_path / "tok")
    assert len(tok) == 2000 and not tok.do_lower_case
    assert tok.tokenize("Café")[0].startswith("C") and tok.tokenize("Café")[-1].endswith("é")


@pytest.mark.parametrize("case", ["missing", "empty", "not_a_tokenizer", "exists", "bad_vocab_size"])
def test_cli_bad_inputs(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    out = tmp_path / "out"
    args = {"missing": [str(tmp_path / "nope.txt"), "--out", str(out)],
            "empty": [str(empty), "--out", str(out)],
            "not_a_tokenizer": [str(empty), "--out", str(tmp_path)],
            "exists": [str(REFERENCE / "en_wiki_sample.txt.gz"), "--out", str(out)],
            "bad_vocab_size": [str(empty), "--out", str(out), "--vocab-size", "3"]}[case]
    if case == "exists":
        load_tokenizer(REFERENCE / "en_vocab_8k.txt").save(out)
    status, _, err = run_cli(capsys, *args)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("bertforge: error: ")
    expected = {"missing": "no such file", "empty": "holds no text", "not_a_tokenizer": "not a tokenizer folder",
                "exists": "--overwrite", "bad_vocab_size": "--vocab-size 3"}[case]
    assert expected in err
    assert case == "exists" or not out.exists()


@pytest.mark.slow
def test_cli_default_corpus_as_a_subprocess(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "bertforge", "tokenizer", "train", "--out", str(tmp_path / "t"),
                             "--vocab-size", "3000"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "4 files (wikiextractor ×4)" in result.stdout
    assert BertTokenizerFast.from_pretrained(str(tmp_path / "t")).vocab_size == 3000
    refused = subprocess.run([sys.executable, "-m", "bertforge", "tokenizer", "train", "--out", str(tmp_path / "t")],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
