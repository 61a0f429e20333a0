"""Read a teacher cache (any URL Zarr accepts), refusing anything not fully written.

A reader trusts an example only if its ``written`` flag is 1 (see ``kvkd.cache.writer`` for the
rules that make this safe) and, unless ``allow_incomplete=True``, only caches whose ``status``
is ``complete``. Encoded arrays come back as float32; the others in their stored dtypes.
Torch is imported lazily (``row``), so the cache package works without it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
import zarr.errors
import zarr.storage

from kvkd.cache import integrity, remote
from kvkd.cache import zarr_adapter as za
from kvkd.cache.codecs import CodecSet
from kvkd.cache.errors import CacheError
from kvkd.cache.integrity import CHECKSUM_ARRAY, ChunkProblem
from kvkd.cache.schema import FLAG_ARRAY, SCHEMA_VERSION, CacheLayout

if TYPE_CHECKING:
    import torch

_RESUME_HINT = "run `kvkd extract` again with the same arguments to resume it"
_DAMAGED_HINT = ("the cache is damaged: `kvkd cache verify` lists every bad chunk; restore the file(s) or "
                 "re-extract the cache (`kvkd extract ... --overwrite`)")


class CacheReader:
    """Read-only view of one cache (use ``CacheReader.open``).

    Attributes:
        url: the cache's location.
        metadata: all group attributes (teacher, tokenizer, dataset, layout, codec, status ...).
        layout: ``CacheLayout`` with ``examples_per_shard`` resolved.
        codecs: the storage codec of each of ``keys``/``values``/``hidden`` (``CodecSet``; one
            codec for all three in caches written before per-array codecs).
    """

    def __init__(self, url: str, group: zarr.Group, allow_incomplete: bool, check: str = "full", local_root: Path | str | None = None):
        if check not in ("full", "index"):
            raise ValueError(f"check must be 'full' or 'index', got {check!r}")
        self.url, self.group, self.allow_incomplete, self.check = url, group, allow_incomplete, check
        self.local_root = local_root  # as given to open (reopened with it in other processes)
        self.metadata: dict[str, Any] = group.attrs.asdict()
        self.layout = CacheLayout.from_json(self.metadata["layout"])
        try:
            self.codecs = CodecSet.from_metadata(self.metadata)
        except (KeyError, ValueError) as e:
            msg = e.args[0] if e.args else e
            raise CacheError(f"cache {url}: cannot read its codec record ({msg}); it may need a newer kvkd") from None
        self._specs = self.layout.row_specs()
        self._parts = {name: list(self.codecs[name].storage_dtypes(spec.shape)) for name, spec in self._specs.items() if spec.encoded}
        self.schema = int(self.metadata.get("schema_version", 1))
        self._arrays: dict[str, zarr.Array] = {}
        wanted = list(self.layout.arrays(self.codecs)) + ([CHECKSUM_ARRAY] if self.schema >= 2 else [])
        for name in wanted:
            try:
                self._arrays[name] = group[name]
            except KeyError:
                raise CacheError(f"cache {url} has no array {name!r}; was its creation interrupted?") from None
        self._names = [n for n in self.layout.arrays(self.codecs) if n != FLAG_ARRAY]  # data arrays
        self._checksums = self._arrays.pop(CHECKSUM_ARRAY, None)
        if self._checksums is not None and self.metadata.get("checksums", {}).get("arrays") != self._names:
            raise CacheError(f"cache {url}: its checksum table lists arrays {self.metadata.get('checksums', {}).get('arrays')}, "
                             f"its layout has {self._names}; the metadata is damaged")
        self._checked: set[int] = set()  # shards whose objects passed the size/index check
        self._local_sizes: dict[tuple[str, int], int] = {}  # local shard files of checked shards: size when checked
        self._flags = self._read_flags()  # (N,) uint8

    @classmethod
    def open(cls, url: str | Path, allow_incomplete: bool = False, check: str = "full", local_root: Path | str | None = "auto") -> CacheReader:
        """Open the cache at ``url`` (local path or fsspec URL such as ``file://``, ``s3://``,
        ``http(s)://``, read-only).

        Args:
            url: the cache.
            allow_incomplete: read the written examples of a cache whose extraction is unfinished.
            check: what the first read of a shard checks against the digests recorded when it was
                written: ``"full"`` reads every shard object whole once (catches any changed byte
                and swapped shard files; one extra read of each shard per reader), ``"index"``
                only sizes and shard indexes (a few bytes; swapped shards of equal size pass, but
                zarr still checks each chunk's crc32c).
            local_root: for a remote ``complete`` cache, the folder under which its chunk
                objects are kept once downloaded (``kvkd.cache.remote.ReadThroughStore``):
                ``"auto"`` is ``$KVKD_HOME/remote``, None reads every object from the remote
                store each time (what ``kvkd cache verify`` does). Ignored for local caches.

        Raises:
            CacheError: no cache there, a newer schema, or status not ``complete`` (unless
                ``allow_incomplete``; the message says how to resume).
        """
        url = str(url)
        try:
            group = zarr.open_group(url, mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.NodeNotFoundError, zarr.errors.GroupNotFoundError):
            raise CacheError(f"no cache at {url}") from None
        except (zarr.errors.ContainsArrayError, zarr.errors.NodeTypeValidationError):
            raise CacheError(f"{url} is a Zarr array, not a kvkd cache group") from None
        attrs = group.attrs.asdict()
        version = attrs.get("schema_version")
        if not isinstance(version, int):
            raise CacheError(f"{url} is a Zarr group but not a kvkd cache (no schema_version)")
        if version > SCHEMA_VERSION:
            raise CacheError(f"cache {url} has schema {version}; this kvkd reads <= {SCHEMA_VERSION}: upgrade kvkd")
        if attrs.get("status") != "complete" and not allow_incomplete:
            raise CacheError(f"cache {url} is {attrs.get('status')!r}, not complete: {_RESUME_HINT}")
        if local_root is not None and attrs.get("status") == "complete" and remote.is_remote(url):
            root = remote.default_local_root() if local_root == "auto" else Path(local_root)
            store = remote.ReadThroughStore(group.store, remote.local_folder(root, url, attrs))
            group = zarr.open_group(store=store, mode="r", zarr_format=3)
        return cls(url, group, allow_incomplete, check, local_root)

    def __len__(self) -> int:
        return self.layout.num_examples

    def __reduce__(self):
        """Reopen by URL when sent to another process (e.g. spawned data-loader workers)."""
        return _reopen, (self.url, self.allow_incomplete, self.check, self.local_root)

    # ---- reading ------------------------------------------------------------------------------

    def _indices(self, indices: Sequence[int] | slice) -> np.ndarray:
        n = len(self)
        if isinstance(indices, slice):
            return np.arange(*indices.indices(n), dtype=np.int64)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if ((idx < -n) | (idx >= n)).any():
            raise IndexError(f"indices out of range for a cache of {n} examples: {idx[(idx < -n) | (idx >= n)][:5]}")
        return np.where(idx < 0, idx + n, idx)

    def _check_written(self, idx: np.ndarray) -> None:
        if (self._flags[idx] == 1).all():
            return
        if self.allow_incomplete:  # a writer may have finished more shards since we opened
            self._flags = self._read_flags()
        bad = idx[self._flags[idx] != 1]  # in the order requested
        if bad.size:
            example = int(bad[0])
            raise CacheError(
                f"example {example} (shard {self.layout.shard_of(example)}) of cache {self.url} is not "
                f"written ({np.unique(bad).size} of the requested examples are missing): {_RESUME_HINT}"
            )

    def _read_flags(self) -> np.ndarray:
        """``written`` (N,) uint8; a damaged flags chunk raises CacheError naming its shard."""
        arr = self._arrays[FLAG_ARRAY]
        try:
            return np.asarray(arr[:])
        except Exception:  # noqa: BLE001 - locate the bad chunk (crc32c mismatch, truncated object ...)
            for shard in range(self.layout.num_shards):
                lo, hi = self.layout.shard_range(shard)
                try:
                    arr[lo:hi]
                except Exception as e:  # noqa: BLE001
                    raise CacheError(f"cache {self.url}: array {FLAG_ARRAY!r}, examples {lo}-{hi - 1} (shard {shard}): "
                                     f"unreadable ({_short(e)}); {_DAMAGED_HINT}") from None
            raise

    def _digest(self, shard: int) -> np.ndarray | None:
        """``(A, 3)`` uint64 digests recorded for ``shard`` (None for schema-1 caches)."""
        if self._checksums is None:
            return None
        try:
            return np.asarray(self._checksums[shard])
        except Exception as e:  # noqa: BLE001
            raise CacheError(f"cache {self.url}: array {CHECKSUM_ARRAY!r}, shard {shard}: unreadable ({_short(e)}); {_DAMAGED_HINT}") from None

    def shard_problems(self, shard: int, full: bool = True) -> list[ChunkProblem]:
        """Missing or damaged stored data of a written shard, over every array (empty: sound).

        Args:
            shard: shard index.
            full: read each shard object whole and compare its recorded hash (what ``verify``
                does); False checks only sizes and shard indexes (a few bytes per array).
        """
        lo, hi = self.layout.shard_range(shard)
        digest = self._digest(shard)
        out = []
        for a, name in enumerate(self._names):
            recorded = None if digest is None else digest[a]
            out += integrity.check_shard(self._arrays[name], name, shard, range(lo, hi), self.layout.examples_per_shard, recorded, full, self.schema)
        return out

    def check_shards(self) -> None:
        """Check every written shard's objects by size and index (a few bytes each), before use.

        Finds deleted, emptied, truncated and (most) swapped shard files up front, e.g. before
        training creates its run folder; changed bytes inside chunks are found when read.

        Raises:
            CacheError: naming the first bad array, examples and shard.
        """
        for shard in range(self.layout.num_shards):
            lo, hi = self.layout.shard_range(shard)
            if (self._flags[lo:hi] == 1).all():
                problems = self.shard_problems(shard, full=False)
                if problems:
                    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
                    raise CacheError(f"cache {self.url}: {problems[0].message()}{more}; {_DAMAGED_HINT}")

    def _check_shards(self, idx: np.ndarray) -> None:
        for shard in np.unique(idx // self.layout.examples_per_shard).tolist():
            if shard in self._checked:
                self._check_still_there(shard)
                continue
            problems = self.shard_problems(shard, full=self.check == "full")
            if problems and self._evict_local(shard, {p.array for p in problems}):  # damaged local copies: download again
                problems = self.shard_problems(shard, full=self.check == "full")
            if problems:
                more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
                raise CacheError(f"cache {self.url}: {self._locate(problems[0])}{more}; {_DAMAGED_HINT}")
            self._checked.add(shard)
            self._local_sizes.update(self._local_shard_sizes(shard))

    def _local_shard_sizes(self, shard: int) -> dict[tuple[str, int], int]:
        """(array, shard) -> size of its shard file, for a cache in a local folder (else empty)."""
        store = self.group.store
        if not isinstance(store, zarr.storage.LocalStore):
            return {}  # object stores: a read-through copy is local and kept; others are checked per open
        out = {}
        for name in self._names:
            arr = self._arrays[name]
            f = Path(store.root) / arr.path / za.shard_key(arr, shard)
            out[(name, shard)] = f.stat().st_size if f.is_file() else -1
        return out

    def _check_still_there(self, shard: int) -> None:
        """A checked shard's local files are still there, same size: a cache removed or replaced
        while it is being read (``kvkd cache rm`` during training) must not read as zeros."""
        now = self._local_shard_sizes(shard)
        for key, size in now.items():
            if key in self._local_sizes and size != self._local_sizes[key]:
                lo, hi = self.layout.shard_range(shard)
                what = "was removed" if size < 0 else f"changed size ({self._local_sizes[key]:,} -> {size:,} bytes)"
                raise CacheError(f"cache {self.url}: array '{key[0]}', examples {lo}-{hi - 1} (shard {shard}): its shard file {what} "
                                 f"while this process was reading the cache (removed or rewritten under a running job?); "
                                 f"restore the cache, then rerun (a training run resumes from its last checkpoint)")

    def _locate(self, problem: ChunkProblem) -> str:
        """``problem``'s message, led by the exact chunk when the shard object is intact but
        its checksum differs (a changed byte inside one chunk's data)."""
        if problem.intact:
            arr = self._arrays[problem.array]
            for e in problem.examples:
                try:
                    arr[e]
                except Exception as err:  # noqa: BLE001 - the chunk's crc32c fails
                    chunk = ChunkProblem(problem.array, problem.shard, (e,), f"unreadable chunk ({_short(err)})")
                    return f"{chunk.message()}; {problem.message()}"
        return problem.message()

    def _evict_local(self, shard: int, names: set[str]) -> bool:
        """Drop the local copies of shard ``shard`` of arrays ``names`` (a read-through remote
        cache); True if any was dropped."""
        store = self.group.store
        if not isinstance(store, remote.ReadThroughStore):
            return False
        return sum(store.evict(f"{self._arrays[n].path}/{za.shard_key(self._arrays[n], shard)}") for n in names) > 0

    def read(self, indices: Sequence[int] | slice) -> dict[str, np.ndarray]:
        """Read examples, in the order given, checking what is read.

        Every chunk's crc32c is checked by zarr; on the first read of a shard its objects are
        checked against the digests recorded when it was written (missing, emptied, truncated,
        changed or swapped shard files; see ``check`` of ``open``); the rows read get the consistency checks of
        ``verify`` (finite values, slots vs ``cot_len``). Zeros never stand in for missing data.

        Args:
            indices: example indices (negative allowed, repeats allowed) or a slice.
        Returns:
            name -> array with a leading axis of len(indices): keys/values (n, L, H_kv, M, D) and
            hidden (n, L+1, d) float32; slot_pos (n, L, H_kv, M) int32; slot_importance,
            slot_score float32 and slot_valid bool of the same shape; cot_len, answer_len (n,)
            int32; answer_nll (n,) float32.
        Raises:
            CacheError: a requested example is not written, or its data is missing, damaged or
                inconsistent (one line naming array, example and shard).
            IndexError: if an index is out of range.
        """
        idx = self._indices(indices)
        self._check_written(idx)
        self._check_shards(idx)
        uniq, inverse = np.unique(idx, return_inverse=True)
        out = self._read_unique(uniq)
        if uniq.size:
            for check, examples in _check_rows(out, self.layout.slots).items():
                if examples.size:
                    e = int(uniq[examples[0]])
                    raise CacheError(f"cache {self.url}: example {e} (shard {self.layout.shard_of(e)}) fails the check "
                                     f"'{check}' ({examples.size} of the examples read); {_DAMAGED_HINT}")
        if not np.array_equal(uniq, idx):
            out = {k: v[inverse] for k, v in out.items()}
        return out

    def _read_unique(self, uniq: np.ndarray) -> dict[str, np.ndarray]:
        """Decoded rows of sorted unique examples (no checks beyond zarr's chunk crc32c)."""
        if uniq.size == 0:
            return {k: np.zeros((0, *s.shape), s.dtype) for k, s in self._specs.items()}
        try:
            stored = self._read_runs(_runs(uniq))
        except Exception as e:  # noqa: BLE001 - a chunk failed its checksum or could not be decoded
            bad = self._bad_chunks(uniq.tolist(), first_only=True)
            if bad:
                raise CacheError(f"cache {self.url}: {bad[0].message()}; {_DAMAGED_HINT}") from None
            raise CacheError(f"cache {self.url}: reading examples {_head(uniq.tolist())} failed: {_short(e)}") from None
        out = {}
        for name, spec in self._specs.items():
            if spec.encoded:
                out[name] = self.codecs[name].decode({suffix: stored[name + suffix] for suffix in self._parts[name]})
            else:
                out[name] = np.asarray(stored[name], dtype=spec.dtype)
        return out

    def _bad_chunks(self, examples: list[int], first_only: bool = False) -> list[ChunkProblem]:
        """Chunks of ``examples`` that zarr cannot read (checksum mismatch, undecodable), one by one."""
        out = []
        for name in self._names:
            for e in examples:
                try:
                    self._arrays[name][e]
                except Exception as err:  # noqa: BLE001
                    out.append(ChunkProblem(name, self.layout.shard_of(e), (e,), f"unreadable chunk ({_short(err)})"))
                    if first_only:
                        return out
        return out

    def _read_runs(self, runs: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        """Stored arrays over example runs ``[start, stop)``, concatenated in run order.

        Every (array, run) slice is requested at once on Zarr's event loop, so the per-call
        latency of each chunk read overlaps. Slices instead of ``oindex``: an orthogonal
        selection of 4 scattered rows costs ~5x more than 4 one-row slices in zarr-python 3.1
        (``benchmarks/streaming.py``).
        """
        names = self._names

        async def fetch():
            return await asyncio.gather(*(za.getitem_async(self._arrays[n], slice(a, b)) for n in names for a, b in runs))

        parts = iter(za.run_sync(fetch()))
        out = {}
        for name in names:
            got = [np.asarray(next(parts)) for _ in runs]
            out[name] = got[0] if len(got) == 1 else np.concatenate(got)
        return out

    def column(self, name: str) -> np.ndarray:
        """One per-example array for every example (e.g. ``answer_nll`` (N,) float32), without
        reading the large ones; only for arrays stored as-is (not the codec-encoded KV/hidden).

        Raises:
            KeyError: unknown or codec-encoded array name.
            CacheError: if an example is not written.
        """
        spec = self._specs.get(name)
        if spec is None or spec.encoded:
            raise KeyError(f"{name!r} is not a plain per-example array of this cache; choose one of {sorted(k for k, v in self._specs.items() if not v.encoded)}")
        every = np.arange(len(self))
        self._check_written(every)
        self._check_shards(every)
        try:
            return np.asarray(self._arrays[name][:], dtype=spec.dtype)
        except Exception:  # noqa: BLE001 - name the bad chunk
            bad = [p for p in self._bad_chunks(every.tolist()) if p.array == name]
            raise CacheError(f"cache {self.url}: {bad[0].message() if bad else name + ' unreadable'}; {_DAMAGED_HINT}") from None

    def row(self, i: int) -> dict[str, torch.Tensor]:
        """One example as torch tensors (shapes of ``read`` without the leading axis)."""
        import torch

        return {k: torch.from_numpy(np.asarray(v[0])) for k, v in self.read([i]).items()}  # 0-d for scalars

    # ---- inspection ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Summary for ``kvkd cache info`` (JSON-serialisable).

        Returns:
            dict with ``url``, ``metadata``, ``num_examples``, ``num_written``, ``num_shards``,
            ``examples_per_shard``, ``arrays`` (name -> shape, dtype, chunks, shards, codecs,
            stored_bytes), ``stored_bytes`` (sum of stored object sizes), ``bytes_per_example``
            (stored bytes / written examples), ``uncompressed_bytes_per_example`` and
            ``checksums`` (what is summed, or "none" for a schema-1 cache).
        """
        arrays, total = {}, 0
        every = {**self._arrays, **({CHECKSUM_ARRAY: self._checksums} if self._checksums is not None else {})}
        for name, arr in every.items():
            nbytes = int(arr.nbytes_stored())
            total += nbytes
            arrays[name] = {
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
                "chunks": list(arr.chunks),
                "shards": list(arr.shards) if arr.shards else None,
                "codecs": json.loads(json.dumps(arr.metadata.to_dict()["codecs"], default=str)),
                "stored_bytes": nbytes,
            }
        written = int((np.asarray(self._arrays[FLAG_ARRAY][:]) == 1).sum())
        return {
            "url": self.url,
            "metadata": self.metadata,
            "num_examples": len(self),
            "num_written": written,
            "num_shards": self.layout.num_shards,
            "examples_per_shard": self.layout.examples_per_shard,
            "arrays": arrays,
            "stored_bytes": total,
            "bytes_per_example": total / max(written, 1),
            "uncompressed_bytes_per_example": self.layout.bytes_per_example(self.codecs),
            "checksums": "crc32c per chunk; size, BLAKE2b-64 and index crc32c per shard" if self._checksums is not None else f"none (schema {self.schema})",
        }

    def verify(self, on_progress: Callable[[int, int], None] | None = None) -> list[str]:
        """Problems of the cache (empty list: all good); see ``verify_report``."""
        return self.verify_report(on_progress).problems

    def verify_report(self, on_progress: Callable[[int, int], None] | None = None) -> VerifyReport:
        """Check every byte and every example of the cache.

        Checks: status vs flags, unwritten shards, array shapes; for every written shard and
        every array: the shard object exists, is not empty, has the size and hash recorded when
        it was written (schema 2) and an intact index listing every chunk; every chunk decodes
        (its crc32c matches); then the rows: finite floats, slot_valid vs cot_len
        (``min(cot_len, M)`` valid slots per layer and head), slot_pos (-1 exactly on empty slots,
        in ``[0, cot_len)`` and increasing on kept ones), non-negative lengths.

        Args:
            on_progress: called as ``on_progress(shards_done, num_shards)`` after each shard.
        Returns:
            VerifyReport: ``problems`` (one line each; every bad chunk listed) and ``notes``
            (e.g. a schema-1 cache has no checksums).
        """
        problems, notes = [], []
        if self._checksums is None:
            notes.append(f"schema {self.schema} cache: no checksums on chunk data or shards (only a missing shard or chunk "
                         "can be found); re-extract it with this kvkd to get them")
        try:
            flags = self._read_flags()
        except CacheError as e:
            problems.append(str(e))
            flags = np.zeros(len(self), np.uint8)
        status = self.metadata.get("status")
        shards = range(self.layout.num_shards)
        missing = [s for s in shards if not (flags[slice(*self.layout.shard_range(s))] == 1).all()]
        if missing:
            problems.append(f"{len(missing)} shard(s) not written: {_head(missing)}")
            if status == "complete":
                problems.append("status is 'complete' but some written flags are 0")
        elif status != "complete":
            problems.append(f"all shards are written but status is {status!r}: run `kvkd extract` again to finalize")
        for name, spec in self.layout.arrays(self.codecs).items():
            arr = self._arrays[name]
            if tuple(arr.shape) != (len(self), *spec.shape) or arr.dtype != spec.dtype:
                want = (len(self), *spec.shape)
                problems.append(f"array {name}: {arr.shape} {arr.dtype}, layout says {want} {spec.dtype}")
        bad: dict[str, list[int]] = {}
        for shard in shards:
            if shard not in missing:
                start, stop = self.layout.shard_range(shard)
                try:
                    chunk_problems = self.shard_problems(shard, full=True)
                except CacheError as e:
                    chunk_problems, _ = [], problems.append(str(e))
                broken = {p.array for p in chunk_problems if not p.intact}  # no chunk to read one by one
                chunk_problems += [p for p in self._bad_chunks(list(range(start, stop))) if p.array not in broken]
                problems += [p.message() for p in chunk_problems]
                if not chunk_problems:
                    rows = self._read_unique(np.arange(start, stop))
                    for check, examples in _check_rows(rows, self.layout.slots).items():
                        bad.setdefault(check, []).extend(int(e) + start for e in examples)
            if on_progress:
                on_progress(shard + 1, self.layout.num_shards)
        problems += [f"{check}: {len(ex)} example(s), e.g. {_head(ex)}" for check, ex in bad.items() if ex]
        return VerifyReport(problems, notes)


@dataclass
class VerifyReport:
    """Result of ``CacheReader.verify_report``.

    Attributes:
        problems: one line per problem (each bad chunk names array, example and shard).
        notes: facts that are not problems (e.g. "no checksums" for a schema-1 cache).
    """

    problems: list[str]
    notes: list[str]


def _short(err: Exception) -> str:
    """First line of an exception's message, with its type."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _runs(sorted_unique: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive indices: [0, 1, 2, 7, 9, 10] -> [(0, 3), (7, 8), (9, 11)]."""
    breaks = np.flatnonzero(np.diff(sorted_unique) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(sorted_unique, breaks)]


def _reopen(url: str, allow_incomplete: bool, check: str = "full", local_root: Path | str | None = "auto") -> CacheReader:
    return CacheReader.open(url, allow_incomplete=allow_incomplete, check=check, local_root=local_root)


def _head(items: list[int], k: int = 5) -> str:
    return ", ".join(map(str, items[:k])) + (" ..." if len(items) > k else "")


def _check_rows(r: dict[str, np.ndarray], m: int) -> dict[str, np.ndarray]:
    """Per-check example indices (within ``r``) that fail it."""
    n = r["cot_len"].shape[0]
    out = {}
    for name in ("keys", "values", "hidden", "slot_importance", "slot_score", "answer_nll"):
        out[f"non-finite {name}"] = np.flatnonzero(~np.isfinite(r[name].reshape(n, -1)).all(axis=1))
    out["negative cot_len/answer_len"] = np.flatnonzero((r["cot_len"] < 0) | (r["answer_len"] < 0))
    valid, pos = r["slot_valid"], r["slot_pos"]  # (n, L, H_kv, M)
    want = np.minimum(r["cot_len"], m)[:, None, None]  # (n, 1, 1)
    out["slot_valid count != min(cot_len, M)"] = np.flatnonzero((valid.sum(-1) != want).any(axis=(1, 2)))
    empty_ok = np.where(valid, pos >= 0, pos == -1)
    in_range = np.where(valid, pos < r["cot_len"][:, None, None, None], True)
    out["slot_pos inconsistent with slot_valid/cot_len"] = np.flatnonzero(~(empty_ok & in_range).all(axis=(1, 2, 3)))
    seen = np.maximum.accumulate(np.where(valid, pos, -1), axis=-1)  # largest kept position so far
    order_ok = ~valid[..., 1:] | (pos[..., 1:] > seen[..., :-1])  # kept slots stay in CoT order
    out["slot_pos not increasing on valid slots"] = np.flatnonzero(~order_ok.all(axis=(1, 2, 3)))
    return out
