"""The bad-input table: every case is a real `python -m bertforge ...` invocation with something wrong in it.

A case names the command line (placeholders filled from the session's real tokenizer, DATA and RUN folders and
the case's own scratch folder), the files to set up first, a substring the one-line message must contain, and the
output path that must not be left half-written. tests/faults/test_bad_input.py runs them; bad_input_table.py turns
the results into docs/faults.md's table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

Setup = Callable[[Path], None]


@dataclass(frozen=True)
class Case:
    id: str
    what: str                      # the bad input, for the table
    args: tuple[str, ...]          # {tok} {data} {run} {model} {synthetic} {corpus} {tmp} placeholders
    expect: str                    # a substring of the message (case-insensitive)
    out: str | None = None         # a path (with placeholders) that must be absent or unchanged afterwards
    setup: tuple[Setup, ...] = field(default_factory=tuple)
    known_bug: str | None = None   # why this case is not clean yet (reported to the owner); the test is xfail(strict)


def write(name: str, content: str | bytes) -> Setup:
    def make(tmp: Path) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return make


def gpt2_folder(tmp: Path) -> None:
    folder = tmp / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                    "n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 50}))
    (folder / "model.safetensors").write_bytes(b"")


BINARY = bytes(range(256)) * 64  # deterministic non-text bytes (NULs, invalid UTF-8)
SOME_TEXT = "The cat sat on the mat. It was happy.\n\nDogs bark loudly. They run.\n"
TRAIN_TSV = "sentence\tlabel\n" + "".join(f"{'good' if i % 2 else 'bad'} film {i}\t{i % 2}\n" for i in range(8))
PRETRAIN = ("pretrain", "--data", "{data}", "--out", "{tmp}/RUN", "--model", "tiny", "--device", "cpu")
PREPARE = ("prepare", "{corpus}", "--tokenizer", "{tok}", "--out", "{tmp}/DATA", "--workers", "1", "--quiet")
FINETUNE = ("finetune", "classify", "--model", "{run}", "--out", "{tmp}/FT", "--device", "cpu")

CASES: list[Case] = [
    # ---- tokenizer train
    Case("tok-missing-corpus", "tokenizer train: corpus file does not exist",
         ("tokenizer", "train", "{tmp}/nope.txt", "--out", "{tmp}/tok"), "nope.txt", "{tmp}/tok"),
    Case("tok-empty-corpus", "tokenizer train: empty corpus file",
         ("tokenizer", "train", "{tmp}/empty.txt", "--out", "{tmp}/tok"), "no text", "{tmp}/tok",
         (write("empty.txt", ""),)),
    Case("tok-binary-corpus", "tokenizer train: binary corpus file",
         ("tokenizer", "train", "{tmp}/blob.bin", "--out", "{tmp}/tok"), "blob.bin", "{tmp}/tok",
         (write("blob.bin", BINARY),)),
    Case("tok-zero-vocab", "tokenizer train: --vocab-size 0",
         ("tokenizer", "train", "{corpus}", "--out", "{tmp}/tok", "--vocab-size", "0"), "vocab", "{tmp}/tok"),
    Case("tok-out-occupied", "tokenizer train: --out holds something else",
         ("tokenizer", "train", "{corpus}", "--out", "{tmp}/mine", "--vocab-size", "200"), "mine", "{tmp}/mine",
         (write("mine/notes.txt", "my notes"),)),
    # ---- prepare
    Case("prep-missing-corpus", "prepare: corpus file does not exist",
         ("prepare", "{tmp}/nope.txt", "--tokenizer", "{tok}", "--out", "{tmp}/DATA"), "nope.txt", "{tmp}/DATA"),
    Case("prep-empty-corpus", "prepare: empty corpus file",
         ("prepare", "{tmp}/empty.txt", "--tokenizer", "{tok}", "--out", "{tmp}/DATA"), "no document", "{tmp}/DATA",
         (write("empty.txt", ""),)),
    Case("prep-binary-corpus", "prepare: binary corpus file",
         ("prepare", "{tmp}/blob.bin", "--tokenizer", "{tok}", "--out", "{tmp}/DATA"), "blob.bin", "{tmp}/DATA",
         (write("blob.bin", BINARY),)),
    Case("prep-vocab-no-specials", "prepare: vocab.txt without [CLS]/[SEP]/[MASK]",
         ("prepare", "{corpus}", "--tokenizer", "{tmp}/vocab.txt", "--out", "{tmp}/DATA"), "[", "{tmp}/DATA",
         (write("vocab.txt", "the\ncat\nsat\non\nmat\n"),)),
    Case("prep-missing-tokenizer", "prepare: --tokenizer folder does not exist",
         ("prepare", "{corpus}", "--tokenizer", "{tmp}/none", "--out", "{tmp}/DATA"), "none", "{tmp}/DATA"),
    Case("prep-mlm-prob-high", "prepare: --masked-lm-prob 1.5 (outside (0,1))",
         (*PREPARE, "--masked-lm-prob", "1.5"), "masked-lm-prob", "{tmp}/DATA"),
    Case("prep-mlm-prob-zero", "prepare: --masked-lm-prob 0",
         (*PREPARE, "--masked-lm-prob", "0"), "masked-lm-prob", "{tmp}/DATA"),
    Case("prep-short-seq-negative", "prepare: --short-seq-prob -0.1",
         (*PREPARE, "--short-seq-prob", "-0.1"), "short-seq-prob", "{tmp}/DATA"),
    Case("prep-seq-len-tiny", "prepare: --max-seq-len 2 (no room for a pair)",
         (*PREPARE, "--max-seq-len", "2"), "max-seq-len", "{tmp}/DATA"),
    Case("prep-dupe-zero", "prepare: --dupe-factor 0", (*PREPARE, "--dupe-factor", "0"), "dupe-factor",
         "{tmp}/DATA"),
    Case("prep-out-occupied", "prepare: --out holds something else",
         ("prepare", "{corpus}", "--tokenizer", "{tok}", "--out", "{tmp}/mine", "--workers", "1"), "mine",
         "{tmp}/mine", (write("mine/notes.txt", "my notes"),)),
    # ---- pretrain
    Case("pt-negative-steps", "pretrain: --max-steps -5", (*PRETRAIN, "--max-steps", "-5"), "max-steps",
         "{tmp}/RUN"),
    Case("pt-zero-batch", "pretrain: --batch-size 0", (*PRETRAIN, "--batch-size", "0"), "batch-size", "{tmp}/RUN"),
    Case("pt-negative-lr", "pretrain: --lr -1", (*PRETRAIN, "--lr", "-1"), "lr", "{tmp}/RUN"),
    Case("pt-dropout-one", "pretrain: --dropout 1.0 (outside [0,1))", (*PRETRAIN, "--dropout", "1.0"), "dropout",
         "{tmp}/RUN"),
    Case("pt-unknown-option", "pretrain: unknown option --frobnicate", (*PRETRAIN, "--frobnicate"),
         "unrecognized arguments", "{tmp}/RUN"),
    Case("pt-bad-choice", "pretrain: --on-nan explode", (*PRETRAIN, "--on-nan", "explode"), "invalid choice",
         "{tmp}/RUN"),
    Case("pt-missing-data", "pretrain: --data folder does not exist",
         ("pretrain", "--data", "{tmp}/nodata", "--out", "{tmp}/RUN"), "nodata", "{tmp}/RUN"),
    Case("pt-data-not-data", "pretrain: --data is a tokenizer folder, not DATA",
         ("pretrain", "--data", "{tok}", "--out", "{tmp}/RUN"), "prepare", "{tmp}/RUN"),
    Case("pt-config-wrong-field", "pretrain: --model CONFIG.json with a misspelt field",
         ("pretrain", "--data", "{data}", "--out", "{tmp}/RUN", "--model", "{tmp}/cfg.json"), "hidden_sizee",
         "{tmp}/RUN", (write("cfg.json", json.dumps({"hidden_sizee": 64})),)),
    Case("pt-config-not-json", "pretrain: --model CONFIG.json that is not JSON",
         ("pretrain", "--data", "{data}", "--out", "{tmp}/RUN", "--model", "{tmp}/cfg.json"), "cfg.json",
         "{tmp}/RUN", (write("cfg.json", "{hidden_size: 64"),)),
    Case("pt-positions-too-short", "pretrain: model with 16 positions on DATA of --max-seq-len 32",
         ("pretrain", "--data", "{data}", "--out", "{tmp}/RUN", "--model", "{tmp}/cfg.json"), "32", "{tmp}/RUN",
         (write("cfg.json", json.dumps({"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                        "intermediate_size": 64, "max_position_embeddings": 16})),)),
    Case("pt-vocab-mismatch", "pretrain: --init a model whose vocabulary differs from DATA's",
         ("pretrain", "--data", "{synthetic}", "--out", "{tmp}/RUN", "--init", "{model}"), "vocab", "{tmp}/RUN"),
    Case("pt-out-occupied", "pretrain: --out holds something else",
         ("pretrain", "--data", "{data}", "--out", "{tmp}/mine", "--model", "tiny"), "mine", "{tmp}/mine",
         (write("mine/notes.txt", "my notes"),)),
    Case("pt-resume-nothing", "pretrain: --resume where there is no run",
         ("pretrain", "--data", "{data}", "--out", "{tmp}/RUN", "--resume"), "resume", "{tmp}/RUN"),
    Case("pt-out-of-memory", "pretrain: a batch estimated not to fit in memory",
         ("pretrain", "--data", "{data}", "--out", "{tmp}/RUN", "--model", "large", "--batch-size", "200000",
          "--device", "cpu"), "batch-size", "{tmp}/RUN"),
    # ---- evaluate / fill-mask / nsp / export
    Case("eval-gpt2", "evaluate: a GPT-2 model folder",
         ("evaluate", "--model", "{tmp}/gpt2", "--data", "{data}"), "gpt2", None, (gpt2_folder,)),
    Case("eval-vocab-mismatch", "evaluate: model and DATA with different vocabularies",
         ("evaluate", "--model", "{model}", "--data", "{synthetic}"), "vocab"),
    Case("fill-no-mask", "fill-mask: text without [MASK]", ("fill-mask", "--model", "{model}", "no mask here"),
         "[MASK]"),
    Case("fill-missing-model", "fill-mask: --model folder does not exist",
         ("fill-mask", "--model", "{tmp}/none", "a [MASK] ."), "none"),
    Case("fill-top-k-zero", "fill-mask: --top-k 0", ("fill-mask", "--model", "{model}", "a [MASK] .", "--top-k", "0"),
         "top-k"),
    Case("nsp-gpt2", "nsp: a GPT-2 model folder", ("nsp", "--model", "{tmp}/gpt2", "a b .", "c d ."), "gpt2", None,
         (gpt2_folder,)),
    Case("export-out-occupied", "export: --out holds something else",
         ("export", "--model", "{model}", "--out", "{tmp}/mine"), "mine", "{tmp}/mine",
         (write("mine/notes.txt", "my notes"),)),
    # ---- inspect
    Case("inspect-not-data", "inspect: a folder that is not DATA", ("inspect", "{tok}"), "prepare"),
    Case("inspect-negative-n", "inspect: -n -3", ("inspect", "{data}", "-n", "-3"), "num"),
    # ---- finetune / predict
    Case("ft-tsv-columns", "finetune: TSV row with a missing column (line 4)",
         (*FINETUNE, "--train", "{tmp}/train.tsv", "--dev", "{tmp}/train.tsv"), "train.tsv:4", "{tmp}/FT",
         (write("train.tsv", "sentence\tlabel\ngood film\t1\nbad film\t0\nno label here\ngreat\t1\n"),)),
    Case("ft-conll-columns", "finetune: CoNLL line with a missing tag column (line 3)",
         ("finetune", "ner", "--model", "{run}", "--train", "{tmp}/t.conll", "--dev", "{tmp}/t.conll", "--out",
          "{tmp}/FT"), "t.conll:3", "{tmp}/FT", (write("t.conll", "EU B-ORG\nrejects O\nGerman\ncall O\n"),)),
    Case("ft-squad-no-answers", "finetune: SQuAD question without answers (id q2)",
         ("finetune", "qa", "--model", "{run}", "--train", "{tmp}/s.json", "--dev", "{tmp}/s.json", "--out",
          "{tmp}/FT"), "q2", "{tmp}/FT",
         (write("s.json", json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "Paris is in France.", "qas": [
             {"id": "q1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]},
             {"id": "q2", "question": "What is Paris?"}]}]}]})),)),
    Case("ft-squad-not-json", "finetune: SQuAD file that is not JSON",
         ("finetune", "qa", "--model", "{run}", "--train", "{tmp}/s.json", "--dev", "{tmp}/s.json", "--out",
          "{tmp}/FT"), "s.json", "{tmp}/FT", (write("s.json", '{"data": [ {"title": '),)),
    Case("ft-zero-epochs", "finetune: --epochs 0",
         (*FINETUNE, "--train", "{tmp}/train.tsv", "--dev", "{tmp}/train.tsv", "--epochs", "0"), "epochs",
         "{tmp}/FT", (write("train.tsv", TRAIN_TSV),)),
    Case("ft-layer-lr-decay-zero", "finetune: --layer-lr-decay 0 (outside (0, 1])",
         (*FINETUNE, "--train", "{tmp}/train.tsv", "--dev", "{tmp}/train.tsv", "--layer-lr-decay", "0"),
         "layer-lr-decay", "{tmp}/FT", (write("train.tsv", TRAIN_TSV),)),
    Case("ft-seq-len-too-long", "finetune: --max-seq-len beyond the model's position table",
         (*FINETUNE, "--train", "{tmp}/train.tsv", "--dev", "{tmp}/train.tsv", "--max-seq-len", "4096"),
         "max-seq-len", "{tmp}/FT", (write("train.tsv", TRAIN_TSV),)),
    Case("ft-model-gpt2", "finetune: a GPT-2 model folder",
         ("finetune", "classify", "--model", "{tmp}/gpt2", "--train", "{tmp}/train.tsv", "--dev", "{tmp}/train.tsv",
          "--out", "{tmp}/FT"), "gpt2", "{tmp}/FT", (gpt2_folder, write("train.tsv", TRAIN_TSV))),
    Case("predict-not-finetuned", "predict: --model is a pre-training run, not a fine-tuned one",
         ("predict", "--model", "{run}", "--input", "{tmp}/in.tsv", "--out", "{tmp}/pred.tsv"), "finetune",
         "{tmp}/pred.tsv", (write("in.tsv", TRAIN_TSV),)),
    Case("ft-missing-train", "finetune: --train file does not exist",
         (*FINETUNE, "--train", "{tmp}/none.tsv", "--dev", "{tmp}/none.tsv"), "none.tsv", "{tmp}/FT"),
    Case("ft-resume-nothing", "finetune: --resume where no fine-tuning run was started",
         (*FINETUNE, "--train", "{tmp}/train.tsv", "--dev", "{tmp}/train.tsv", "--resume"), "no fine-tuning run to resume", "{tmp}/FT", (write("train.tsv", TRAIN_TSV),)),
    Case("ft-resume-overwrite", "finetune: --resume together with --overwrite",
         (*FINETUNE, "--train", "{tmp}/train.tsv", "--dev", "{tmp}/train.tsv", "--resume", "--overwrite"),
         "contradict", "{tmp}/FT", (write("train.tsv", TRAIN_TSV),)),
    Case("ft-headerless-columns", "finetune: --no-header file of 4 columns, text columns not named",
         (*FINETUNE, "--train", "{tmp}/cola.tsv", "--dev", "{tmp}/cola.tsv", "--no-header"), "--text-columns",
         "{tmp}/FT", (write("cola.tsv", "gj04\t1\t\tOur friends won't buy this analysis.\n"
                                        "gj04\t0\t*\tThey drank the pub.\n"),)),
]


def fill(text: str, paths: dict[str, Path]) -> str:
    return text.format(**{key: str(value) for key, value in paths.items()})


def snapshot(path: Path) -> dict[str, bytes] | None:
    """A folder's (or file's) contents, to show a failed command left it as it was."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(path.rglob("*"))}
