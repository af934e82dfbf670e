"""Artifact contracts: Parquet schemas and the Zarr Hessian store, each defined once.

Every writer builds its artifact beside the destination and moves it into place only when it
is whole, so a failed run never leaves a complete-looking artifact behind.
"""

import contextlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs.numcodecs import Zstd

from stages.errors import RacError

SCHEMA_VERSION = 1
_META_KEY = b"rac"

# What every generated sample records, in traces and in evaluation samples alike.
_GENERATION = [
    ("prompt", pa.string()),
    ("completion", pa.string()),
    ("n_prompt_tokens", pa.int32()),
    ("n_completion_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("answer", pa.string()),
]


def generation_columns(
    prompt: str, completion: str, prompt_ids: list[int], completion_ids: list[int], finish_reason: str, answer: str
) -> dict[str, Any]:
    """The ``_GENERATION`` columns of one sample."""
    return {
        "prompt": prompt,
        "completion": completion,
        "n_prompt_tokens": len(prompt_ids),
        "n_completion_tokens": len(completion_ids),
        "finish_reason": finish_reason,
        "answer": answer,
    }


TRACES = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("sample_idx", pa.int32()),
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("completion_token_ids", pa.list_(pa.int32())),
        *_GENERATION,
        ("correct", pa.bool_()),
    ]
)

CALIBRATION = pa.schema(
    [
        ("seq_id", pa.int64()),
        ("token_ids", pa.list_(pa.int32())),
        ("segment", pa.list_(pa.int8())),  # per token: 0 = prompt/text, 1 = decode
        ("source", pa.string()),
    ]
)

SAMPLES = pa.schema(
    [
        ("problem_id", pa.int64()),
        ("sample_idx", pa.int32()),
        *_GENERATION,
        ("extracted", pa.string()),
        ("correct", pa.bool_()),
    ]
)

# One row per (model, problem): e_t = ‖h_dense,t − h_model,t‖₂ of the final hidden state along the dense
# model's greedy rollout; positions < n_prompt_tokens are the prompt, the rest the decode.
ERRORS = pa.schema(
    [
        ("model", pa.string()),
        ("problem_id", pa.int64()),
        ("n_prompt_tokens", pa.int32()),
        ("token_ids", pa.list_(pa.int32())),
        ("errors", pa.list_(pa.float32())),
    ]
)

SEGMENT_IDS = {"prompt": 0, "decode": 1}


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``dest``; move it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        os.replace(tmp, dest)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()


def write_parquet(rows: list[dict[str, Any]], schema: pa.Schema, path: Path, metadata: dict[str, Any]) -> None:
    """Write ``rows`` with ``schema`` and JSON ``metadata`` to ``path``, atomically."""
    table = pa.Table.from_pylist(rows, schema=schema)
    table = table.replace_schema_metadata({_META_KEY: json.dumps(metadata).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: Path, schema: pa.Schema, what: str) -> tuple[pa.Table, dict[str, Any]]:
    """Read ``path``, check it has ``schema``'s columns and types; return the table and metadata."""
    path = Path(path)
    if not path.is_file():
        raise RacError(f"{what} file {str(path)!r} does not exist; run the stage that writes it first")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise RacError(f"{what} file {str(path)!r} is not readable Parquet ({err}); rebuild it") from err
    got = {f.name: f.type for f in table.schema}
    bad = [f"{f.name}:{f.type}" for f in schema if got.get(f.name) != f.type]
    if bad:
        raise RacError(f"{what} file {str(path)!r} lacks columns {bad}; it was not written by this rac version")
    raw = (table.schema.metadata or {}).get(_META_KEY)
    return table.select(schema.names), json.loads(raw) if raw else {}


@contextlib.contextmanager
def numcodecs_quiet() -> Iterator[None]:
    """Silence zarr's note that numcodecs' Zstd is outside the v3 core spec: the store uses it on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
        yield


@dataclass(frozen=True)
class GroupInfo:
    """One Hessian group: the linears of one decoder layer that read the same input."""

    layer: int
    name: str
    members: list[str]
    n_tokens: dict[str, int]

    @property
    def key(self) -> str:
        return f"layers/{self.layer}/{self.name}"


class HessianWriter:
    """Builds a Hessian store in a temp dir; ``finish`` moves it into place and marks it complete.

    Layout (Zarr v3): root attrs ``schema_version, model_id, model_fingerprint, source, dtype,
    complete``; one group ``layers/<i>/<first member>`` per input group holding float32 [d, d]
    arrays ``xtx_prompt`` and ``xtx_decode`` (raw sums of x·xᵀ) and attrs ``n_tokens_prompt``,
    ``n_tokens_decode``, ``members``.
    """

    def __init__(
        self, path: Path, *, model_id: str, fingerprint: str, source: str, chunk: int, build: Path | None = None
    ) -> None:
        """Build beside ``path``, or in ``build`` (kept across runs, and reopened if it holds a partial build)."""
        self.path = Path(path)
        self.tmp = Path(build) if build else self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.chunk = chunk
        attrs = {
            "schema_version": SCHEMA_VERSION,
            "model_id": model_id,
            "model_fingerprint": fingerprint,
            "source": source,
            "dtype": "float32",
            "complete": False,
        }
        if (self.tmp / "zarr.json").is_file():
            self.root = zarr.open_group(store=str(self.tmp), mode="r+", zarr_format=3)
            if dict(self.root.attrs) != attrs:
                raise RacError(f"partial Hessian build {str(self.tmp)!r} is for other inputs; delete it and rerun")
        else:
            self.root = zarr.open_group(store=str(self.tmp), mode="w", zarr_format=3)
            self.root.attrs.update(attrs)

    def write_group(
        self, layer: int, name: str, members: list[str], xtx: dict[str, np.ndarray], n_tokens: dict[str, int]
    ) -> None:
        """Write the per-segment sums ``xtx[segment]`` [d, d] and token counts of one group."""
        group = self.root.require_group(f"layers/{layer}/{name}")
        for segment in SEGMENT_IDS:
            d = xtx[segment].shape[0]
            with numcodecs_quiet():
                compressor = Zstd(level=3)
            array = group.create_array(
                f"xtx_{segment}",
                shape=(d, d),
                chunks=(min(d, self.chunk), min(d, self.chunk)),
                dtype="float32",
                compressors=[compressor],
                overwrite=True,  # a window cut short by a kill is written again in full
            )
            array[...] = xtx[segment].astype(np.float32)
        group.attrs.update({f"n_tokens_{s}": int(n_tokens[s]) for s in SEGMENT_IDS} | {"members": members})

    def finish(self) -> None:
        """Move the whole store into place, then write ``complete: true`` last."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(self.tmp, self.path)  # a rename on one filesystem; `complete` is only written after it
        zarr.open_group(store=str(self.path), mode="r+", zarr_format=3).attrs["complete"] = True

    def abort(self) -> None:
        """Remove the partial build."""
        shutil.rmtree(self.tmp, ignore_errors=True)


class HessianStore:
    """A complete Hessian store, checked against the model that will be pruned."""

    def __init__(self, path: Path, fingerprint: str | None) -> None:
        """Open a complete store; check it was built for the model ``fingerprint`` (None: any model)."""
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise RacError(f"Hessian store {str(self.path)!r} does not exist; run `dvc repro hessians` first")
        self.root = zarr.open_group(store=str(self.path), mode="r", zarr_format=3)
        attrs = dict(self.root.attrs)
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise RacError(
                f"Hessian store {str(self.path)!r} has schema_version {attrs.get('schema_version')!r}, "
                f"expected {SCHEMA_VERSION}; rebuild it"
            )
        if attrs.get("complete") is not True:
            raise RacError(f"Hessian store {str(self.path)!r} is incomplete; delete it and rerun the hessians stage")
        if fingerprint is not None and attrs.get("model_fingerprint") != fingerprint:
            raise RacError(
                f"Hessian store {str(self.path)!r} was built for model {attrs.get('model_id')!r} "
                f"(fingerprint {attrs.get('model_fingerprint')}), not this one ({fingerprint}); rebuild it"
            )
        self.attrs = attrs

    def groups(self) -> list[GroupInfo]:
        """Every input group in the store, ordered by layer."""
        out = []
        for layer_key, layer in self.root["layers"].groups():
            for name, group in layer.groups():
                attrs = group.attrs
                counts = {s: int(attrs[f"n_tokens_{s}"]) for s in SEGMENT_IDS}
                out.append(GroupInfo(int(layer_key), name, list(attrs["members"]), counts))
        return sorted(out, key=lambda g: (g.layer, g.name))

    def sums(self, group: GroupInfo) -> dict[str, np.ndarray]:
        """The raw per-segment sums of x·xᵀ [d, d] of ``group``."""
        with numcodecs_quiet():
            node = self.root[group.key]
            return {s: np.asarray(node[f"xtx_{s}"][...]) for s in SEGMENT_IDS}
