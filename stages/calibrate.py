"""Reads: traces Parquet (for ``rac``), params ``model``, ``calib_task``, ``task``, ``benchmarks``, ``chat``,
``calibrate``, ``rollout.keep``. Writes: one calibration Parquet per source (``schemas.CALIBRATION``), all with
the same token budget.

Sources: ``generic`` (``calibrate.generic_corpus``: ``stages/corpus.py``), ``prompt`` (prompts only, so it
takes more prompts than RAC to fill the budget), ``rac`` (prompt plus the on-policy chain of thought; only the
correct traces with ``rollout.keep: correct``), ``offpolicy`` (prompt plus another model's chain of thought,
from ``calibrate.offpolicy_traces``).
"""

import itertools
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from stages.corpus import documents
from stages.errors import RacError
from stages.evaluate import held_out_texts
from stages.models import bos_ids, check_chat_template, encode_prompt, load_tokenizer, vocab_hash
from stages.params import Params
from stages.schemas import CALIBRATION, SEGMENT_IDS, SOURCES, TRACES, read_parquet, write_parquet
from stages.tasks import calibration_problems, get_task

log = logging.getLogger(__name__)
PROMPT, DECODE = SEGMENT_IDS["prompt"], SEGMENT_IDS["decode"]

Sequence = tuple[list[int], list[int]]  # (token ids, per-token segment)


def _generic(p: Params) -> Iterator[Sequence]:
    """Windows of ``generic_seq_len`` tokens over the generic corpus's documents, each after the tokenizer's BOS
    (if it has a real one)."""
    tokenizer, c = load_tokenizer(p.dense), p.calibrate
    bos = bos_ids(tokenizer)
    width = c.generic_seq_len - len(bos)
    for text in documents(c.generic_corpus, c.budget_tokens * 2, c.seed):  # a generated corpus: >= 1 char/token
        ids = tokenizer.encode(text, add_special_tokens=False)
        for start in range(0, len(ids) - width + 1, width):
            seq = bos + ids[start : start + width]
            yield seq, [PROMPT] * len(seq)


def _prompt(p: Params) -> Iterator[Sequence]:
    """Chat prompts of calib_task without their completions: a fixed benchmark's problems once each in seeded
    order, or a generator's disjoint seeded batches; evaluation problems are kept out."""
    tokenizer, task = load_tokenizer(p.dense), get_task(p.calib_task, p.benchmarks)
    check_chat_template(tokenizer, p.dense, p.chat.require_template)
    held_out = held_out_texts(p)
    sizes: Iterable[int] = [task.size] if task.size is not None else itertools.repeat(256)
    for batch, n in enumerate(sizes):
        seed = p.calibrate.seed * 1_000_003 + batch
        for problem in calibration_problems(task, n, seed, held_out, p.allow_overlap):
            seq = encode_prompt(tokenizer, problem.prompt, p.chat.system_prompt)
            yield seq, [PROMPT] * len(seq)


def _rac(traces: Path, tokenizer_hash: str, keep: str) -> Iterator[Sequence]:
    """Prompt then completion of each trace (``keep: correct``: of the correct ones only)."""
    table, meta = read_parquet(traces, TRACES, "traces")
    if meta.get("tokenizer") != tokenizer_hash:
        raise RacError(
            f"traces {str(traces)!r} were sampled by {meta.get('model')!r} with another vocabulary; "
            "off-policy traces must come from a model with the same tokenizer"
        )
    kept = [keep == "all" or c for c in table["correct"].to_pylist()]
    log.info("calibrate: keeping %d of %d traces (rollout.keep=%s)", sum(kept), len(kept), keep)
    if not any(kept):
        raise RacError(
            f"rollout.keep={keep!r} keeps none of the {len(kept)} traces in {str(traces)!r} (none is correct); "
            "set rollout.keep: all, or sample more (rollout.n_prompts, samples_per_prompt)"
        )
    columns = (table[c].to_pylist() for c in ("prompt_token_ids", "completion_token_ids"))
    for keep_it, prompt_ids, completion_ids in zip(kept, *columns, strict=True):
        if keep_it:
            yield prompt_ids + completion_ids, [PROMPT] * len(prompt_ids) + [DECODE] * len(completion_ids)


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
        "lower the budget, or raise rollout.n_prompts or samples_per_prompt (rac, offpolicy: with rollout.keep="
        "correct only correct traces count), or use a larger calib_task (prompt) or generic corpus (generic)"
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
    vocab = vocab_hash(load_tokenizer(p.dense))
    streams = {
        "generic": lambda: _generic(p),
        "prompt": lambda: _prompt(p),
        "rac": lambda: _rac(traces, vocab, p.rollout.keep),
        "offpolicy": lambda: _rac(Path(str(p.calibrate.offpolicy_traces)), vocab, p.rollout.keep),
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
