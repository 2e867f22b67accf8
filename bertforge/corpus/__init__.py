"""The bundled default corpus (a few MB of English Wikipedia, CC BY-SA 3.0; see ATTRIBUTION.md)."""

from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent


def default_corpus_files() -> list[Path]:
    """The bundled corpus files (WikiExtractor format, gzip-compressed)."""
    return sorted(CORPUS_DIR.glob("wiki_*.gz"))
