"""Task readers and featurisation on real slices of ../shared/data, and the quirks real files have."""

import gzip
import json
import logging
from pathlib import Path

import pytest

from bertforge.errors import BertforgeError
from bertforge.metrics import cmrc_exact, normalize_answer
from bertforge.tasks import TASKS, TaskOptions
from bertforge.tasks.base import IGNORE_INDEX, Evaluation, collate_features
from bertforge.tasks.qa import detect_language
from bertforge.tokenizer import load_tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")


@pytest.fixture(scope="module")
def en_tokenizer():
    return load_tokenizer(DATA / "reference" / "en_vocab_8k.txt")


@pytest.fixture(scope="module")
def zh_tokenizer():
    return load_tokenizer(DATA / "reference" / "zh_vocab_6k.txt")


def task(name, **options):
    return TASKS[name](TaskOptions(**options))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ classify

def test_sst2_reader_and_features(en_tokenizer):
    classify = task("classify")
    examples = classify.read(DATA / "glue" / "SST-2" / "dev.tsv.gz")
    assert len(examples) == 872                                       # README: 872 dev rows
    assert sum(e.label == "1" for e in examples) == 444
    assert all(len(e.texts) == 1 for e in examples)
    assert any('"' in e.texts[0] or "'" in e.texts[0] for e in examples)  # unquoted TSV kept verbatim
    classify.fit_labels(examples, Path("dev"))
    assert classify.label_names == ["0", "1"]
    features = classify.featurize(examples[:50], en_tokenizer, 16, train=True)
    assert all(f.input_ids[0] == en_tokenizer.cls_id and f.input_ids[-1] == en_tokenizer.sep_id for f in features)
    assert max(len(f.input_ids) for f in features) == 16               # long ones truncated to the window
    assert set(sum((f.token_type_ids for f in features), [])) == {0}
    batch = collate_features(features[:4], en_tokenizer.pad_id, packed=False)  # dynamic padding: the batch's longest
    assert batch["input_ids"].shape == (4, max(len(f.input_ids) for f in features[:4]))
    assert batch["attention_mask"].sum().item() == sum(len(f.input_ids) for f in features[:4])
    packed = collate_features(features[:4], en_tokenizer.pad_id)      # the default: the real tokens only
    assert packed["input_ids"].tolist() == batch["input_ids"][batch["attention_mask"].bool()].tolist()
    lengths = [len(f.input_ids) for f in features[:4]]
    assert packed["cu_seqlens"].tolist() == [0, *(sum(lengths[:i + 1]) for i in range(4))]


def test_mrpc_bom_and_column_names(en_tokenizer):
    # MRPC starts with a BOM and names its columns Quality / #1 String / #2 String.
    for options in ({}, {"text_columns": ("sentence1", "sentence2"), "label_column": "label"}):
        classify = task("classify", **options)
        examples = classify.read(DATA / "glue" / "MRPC" / "train.tsv.gz")
        assert len(examples) == 3667
        assert all(len(e.texts) == 2 for e in examples)
        assert {e.label for e in examples} == {"0", "1"}
    classify.fit_labels(examples, Path("train"))
    feature = classify.featurize(examples[:1], en_tokenizer, 128, train=True)[0]
    first_sep = feature.input_ids.index(en_tokenizer.sep_id)
    assert feature.token_type_ids[:first_sep + 1] == [0] * (first_sep + 1)
    assert set(feature.token_type_ids[first_sep + 1:]) == {1}
    # a pair longer than the window is cut longest-first, keeping both [SEP]s
    short = classify.featurize(examples[:20], en_tokenizer, 20, train=True)
    assert all(len(f.input_ids) <= 20 and f.input_ids.count(en_tokenizer.sep_id) == 2 for f in short)


def test_chnsenticorp_reader(zh_tokenizer):
    classify = task("classify")
    examples = classify.read(DATA / "zh_tasks" / "chnsenticorp" / "dev.tsv.gz")
    assert len(examples) == 1200 and sum(e.label == "0" for e in examples) == 607
    classify.fit_labels(examples, Path("dev"))
    feature = classify.featurize(examples[:1], zh_tokenizer, 64, train=True)[0]
    tokens = zh_tokenizer.convert_ids_to_tokens(feature.input_ids)
    assert tokens[0] == "[CLS]" and len(tokens) > 10                   # Chinese split into characters


def test_classify_csv_jsonl_and_regression(tmp_path, en_tokenizer):
    csv_file = write(tmp_path / "t.csv", 'text,label\n"good, really",pos\nbad,neg\n')
    assert [e.texts for e in task("classify").read(csv_file)] == [("good, really",), ("bad",)]
    jsonl = write(tmp_path / "t.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 3.5}\n\n'
                                        '{"sentence1": "c", "sentence2": "d", "score": 1}\n')
    regression = task("classify", regression=True)
    examples = regression.read(jsonl)
    regression.fit_labels(examples, jsonl)
    assert regression.num_labels == 1
    assert [f.label for f in regression.featurize(examples, en_tokenizer, 16, train=True)] == [3.5, 1.0]


def test_classify_bad_input(tmp_path):
    classify = task("classify")
    bad = write(tmp_path / "bad.tsv", "sentence\tlabel\ngood\t1\nbad\t0\textra\n")
    with pytest.raises(BertforgeError, match=r"bad.tsv:3: expected 2 columns"):
        classify.read(bad)
    empty = write(tmp_path / "empty.tsv", "sentence\tlabel\n")
    with pytest.raises(BertforgeError, match="no examples"):
        classify.fit_labels(classify.read(empty), empty)
    train = write(tmp_path / "train.tsv", "sentence\tlabel\na\t0\nb\t1\n")
    dev = write(tmp_path / "dev.tsv", "sentence\tlabel\nc\t2\n")
    classify.fit_labels(classify.read(train), train)
    with pytest.raises(BertforgeError, match="'2' do not occur in the training file"):
        classify.check_labels(classify.read(dev), dev)
    with pytest.raises(BertforgeError, match="--text-columns"):
        classify.read(write(tmp_path / "odd.tsv", "foo\tlabel\nx\t1\n"))
    with pytest.raises(BertforgeError, match="needs a number"):
        task("classify", regression=True).read(write(tmp_path / "r.tsv", "sentence\tlabel\nx\thigh\n"))


def test_unlabelled_test_files_keep_their_index_and_text_count_is_checked(tmp_path):
    # GLUE test files: `index` + text column(s), no label. A submission keys predictions on that index.
    pairs = task("classify")
    pairs.fit_labels(pairs.read(DATA / "glue" / "MRPC" / "train.tsv.gz"), Path("train"))
    test = pairs.read(DATA / "glue" / "MRPC" / "test.tsv.gz", labelled=False)
    assert len(test) == 1725 and test[0].id == "0" and test[-1].id == "1724" and test[0].label is None
    out = tmp_path / "pred.tsv"
    pairs.write_predictions(test[:3], Evaluation(["1", "0", "1"], {}), out)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "index\tsentence1\tsentence2\tprediction"
    assert [line.split("\t")[0] for line in lines[1:]] == ["0", "1", "2"]
    assert [line.split("\t")[-1] for line in lines[1:]] == ["1", "0", "1"]
    # a pair model given single sentences (SST-2's test file) is an error, not silent nonsense
    with pytest.raises(BertforgeError, match="fine-tuned on sentence pairs, but this file gives 1 text column"):
        pairs.read(DATA / "glue" / "SST-2" / "test.tsv.gz", labelled=False)
    restored = TASKS["classify"](TaskOptions(), **pairs.state())  # as `predict` rebuilds it from finetune.json
    with pytest.raises(BertforgeError, match="sentence pairs"):
        restored.read(DATA / "glue" / "SST-2" / "test.tsv.gz", labelled=False)
    single = task("classify")
    single.fit_labels(single.read(DATA / "glue" / "SST-2" / "dev.tsv.gz"), Path("dev"))
    with pytest.raises(BertforgeError, match="fine-tuned on single sentences"):
        single.read(DATA / "glue" / "MRPC" / "dev.tsv.gz")
    assert TASKS["classify"](TaskOptions(), label_names=["0", "1"]).text_count is None  # folders from before


def test_headerless_tsv_afqmc_and_cola_style(tmp_path):
    afqmc = DATA / "zh_tasks" / "afqmc"
    with pytest.raises(BertforgeError, match="--no-header if that first line is data"):
        task("classify").read(afqmc / "dev.txt.gz")                   # the first row is data, not names
    pairs = task("classify", no_header=True)
    train = pairs.read(afqmc / "dev.txt.gz")
    assert len(train) == 4316 and train[0].line == 1                  # README: 4,316 rows, no header
    assert train[0].texts == ("双十一花呗提额在哪", "里可以提花呗额度") and train[0].label == "0"
    assert sum(e.label == "1" for e in train) == 1338
    pairs.fit_labels(train, afqmc / "dev.txt.gz")
    assert pairs.text_count == 2 and pairs.label_names == ["0", "1"]
    # the CLUE JSON of the same rows (its own keys), and the unlabelled two-column test file
    clue = pairs.read(afqmc / "clue_json" / "dev.json.gz")
    assert [e.texts for e in clue[:50]] == [e.texts for e in train[:50]] and clue[7].id == "7"
    test = pairs.read(afqmc / "test.txt.gz", labelled=False)
    assert len(test) == 3861 and all(e.label is None and len(e.texts) == 2 for e in test)
    # CoLA-style: source, label, original label, sentence; columns by number
    cola = write(tmp_path / "cola.tsv", "gj04\t1\t\tOur friends won't buy this analysis.\n"
                                        "gj04\t0\t*\tThey drank the pub.\n")
    single = task("classify", no_header=True, text_columns=("3",), label_column="1")
    assert [(e.texts, e.label) for e in single.read(cola)] == [(("Our friends won't buy this analysis.",), "1"),
                                                              (("They drank the pub.",), "0")]
    with pytest.raises(BertforgeError, match="4 columns and no header; pass --text-columns"):
        task("classify", no_header=True).read(cola)
    ragged = write(tmp_path / "ragged.tsv", "a\tb\t1\nc\t0\n")
    with pytest.raises(BertforgeError, match="ragged.tsv:2: expected 3 columns"):
        task("classify", no_header=True).read(ragged)


# ----------------------------------------------------------------------------------------------------- ner

def test_conll2003_reader(en_tokenizer):
    ner = task("ner")
    sentences = ner.read(DATA / "conll2003" / "valid.txt.gz")
    assert len(sentences) == 3250                                        # README counts
    assert sum(len(s.tokens) for s in sentences) == 51362
    assert not any("-DOCSTART-" in s.tokens for s in sentences)
    ner.fit_labels(sentences, Path("valid"))
    assert set(ner.label_names) == {"O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"}
    features = ner.featurize(sentences[:200], en_tokenizer, 128, train=True)
    for feature in features:
        sentence = sentences[feature.example_index]
        labelled = [i for i, label in enumerate(feature.label) if label != IGNORE_INDEX]
        assert labelled == [position for position, _ in feature.extra["words"]]   # first word-piece only
        for position, word in feature.extra["words"]:
            assert ner.label_names[feature.label[position]] == sentence.tags[word]


def test_conll_quirks(tmp_path, en_tokenizer, caplog):
    text = ("-DOCSTART- -X- -X- O\n\n"
            "\ufeffEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"
            "\ufeff\n"                        # a line that is only a BOM
            "Peter NNP B-NP B-PER\n😀 X X O\n\ufe0f X X O\nBlackburn NNP I-NP I-PER\n"
            "   \n"                           # whitespace only
            + "".join(f"w{i} NN I-NP O\n" for i in range(40)))
    path = write(tmp_path / "quirks.conll", text)
    ner = task("ner")
    with caplog.at_level(logging.WARNING, logger="bertforge.finetune"):
        sentences = ner.read(path)
        assert [s.tokens[0] for s in sentences] == ["EU", "Peter", "w0"]
        ner.fit_labels(sentences, path)
        features = ner.featurize(sentences, en_tokenizer, 16, train=True)
    assert "only whitespace or a BOM" in caplog.text
    assert "no word-pieces" in caplog.text and "split into windows" in caplog.text
    emoji_sentence = [f for f in features if f.example_index == 1][0]
    positions = dict((word, position) for position, word in emoji_sentence.extra["words"])
    assert emoji_sentence.input_ids[positions[2]] == en_tokenizer.unk_id      # the variation selector -> [UNK]
    # the 40-word sentence is split so that every word is predicted exactly once
    long_windows = [f for f in features if f.example_index == 2]
    assert len(long_windows) > 1 and all(len(f.input_ids) <= 16 for f in long_windows)
    assert sorted(w for f in long_windows for _, w in f.extra["words"]) == list(range(40))


def test_conll_bad_input(tmp_path):
    ner = task("ner")
    with pytest.raises(BertforgeError, match=r"bad.conll:3: expected 4 columns"):
        ner.read(write(tmp_path / "bad.conll", "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGerman JJ B-MISC\n"))
    with pytest.raises(BertforgeError, match="no sentences"):
        ner.fit_labels([], tmp_path / "empty.conll")
    ner.fit_labels(ner.read(write(tmp_path / "t.conll", "a O\nb B-PER\n")), tmp_path / "t.conll")
    with pytest.raises(BertforgeError, match="'B-LOC' do not occur"):
        ner.check_labels(ner.read(write(tmp_path / "d.conll", "c B-LOC\n")), tmp_path / "d.conll")


# ------------------------------------------------------------------------------------------------------ qa

def squad_split(tmp_path: Path, articles: slice, name: str) -> Path:
    """A slice of the SQuAD v1.1 dev set by article (the only SQuAD split in ../shared/data)."""
    with gzip.open(DATA / "squad" / "v1.1" / "dev-v1.1.json.gz", "rt", encoding="utf-8") as handle:
        data = json.load(handle)
    data["data"] = data["data"][articles]
    return write(tmp_path / name, json.dumps(data))


def test_squad_windows_map_answers_back(tmp_path, en_tokenizer):
    qa = task("qa", doc_stride=32)
    path = squad_split(tmp_path, slice(0, 2), "squad.json")
    examples = qa.read(path)
    assert {e.qid for e in examples} and all(e.answers for e in examples)
    qa.fit_labels(examples, path)
    assert qa.lang == "en"
    features = qa.featurize(examples, en_tokenizer, 96, train=True)
    assert len(features) > len(examples)                                  # long contexts need several windows
    hits = exact = 0
    for feature in features:
        start, end = feature.label
        assert len(feature.input_ids) <= 96
        if (start, end) == (0, 0):
            continue
        hits += 1
        example = examples[feature.example_index]
        text = example.context[feature.extra["offsets"][start][0]:feature.extra["offsets"][end][1]]
        # the whole word-pieces that cover the answer ("gold" inside "golden" gives "golden")
        assert example.answers[0] in text
        exact += normalize_answer(text) == normalize_answer(example.answers[0])
    assert hits >= len(examples)                                         # every answer lies in some window
    assert exact >= 0.95 * hits
    # each context token is "max context" in exactly one window of its question
    by_example = {}
    for feature in features:
        for position in feature.extra["max_context"]:
            by_example.setdefault(feature.example_index, []).append(feature.extra["offsets"][position])
    for index, spans in by_example.items():
        assert len(spans) == len(set(spans)) == len(en_tokenizer.backend.encode(
            examples[index].context, add_special_tokens=False).ids)


def test_squad_answer_start_mismatch_is_skipped_and_counted(tmp_path, en_tokenizer, caplog):
    data = {"data": [{"title": "t", "paragraphs": [{"context": "Paris is the capital of France.", "qas": [
        {"id": "good", "question": "What is the capital?", "answers": [{"text": "Paris", "answer_start": 0}]},
        {"id": "bad", "question": "Which country?", "answers": [{"text": "France", "answer_start": 3}]}]}]}]}
    path = write(tmp_path / "m.json", json.dumps(data))
    qa = task("qa")
    with caplog.at_level(logging.WARNING, logger="bertforge.finetune"):
        examples = qa.read(path)
    assert "1 answer(s) whose answer_start does not match" in caplog.text
    assert [e.answer_start for e in examples] == [0, None]
    assert [f.example_index for f in qa.featurize(examples, en_tokenizer, 64, train=True)] == [0]
    with pytest.raises(BertforgeError, match="not valid JSON"):
        qa.read(write(tmp_path / "broken.json", "{"))


def test_cmrc2018_windows_and_language(zh_tokenizer, tmp_path):
    qa = task("qa", doc_stride=64)
    examples = qa.read(DATA / "zh_tasks" / "cmrc2018" / "cmrc2018_trial.json.gz")[:60]
    assert detect_language(examples) == "zh"
    qa.fit_labels(examples, Path("trial"))
    assert qa.lang == "zh"
    features = qa.featurize(examples, zh_tokenizer, 192, train=True)
    found = 0
    for feature in features:
        if feature.label == (0, 0):
            continue
        start, end = feature.label
        example = examples[feature.example_index]
        text = example.context[feature.extra["offsets"][start][0]:feature.extra["offsets"][end][1]]
        found += cmrc_exact(text, example.answers[0]) == 1.0
    assert found >= 0.9 * len({f.example_index for f in features if f.label != (0, 0)})


def test_cli_task_names_match_the_task_registry() -> None:
    from bertforge.cli.finetune import TASK_NAMES
    from bertforge.tasks import TASKS

    assert set(TASK_NAMES) == set(TASKS)
