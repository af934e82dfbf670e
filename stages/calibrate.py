"""Reads: traces Parquet (for ``rac``), params ``model``, ``calib_task``, ``benchmarks``, ``calibrate``.
Writes: one calibration Parquet per source (``schemas.CALIBRATION``), all with the same token budget.

Sources: ``generic`` (``calibrate.generic_corpus``, a C4 shard, or else the embedded task's generic text),
``prompt`` (prompts only, so it takes more prompts than RAC to fill the budget), ``rac`` (prompt plus the
on-policy chain of thought), ``offpolicy`` (prompt plus another model's chain of thought, from
``calibrate.offpolicy_traces``).
"""

import itertools
import logging
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from stages.errors import RacError
from stages.models import bos_ids, encode_prompt, load_tokenizer, vocab_hash
from stages.params import SOURCES, Params
from stages.schemas import CALIBRATION, TRACES, read_parquet, write_parquet
from stages.tasks import get_task
from stages.tasks.math_benchmarks import read_texts

log = logging.getLogger(__name__)

Sequence = tuple[list[int], list[int]]  # (token ids, per-token segment)


def _generic(p: Params) -> Iterator[Sequence]:
    tokenizer, c = load_tokenizer(p.model), p.calibrate
    if c.generic_corpus:  # documents in seeded order, each cut into windows of generic_seq_len
        texts = read_texts(c.generic_corpus)
        texts = [texts[i] for i in random.Random(c.seed).sample(range(len(texts)), len(texts))]
    else:
        task = get_task(p.calib_task, p.benchmarks)
        texts = [task.generic_text(c.budget_tokens * 2, c.seed)]  # one char per token or more: enough text
    bos = bos_ids(tokenizer)
    width = c.generic_seq_len - len(bos)
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for start in range(0, len(ids) - width + 1, width):
            seq = bos + ids[start : start + width]
            yield seq, [0] * len(seq)


def _prompt(p: Params) -> Iterator[Sequence]:
    tokenizer, task = load_tokenizer(p.model), get_task(p.calib_task, p.benchmarks)
    # a fixed benchmark: each of its problems once, in seeded order; an endless generator: disjoint seeded batches
    sizes: Iterable[int] = [task.size] if task.size is not None else itertools.repeat(256)
    for batch, n in enumerate(sizes):
        for problem in task.problems(n, p.calibrate.seed * 1_000_003 + batch):
            seq = encode_prompt(tokenizer, problem.prompt)
            yield seq, [0] * len(seq)


def _rac(traces: Path, tokenizer_hash: str) -> Iterator[Sequence]:
    table, meta = read_parquet(traces, TRACES, "traces")
    if meta.get("tokenizer") != tokenizer_hash:
        raise RacError(
            f"traces {str(traces)!r} were sampled by {meta.get('model')!r} with another vocabulary; "
            "off-policy traces must come from a model with the same tokenizer"
        )
    for prompt_ids, completion_ids in zip(
        table["prompt_token_ids"].to_pylist(), table["completion_token_ids"].to_pylist(), strict=True
    ):
        yield prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def take_budget(sequences: Iterator[Sequence], budget: int, source: str) -> list[Sequence]:
    """Whole sequences until ``budget`` tokens, the last one cut to fit exactly."""
    taken, total = [], 0
    # disable=None: a bar on a terminal only, so errors stay one line in logs
    with tqdm(total=budget, desc=f"calibrate {source}", unit="tok", unit_scale=True, disable=None) as bar:
        for ids, segment in sequences:
            room = budget - total
            taken.append((ids[:room], segment[:room]))
            total += len(taken[-1][0])
            bar.update(len(taken[-1][0]))
            if total == budget:
                return taken
    raise RacError(
        f"calibrate.budget_tokens={budget} exceeds the {total} tokens available for source {source!r}; "
        "lower the budget, or raise rollout.n_prompts (rac) or use a larger calib_task (prompt)"
    )


# Python lists of token ids and segments, then the Arrow table: about this many bytes per calibration token.
BYTES_PER_TOKEN = 64


def available_memory() -> int:
    """Bytes of memory available to this process now (MemAvailable on Linux)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(budget: int) -> None:
    """Refuse up front a budget whose sequences cannot be held in memory (an endless source would run for hours)."""
    need, have = budget * BYTES_PER_TOKEN, available_memory()
    if need > have:
        raise RacError(
            f"calibrate.budget_tokens={budget} needs about {need / 2**30:.1f} GB in memory, more than the "
            f"{have / 2**30:.1f} GB available; lower the budget"
        )


def run(p: Params, source: str, traces: Path, out: Path) -> None:
    """Write the calibration sequences of ``source`` to ``out``."""
    if source not in SOURCES:
        raise RacError(f"source {source!r} is unknown; choose one of {list(SOURCES)}")
    check_memory(p.calibrate.budget_tokens)
    vocab = vocab_hash(load_tokenizer(p.model))
    streams = {
        "generic": lambda: _generic(p),
        "prompt": lambda: _prompt(p),
        "rac": lambda: _rac(traces, vocab),
        "offpolicy": lambda: _rac(Path(str(p.calibrate.offpolicy_traces)), vocab),
    }
    sequences = take_budget(streams[source](), p.calibrate.budget_tokens, source)
    n_decode = sum(sum(seg) for _, seg in sequences)
    log.info(
        "calibrate %s: %d sequences, %d tokens (%d decode)",
        source,
        len(sequences),
        p.calibrate.budget_tokens,
        n_decode,
    )
    rows = [{"seq_id": i, "token_ids": ids, "segment": seg, "source": source} for i, (ids, seg) in enumerate(sequences)]
    meta = {"source": source, "budget_tokens": p.calibrate.budget_tokens, "n_tokens": p.calibrate.budget_tokens}
    write_parquet(rows, CALIBRATION, out, meta | {"n_sequences": len(rows), "n_decode_tokens": n_decode})
