"""`bertforge demo`: the whole pipeline on the bundled corpus in about ten CPU minutes.

tokenizer -> prepared instances -> MLM + NSP pre-training under a wall-clock budget -> held-out accuracy next to
trivial baselines, fill-mask and NSP examples like the paper's, and where the run, model and curves are.

Choices for ~4 MB of text and a few CPU minutes (the budget, not the corpus, is the limit; the recipe has to show
held-out MLM and NSP gains and sensible examples on a machine that fits only a couple of thousand steps):
- vocabulary 4,096 WordPiece entries: with ~1M words of text a 30k vocabulary leaves most entries seen a handful
  of times (their embeddings would stay near their initialisation), and the MLM softmax over the vocabulary is a
  large share of a `tiny` step; at 4k every entry is frequent and that share halves against 8k;
- the `tiny` model (2 layers, 128 hidden) with 8 heads of 16 instead of 2 of 64: ten minutes of two cores is ~5e13
  FLOPs, for which the compute-optimal size (about C/120 squared-rooted, Hoffmann et al. 2022) is under a million
  non-embedding parameters; `tiny` has 0.4M and runs ~3x the steps of `mini` (3.2M), which learned less per
  minute. Two of the first layer's heads start out reading the neighbouring tokens (below); the others are free
  for what NSP needs, a view of the whole of both segments. With 2 heads, both taken, NSP stayed near its
  baseline; with 4 of 32 it generalised later than with 8 of 16, which also ran more steps with both threads;
- sequences of 64 tokens (a sentence or two per segment, like the fill-mask and NSP examples), batch 32: at this
  budget optimizer steps are what is scarce, and halving the sequence doubles the steps and the NSP labels per
  token of compute (attention's cost per token halves too). Shorter is worse: at 32 tokens most segments are one
  sentence, for which the generator always draws a random next, so NSP's majority class is ~80%;
- 15% of the tokens masked (Devlin et al.'s rate): the 30% of MosaicBERT and ModernBERT gives twice the targets
  per sequence, but at this budget it hides too much of the context a small model is learning to read (it gave
  lower accuracy on [MASK] inputs, a higher perplexity and a smaller NSP gain);
- `pretrain --position-init neighbours`: position embeddings start as sinusoids in half of the dimensions, and
  two heads of the first layer start out attending to the next and the previous token (`position_init.py`).
  With BERT's random start, a model this small on this budget never learned to look at its neighbours (no head
  put more than ~9% of its weight on one), so it predicted masked words from the sentence's topic and frequency
  alone ("the" everywhere, or topic nouns); starting from the neighbours, it reads "united [MASK]" or "world war
  [MASK]" within the first thousand steps, and its held-out accuracy on [MASK] inputs roughly doubles;
- dynamic masking, and a duplication factor from the budget (about one pass of ~18k instances per minute, at
  most 10): training rarely repeats a sentence pair, and where a fast machine does, the pair gets fresh masks;
- dropout off (one pass or less over the data is an under-fitting regime: dropout only slows learning, as in
  Geiping & Goldstein's "Cramming", 2022), a learning rate of 1e-3 with a 5% warm-up (2e-3 was worse with the
  neighbour heads and no better without; 5e-4 was slower, and at 3e-3 `tiny` sat at the unigram baseline for
  hundreds of steps).

Fill-mask examples: the paper's "the man went to the [MASK] store ." and sentences of the kind the bundled
Wikipedia text holds. The paper's other examples ask for words this ~650k-word corpus barely has ("gallon"
occurs twice, "milk" eight times), which no model trained on it can know. The report lists the five likeliest
whole words at each [MASK] (`word_predictions`: a special token or a "##" piece cannot fill a slot between
spaces), and gives the held-out accuracy on [MASK] inputs beside the headline MLM accuracy: the headline also
counts the 10% of targets that the 80/10/10 rule leaves unchanged, which a model soon copies.

NSP is the slower objective: it generalises to documents the model has not seen only after several thousand steps
(before that, training NSP accuracy rises on the training documents alone), so on a slow or shared CPU the report
can show an MLM gain with NSP still at its baseline; a larger `--minutes` gives it those steps. The paper's two
NSP examples are short and about things the corpus hardly mentions; at these budgets their order is not a stable
result from run to run.

What "held-out" means here: the validation articles are whole articles the model never trains on, but they come
from the same four files, whose articles come in series (a run of Japanese emperors, the cinema of one country
after another, Fiji's transport and telecommunications). They test new articles on topics the model has read
about. On articles from other parts of Wikipedia (`benchmarks/demo_held_out.py`) the MLM gain holds, while the
NSP gain shrinks to a few points at these budgets: what NSP learns first is which words the corpus's topics use.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bertforge.config import PRESETS, check_options, resolve_model_config
from bertforge.corpus import default_corpus_files
from bertforge.data.dataset import PretrainData, collate_pretrain
from bertforge.data.prepare import prepare
from bertforge.data.shards import is_data_dir
from bertforge.errors import BertforgeError
from bertforge.heads import IGNORE_INDEX, BertForPreTraining, fill_mask, next_sentence_probability
from bertforge.loop import autocast_context
from bertforge.model_folder import load_model
from bertforge.monitor import METRICS_FILE, read_metrics
from bertforge.optim import build_optimizer
from bertforge.precision import fastest_precision
from bertforge.pretrain import PretrainConfig, count_targets, pretrain, pretraining_loss
from bertforge.run_folder import OutKind, check_out, write_json
from bertforge.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

MARKER = "demo.json"  # marks a folder as a bertforge demo, so --overwrite never deletes anything else
DEMO_FOLDER = OutKind(noun="a demo", foreign="is not empty and holds no bertforge demo",
                      is_ours=lambda path: (path / MARKER).is_file(), resumable=True)
VOCAB_SIZE = 4096
MAX_SEQ_LEN = 64
MASKED_LM_PROB = 0.15
MAX_PREDICTIONS = 10  # 15% of 64 tokens, rounded up
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
WARMUP_FRACTION = 0.05
# 14 of the 281 bundled articles (~870 validation instances per duplication pass): NSP accuracy over 4 articles
# moved by up to 10 points with the seed that picks them, since every NotNext B of the split comes from its few
# other articles
VALIDATION_FRACTION = 0.05
HEAD_DIM = 16  # the demo's heads: `tiny` runs 8 of 16 dimensions instead of 2 of 64 (see the module notes)
FILL_MASK_EXAMPLES = (  # the paper's, then sentences of the kind the bundled (Wikipedia) text is made of
    "the man went to the [MASK] store .",
    "he moved to the united [MASK] in 1990 .",
    "it was built during world war [MASK] .",
    "the book was [MASK] in 1990 .",
    "he died in [MASK] at the age of 80 .",
)
NSP_EXAMPLES = (  # after the paper's §3.1 examples: (A, B, does B follow A?)
    ("the man went to the store .", "he bought a gallon of milk .", True),
    ("the man went to the store .", "penguins are flightless birds .", False),
)


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Options of `bertforge demo` (see `bertforge demo --help`)."""

    out: Path = Path("bertforge-demo")
    minutes: float = 10.0
    model: str = "tiny"
    seed: int = 12345
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        check_options(self, "positive", lambda v: v > 0, "minutes")
        if self.overwrite and self.resume:
            raise BertforgeError("--overwrite and --resume exclude each other; pick one")


@dataclass(frozen=True)
class Baselines:
    """Trivial predictors on the validation split, computed from the data."""

    nsp_majority: float      # share of the most common NSP label
    nsp_majority_label: str  # "IsNext" | "NotNext"
    mlm_unigram: float       # accuracy of always predicting the most frequent masked token
    mlm_unigram_token: str
    mlm_masked_unigram: float  # the same on the targets whose input is [MASK]
    instances: int
    masked_tokens: int
    documents: int | None = None  # held-out documents, where the manifest records them


def validation_baselines(data_dir: Path) -> Baselines:
    """NSP majority-class share and MLM unigram accuracy over the validation split of DATA `data_dir`."""

    data = PretrainData(data_dir, verify="size")
    store = data.split("validation")
    labels: Counter[int] = Counter()
    masked: Counter[int] = Counter()  # the labels of the targets whose input is [MASK]
    nsp: Counter[int] = Counter()
    for item in store:
        labels.update(item["masked_lm_ids"].tolist())
        masked.update(item["masked_lm_ids"][item["input_ids"][item["masked_lm_positions"]] == data.special_ids.mask]
                      .tolist())
        nsp[item["next_sentence_label"]] += 1
    if not labels:
        raise BertforgeError(f"{data_dir} has no validation instances; the demo needs a validation split")
    token_id, token_count = labels.most_common(1)[0]
    label, label_count = nsp.most_common(1)[0]
    return Baselines(nsp_majority=label_count / len(store), nsp_majority_label="NotNext" if label else "IsNext",
                     mlm_unigram=token_count / sum(labels.values()), mlm_unigram_token=data.vocab[token_id],
                     mlm_masked_unigram=max(masked.values(), default=0) / max(1, sum(masked.values())),
                     instances=len(store), masked_tokens=sum(labels.values()),
                     documents=data.manifest["splits"]["validation"].get("documents"))


def _validation_batches(data_dir: Path) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """The validation split of DATA `data_dir` in padded batches of 64, each with the [MASK] id."""
    data = PretrainData(data_dir, verify="size")
    store = data.split("validation")
    for begin in range(0, len(store), 64):
        yield (collate_pretrain([store[i] for i in range(begin, min(begin + 64, len(store)))], data.special_ids.pad),
               data.special_ids.mask)


@torch.no_grad()
def masked_input_accuracy(model: BertForPreTraining, data_dir: Path) -> float:
    """Held-out MLM accuracy on the targets whose input is [MASK] (80% of them).

    Of the other 20%, half keep their own token at the input, and a model soon learns to copy it, so the overall
    MLM accuracy flatters what the model reads from the context; this is the part that has to come from it.
    """
    right = total = 0
    for batch, mask_id in _validation_batches(data_dir):
        output = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                       batch["masked_lm_positions"])  # logits (B, P, V) at every listed position
        labels = batch["masked_lm_labels"]
        on_mask = (labels != IGNORE_INDEX) & (batch["input_ids"].gather(1, batch["masked_lm_positions"]) == mask_id)
        right += int((output.mlm_logits.argmax(-1)[on_mask] == labels[on_mask]).sum())
        total += int(on_mask.sum())
    return right / max(1, total)


@torch.no_grad()
def held_out_next_probability(model: BertForPreTraining, data_dir: Path) -> tuple[float, float]:
    """Mean P(IsNext) over the validation pairs that are IsNext, and over those that are NotNext.

    The paper's two example pairs are single short sentences about things the bundled corpus hardly mentions, so
    their order says little about a small model; the held-out pairs' means show whether it tells them apart.
    """
    sums, counts = [0.0, 0.0], [0, 0]  # by next_sentence_label: 0 IsNext, 1 NotNext
    for batch, _ in _validation_batches(data_dir):
        output = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        is_next = torch.softmax(output.nsp_logits.float(), dim=-1)[:, 0]
        for label in (0, 1):
            chosen = batch["next_sentence_label"] == label
            sums[label] += float(is_next[chosen].sum())
            counts[label] += int(chosen.sum())
    return sums[0] / max(1, counts[0]), sums[1] / max(1, counts[1])


def _dupe_factor(minutes: float) -> int:
    """Passes over the corpus: ~1 per minute of budget (a pass is ~18k instances of 64 tokens, about what `tiny`
    trains on in a minute of an idle 2-core CPU), between 1 and 10, so training rarely repeats a sentence pair
    (dynamic masking gives a repeated one fresh masks); preparing a pass costs a few seconds."""
    return max(1, min(10, round(minutes)))


def _architecture(model: str, out: Path) -> str:
    """`model` as the demo trains it: a size gets heads of HEAD_DIM dimensions (never fewer heads than it has),
    written to OUT/model_config.json; a CONFIG.json is taken as it is."""
    if model not in PRESETS:
        return model
    config = resolve_model_config(model)
    heads = max(config.num_attention_heads, config.hidden_size // HEAD_DIM)
    path = out / "model_config.json"
    write_json(path, {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                      "num_attention_heads": heads, "intermediate_size": config.intermediate_size})
    return str(path)


def _seconds_per_step(architecture: str, data_dir: Path) -> float:
    """Wall seconds of one training step of the demo's model on real batches, in the precision this CPU is
    fastest at: the fastest of steps 6-20.

    The first steps of a process are slow (each new batch shape sets up its kernels): planning from those left a
    third of the budget unused. The fastest warm step, not their mean or median: even those planned ~20% fewer
    steps than the training loop then ran, and a slow sample on a shared machine would plan fewer still, while
    too many planned steps only end at the time limit with the learning rate not quite decayed.
    """

    data = PretrainData(data_dir, verify="size")
    store = data.split("train")
    model_config = resolve_model_config(architecture, vocab_size=data.vocab_size)
    model = BertForPreTraining(model_config.with_dropout(0.0))
    optimizer = build_optimizer(model, "adamw", lr=LEARNING_RATE, weight_decay=0.01)
    times = []
    for step in range(20):
        batch = collate_pretrain([store[(step * BATCH_SIZE + i) % len(store)] for i in range(BATCH_SIZE)],
                                 data.special_ids.pad, packed=True)  # as `pretrain` trains
        begin = time.perf_counter()
        totals = {name: torch.tensor(value) for name, value in count_targets(batch).items()}
        with autocast_context(torch.device("cpu"), fastest_precision(torch.device("cpu"))):
            loss, _ = pretraining_loss(model, batch, totals)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - begin)
    return min(times[5:])


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_demo(config: DemoConfig) -> str:
    """Run the demo end to end and return the report (the CLI prints it)."""
    start = time.monotonic()
    out = config.out
    if check_out(out, DEMO_FOLDER, overwrite=config.overwrite, resume=config.resume) and config.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MARKER, {"kind": "bertforge-demo", "model": config.model, "seed": config.seed})
    corpus = default_corpus_files()
    tokenizer_dir, data_dir, run_dir = out / "tokenizer", out / "data", out / "run"

    if config.resume and (tokenizer_dir / "vocab.txt").is_file():
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        _say(f"[1/4] tokenizer: training a {VOCAB_SIZE:,}-entry WordPiece vocabulary on the bundled corpus "
             f"({len(corpus)} files)")
        tokenizer = train_tokenizer(corpus, tokenizer_dir, vocab_size=VOCAB_SIZE)
    if not (config.resume and is_data_dir(data_dir)):
        dupe_factor = _dupe_factor(config.minutes)
        _say(f"[2/4] prepare: NSP + MLM instances, sequences of {MAX_SEQ_LEN}, {MASKED_LM_PROB:.0%} masked, "
             f"duplication factor {dupe_factor}")
        prepare(corpus, tokenizer_dir, data_dir, max_seq_len=MAX_SEQ_LEN, max_predictions=MAX_PREDICTIONS,
                masked_lm_prob=MASKED_LM_PROB, dupe_factor=dupe_factor, validation_fraction=VALIDATION_FRACTION,
                seed=config.seed, overwrite=True)

    # Keep back time for the final evaluation, the export and the report (a few seconds each on a CPU).
    reserve = min(30.0, 0.08 * config.minutes * 60)

    def seconds_left() -> float:
        return max(3.0, config.minutes * 60 - (time.monotonic() - start) - reserve)

    architecture = _architecture(config.model, out)
    if config.resume and (run_dir / "config.json").is_file():
        # Continue the interrupted run as it was planned (its schedule and steps are part of the run).
        train_seconds = seconds_left()
        _say(f"[3/4] pretrain: resuming {run_dir} for at most {train_seconds / 60:.1f} minutes")
        result = pretrain(PretrainConfig.from_run(run_dir, max_minutes=train_seconds / 60))
    else:
        seconds_per_step = _seconds_per_step(architecture, data_dir)
        train_seconds = seconds_left()
        # The schedule should end when the budget does (linear decay to 0 at the last step), so size it from the
        # measured step time; the time limit stops the run if the machine turns out slower.
        steps = max(4, int(train_seconds / seconds_per_step))
        _say(f"[3/4] pretrain: `{config.model}`, {steps:,} steps of {BATCH_SIZE} in ~{train_seconds / 60:.1f} "
             f"minutes ({seconds_per_step:.2f} s/step measured)")
        result = pretrain(PretrainConfig(
            data=data_dir, out=run_dir, model=architecture, batch_size=BATCH_SIZE, lr=LEARNING_RATE,
            warmup_steps=max(1, round(steps * WARMUP_FRACTION)), max_steps=steps, dropout=0.0, seed=config.seed,
            dynamic_masking=True, position_init="neighbours",
            # three evaluations: each pass over the 5% split is time taken from training
            log_every=max(1, steps // 100), eval_every=max(1, steps // 3), save_every=max(1, steps // 4),
            keep_last=1, max_minutes=train_seconds / 60, decay_to_deadline=True, precision="auto", overwrite=True))
    if result.interrupted:
        _say(f"the run was saved at step {result.step}; `bertforge demo --out {out} --resume` continues it")
        raise KeyboardInterrupt
    _say(result.summary)

    _say("[4/4] report")
    baselines = validation_baselines(data_dir)
    model = load_model(run_dir).model.eval()
    evaluation = last_evaluation(run_dir) | {"mlm_accuracy_on_mask": masked_input_accuracy(model, data_dir),
                                              "held_out_is_next": held_out_next_probability(model, data_dir)}
    return _report(config, baselines, evaluation, model, tokenizer, run_dir, time.monotonic() - start)


def word_predictions(model: BertForPreTraining, tokenizer: Tokenizer, text: str,
                     top_k: int = 5) -> list[list[tuple[str, float]]]:
    """`fill_mask`'s top-k for each [MASK] of `text` among the tokens that can stand for a whole word: not a
    special token and not a "##" piece.

    The demo's examples put each [MASK] between spaces, where a word goes: a continuation piece would glue onto
    the word before it, and [CLS], [SEP], [PAD], [MASK] or [UNK] are no answer. The probabilities stay those of
    the softmax over the whole vocabulary (`fill_mask`'s), so they are what the model gives those words.
    """
    excluded = set(tokenizer.special_tokens.values())
    rows = fill_mask(model, tokenizer, text, top_k=tokenizer.vocab_size)
    return [[(token, probability) for token, probability in row if token not in excluded
             and not token.startswith("##")][:top_k] for row in rows]


def last_evaluation(run_dir: Path) -> dict:
    """The last validation line of a run's metrics.jsonl: the figures the report prints."""
    evaluations = [r for r in read_metrics(run_dir / METRICS_FILE) if r.get("split") == "validation"]
    if not evaluations:
        raise BertforgeError(f"{run_dir / METRICS_FILE} holds no validation line; the run ended before evaluating")
    return evaluations[-1]


def _report(config: DemoConfig, baselines: Baselines, evaluation: dict, model: BertForPreTraining,
            tokenizer: Tokenizer, run_dir: Path, seconds: float) -> str:
    mlm, nsp = evaluation["mlm_accuracy"], evaluation["nsp_accuracy"]
    on_mask = evaluation["mlm_accuracy_on_mask"]
    articles = "" if baselines.documents is None else f" from {baselines.documents:,} articles it never trained on"
    lines = [
        "",
        f"bertforge demo: `{config.model}` ({model.config.num_attention_heads} heads) pre-trained for "
        f"{evaluation['step']:,} steps "
        f"({seconds / 60:.1f} minutes in all, on {torch.get_num_threads()} CPU threads)",
        f"held-out validation split: {baselines.instances:,} instances{articles}, {baselines.masked_tokens:,} masked "
        "tokens",
        f"  {'':24}{'model':>8}  {'baseline':>8}  {'gain':>7}",
        f"  {'MLM accuracy':24}{mlm:8.1%}  {baselines.mlm_unigram:8.1%}  {100 * (mlm - baselines.mlm_unigram):+6.1f}"
        f"   baseline: always \"{baselines.mlm_unigram_token}\" (the commonest masked token)",
        f"  {'  on [MASK] inputs':24}{on_mask:8.1%}  {baselines.mlm_masked_unigram:8.1%}  "
        f"{100 * (on_mask - baselines.mlm_masked_unigram):+6.1f}   (the other targets show their own token or a random "
        f"one)",
        f"  {'NSP accuracy':24}{nsp:8.1%}  {baselines.nsp_majority:8.1%}  {100 * (nsp - baselines.nsp_majority):+6.1f}"
        f"   baseline: always {baselines.nsp_majority_label} (the majority class)",
        f"  {'MLM perplexity':24}{evaluation.get('perplexity', float('nan')):8.1f}",
        "",
        "fill-mask (top 5 words: special tokens and ##pieces left out):",
    ]
    for text in FILL_MASK_EXAMPLES:
        for predictions in word_predictions(model, tokenizer, text):
            shown = " | ".join(f"{token} {prob:.2f}" for token, prob in predictions)
            lines.append(f"  {text}\n      -> {shown}")
    lines += ["", "next sentence prediction:"]
    for first, second, follows in NSP_EXAMPLES:
        probability = next_sentence_probability(model, tokenizer, first, second)
        lines.append(f"  A: {first}  B: {second}\n      -> P(IsNext) = {probability:.2f}"
                     f"  ({'IsNext' if follows else 'NotNext'} in the paper)")
    is_next, not_next = evaluation["held_out_is_next"]
    lines.append(f"  held-out pairs: mean P(IsNext) {is_next:.2f} where B follows A, {not_next:.2f} where B is random")
    lines += [
        "",
        f"run:    {run_dir}   (metrics.jsonl, checkpoints/)",
        f"model:  {run_dir / 'model'}   (Hugging Face format; try `bertforge fill-mask --model {run_dir / 'model'} "
        f"\"the man went to the [MASK] store .\"`)",
        f"curves: {run_dir / 'curves.png'}",
    ]
    return "\n".join(lines)
