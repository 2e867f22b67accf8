"""`prepare` end to end: DATA folders, manifest, --exact through the CLI, workers, Chinese, and bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from bertforge.cli import main
from bertforge.data.dataset import PretrainData
from bertforge.data.prepare import prepare, tokenize_corpus
from bertforge.data.spill import InstanceBatch, RunFile, permute_external, random_merge
from bertforge.tokenizer import load_tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REFERENCE = DATA / "reference"
needs_shared = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not available")
EN_VOCAB = REFERENCE / "en_vocab_8k.txt"
ZH_VOCAB = REFERENCE / "zh_vocab_6k.txt"


def shard_hashes(path: Path) -> list[str]:
    manifest = json.loads((path / "manifest.json").read_text())
    return [meta["sha256"] for shard in manifest["shards"] for meta in shard["files"].values()]


@needs_shared
def test_cli_exact_reproduces_reference(tmp_path, capsys):
    out = tmp_path / "data"
    code = main(["prepare", str(REFERENCE / "en_wiki_sample.txt.gz"), "--tokenizer", str(EN_VOCAB), "--out", str(out),
                 "--exact", "--seed", "7", "--dupe-factor", "1", "--max-seq-len", "64", "--max-predictions", "10",
                 "--whole-word-mask", "--validation-fraction", "0", "--quiet"])
    assert code == 0
    assert "IsNext" in capsys.readouterr().err
    data = PretrainData(out)
    store = data.split("train")
    with gzip.open(REFERENCE / "en_seed7_dupe1_seq64_pred10_wwm.jsonl.gz", "rt") as handle:
        expected = [json.loads(line) for line in handle]
    assert len(store) == len(expected)
    for i in range(0, len(store), 7):
        item, want = store[i], expected[i]
        assert [data.vocab[t] for t in item["input_ids"]] == want["tokens"]
        assert item["token_type_ids"].tolist() == want["segment_ids"]
        assert item["masked_lm_positions"].tolist() == want["masked_lm_positions"]
        assert [data.vocab[t] for t in item["masked_lm_ids"]] == want["masked_lm_labels"]
        assert item["next_sentence_label"] == int(want["is_random_next"])
    manifest = data.manifest
    assert manifest["options"]["exact"] and manifest["options"]["whole_word_mask"]
    assert manifest["vocab_hash"] == load_tokenizer(EN_VOCAB).vocab_hash
    assert manifest["formats"] == {"lines": 1} and manifest["counts"]["documents"] == 60


def test_bundled_corpus_split_manifest_and_workers(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    manifest = prepare(None, EN_VOCAB, one, dupe_factor=1, validation_fraction=0.05, workers=1, show_progress=False)
    prepare(None, EN_VOCAB, two, dupe_factor=1, validation_fraction=0.05, workers=2, show_progress=False)
    # tasks and their seeds depend on the corpus and seed only: the worker count does not change a byte
    assert shard_hashes(one) == shard_hashes(two)
    counts, splits = manifest["counts"], manifest["splits"]
    documents = counts["documents"]
    assert splits["validation"]["documents"] == round(0.05 * documents)
    assert splits["train"]["documents"] + splits["validation"]["documents"] == documents
    assert counts["instances"] == splits["train"]["instances"] + splits["validation"]["instances"]
    assert 0.4 < 1 - counts["is_random_next"] / counts["instances"] < 0.5
    assert manifest["formats"] == {"wikiextractor": 4}
    for key in ("tokens", "unk_tokens", "sentences", "bytes_read", "truncated_instances", "short_target_instances",
                "masks", "replaced_bytes"):
        assert key in counts
    for key in ("max_seq_len", "max_predictions", "masked_lm_prob", "short_seq_prob", "dupe_factor", "seed",
                "whole_word_mask", "chinese_wwm", "validation_fraction", "workers", "exact", "format"):
        assert key in manifest["options"]
    data = PretrainData(one)
    assert len(data.split("train")) == splits["train"]["instances"]
    assert data.max_seq_len == 128 and data.vocab_hash == manifest["vocab_hash"]
    other = prepare(None, EN_VOCAB, tmp_path / "other", dupe_factor=1, seed=1, validation_fraction=0.05,
                    show_progress=False)
    assert shard_hashes(tmp_path / "other") != shard_hashes(one)
    assert other["splits"]["validation"]["documents"] == splits["validation"]["documents"]


def test_validation_fraction_edge_cases(tmp_path):
    corpus = tmp_path / "two_docs.txt"
    corpus.write_text("the cat sat on the mat .\nit was happy .\n\nthe dog ran away .\nit came back .\n")
    manifest = prepare([corpus], EN_VOCAB, tmp_path / "a", dupe_factor=2, validation_fraction=0.01,
                       show_progress=False)
    assert manifest["splits"]["validation"]["documents"] == 1 and manifest["splits"]["train"]["documents"] == 1
    manifest = prepare([corpus], EN_VOCAB, tmp_path / "b", dupe_factor=2, validation_fraction=0, show_progress=False)
    assert "validation" not in manifest["splits"]
    single = tmp_path / "single.txt"
    single.write_text("one lonely sentence that is long enough to be split into a pair .\n")
    manifest = prepare([single], EN_VOCAB, tmp_path / "c", dupe_factor=3, show_progress=False)
    assert manifest["splits"]["train"]["instances"] == 3 and manifest["counts"]["is_random_next"] == 3


# --- too few documents: one warning line ----------------------------------------------------------------------------

def warnings_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if "warning" in line]


def documents_file(path: Path, documents: int) -> Path:
    """`documents` documents of three sentences in the `lines` format (a blank line between documents)."""
    path.write_text("".join(f"the man went to the store number {d} .\nhe bought a gallon of milk .\n"
                            f"it was a long walk home .\n\n" for d in range(documents)))
    return path


@needs_shared
def test_one_document_corpus_warns_in_one_line_what_to_do(tmp_path, capsys):
    """The 中文 quick start on articles concatenated into one file: `--format text` reads it as one document."""
    articles = sorted((DATA / "zh_pretrain" / "zhwiki_readwiki100" / "words_txt").glob("*.txt.gz"))[:3]
    joined = tmp_path / "all.txt"
    joined.write_text("\n\n".join(gzip.open(path, "rt", encoding="utf-8").read() for path in articles),
                      encoding="utf-8")
    code, err = run_cli(capsys, str(joined), "--tokenizer", str(ZH_VOCAB), "--out", str(tmp_path / "DATA"),
                        "--format", "text", "--chinese-wwm", "--dupe-factor", "1", "--quiet")
    assert code == 0
    [warning] = warnings_of(err)
    assert warning.startswith("bertforge: warning: the corpus is 1 document, so every NotNext pair")
    assert "--validation-fraction 0.01 leaves the validation split empty" in warning
    assert "--format text reads each file as one document" in warning and "one file per article" in warning
    assert PretrainData(tmp_path / "DATA").splits == ["train"]


def test_one_document_validation_split_warns(tmp_path, capsys):
    corpus = documents_file(tmp_path / "ten.txt", 10)
    code, err = run_cli(capsys, str(corpus), "--tokenizer", str(EN_VOCAB), "--out", str(tmp_path / "DATA"),
                        "--validation-fraction", "0.1", "--dupe-factor", "1", "--quiet")
    assert code == 0
    [warning] = warnings_of(err)
    assert warning.startswith("bertforge: warning: the validation split holds 1 document (10 documents in all)")
    assert warning.endswith("raise --validation-fraction to 0.2 (2 documents) or give more documents")
    code, err = run_cli(capsys, str(corpus), "--tokenizer", str(EN_VOCAB), "--out", str(tmp_path / "DATA"),
                        "--validation-fraction", "0.2", "--dupe-factor", "1", "--quiet", "--overwrite")
    assert code == 0 and warnings_of(err) == []


def test_no_warning_on_a_corpus_of_many_documents(tmp_path, capsys):
    corpus = documents_file(tmp_path / "many.txt", 200)
    code, err = run_cli(capsys, str(corpus), "--tokenizer", str(EN_VOCAB), "--out", str(tmp_path / "DATA"),
                        "--dupe-factor", "1", "--quiet")
    assert code == 0 and warnings_of(err) == [] and "200 documents" in err


def test_non_utf8_bytes_are_counted_and_long_lines_handled(tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait is nice .\nna\xefve people drink it .\n\n".encode("latin-1")
                      + ("word " * 20000 + ".\n").encode() + b"short end .\n")
    manifest = prepare([latin], EN_VOCAB, tmp_path / "d", dupe_factor=1, validation_fraction=0,
                       show_progress=False)
    assert manifest["counts"]["replaced_bytes"] == 2
    assert manifest["counts"]["truncated_instances"] >= 1
    assert PretrainData(tmp_path / "d").split("train")[0]["input_ids"].shape[0] <= 128


def chinese_files(tmp_path: Path) -> list[Path]:
    wiki = sorted((DATA / "zh_pretrain" / "zhwiki_readwiki100" / "words_txt").glob("*.txt.gz"))[:25]
    with gzip.open(DATA / "zh_pretrain" / "classic_novels" / "hongloumeng.txt.gz", "rt", encoding="utf-8") as handle:
        novel = [next(handle) for _ in range(120)]
    (tmp_path / "hongloumeng_start.txt").write_text("".join(novel), encoding="utf-8")
    return [*wiki, tmp_path / "hongloumeng_start.txt"]


@needs_shared
@pytest.mark.slow
def test_chinese_with_and_without_whole_word_masking(tmp_path):
    files = chinese_files(tmp_path)
    tok = load_tokenizer(ZH_VOCAB)
    corpus, _ = tokenize_corpus(files, tok, fmt="text", chinese_wwm=True)
    assert corpus.word_starts is not None
    raw = corpus.tokens.tobytes()
    located: dict[bytes, np.ndarray | None] = {}   # a segment's ids -> its word-start flags where it occurs

    def locate(segment: np.ndarray) -> np.ndarray | None:
        """The corpus word starts of `segment` if it occurs exactly once in the corpus, else None."""
        needle = segment.astype(np.int32).tobytes()
        hits: list[int] = []
        found = raw.find(needle)
        while found >= 0 and len(hits) < 2:
            if found % 4 == 0:
                hits.append(found // 4)
            found = raw.find(needle, found + 1)
        if len(hits) != 1:
            return None
        return corpus.word_starts[hits[0]:hits[0] + len(segment)].copy()

    def word_of_instance(item) -> np.ndarray | None:
        """Word index of every position: specials and segment starts begin words, else the corpus's jieba words."""
        ids, types = item["original_ids"], item["token_type_ids"]
        a_len = int((types == 0).sum())
        flags = [np.ones(1, dtype=bool)]
        for segment in (ids[1:a_len - 1], ids[a_len:-1]):
            key = segment.tobytes()
            if key not in located:
                located[key] = locate(segment)
            if located[key] is None:
                return None
            starts = located[key].copy()
            starts[0] = True
            flags += [starts, np.ones(1, dtype=bool)]
        return np.cumsum(np.concatenate(flags)) - 1

    def partial_words(path: Path, limit: int = 400) -> tuple[int, int]:
        """(words masked whole with 2+ characters, words masked in part) over the first `limit` instances."""
        store = PretrainData(path).split("train")
        whole = partial = 0
        for i in range(min(limit, len(store))):
            item = store[i]
            words = word_of_instance(item)
            if words is None:
                continue
            masked = np.zeros(len(words), dtype=bool)
            masked[item["masked_lm_positions"]] = True
            for w in np.unique(words[masked]):
                members = words == w
                if members.sum() > 1:
                    whole += bool(masked[members].all())
                    partial += not masked[members].all()
        return whole, partial

    manifest = prepare(files, ZH_VOCAB, tmp_path / "wwm", fmt="text", chinese_wwm=True, dupe_factor=1,
                       validation_fraction=0, show_progress=False)
    assert manifest["options"]["chinese_wwm"] and manifest["options"]["whole_word_mask"]
    assert manifest["counts"]["instances"] > 1000 and manifest["formats"] == {"text": len(files)}
    whole, partial = partial_words(tmp_path / "wwm")
    assert whole > 100 and partial == 0
    prepare(files, ZH_VOCAB, tmp_path / "plain", fmt="text", dupe_factor=1, validation_fraction=0,
            show_progress=False)
    whole, partial = partial_words(tmp_path / "plain")
    assert partial > whole   # character masking splits most words


def test_jieba_words_become_whole_word_groups(tmp_path):
    source = tmp_path / "zh.txt"
    source.write_text("我爱北京天安门。\n", encoding="utf-8")
    corpus, _ = tokenize_corpus([source], load_tokenizer(ZH_VOCAB), chinese_wwm=True)
    # jieba: 我 / 爱 / 北京 / 天安门 / 。
    assert corpus.word_starts.tolist() == [True, True, True, False, True, False, False, True]


# --- bad input through the CLI ---------------------------------------------------------------------------------------

def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["prepare", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("option", [["--max-seq-len", "4"], ["--masked-lm-prob", "0"], ["--masked-lm-prob", "1.2"],
                                    ["--short-seq-prob", "-0.1"], ["--dupe-factor", "0"], ["--max-predictions", "0"],
                                    ["--validation-fraction", "1"], ["--workers", "0"],
                                    ["--seed", "-1"]])
def test_bad_options_fail_in_one_line(tmp_path, capsys, option):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "--tokenizer", str(EN_VOCAB), "--out", str(out), "--quiet", *option)
    assert code == 2 and err.count("\n") == 1 and err.startswith("bertforge: error: ") and option[0] in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_inputs_fail_in_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a\n\nb\n")
    binary = tmp_path / "binary.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    no_specials = tmp_path / "vocab.txt"
    no_specials.write_text("a\nb\nc\n")
    cases = [
        ([str(tmp_path / "missing.txt"), "--tokenizer", str(EN_VOCAB)], "no such file"),
        ([str(tmp_path / "*.none"), "--tokenizer", str(EN_VOCAB)], "no file matches"),
        ([str(empty), "--tokenizer", str(EN_VOCAB)], "no document"),
        ([str(tiny), "--tokenizer", str(EN_VOCAB)], "at least 2 tokens"),
        ([str(binary), "--tokenizer", str(EN_VOCAB)], "binary"),
        ([str(tiny), "--tokenizer", str(no_specials)], "special token"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        code, err = run_cli(capsys, *args, "--out", str(out), "--quiet")
        assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, (args, err)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary folder left behind"


def test_output_folder_rules(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat .\nit was happy .\n\nthe dog ran away .\nit came back .\n")
    base = [str(corpus), "--tokenizer", str(EN_VOCAB), "--dupe-factor", "1", "--quiet"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, err = run_cli(capsys, *base, "--out", str(foreign), "--overwrite")
    assert code == 2 and "not a bertforge DATA folder" in err and (foreign / "notes.txt").read_text() == "mine"
    out = tmp_path / "data"
    assert run_cli(capsys, *base, "--out", str(out))[0] == 0
    before = shard_hashes(out)
    code, err = run_cli(capsys, *base, "--out", str(out), "--seed", "3")
    assert code == 2 and "--overwrite" in err and shard_hashes(out) == before
    assert run_cli(capsys, *base, "--out", str(out), "--seed", "3", "--overwrite")[0] == 0
    assert json.loads((out / "manifest.json").read_text())["options"]["seed"] == 3
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert run_cli(capsys, *base, "--out", str(empty_dir))[0] == 0


# --- spilled instances and the bounded-memory shuffles ------------------------------------------------------------------

def numbered_batch(start: int, count: int) -> InstanceBatch:
    """Instances whose ids encode their number i: [2, i, 3, i, 3] with one mask at position 1."""
    ids = np.array([[2, i, 3, i, 3] for i in range(start, start + count)], dtype=np.int32).ravel()
    counts = np.arange(count + 1, dtype=np.int64)
    return InstanceBatch(ids, counts * 5, np.full(count, 3, np.int32), np.zeros(count, bool), counts,
                         np.ones(count, np.int32), np.arange(start, start + count, dtype=np.int32),
                         np.full(count, 4, np.int32), np.zeros(count, bool), np.zeros(count, bool))


def numbers(batches) -> np.ndarray:
    return np.concatenate([batch.ids[1::5] for batch in batches])


def test_permute_external_applies_the_permutation_through_buckets(tmp_path):
    run = RunFile(tmp_path / "run", np.dtype(np.int32))
    for start in range(0, 1000, 300):
        run.append(numbered_batch(start, min(300, 1000 - start)))
    permutation = np.random.default_rng(0).permutation(1000)
    out = list(permute_external(run, permutation, tmp_path / "bucket", chunk=64, max_buckets=7, out_chunk=50))
    assert np.array_equal(numbers(out), permutation)
    assert all(np.array_equal(b.masked_ids, b.ids[1::5]) for b in out)   # masks travel with their instance
    assert not list(tmp_path.glob("bucket*"))


def test_random_merge_is_a_full_shuffle(tmp_path):
    runs = []
    for r in range(4):   # runs of different sizes, each internally in order
        run = RunFile(tmp_path / f"r{r}", np.dtype(np.int32))
        run.append(numbered_batch(r * 1000, 250 * (r + 1)))
        runs.append(run)
    merged = numbers(random_merge(runs, np.random.default_rng(1), chunk=100))
    assert sorted(merged.tolist()) == sorted(numbers(run.read(0, run.count) for run in runs).tolist())
    total = len(merged)
    for r in range(4):   # every run is spread over the whole output, in proportion
        where = np.flatnonzero(merged // 1000 == r)
        assert abs(where.mean() / total - 0.5) < 0.05
        assert np.all(np.diff(merged[where]) > 0)   # a run's own order is kept (it was shuffled before writing)
