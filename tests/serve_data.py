"""Tiny models, fine-tuned folders and a run for the `bertforge serve` tests, made with the real code paths, and
a small HTTP client for the API.

A randomly initialised tiny BERT over a small English + Chinese word vocabulary stands in for a pre-trained model;
`finetune` trains one epoch of classify / ner / qa on a few hand-written examples from it, and `pretrain` runs a
few steps on synthetic data (tests/training_data.py) so that the run has training and validation metrics.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path


from bertforge.finetune import FinetuneConfig, finetune
from bertforge.pretrain import PretrainConfig, pretrain
from training_data import build_data

WORDS = ("the a an is was to of in on and at man woman went store shop bought gallon milk bread he she it they "
         "penguin penguins are flightless birds good great fine bad awful poor film movie day book john mary "
         "paris london berlin lives works visited who where what city capital france germany river flows "
         "through . , ? ! ' 's").split()
CHARACTERS = "北京是中国的首都上海城市人大学我们他在去了吗"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

CLASSIFY_ROWS = [("a good film", "pos"), ("a great book", "pos"), ("a fine day", "pos"), ("good day", "pos"),
                 ("a bad film", "neg"), ("an awful book", "neg"), ("a poor day", "neg"), ("bad movie", "neg")]
NER_SENTENCES = [[("john", "B-PER"), ("lives", "O"), ("in", "O"), ("paris", "B-LOC"), (".", "O")],
                 [("mary", "B-PER"), ("works", "O"), ("in", "O"), ("london", "B-LOC"), (".", "O")],
                 [("john", "B-PER"), ("visited", "O"), ("berlin", "B-LOC"), (".", "O")]]
QA_PARAGRAPHS = [("john lives in paris .", [("where does john live ?", "paris", 14)]),
                 ("mary works in london .", [("who works in london ?", "mary", 0)])]


def write_vocab(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(SPECIALS + WORDS + list(CHARACTERS)) + "\n", encoding="utf-8")
    return path


def _finetune(task: str, model: Path, train: Path, out: Path, epochs: int = 1) -> Path:
    finetune(FinetuneConfig(task=task, model=str(model), train=str(train), dev=str(train), out=str(out),
                            epochs=epochs, batch_size=4, max_seq_len=32, lr=3e-3, warmup_ratio=0.0, device="cpu"))
    return out


def make_classifier(root: Path, model: Path) -> Path:
    train = root / "classify.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"{s}\t{l}\n" for s, l in CLASSIFY_ROWS), encoding="utf-8")
    return _finetune("classify", model, train, root / "classifier")


def make_tagger(root: Path, model: Path) -> Path:
    train = root / "ner.conll"
    train.write_text("\n".join("".join(f"{w} {t}\n" for w, t in s) for s in NER_SENTENCES), encoding="utf-8")
    return _finetune("ner", model, train, root / "tagger", epochs=20)  # learns the three sentences' tags


def make_reader(root: Path, model: Path) -> Path:
    paragraphs = [{"context": context,
                   "qas": [{"id": f"q{p}{k}", "question": question, "answers": [{"text": text, "answer_start": start}]}
                           for k, (question, text, start) in enumerate(questions)]}
                  for p, (context, questions) in enumerate(QA_PARAGRAPHS)]
    train = root / "qa.json"
    train.write_text(json.dumps({"data": [{"title": "t", "paragraphs": paragraphs}]}), encoding="utf-8")
    return _finetune("qa", model, train, root / "reader")


def make_run(root: Path) -> Path:
    """A finished pre-training run: metrics.jsonl with training lines and two validation lines, checkpoints."""
    run = root / "RUN"
    pretrain(PretrainConfig(data=build_data(root / "DATA"), out=run, model="tiny", batch_size=4, lr=1e-3,
                            warmup_steps=2, dropout=0.0, max_steps=6, log_every=1, eval_every=3, save_every=3))
    return run


def call(base: str, path: str, body=None, *, raw: bytes | None = None) -> tuple[int, object]:
    """(status, parsed JSON) of GET `path`, or of POST when `body` (JSON-encoded) or `raw` bytes are given."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(base + path, data=data, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def ok(base: str, path: str, body=None):
    status, data = call(base, path, body)
    assert status == 200, data
    return data
