"""BERT WordPiece tokenizer: train, load and save, on Hugging Face `tokenizers`.

The pipeline is BERT's (Devlin et al. 2019, §A.2; Google's `tokenization.FullTokenizer`): clean text (control
characters dropped, whitespace normalised), every CJK ideograph its own word, lower-casing and accent stripping
unless cased, split on whitespace and punctuation, then greedy longest-match-first WordPiece with ``##``
continuation pieces. HF `tokenizers` reproduces FullTokenizer's output exactly on the shared reference samples.
One addition: a vocabulary entry of several CJK ideographs (a whole Chinese word, `tokenizer extend --chinese-words`)
is matched in the raw text before normalisation, as an added token; BERT's own vocabularies hold none.

A tokenizer folder holds ``vocab.txt`` (id == line number), ``tokenizer.json`` (with the ``[CLS] A [SEP] B [SEP]``
template), ``tokenizer_config.json`` and ``special_tokens_map.json``, all loadable by
``transformers.BertTokenizerFast.from_pretrained(DIR)``, and byte-identical for the same vocabulary and casing.
Training is deterministic too: the same corpus and options give the same files.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer
from tqdm import tqdm

from bertforge.data.corpus import CorpusStats, expand_inputs, iter_documents
from bertforge.errors import BertforgeError
from bertforge.run_folder import OutKind, check_out, read_json, write_json, writing_dir

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_SPECIAL_KEYS = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")   # same order as above
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MODEL_MAX_LENGTH = 512
_FIX = "give a tokenizer folder that bertforge or transformers saved"
# The code points BERT's normalizer makes words of their own (Google's tokenization._is_chinese_char), two or more.
_CJK_WORD = re.compile("[\u4e00-\u9fff\u3400-\u4dbf\U00020000-\U0002a6df\U0002a700-\U0002b73f\U0002b740-\U0002b81f"
                       "\U0002b820-\U0002ceaf\uf900-\ufaff\U0002f800-\U0002fa1f]{2,}")


def is_cjk_word(token: str) -> bool:
    """Whether `token` is two or more CJK ideographs: an entry that WordPiece alone never reaches while CJK
    characters are split (each ideograph is then a word of its own), so a whole word added on purpose."""
    return _CJK_WORD.fullmatch(token) is not None


class Tokenizer:
    """A BERT WordPiece vocabulary and its `tokenizers` pipeline.

    `backend` adds no special tokens: `encode_batch` returns word-piece ids only, and callers that need offsets
    (fine-tuning) call ``backend.encode_batch(texts)`` for `tokenizers.Encoding`s with ``.offsets``.
    """

    def __init__(self, vocab: Sequence[str], *, do_lower_case: bool = True, strip_accents: bool | None = None,
                 tokenize_chinese_chars: bool = True, special_tokens: dict[str, str] | None = None) -> None:
        """`vocab` in id order; `strip_accents` None follows `do_lower_case` (as in BERT);
        `special_tokens` maps pad_token/unk_token/cls_token/sep_token/mask_token to vocab entries."""
        self.vocab: list[str] = list(vocab)
        self.do_lower_case = do_lower_case
        self.strip_accents = strip_accents
        self.tokenize_chinese_chars = tokenize_chinese_chars
        self.special_tokens = dict(zip(_SPECIAL_KEYS, SPECIAL_TOKENS)) | (special_tokens or {})
        # Duplicate entries (some published vocabs have them) resolve to the last id, as in BERT's load_vocab.
        self._ids = {token: index for index, token in enumerate(self.vocab)}
        missing = [token for token in self.special_tokens.values() if token not in self._ids]
        if missing:
            raise BertforgeError(f"the vocabulary lacks the special token(s) {' '.join(missing)}; "
                                 "a BERT vocab.txt must contain [PAD] [UNK] [CLS] [SEP] [MASK]")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            self._ids[self.special_tokens[key]] for key in _SPECIAL_KEYS)
        self.vocab_hash = hashlib.sha256("\n".join(self.vocab).encode("utf-8")).hexdigest()
        self.backend = self._build_backend()

    def _build_backend(self) -> BackendTokenizer:
        backend = BackendTokenizer(WordPiece(self._ids, unk_token=self.special_tokens["unk_token"],
                                             continuing_subword_prefix="##", max_input_chars_per_word=100))
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=self.tokenize_chinese_chars,
            strip_accents=self.do_lower_case if self.strip_accents is None else self.strip_accents,
            lowercase=self.do_lower_case)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        # Special tokens typed in text ("the [MASK] store") are matched whole, as transformers does.
        backend.add_special_tokens([self.special_tokens[key] for key in _SPECIAL_KEYS])
        words = [token for token in self.vocab if is_cjk_word(token)] if self.tokenize_chinese_chars else []
        if words:
            # Whole Chinese words (`tokenizer extend --chinese-words`) are matched in the raw text, before the
            # normalizer splits ideographs apart; tokenizer.json keeps them as added tokens, so transformers agrees.
            backend.add_tokens([AddedToken(word, normalized=False) for word in words])
        return backend

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Word-piece ids of each text, no [CLS]/[SEP]; runs on all cores (Rust threads)."""
        # encode_batch_fast skips offset tracking, which ids do not need.
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        """Word-piece ids of one text, no [CLS]/[SEP]."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def tokenize(self, text: str) -> list[str]:
        return self.backend.encode(text, add_special_tokens=False).tokens

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.vocab[int(index)] for index in ids]

    def decode(self, ids: Iterable[int]) -> str:
        """Text from ids (word pieces joined, special tokens kept)."""
        return self.backend.decode([int(index) for index in ids], skip_special_tokens=False)

    def with_post_processor(self) -> BackendTokenizer:
        """A copy of `backend` that adds ``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]`` (what tokenizer.json holds)."""
        full = BackendTokenizer.from_str(self.backend.to_str())
        cls, sep = self.special_tokens["cls_token"], self.special_tokens["sep_token"]
        full.post_processor = processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, self.cls_id), (sep, self.sep_id)])
        return full

    def save(self, out_dir: str | Path) -> None:
        """Write vocab.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "vocab.txt").write_text("".join(token + "\n" for token in self.vocab), encoding="utf-8")
        (out / "tokenizer.json").write_text(self.with_post_processor().to_str(pretty=True) + "\n", encoding="utf-8")
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": self.do_lower_case,
                  "strip_accents": self.strip_accents, "tokenize_chinese_chars": self.tokenize_chinese_chars,
                  "model_max_length": MODEL_MAX_LENGTH, "clean_up_tokenization_spaces": False, **self.special_tokens}
        write_json(out / "tokenizer_config.json", config)
        write_json(out / "special_tokens_map.json", self.special_tokens)


def read_vocab(path: Path) -> list[str]:
    """The entries of a BERT vocab.txt, one per line, in id order."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BertforgeError(f"cannot read vocabulary {path}: {exc}") from exc
    vocab = [line.rstrip("\r") for line in text.split("\n")]
    if vocab and vocab[-1] == "":
        vocab.pop()   # the final newline
    return vocab


def _special_tokens_from(config: dict) -> dict[str, str]:
    """Special tokens named in a transformers tokenizer_config.json / special_tokens_map.json."""
    found = {}
    for key in _SPECIAL_KEYS:
        value = config.get(key)
        if isinstance(value, dict):   # serialised AddedToken
            value = value.get("content")
        if isinstance(value, str):
            found[key] = value
    return found


def load_tokenizer(path: str | Path, cased: bool | None = None) -> Tokenizer:
    """Load a tokenizer from a bertforge/HF tokenizer folder, a folder holding only vocab.txt, a Hugging Face
    BERT model folder, or a vocab.txt file. `cased` overrides the casing; otherwise it comes from the folder's
    tokenizer_config.json or tokenizer.json, and a bare vocab.txt is uncased."""
    path = Path(path)
    if path.is_file() and path.name == "tokenizer.json":
        return load_tokenizer(path.parent, cased)
    if path.is_file():
        return Tokenizer(read_vocab(path), do_lower_case=not cased)
    if not path.is_dir():
        raise BertforgeError(f"no such tokenizer: {path} (give a tokenizer folder or a vocab.txt)")
    config = read_json(path / "tokenizer_config.json", fix=_FIX) if (path / "tokenizer_config.json").is_file() else {}
    special = _special_tokens_from(config)
    if (path / "special_tokens_map.json").is_file():
        special |= _special_tokens_from(read_json(path / "special_tokens_map.json", fix=_FIX))
    normalizer: dict = {}
    if (path / "vocab.txt").is_file():
        vocab = read_vocab(path / "vocab.txt")
        if (path / "tokenizer.json").is_file():
            normalizer = read_json(path / "tokenizer.json", fix=_FIX).get("normalizer") or {}
    elif (path / "tokenizer.json").is_file():
        backend = read_json(path / "tokenizer.json", fix=_FIX)
        model = backend.get("model") or {}
        if model.get("type") != "WordPiece":
            raise BertforgeError(f"{path / 'tokenizer.json'} is not a WordPiece (BERT) tokenizer")
        vocab = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
        normalizer = backend.get("normalizer") or {}
    else:
        raise BertforgeError(f"{path} holds neither vocab.txt nor tokenizer.json; give a tokenizer folder")
    if cased is not None:
        do_lower_case = not cased
    elif "do_lower_case" in config:
        do_lower_case = bool(config["do_lower_case"])
    else:
        do_lower_case = bool(normalizer.get("lowercase", True))
    strip_accents = config.get("strip_accents", normalizer.get("strip_accents"))
    return Tokenizer(vocab, do_lower_case=do_lower_case, strip_accents=strip_accents, special_tokens=special,
                     tokenize_chinese_chars=bool(config.get("tokenize_chinese_chars",
                                                            normalizer.get("handle_chinese_chars", True))))


def is_tokenizer_dir(path: Path) -> bool:
    """Whether `path` looks like a folder a tokenizer was saved to."""
    return (path / "vocab.txt").is_file() and (path / "tokenizer_config.json").is_file()


TOKENIZER_FOLDER = OutKind(noun="a tokenizer", foreign="exists and is not a tokenizer folder",
                           is_ours=is_tokenizer_dir)


def _sentence_batches(paths: list[Path], fmt: str | None, stats: CorpusStats, show_progress: bool, desc: str,
                      batch_size: int = 1000) -> Iterator[list[str]]:
    """The corpus's sentences in batches (the trainer's input), with a per-file progress bar."""
    batch: list[str] = []
    with tqdm(total=len(paths), unit="file", desc=desc,
              disable=None if show_progress else True) as bar:   # None: only on a terminal
        for path in paths:
            for document in iter_documents(path, fmt, stats):
                batch.extend(document)
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
            bar.set_postfix_str(f"{stats.bytes_read / 1e6:.1f} MB, {stats.sentences:,} sentences", refresh=False)
            bar.update(1)
    if batch:
        yield batch


def _alphabet(backend: BackendTokenizer, counts: Counter[str], limit: int) -> tuple[list[str], list[str]]:
    """The `limit` most frequent characters after normalisation (ties by code point), and the "##c" pieces of
    those that can continue a word (not punctuation, not CJK ideographs, which always stand alone)."""
    normalized: Counter[str] = Counter()
    for char, count in counts.items():
        for out in backend.normalizer.normalize_str(char):
            if not out.isspace():
                normalized[out] += count
    alphabet = sorted(sorted(normalized, key=lambda char: (-normalized[char], char))[:limit])
    def continues_a_word(char: str) -> bool:
        return len(backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str("a" + char))) == 1

    continuations = [f"##{char}" for char in alphabet if continues_a_word(char)]
    return alphabet, continuations


def train_tokenizer(files: Iterable[str | Path], out_dir: str | Path, *, vocab_size: int = 30522,
                    cased: bool = False, min_frequency: int = 2, fmt: str | None = None,
                    limit_alphabet: int | None = None, overwrite: bool = False, show_progress: bool = True,
                    stats: CorpusStats | None = None) -> Tokenizer:
    """Train a WordPiece vocabulary on the sentences of a corpus and save it to `out_dir` atomically.

    `files`: files, directories or globs (see `bertforge.data.corpus`); `fmt` a corpus format or None to detect.
    `limit_alphabet`: most distinct characters kept (default max(1000, vocab_size // 4), so that a Chinese corpus
    keeps its characters). `out_dir` must not exist, be empty, or (with `overwrite`) be a tokenizer folder.
    `stats`, when given, receives the corpus counts. The vocabulary starts [PAD] [UNK] [CLS] [SEP] [MASK].
    """
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise BertforgeError(f"--vocab-size {vocab_size} leaves no room beside the {len(SPECIAL_TOKENS)} special "
                             "tokens; use a few thousand or more")
    if limit_alphabet is not None and limit_alphabet < 1:
        raise BertforgeError(f"--limit-alphabet must be at least 1 (got {limit_alphabet})")
    if min_frequency < 1:
        raise BertforgeError(f"--min-frequency must be at least 1 (got {min_frequency})")
    out = Path(out_dir)
    check_out(out, TOKENIZER_FOLDER, overwrite=overwrite)
    paths = expand_inputs(files)
    stats = stats if stats is not None else CorpusStats()

    backend = Tokenizer(SPECIAL_TOKENS, do_lower_case=not cased).backend
    counts: Counter[str] = Counter()
    for batch in _sentence_batches(paths, fmt, stats, show_progress, "reading corpus (1/2)"):
        for sentence in batch:
            counts.update(sentence)
    if stats.sentences == 0:
        raise BertforgeError(f"the corpus holds no text ({len(paths)} file(s) read); "
                             "give files with sentences in them")
    alphabet, continuations = _alphabet(backend, counts, limit_alphabet or max(1000, vocab_size // 4))
    # Fixing the alphabet and every "##c" piece up front gives them fixed ids, which makes training
    # deterministic: `tokenizers` otherwise numbers "##c" in hash-map order and breaks merge ties by id
    # (huggingface/tokenizers#1794).
    trainer = WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[*SPECIAL_TOKENS, *continuations],
        initial_alphabet=alphabet, limit_alphabet=len(alphabet), continuing_subword_prefix="##",
        show_progress=show_progress and sys.stderr.isatty())   # off a terminal it prints stray blank lines
    backend.train_from_iterator(_sentence_batches(paths, fmt, CorpusStats(), show_progress, "training (2/2)"),
                                trainer=trainer)
    trained = backend.get_vocab(with_added_tokens=True)
    tokenizer = Tokenizer(sorted(trained, key=trained.__getitem__), do_lower_case=not cased)
    with writing_dir(out, what="tokenizer folder", then="free space or fix the folder and train again") as tmp:
        tokenizer.save(tmp)  # then published: an interrupted run leaves no half-written folder
        check_out(out, TOKENIZER_FOLDER, overwrite=overwrite)  # the folder may have changed while we trained
    return tokenizer
