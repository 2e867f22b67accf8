"""Corpus reading: inputs, formats, compression, encodings, binary refusal, sentence splitting."""

from __future__ import annotations

import bz2
import gzip
import json
import random
import time
from pathlib import Path

import pytest
import zstandard

from bertforge.data.corpus import CorpusStats, detect_format, expand_inputs, iter_documents, split_sentences
from bertforge.errors import BertforgeError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GUTENBERG = DATA / "en_pretrain" / "nltk_gutenberg"
WIKI = DATA / "en_pretrain" / "wikipedia_en_2015" / "AA"


def read(path: Path, fmt: str | None = None) -> tuple[list[list[str]], CorpusStats]:
    stats = CorpusStats()
    return list(iter_documents(path, fmt, stats)), stats


@pytest.mark.parametrize("text, expected", [
    ("Mr. Smith went to Washington. He arrived at 3.15 p.m. on Monday. It was cold!",
     ["Mr. Smith went to Washington.", "He arrived at 3.15 p.m. on Monday.", "It was cold!"]),
    ('He said "Stop." Then he left. (See e.g. Fig. 3 and i.e. this.) The end?',
     ['He said "Stop."', "Then he left.", "(See e.g. Fig. 3 and i.e. this.)", "The end?"]),
    ("J. R. R. Tolkien wrote books. The U.S. Army is large. Pi is 3.14159. Next.",
     ["J. R. R. Tolkien wrote books.", "The U.S. Army is large.", "Pi is 3.14159.", "Next."]),
    ("Prices rose, etc. and so on. Wait... what? Really?! Yes.",
     ["Prices rose, etc. and so on.", "Wait... what?", "Really?!", "Yes."]),
    ("See No. 5 and vol. 3 for details. It cost $3.50. In 1999. The end",
     ["See No. 5 and vol. 3 for details.", "It cost $3.50.", "In 1999.", "The end"]),
    ("他说：“你好。”然后走了。真的吗？是的！好；再见", ["他说：“你好。”", "然后走了。", "真的吗？", "是的！", "好；", "再见"]),
    ("（见《红楼梦》。）下一句。", ["（见《红楼梦》。）", "下一句。"]),
    ("Hello world!你好。", ["Hello world!", "你好。"]),
    ("So am I. Then we left for St. Louis at 5 a.m. Monday.", ["So am I.", "Then we left for St. Louis at 5 a.m. Monday."]),
    ("no punctuation at all", ["no punctuation at all"]),
    ("", []),
    ("   ", []),
])
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_split_sentences_is_linear_on_huge_paragraphs() -> None:
    many = "This is sentence number 7. " * 100_000           # 2.7 MB, 100k boundaries
    spaceless = "a.b" * 1_000_000 + ". Done."                 # dots that are never boundaries, no spaces
    started = time.perf_counter()
    assert len(split_sentences(many)) == 100_000
    assert split_sentences(spaceless)[-1] == "Done."
    # A quadratic scan would take hours here; linear takes about a second even on a busy machine.
    assert time.perf_counter() - started < 30


def test_lines_format_documents_crlf_bom(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes("\ufeffFirst sentence.\r\n  Second one.  \r\n\r\n\r\nOther doc.\r\n\r\n".encode("utf-8"))
    assert detect_format(path) == "lines"
    documents, stats = read(path)
    assert documents == [["First sentence.", "Second one."], ["Other doc."]]
    assert (stats.files, stats.documents, stats.sentences) == (1, 2, 3)
    assert stats.bytes_read == path.stat().st_size
    assert stats.formats == {str(path): "lines"}


def test_text_format_joins_wrapped_lines_and_splits_sentences(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("[A Book]\n\nIt was a dark night. The wind\nhowled.  Mr. Brown slept.\n\n\n"
                    "中文的段落，\n继续。第二句！\n", encoding="utf-8")
    documents, _ = read(path, "text")
    assert documents == [["[A Book]", "It was a dark night.", "The wind howled.", "Mr. Brown slept.",
                          "中文的段落，继续。", "第二句！"]]


def test_jsonl_format(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    records = [{"text": "One. Two.\n\nThree.", "id": 1}, {"text": ""}, {"text": "第一。第二？"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n", encoding="utf-8")
    assert detect_format(path) == "jsonl"
    documents, stats = read(path)
    assert documents == [["One.", "Two.", "Three."], ["第一。", "第二？"]]
    assert stats.documents == 2

    path.write_text('{"text": "fine."}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(BertforgeError, match=r"docs\.jsonl:2: not valid JSON"):
        read(path)
    path.write_text('{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(BertforgeError, match='"text" field'):
        read(path)


def test_wikiextractor_format(tmp_path: Path) -> None:
    path = tmp_path / "wiki_00"
    path.write_text('\n<doc id="1" url="u" title="Ada &amp; Co">\nAda & Co\n\nAda was born. She wrote code.\n'
                    'History\nShe died in 1852.\n</doc>\n'
                    '<doc id="2" title="A &quot;B&quot;">\nA &quot;B&quot;\n</doc>\n'
                    '<doc id="3" title="B">\nNot the title. Second.\n</doc>\n', encoding="utf-8")
    assert detect_format(path) == "wikiextractor"
    documents, _ = read(path)
    assert documents == [["Ada was born.", "She wrote code.", "History", "She died in 1852."],
                         ["Not the title.", "Second."]]


def test_wikiextractor_on_the_shared_extract() -> None:
    path = WIKI / "wiki_00.gz"
    raw = gzip.decompress(path.read_bytes()).decode("utf-8")
    documents, stats = read(path)
    assert stats.formats[str(path)] == "wikiextractor"
    assert len(documents) == raw.count("<doc ") > 10
    assert documents[0][0].startswith("Anarchism is a political philosophy")   # title line dropped
    assert all(sentence and "<doc" not in sentence and sentence != "</doc>" for doc in documents for sentence in doc)
    assert stats.bytes_read == len(raw.encode("utf-8"))


def test_compressed_inputs_read_like_plain(tmp_path: Path) -> None:
    text = "Alpha one.\nAlpha two.\n\nBeta one.\n" * 50
    plain = tmp_path / "c.txt"
    plain.write_text(text, encoding="utf-8")
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    (tmp_path / "c.txt.bz2").write_bytes(bz2.compress(text.encode()))
    expected, _ = read(plain)
    for name in ("c.txt.gz", "c.txt.zst", "c.txt.bz2"):
        documents, stats = read(tmp_path / name)
        assert documents == expected, name
        assert stats.bytes_read == len(text.encode())
    (tmp_path / "broken.gz").write_bytes(gzip.compress(text.encode())[:-20])
    with pytest.raises(BertforgeError, match="broken.gz"):
        read(tmp_path / "broken.gz")


def test_latin1_gutenberg_bytes_are_replaced_and_counted() -> None:
    books = sorted(GUTENBERG.glob("*.txt.gz"))
    stats = CorpusStats()
    documents = [document for book in books for document in iter_documents(book, "text", stats)]
    assert len(documents) == stats.documents == len(books) == 14     # a book is one document
    expected = {}
    for book in books:
        raw = gzip.decompress(book.read_bytes())
        high = sum(byte >= 0x80 for byte in raw)       # the files are ASCII apart from isolated Latin-1 bytes
        if high:
            expected[str(book)] = high
    assert {Path(name).name for name in expected} == {"chesterton-ball.txt.gz", "shakespeare-caesar.txt.gz"}
    assert stats.replaced_by_file == expected
    assert stats.replaced_bytes == sum(expected.values())
    assert sum("\ufffd" in s for doc in documents for s in doc) > 0
    assert "non-UTF-8 bytes replaced" in stats.summary()


def test_binary_files_are_refused(tmp_path: Path) -> None:
    nul = tmp_path / "image.bin"
    nul.write_bytes(b"some text\n\x00\x01\x02 more")
    with pytest.raises(BertforgeError, match="image.bin looks binary"):
        read(nul)
    rng = random.Random(0)
    junk = tmp_path / "junk.dat"
    junk.write_bytes(bytes(rng.randrange(0x80, 0x100) for _ in range(4096)))
    with pytest.raises(BertforgeError, match="junk.dat looks binary"):
        read(junk)
    with pytest.raises(BertforgeError, match="junk.dat"):
        detect_format(junk)
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("hello world\n", encoding="utf-16")
    with pytest.raises(BertforgeError, match="UTF-16"):
        read(utf16)
    mostly_fine = tmp_path / "fine.txt"
    mostly_fine.write_bytes(b"caf\xe9 au lait.\nna\xefve.\n")
    documents, stats = read(mostly_fine)
    assert documents == [["caf\ufffd au lait.", "na\ufffdve."]] and stats.replaced_bytes == 2


def test_extremely_long_line(tmp_path: Path) -> None:
    path = tmp_path / "long.txt.gz"
    line = "word " * 2_000_000                              # one 10 MB line
    path.write_bytes(gzip.compress((line + "\n\nshort.\n").encode(), compresslevel=1))
    documents, stats = read(path)
    assert len(documents) == 2 and len(documents[0][0]) == len(line.strip())
    assert stats.sentences == 2


def test_expand_inputs(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for name in ("a.txt", "sub/b.txt.gz", "sub/deeper/c.jsonl", ".secret.txt", ".hidden/d.txt"):
        (tmp_path / name).write_text("x\n")
    found = expand_inputs([str(tmp_path), str(tmp_path / "a.txt"), str(tmp_path / "sub" / "*.gz")])
    assert found == sorted([tmp_path / "a.txt", tmp_path / "sub/b.txt.gz", tmp_path / "sub/deeper/c.jsonl"], key=str)
    assert expand_inputs([str(tmp_path / "**" / "*.jsonl")]) == [tmp_path / "sub/deeper/c.jsonl"]
    with pytest.raises(BertforgeError, match="no such file"):
        expand_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(BertforgeError, match="no file matches"):
        expand_inputs([str(tmp_path / "*.none")])
    with pytest.raises(BertforgeError, match="no input files"):
        expand_inputs([])


def test_directory_expansion_skips_dataset_cards_and_checksums(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one sentence.\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "wiki_00").write_text("two sentence.\n", encoding="utf-8")
    for name in ("README.md", "SHA256SUMS", "SHA256SUMS.uncompressed", "LICENSE"):
        (tmp_path / name).write_text("not corpus text\n", encoding="utf-8")
    assert [p.name for p in expand_inputs([str(tmp_path)])] == ["a.txt", "wiki_00"]
    # naming such a file explicitly still reads it
    assert [p.name for p in expand_inputs([str(tmp_path / "README.md")])] == ["README.md"]
