"""The built-in corpus: Python's own documentation topics (`pydoc_data`), real English prose and
code (about 0.5 MB) that every Python installation ships, so a run with no --data needs no
download and no tokenizer files (its default tokenizer is "bytes")."""

from __future__ import annotations

DEFAULT_CORPUS_NAME = "builtin:pydoc_data"
DEFAULT_CORPUS_TOKENIZER = "bytes"


def default_corpus_documents() -> list[str]:
    """The documentation topics, one document each, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]
