"""Raw corpus reading: files → documents, a document being a list of sentences.

Inputs are files, directories (searched recursively, hidden files skipped) or globs; each file may be plain
text or compressed (gzip, zstandard, bzip2, xz: recognised by its magic bytes, not its name). Formats:

- ``lines``: Google's format. One sentence per line; a blank line ends a document. Lines are not split further.
- ``text``: running prose. A file is one document; blank lines separate paragraphs; the lines of a paragraph are
  joined (hard-wrapped books) and the paragraph is split into sentences by `split_sentences`.
- ``jsonl``: one JSON object per line, one document each, its ``text`` field read like a ``text`` file.
- ``wikiextractor``: ``<doc ...>`` … ``</doc>`` blocks, one document each; every line is a paragraph, split into
  sentences; the first line is dropped when it repeats the ``title`` attribute.

Without an explicit format a file whose first non-blank line starts with ``<doc`` is ``wikiextractor``, one that
starts with ``{`` is ``jsonl``, anything else ``lines``. Bytes that are not UTF-8 are replaced by U+FFFD and
counted (`CorpusStats.replaced_bytes`), never fatal; a file whose first 64 KiB hold a NUL byte or mostly
undecodable bytes is refused as binary. Files are streamed line by line: memory holds one document at a time.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import html
import io
import json
import lzma
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import zstandard

from bertforge.errors import BertforgeError

FORMATS = ("lines", "text", "jsonl", "wikiextractor")
# How each format delimits documents: NSP draws a NotNext B from another document, and validation holds out
# whole documents, so a corpus read as too few documents is named with this in `bertforge prepare`'s warning.
DOCUMENT_DELIMITERS = {
    "lines": "ends a document at a blank line",
    "text": "reads each file as one document (blank lines separate paragraphs)",
    "jsonl": "reads each line as one document",
    "wikiextractor": "reads each <doc> block as one document",
}

_SAMPLE_BYTES = 64 * 1024
# A sample with more undecodable bytes than this share is not text in any encoding we could usefully read.
_MAX_UNDECODABLE_SHARE = 0.3


@dataclass
class CorpusStats:
    """Counts gathered while reading a corpus (filled in by `iter_documents`)."""

    files: int = 0
    bytes_read: int = 0                  # uncompressed bytes
    replaced_bytes: int = 0              # bytes that were not UTF-8, replaced by U+FFFD
    replaced_by_file: dict[str, int] = field(default_factory=dict)
    documents: int = 0                   # non-empty documents
    sentences: int = 0
    formats: dict[str, str] = field(default_factory=dict)   # file -> format read

    def summary(self) -> str:
        """One line: files, MB, documents, sentences, formats and replaced bytes."""
        formats = ", ".join(f"{fmt} ×{n}" for fmt, n in sorted(Counter(self.formats.values()).items()))
        line = (f"{self.files} files ({formats}), {self.bytes_read / 1e6:.1f} MB, {self.documents:,} documents, "
                f"{self.sentences:,} sentences")
        if self.replaced_bytes:
            worst = sorted(self.replaced_by_file.items(), key=lambda item: -item[1])[:3]
            where = ", ".join(f"{Path(name).name}: {n}" for name, n in worst)
            line += f"; {self.replaced_bytes:,} non-UTF-8 bytes replaced ({where})"
        return line


# --- inputs -----------------------------------------------------------------------------------------------------

# Files that sit beside corpora (dataset cards, licences, checksum lists) but are not corpus text. They are
# skipped when a directory is expanded; naming such a file explicitly still reads it.
_METADATA_NAMES = ("readme", "license", "licence", "copying", "sha256sums", "md5sums", "checksums", "attribution")
_METADATA_SUFFIXES = {".md", ".rst", ".html", ".pdf", ".py", ".sh"}


def _is_metadata_file(path: Path) -> bool:
    name = path.name.lower()
    return name.startswith(_METADATA_NAMES) or path.suffix.lower() in _METADATA_SUFFIXES


def expand_inputs(specs: Iterable[str | Path]) -> list[Path]:
    """Files, directories (recursive, hidden entries skipped) and globs → sorted, de-duplicated file paths."""
    found: set[Path] = set()
    for spec in specs:
        path = Path(spec)
        if path.is_file():
            found.add(path)
        elif path.is_dir():
            for child in path.rglob("*"):
                hidden = any(part.startswith(".") for part in child.relative_to(path).parts)
                if child.is_file() and not hidden and not _is_metadata_file(child):
                    found.add(child)
        elif glob.has_magic(str(spec)):
            matches = [Path(m) for m in glob.glob(str(spec), recursive=True) if Path(m).is_file()]
            if not matches:
                raise BertforgeError(f"no file matches {spec}; check the pattern")
            found.update(matches)
        else:
            raise BertforgeError(f"no such file or directory: {spec}")
    if not found:
        raise BertforgeError("no input files: give corpus files, directories or globs")
    return sorted(found, key=str)


# --- bytes → text lines -----------------------------------------------------------------------------------------

_counter = threading.local()


def _count_and_replace(exc: UnicodeError) -> tuple[str, int]:
    assert isinstance(exc, UnicodeDecodeError)
    _counter.replaced = getattr(_counter, "replaced", 0) + exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("bertforge.count_replace", _count_and_replace)


def _decode(data: bytes) -> tuple[str, int]:
    """UTF-8 decode with replacement; returns the text and how many bytes were replaced."""
    _counter.replaced = 0
    text = data.decode("utf-8", "bertforge.count_replace")
    return text, _counter.replaced


def _open_binary(path: Path) -> BinaryIO:
    """The file's uncompressed byte stream, whatever its compression."""
    try:
        with open(path, "rb") as raw:
            magic = raw.read(6)
        if magic.startswith(b"\x1f\x8b"):
            return gzip.open(path, "rb")
        if magic.startswith(b"\x28\xb5\x2f\xfd"):
            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
        if magic.startswith(b"BZh"):
            return bz2.open(path, "rb")
        if magic.startswith(b"\xfd7zXZ\x00"):
            return lzma.open(path, "rb")
        return open(path, "rb")
    except OSError as exc:
        raise BertforgeError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _check_text(path: Path) -> None:
    """Refuse binary files: a NUL byte or mostly undecodable bytes in the first 64 KiB."""
    with _open_binary(path) as stream:
        try:
            sample = stream.read(_SAMPLE_BYTES)
        except (OSError, EOFError, zstandard.ZstdError, lzma.LZMAError) as exc:
            raise BertforgeError(f"cannot read {path}: corrupt or truncated compressed file ({exc})") from exc
    if b"\x00" in sample:
        raise BertforgeError(f"{path} looks binary (it contains NUL bytes); give UTF-8 text files "
                             "(convert UTF-16 text with iconv)")
    _, replaced = _decode(sample)
    if sample and replaced > _MAX_UNDECODABLE_SHARE * len(sample):
        raise BertforgeError(f"{path} looks binary ({replaced / len(sample):.0%} of its first bytes are not "
                             "UTF-8); give UTF-8 text files")


def _iter_lines(path: Path, stats: CorpusStats) -> Iterator[str]:
    """Decoded lines without their line ending (LF or CRLF); a leading BOM is dropped; counts into `stats`."""
    _check_text(path)
    name = str(path)
    first = True
    with _open_binary(path) as stream:
        try:
            for raw_line in stream:   # binary readline: linear even for a single gigantic line
                text, replaced = _decode(raw_line)
                stats.bytes_read += len(raw_line)
                if replaced:
                    stats.replaced_bytes += replaced
                    stats.replaced_by_file[name] = stats.replaced_by_file.get(name, 0) + replaced
                if first:
                    text = text.removeprefix("\ufeff")
                    first = False
                yield text.rstrip("\r\n")
        except (OSError, EOFError, zstandard.ZstdError, lzma.LZMAError) as exc:
            raise BertforgeError(f"cannot read {path}: corrupt or truncated compressed file ({exc})") from exc


def detect_format(path: Path) -> str:
    """"wikiextractor" if the first non-blank line starts with ``<doc``, "jsonl" if with ``{``, else "lines"."""
    for line in _iter_lines(Path(path), CorpusStats()):
        head = line.lstrip()
        if head:
            if head.startswith("<doc"):
                return "wikiextractor"
            return "jsonl" if head.startswith("{") else "lines"
    return "lines"


# --- sentence splitting -----------------------------------------------------------------------------------------

_CLOSERS = re.escape("\"'”’」』）》〉】〗〕］｝)]}")
# CJK ideographs, kana, hangul, CJK punctuation and full-width forms: text written without spaces.
_CJK = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
# A CJK terminator ends a sentence wherever it stands; an English one only before whitespace, the end or CJK text.
_BOUNDARY = re.compile(
    rf"(?P<cjk>[。！？；．]+[{_CLOSERS}]*)"
    rf"|(?P<en>(?P<term>[.!?…]+)[{_CLOSERS}]*)(?=\s|$|[{_CJK}])"
)
_NEXT_CHAR = re.compile(r"\s*(\S)")
# Never sentence-final when followed by more text: titles, Latin shorthands, company suffixes.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt gen col lt maj capt sgt cmdr adm gov sen rep rev hon pres messrs mme mlle "
    "e.g i.e cf vs viz al inc ltd co corp bros dept approx ca ph.d".split()
)
# Abbreviations that are only abbreviations before a number ("No. 5", "Jan. 3", "pp. 12").
_NUMBER_ABBREVIATIONS = frozenset(
    "no nos vol vols p pp ch sec art fig figs op ed eds jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_INITIALS = re.compile(r"(?:[^\W\d_]\.)*[^\W\d_]")   # "J", "U.S", "e.g", "a.m"


def _is_abbreviation(text: str, dot: int, next_char: str) -> bool:
    """Whether the '.' at `dot` closes an abbreviation or an initial rather than a sentence."""
    words = text[max(0, dot - 24):dot].split()
    word = words[-1].lstrip("\"'“‘([{") if words else ""
    if not word:
        return False
    lower = word.lower()
    if lower in _ABBREVIATIONS or (word != "I" and _INITIALS.fullmatch(word)):   # "So am I." ends a sentence
        return True
    return lower in _NUMBER_ABBREVIATIONS and next_char.isdigit()


def split_sentences(text: str) -> list[str]:
    """Split a paragraph into sentences, English (``.!?``) and Chinese (``。！？；``) punctuation aware.

    Closing quotes and brackets stay with their sentence; abbreviations ("Mr.", "e.g."), initials ("J. R. R."),
    decimals ("3.14") and a lower-case continuation ("... etc. and so") do not end one. Linear in len(text).
    """
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        end = match.end()
        if match.group("en") is not None:
            following = _NEXT_CHAR.match(text, end)
            next_char = following.group(1) if following else ""
            if next_char.islower():
                continue
            if match.group("term") == "." and _is_abbreviation(text, match.start(), next_char):
                continue
        sentence = text[start:end].strip()
        if sentence:
            sentences.append(sentence)
        start = end
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _join_lines(lines: list[str]) -> str:
    """Join the lines of a hard-wrapped paragraph: a space between them, none between two CJK characters."""
    parts: list[str] = []
    for line in lines:
        if parts and not (_is_cjk(parts[-1][-1]) and _is_cjk(line[0])):
            parts.append(" ")
        parts.append(line)
    return "".join(parts)


_CJK_CHAR = re.compile(f"[{_CJK}]")


def _is_cjk(char: str) -> bool:
    return _CJK_CHAR.match(char) is not None


def _blocks(lines: Iterable[str]) -> Iterator[list[str]]:
    """The runs of non-blank lines (stripped) that blank lines separate: `lines` documents, or paragraphs."""
    block: list[str] = []
    for line in lines:
        line = line.strip()
        if line:
            block.append(line)
        elif block:
            yield block
            block = []
    if block:
        yield block


def _paragraph_sentences(lines: Iterable[str]) -> Iterator[str]:
    """Blank lines separate paragraphs; each paragraph's lines are joined and split into sentences."""
    for paragraph in _blocks(lines):
        yield from split_sentences(_join_lines(paragraph))


# --- formats ----------------------------------------------------------------------------------------------------

def _read_text(lines: Iterator[str]) -> Iterator[list[str]]:
    yield list(_paragraph_sentences(lines))


def json_objects(lines: Iterable[str], path: Path, hint: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSON-lines file; a line that is not a JSON object is one
    BertforgeError naming it and ending in `hint`."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BertforgeError(f"{path}:{number}: not valid JSON ({exc.msg}); {hint}") from None
        if not isinstance(record, dict):
            raise BertforgeError(f"{path}:{number}: expected a JSON object per line; {hint}")
        yield number, record


def _read_jsonl(lines: Iterator[str], path: Path) -> Iterator[list[str]]:
    for number, record in json_objects(lines, path, "use --format lines or text for plain text"):
        if not isinstance(record.get("text"), str):
            raise BertforgeError(f'{path}:{number}: expected a JSON object with a string "text" field')
        yield list(_paragraph_sentences(record["text"].splitlines()))


_TITLE = re.compile(r'\btitle="([^"]*)"')


def _read_wikiextractor(lines: Iterator[str]) -> Iterator[list[str]]:
    document: list[str] | None = None
    titles: set[str] = set()
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("<doc"):
            if document:
                yield document        # a <doc> without </doc>: the next one starts anyway
            found = _TITLE.search(stripped)
            # The attribute is HTML-escaped; the title line may or may not be.
            titles = {found.group(1).strip(), html.unescape(found.group(1)).strip()} if found else set()
            document = []
        elif stripped == "</doc>":
            if document:
                yield document
            document, titles = None, set()
        elif stripped and document is not None:
            is_title = stripped in titles
            titles = set()            # only the first line can repeat the title
            if not is_title:
                document.extend(split_sentences(stripped))
    if document:
        yield document


def iter_documents(path: Path, fmt: str | None, stats: CorpusStats) -> Iterator[list[str]]:
    """Stream the documents of one file; each document is a non-empty list of sentences.

    `fmt` is one of `FORMATS`, or None / "auto" to use `detect_format`. Updates `stats` as it reads.
    """
    path = Path(path)
    if fmt in (None, "auto"):
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise BertforgeError(f"unknown corpus format {fmt!r}; choose one of {', '.join(FORMATS)}")
    stats.files += 1
    stats.formats[str(path)] = fmt
    lines = _iter_lines(path, stats)
    if fmt == "lines":
        documents = _blocks(lines)
    elif fmt == "text":
        documents = _read_text(lines)
    elif fmt == "jsonl":
        documents = _read_jsonl(lines, path)
    else:
        documents = _read_wikiextractor(lines)
    for document in documents:
        if document:
            stats.documents += 1
            stats.sentences += len(document)
            yield document
