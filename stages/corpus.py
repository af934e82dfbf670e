"""Generic (non-reasoning) text for the ``generic`` calibration source, the stand-in for C4.

``calibrate.generic_corpus`` names one of:

- ``embedded``: sentences over a small word list, in the embedded character model's alphabet;
- ``python-docs``: the Python Language Reference topics shipped with the interpreter (``pydoc_data``,
  about 465 KB of English prose under the PSF license), so a real model gets real prose offline;
- a local file: a C4 shard (``.jsonl`` or ``.parquet`` rows with a ``text`` field).

Reads the named corpus; writes nothing.
"""

import random
from collections.abc import Callable
from pathlib import Path

from stages.errors import RacError
from stages.tasks.math_benchmarks import read_rows

_WORDS = (
    "the a one some every small big old new red blue green cat dog bird fish tree house road "
    "river hill boat car man woman child friend teacher farmer sees finds likes takes makes "
    "walks runs sings reads writes near under over with from into and but then slowly quickly "
    "today often never always here there happy quiet bright dark"
).split()


def word_sentences(n_chars: int, seed: int) -> str:
    """English-like sentences made of a small word list, at least ``n_chars`` long."""
    rng = random.Random(seed)
    sentences: list[str] = []
    size = 0
    while size < n_chars:
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) + "."
        sentences.append(sentence)
        size += len(sentence) + 1
    return " ".join(sentences)


def _python_docs(_n_chars: int, _seed: int) -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics)]


BUILTIN: dict[str, Callable[[int, int], list[str]]] = {
    "embedded": lambda n_chars, seed: [word_sentences(n_chars, seed)],
    "python-docs": _python_docs,
}


def read_texts(path: str) -> list[str]:
    """The ``text`` field of every row of a local C4 shard (``.jsonl`` or ``.parquet``)."""
    if not Path(path).is_file():  # never the hub: all of C4 is terabytes
        raise RacError(
            f"calibrate.generic_corpus={path!r} is neither a built-in corpus {sorted(BUILTIN)} nor a file; download "
            "a C4 shard such as allenai/c4 en/c4-validation.00000-of-00008.json.gz, gunzip it to .jsonl, and set "
            "calibrate.generic_corpus to it"
        )
    rows = read_rows(path, "train")
    if rows and "text" not in rows[0]:
        raise RacError(
            f"generic corpus {path!r} rows lack a 'text' field (they have {sorted(rows[0])}); use a C4 shard"
        )
    return [str(row["text"]) for row in rows]


def documents(corpus: str, n_chars: int, seed: int) -> list[str]:
    """The documents of ``corpus`` in an order seeded by ``seed``; a generated corpus is at least ``n_chars``."""
    texts = BUILTIN[corpus](n_chars, seed) if corpus in BUILTIN else read_texts(corpus)
    return [texts[i] for i in random.Random(seed).sample(range(len(texts)), len(texts))]
