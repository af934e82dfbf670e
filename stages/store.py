"""The Zarr v3 Hessian store: writer, reader and validation, defined once.

Layout: root attrs ``schema_version, model_id, model_fingerprint, source, dtype, n_tokens, groups,
complete``; one Zarr group ``layers/<i>/<first member>`` per input group holding float32 [d, d] arrays
``xtx_prompt`` and ``xtx_decode`` (raw sums of x·xᵀ) and attrs ``n_tokens_prompt``, ``n_tokens_decode``,
``members``; and ``manifest.json``: the size and sha256 of every file under ``layers/`` and of the root
attrs, written before ``complete``.

Disk: a segment that saw no tokens (the decode segment of a prompt or generic source) has no array, and an
array keeps only its upper triangle: x·xᵀ is symmetric, so the chunks below the diagonal are never written
(Zarr writes no chunk that is all fill value) and the reader mirrors the triangle. The mirrored sum is the
upper triangle's, exactly; fp32 addmm leaves the two triangles unequal in the last bits, and the solvers
(Cholesky of one triangle) never read both anyway.

A store is valid only if it is complete, holds exactly the groups of the model it was built for, every
group saw the store's token counts, and every file matches the manifest (a missing chunk would read as
zeros, a corrupted one can still decode). Readers check sizes on open and digests before using a group.
"""

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs.numcodecs import Zstd

from stages.errors import RacError
from stages.models import LinearGroup, expert_member
from stages.schemas import SEGMENT_IDS, atomic_path, numcodecs_quiet, tmp_sibling

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
MANIFEST = "manifest.json"
Digests = dict[str, list[Any]]  # relative path -> [size in bytes, sha256 hex]


def group_key(group: LinearGroup) -> str:
    """Where ``group`` lives in a store."""
    return f"layers/{group.layer}/{group.name}"


@dataclass(frozen=True)
class GroupInfo(LinearGroup):
    """A stored group with the number of tokens per segment that entered its sums."""

    n_tokens: dict[str, int]

    @property
    def key(self) -> str:
        return group_key(self)


def counts_fit(group: LinearGroup, counts: dict[str, int], total: dict[str, int]) -> bool:
    """A group saw every calibration token; an expert's group (routed tokens only) saw at most as many."""
    if expert_member(group.name) is None:
        return counts == total
    return all(0 <= counts[s] <= total[s] for s in SEGMENT_IDS)


def _spec(group: LinearGroup) -> tuple[int, list[str]]:
    return (group.layer, list(group.members))


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def digest_files(root: Path, rels: Iterable[str]) -> Digests:
    """[size, sha256] of each file ``root/rel``; hashed on threads (hashlib releases the GIL)."""
    rels = sorted(rels)
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 1)) as pool:
        shas = list(pool.map(lambda rel: _sha256(root / rel), rels))
    return {rel: [(root / rel).stat().st_size, sha] for rel, sha in zip(rels, shas, strict=True)}


def files_under(root: Path, prefix: str) -> list[str]:
    """Relative paths of the files under ``root/prefix``."""
    base = root / prefix
    return [str(f.relative_to(root)) for f in base.rglob("*") if f.is_file()] if base.is_dir() else []


def _attrs_digest(attrs: dict[str, Any]) -> str:
    """sha256 of the root attrs that define the store (all but ``complete``)."""
    blob = json.dumps({k: v for k, v in attrs.items() if k != "complete"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _open_root(path: Path, mode: str) -> zarr.Group:
    """The root group of a store, or a one-line error when its metadata is unreadable."""
    try:
        return zarr.open_group(store=str(path), mode=mode, zarr_format=3)
    except (ValueError, KeyError, OSError, zarr.errors.BaseZarrError) as err:
        raise RacError(f"Hessian store {str(path)!r} has unreadable metadata ({err}); delete it and rebuild") from err


class HessianWriter:
    """Builds a store in the directory ``build``; ``seal`` writes the manifest, ``publish`` moves it into place."""

    def __init__(
        self,
        build: Path,
        *,
        model_id: str,
        fingerprint: str,
        source: str,
        chunk: int,
        n_tokens: dict[str, int],
        groups: list[LinearGroup],
    ) -> None:
        """Open ``build``: reopened if it holds a partial build of the same attrs, else started afresh."""
        self.build = Path(build)
        self.chunk = chunk
        self.groups = groups
        self.attrs = {
            "schema_version": SCHEMA_VERSION,
            "model_id": model_id,
            "model_fingerprint": fingerprint,
            "source": source,
            "dtype": "float32",
            "n_tokens": {s: int(n_tokens[s]) for s in SEGMENT_IDS},
            "groups": [{"layer": g.layer, "members": list(g.members)} for g in groups],
            "complete": False,
        }
        self.root: zarr.Group | None = None
        if (self.build / "zarr.json").is_file():
            try:
                root = _open_root(self.build, "r+")
                # ``complete`` aside: a sealed build whose publish failed was marked, then moved back here
                if {**dict(root.attrs), "complete": False} == self.attrs:
                    self.root = root
            except RacError as err:
                log.warning("%s", err)
            if self.root is None:
                log.warning("partial Hessian build %s is not of these inputs; starting it afresh", self.build)
        if self.root is None:
            shutil.rmtree(self.build, ignore_errors=True)
            self.root = zarr.open_group(store=str(self.build), mode="w", zarr_format=3)
            self.root.attrs.update(self.attrs)

    def write_group(
        self, layer: int, name: str, members: list[str], xtx: dict[str, np.ndarray], n_tokens: dict[str, int]
    ) -> None:
        """Write the upper triangles of the per-segment sums ``xtx[segment]`` [d, d] and the token counts of one
        group; a segment of no tokens gets no array (``xtx`` may lack it). Non-finite sums are a one-line error."""
        assert self.root is not None
        key = f"layers/{layer}/{name}"
        for segment in (s for s in SEGMENT_IDS if n_tokens[s] > 0):
            if not np.isfinite(xtx[segment]).all():  # refused here, so no store is ever sealed around them
                raise RacError(
                    f"Hessian build {str(self.build)!r}: group {key!r} has non-finite {segment} sums (the model's "
                    "activations overflow float32 on this calibration); check the model's weights, nothing was stored"
                )
        group = self.root.require_group(key)
        for segment in (s for s in SEGMENT_IDS if n_tokens[s] > 0):
            d = xtx[segment].shape[0]
            with numcodecs_quiet():
                compressor = Zstd(level=3)
            array = group.create_array(
                f"xtx_{segment}",
                shape=(d, d),
                chunks=(min(d, self.chunk), min(d, self.chunk)),
                dtype="float32",
                compressors=[compressor],
                overwrite=True,  # a layer cut short by a kill is written again in full
            )
            array[...] = np.triu(xtx[segment]).astype(np.float32)
        group.attrs.update({f"n_tokens_{s}": int(n_tokens[s]) for s in SEGMENT_IDS} | {"members": members})

    def digest_layers(self, layers: Iterable[int]) -> Digests:
        """Sizes and digests of every file written for ``layers``: the record that lets a resume trust them."""
        return digest_files(self.build, [rel for i in layers for rel in files_under(self.build, f"layers/{i}")])

    def verify(self, record: Digests) -> bool:
        """Whether every file of ``record`` is on disk with its recorded size and digest."""
        if not all((self.build / rel).is_file() for rel in record):
            return False
        if any((self.build / rel).stat().st_size != size for rel, (size, _) in record.items()):
            return False
        return digest_files(self.build, record) == record

    def seal(self) -> None:
        """Check the build holds exactly the model's groups with the calibration's token counts; write the manifest."""
        assert self.root is not None
        expected = self.attrs["n_tokens"]
        for spec in self.groups:
            node = self.root.get(group_key(spec))
            if node is None:
                raise RacError(f"Hessian build {str(self.build)!r} lacks group {group_key(spec)!r}; rerun hessians")
            counts = {s: int(node.attrs[f"n_tokens_{s}"]) for s in SEGMENT_IDS}
            if not counts_fit(spec, counts, expected):
                raise RacError(
                    f"group {group_key(spec)!r} saw tokens {counts}, not the calibration's {expected}; rerun hessians"
                )
        manifest = {
            "attrs": _attrs_digest(self.attrs),
            "files": digest_files(self.build, files_under(self.build, "layers")),
        }
        with atomic_path(self.build / MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest, sort_keys=True))

    def publish(self, dest: Path) -> None:
        """Move the sealed build beside ``dest``, mark it complete there, then rename it onto ``dest``.

        ``dest`` is at every moment absent, the old store, or the new complete one: the copy (when the build
        is on another filesystem) happens under a temporary name and only a rename in one directory replaces it.
        If any step fails (a full disk, a read-only folder), the sealed build is back at ``build`` for the rerun to
        publish, and ``dest`` is as it was.
        """
        dest = Path(dest)
        staged = stage_beside(self.build, dest)
        try:
            mark_complete(staged)
            swap_into(staged, dest)
        except BaseException:
            if self.build.exists():  # staged by a copy: the build was never moved
                shutil.rmtree(staged, ignore_errors=True)
            else:  # staged by a rename, within one filesystem: renaming back needs no space
                os.replace(staged, self.build)
            raise
        shutil.rmtree(self.build, ignore_errors=True)  # the original of a copy
        self.root = None

    def abort(self) -> None:
        """Remove the build."""
        shutil.rmtree(self.build, ignore_errors=True)


def stage_beside(build: Path, dest: Path) -> Path:
    """``build`` at a temporary sibling of ``dest``: renamed there, or copied across filesystems (``build`` is then
    kept until the publish ends); a failed copy leaves nothing beside ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = tmp_sibling(dest)
    try:
        os.rename(build, staged)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        try:
            shutil.copytree(build, staged)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    return staged


def mark_complete(path: Path) -> None:
    """Write ``complete: true``: the last write of a store, after its manifest."""
    _open_root(path, "r+").attrs["complete"] = True


def swap_into(staged: Path, dest: Path) -> None:
    """Rename ``staged`` onto ``dest``; an old store at ``dest`` is renamed away first (and back, if the second
    rename fails), then removed."""
    trash = tmp_sibling(dest)
    if dest.exists():
        os.replace(dest, trash)
    try:
        os.replace(staged, dest)
    except BaseException:
        if trash.exists():
            os.replace(trash, dest)
        raise
    shutil.rmtree(trash, ignore_errors=True)


class HessianStore:
    """A complete, whole Hessian store, checked against the model that will use it."""

    def __init__(self, path: Path, fingerprint: str | None, groups: list[LinearGroup] | None = None) -> None:
        """Open a store; check it was built for the model ``fingerprint`` with exactly ``groups`` (None: any)."""
        self.path = Path(path)
        where = f"Hessian store {str(self.path)!r}"
        if not (self.path / "zarr.json").is_file():
            raise RacError(f"{where} does not exist; run `dvc repro hessians` first")
        self.root = _open_root(self.path, "r")
        attrs = dict(self.root.attrs)
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise RacError(
                f"{where} has schema_version {attrs.get('schema_version')!r}, expected {SCHEMA_VERSION}; rebuild it"
            )
        if attrs.get("complete") is not True:
            raise RacError(f"{where} is incomplete; delete it and rerun the hessians stage")
        if fingerprint is not None and attrs.get("model_fingerprint") != fingerprint:
            raise RacError(
                f"{where} was built for model {attrs.get('model_id')!r} "
                f"(fingerprint {attrs.get('model_fingerprint')}), not this one ({fingerprint}); rebuild it"
            )
        manifest = self._manifest(where)
        if manifest["attrs"] != _attrs_digest(attrs):
            raise RacError(f"{where}: its attributes were changed after it was written; rebuild it")
        self.files: Digests = manifest["files"]
        self._check_sizes(where)
        self.attrs = attrs
        self.n_tokens = {s: int(attrs["n_tokens"][s]) for s in SEGMENT_IDS}
        self.specs = sorted((LinearGroup(int(g["layer"]), list(g["members"])) for g in attrs["groups"]), key=_spec)
        if groups is not None:
            self.require_groups(groups)

    def require_groups(self, groups: list[LinearGroup]) -> None:
        """The store holds exactly ``groups`` (those of the model that will use it); else a one-line error."""
        if sorted(map(_spec, groups)) != list(map(_spec, self.specs)):
            theirs, ours = set(map(group_key, self.specs)), set(map(group_key, groups))
            raise RacError(
                f"Hessian store {str(self.path)!r} does not hold exactly this model's input groups (missing "
                f"{sorted(ours - theirs)[:3]}, extra {sorted(theirs - ours)[:3]}); rebuild it for this model"
            )

    def _manifest(self, where: str) -> dict[str, Any]:
        path = self.path / MANIFEST
        if not path.is_file():
            raise RacError(f"{where} has no {MANIFEST}; it is not whole, rebuild it")
        try:
            manifest = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise RacError(f"{where}: {MANIFEST} is unreadable ({err}); rebuild it") from err
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "attrs" not in manifest:
            raise RacError(f"{where}: {MANIFEST} is malformed; rebuild it")
        return manifest

    def _check_sizes(self, where: str) -> None:
        """Every manifest file present with its size, and no file the manifest does not list."""
        on_disk = set(files_under(self.path, "layers"))
        missing = sorted(set(self.files) - on_disk)
        extra = sorted(on_disk - set(self.files))
        if missing or extra:
            raise RacError(
                f"{where} is damaged: missing files {missing[:3]}, unexpected files {extra[:3]}; "
                "restore it with `dvc pull` or `dvc checkout`, or rebuild it"
            )
        for rel, (size, _) in self.files.items():
            if (self.path / rel).stat().st_size != size:
                raise RacError(
                    f"{where} is damaged: {rel} has {(self.path / rel).stat().st_size} bytes, not {size}; "
                    "restore it with `dvc pull` or `dvc checkout`, or rebuild it"
                )

    def verify(self, prefix: str = "layers") -> None:
        """Hash the files at or under ``prefix`` against the manifest; a one-line error names the first mismatch."""
        rels = [rel for rel in self.files if rel == prefix or rel.startswith(prefix + "/")]
        got = digest_files(self.path, rels)
        bad = sorted(rel for rel in rels if got[rel] != self.files[rel])
        if bad:
            raise RacError(
                f"Hessian store {str(self.path)!r} is damaged: {bad[0]} does not match its digest "
                f"({len(bad)} file(s) in all); restore it with `dvc pull` or `dvc checkout`, or rebuild it"
            )

    def groups(self) -> list[GroupInfo]:
        """Every input group in the store, ordered by layer, with its token counts."""
        out = []
        for spec in self.specs:
            self.verify(f"{group_key(spec)}/zarr.json")  # its attrs are read next
            attrs = self.root[group_key(spec)].attrs
            counts = {s: int(attrs[f"n_tokens_{s}"]) for s in SEGMENT_IDS}
            if not counts_fit(spec, counts, self.n_tokens):
                raise RacError(
                    f"Hessian store {str(self.path)!r}: group {group_key(spec)!r} saw tokens {counts}, "
                    f"not the store's {self.n_tokens}; rebuild it"
                )
            out.append(GroupInfo(spec.layer, spec.members, counts))
        return out

    def sums(self, group: LinearGroup) -> dict[str, np.ndarray]:
        """The raw sums of x·xᵀ [d, d] of ``group`` for each segment that saw tokens, after checking its files'
        digests."""
        self.verify(group_key(group))
        sums = {}
        with numcodecs_quiet():
            node = self.root[group_key(group)]
            counts = {s: int(node.attrs[f"n_tokens_{s}"]) for s in SEGMENT_IDS}
            for s in (s for s in SEGMENT_IDS if counts[s] > 0):
                if f"xtx_{s}" not in node:
                    raise RacError(
                        f"Hessian store {str(self.path)!r}: group {group_key(group)!r} has no {s} sums although "
                        f"{counts[s]} {s} tokens entered it; rebuild it"
                    )
                upper = np.asarray(node[f"xtx_{s}"][...])  # [d, d], zero below the diagonal
                sums[s] = upper + np.triu(upper, 1).T
        if not all(np.isfinite(x).all() for x in sums.values()):
            raise RacError(
                f"Hessian store {str(self.path)!r}: group {group_key(group)!r} has non-finite sums; rebuild it"
            )
        return sums
