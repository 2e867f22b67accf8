"""English word segmentation as `nltk.word_tokenize` does it, for the CMRC 2018 scorer.

The official CMRC 2018 evaluation (`cmrc2018_evaluate.py`) splits each run of non-Chinese text with
`nltk.word_tokenize`: Punkt sentence splitting with NLTK's pretrained English model, then NLTK's improved Treebank
word tokenizer on each sentence. So "4.5" and "1,000" stay one token, "don't" is "do" + "n't", and a mark the rules
do not list ("【") stays attached to its word. nltk itself is not a dependency: `word_tokenize` needs the Punkt
model, which nltk downloads at run time, and its rules change between releases, which moves the scores.

This module is our own implementation of the rules of nltk 3.9 (`nltk/tokenize/punkt.py` and
`destructive.py`, Apache-2.0, the NLTK Project; Punkt after Kiss & Strunk 2006, Computational Linguistics 32(4)),
checked token for token against nltk 3.9.1 with its English `punkt_tab` model. On CMRC 2018 text those rules also
agree with nltk 3.4.5, the last release for the Python 2 the official script is written in. nltk 3.10 began to
split dashes (U+2012 to U+2015, so "——" and "1—2"), which CMRC answers contain; we keep the older rule.

The scorer lower-cases before it segments, and lower-case text is the only input this module handles. On it,
Punkt's orthographic statistics matter for four words only (`_LOWER_CASE_STARTERS`), and its collocation list
never changes a decision: every pair in it is an initial or a number before a lower-case word, which the
orthographic rule already keeps in one sentence.
"""

from __future__ import annotations

import re
import string

# ------------------------------------------------------------------------------------ Punkt sentence boundaries

# The English model's abbreviations (`punkt_tab/english/abbrev_types.txt`): a period after one ends no sentence.
# ". . " is the stem of a spaced ellipsis ". . .", which Punkt reads as one token.
_ABBREVIATIONS = frozenset("""
a.a a.c a.d a.g a.h a.m a.m.e a.s a.t adm ala ariz aug ave b.f b.v bros c c.i.t c.o.m.b c.v calif chg cie co col
colo conn corp cos ct d d.c d.h d.w dec dr e e.f e.h e.l e.m f f.g f.j feb fla fri ft g g.d g.f g.k ga gen h h.c
h.f h.m i.m.s ill inc j.b j.c j.j j.k j.p j.r jan jr k kan ky l l.a l.f l.p lt ltd m m.b.a m.d.c m.j maj messrs
mg mich minn mr mrs ms n n.c n.d n.h n.j n.m n.v n.y nev nov oct ok okla ore p p.a.m p.m pa ph.d prof r r.a r.h
r.i r.j r.k r.t rep reps s s.a s.a.y s.c s.g s.p.a s.s sen sep sept sr st sw t t.j tenn tues u.k u.n u.s u.s.a
u.s.s.r v va vs vt w w.c w.r w.va w.w wash wed wis yr
""".split()) | {". . "}

# The model's words seen starting a sentence in lower case and never with a capital: after an initial or a number,
# a lower-case word starts a new sentence ("unknown" in Punkt's orthographic rule) only if it is one of these.
_LOWER_CASE_STARTERS = frozenset({"administrators", "b-week", "r-revised", "z-holiday"})

_NON_WORD = r"(?:[)\";}\]*:@'({\[?!])"            # never inside a Punkt word
_MULTI_CHAR = r"(?:-{2,}|\.{2,}|(?:\.\s){2,}\.)"  # dashes and ellipses, one token each
_PUNKT_WORD = re.compile(
    _MULTI_CHAR + r"|(?=[^(\"`{\[:;&#*@)}\]\-,])\S+?"
    r"(?=\s|$|" + _NON_WORD + "|" + _MULTI_CHAR + r"|,(?=$|\s|" + _NON_WORD + "|" + _MULTI_CHAR + r"))|\S")
_END_CANDIDATE = re.compile(r"[.?!](?=(?P<after>" + _NON_WORD + r"|\s+(?P<next>\S+)))")
_CLOSING = re.compile(r"[\"')\]}]+?(?:\s+|(?=--)|$)", re.MULTILINE)
_ELLIPSIS = re.compile(r"\.\.+$")
_INITIAL = re.compile(r"[^\W\d]\.$")
_NUMBER = re.compile(r"-?[.,]?\d[\d,.-]*\.?$")


def _is_abbreviation(token: str) -> bool:
    stem = token[:-1]
    return stem in _ABBREVIATIONS or stem.split("-")[-1] in _ABBREVIATIONS


def _same_sentence_after_initial_or_number(following: str, after_initial: bool) -> bool:
    """Punkt's orthographic rule: `following` does not start a sentence (Kiss & Strunk §4.1.1, §4.3)."""
    if following in (";", ":", ",", ".", "!", "?"):
        return True
    if following[0].islower():
        return following.removesuffix(".") not in _LOWER_CASE_STARTERS
    # Characters that stay capitals after lower() ("ℂ") are words the model never saw: an initial keeps them.
    return after_initial and following[0].isupper()


def _ends_sentence(token: str, following: str) -> bool:
    """Punkt's decision on one token: the type-based first pass, then the initial and number rule."""
    if token in (".", "?", "!"):
        return True
    if not token.endswith(".") or token.endswith("..") or _ELLIPSIS.match(token) or _is_abbreviation(token):
        return False
    after_initial = bool(_INITIAL.match(token))
    if after_initial or _NUMBER.match(token):
        return not _same_sentence_after_initial_or_number(following, after_initial)
    return True


def _has_inner_break(context: str) -> bool:
    """Whether a token other than the last ends a sentence (Punkt's `text_contains_sentbreak`)."""
    tokens = [token for line in context.split("\n") for token in _PUNKT_WORD.findall(line)]
    return any(_ends_sentence(token, following) for token, following in zip(tokens, tokens[1:]))


def _end_contexts(text: str) -> list[tuple[re.Match[str], str]]:
    """Each candidate end with its context: the word before it, the mark, and what follows. Candidates whose
    words overlap keep only the last of them, as Punkt does."""
    contexts = []
    previous: re.Match[str] | None = None
    word_start = word_end = 0
    for match in _END_CANDIDATE.finditer(text):
        before = text[word_end:match.start()]
        last_space = max(before.rfind(space) for space in string.whitespace)
        start = word_end + last_space + 1 if last_space > 0 else word_start
        if previous is not None and word_end <= start:
            contexts.append((previous, text[word_start:word_end] + previous.group() + previous.group("after")))
        previous, word_start, word_end = match, start, match.start()
    if previous is not None:
        contexts.append((previous, text[word_start:word_end] + previous.group() + previous.group("after")))
    return contexts


def _sentences(text: str) -> list[str]:
    """`nltk.sent_tokenize(text)` with the English model, for lower-case text, plus empty strings it drops."""
    spans: list[tuple[int, int]] = []
    start = 0
    for match, context in _end_contexts(text):
        if _has_inner_break(context):
            spans.append((start, match.end()))
            start = match.start("next") if match.group("next") else match.end()
    spans.append((start, len(text.rstrip())))
    result, shift = [], 0
    # The last sentence has no successor: an empty one, which no closing mark matches.
    for (begin, end), (next_begin, next_end) in zip(spans, spans[1:] + [(len(text), len(text))]):
        # Closing quotes and brackets after the mark belong to the sentence they close.
        closing = _CLOSING.match(text[next_begin:next_end])
        if closing:
            result.append(text[begin + shift:next_begin + len(closing.group().rstrip())])
            shift = closing.end()
        else:
            result.append(text[begin + shift:end])
            shift = 0
    return result


# ------------------------------------------------------------------------------------------ Treebank word rules

_CONTRACTIONS = [r"\b(can)(not)\b", r"\b(d)('ye)\b", r"\b(gim)(me)\b", r"\b(gon)(na)\b", r"\b(got)(ta)\b",
                 r"\b(lem)(me)\b", r"\b(more)('n)\b", r"\b(wan)(na)(?=\s)", r" ('t)(is)\b", r" ('t)(was)\b"]

# (pattern, replacement) in nltk's order: starting quotes, punctuation, brackets, double dashes.
_SPLIT_RULES = [(re.compile(pattern), replacement) for pattern, replacement in [
    (r"([«“‘„]|[`]+)", r" \1 "),
    (r'^"', "``"),
    (r"(``)", r" \1 "),
    (r"([ (\[{<])(\"|'{2})", r"\1 `` "),
    (r"(?i)(')(?!re|ve|ll|m|t|s|d|n)(\w)\b", r"\1 \2"),
    (r"([^.])(\.)([\])}>\"'»”’ ]*)\s*$", r"\1 \2 \3 "),
    (r"([:,])([^\d])", r" \1 \2"),
    (r"([:,])$", r" \1 "),
    (r"\.{2,}", r" \g<0> "),
    (r"[;@#$%&]", r" \g<0> "),
    (r"([^.])(\.)([\])}>\"']*)\s*$", r"\1 \2\3 "),
    (r"[?!]", r" \g<0> "),
    (r"([^'])' ", r"\1 ' "),
    (r"[*]", r" \g<0> "),
    (r"[\]\[(){}<>]", r" \g<0> "),
    (r"--", r" -- "),
]]
# Applied to the sentence padded with a space each side: ending quotes, clitics, then contractions.
_PADDED_RULES = [(re.compile(pattern), replacement) for pattern, replacement in [
    (r"([»”’])", r" \1 "),
    (r"''", " '' "),
    (r'"', " '' "),
    (r"\s+", " "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
    *[("(?i)" + contraction, r" \1 \2 ") for contraction in _CONTRACTIONS],
]]


def _treebank_words(sentence: str) -> list[str]:
    """`nltk.tokenize.NLTKWordTokenizer().tokenize(sentence)`: nltk's improved Penn Treebank word rules."""
    for pattern, replacement in _SPLIT_RULES:
        sentence = pattern.sub(replacement, sentence)
    sentence = " " + sentence + " "
    for pattern, replacement in _PADDED_RULES:
        sentence = pattern.sub(replacement, sentence)
    return sentence.split()


def word_tokenize(text: str) -> list[str]:
    """`nltk.word_tokenize(text)` (English) for lower-case text: Punkt sentences, then Treebank words in each."""
    if not text.strip():  # most runs between two Chinese characters: no words, so skip the 30 rules
        return []
    return [word for sentence in _sentences(text) for word in _treebank_words(sentence)]
