"""Write one teacher's cache shard by shard, crash-safely and resumably.

Crash-safety rules (what a reader may rely on):

1. **Data first, checksums next, flags last.** ``write_shard`` writes every data array of a shard
   (whole shards, no read-modify-write: an old shard object is deleted first), reads each shard
   object back and records its size and hash in ``shard_checksums`` (``kvkd.cache.integrity``),
   and only then sets the shard's ``written`` flags (one chunk, one atomic object write). A
   process killed at any point leaves the shard's flags at 0: readers refuse its examples and
   ``pending_shards`` hands it out again. Every chunk carries its own crc32c and is stored even
   when it equals the fill value, so a reader can tell a missing chunk from a zero one.
2. **One writer per shard.** A writer claims ``{cache}/.claims/shard-{i}`` (O_EXCL on local file
   systems, a conditional ``If-None-Match: *`` PUT on S3; see ``kvkd.cache.claims``) while
   writing shard ``i``; parallel extraction splits work
   on shard boundaries with ``pending_shards(part=(index, count))``. A shard whose flags are
   already set is never rewritten (that would mean two writers overlap).
3. **Complete only when every flag is set.** The group's ``status`` attribute is ``"incomplete"``
   from creation until ``finalize()`` finds all flags at 1 and sets ``"complete"``.
4. **Resume only the same cache.** Reopening an existing cache compares schema version, layout,
   codec, compressor and every key of the given metadata (except volatile ones such as
   ``created``) with what is stored; any difference raises ``CacheMismatchError`` naming it.

Example:
    writer = CacheWriter.open(url, layout, metadata)
    for shard in writer.pending_shards():
        with writer.claim(shard):  # optional: hold the shard while computing it
            writer.write_shard(shard, compute_rows(*writer.layout.shard_range(shard)))
    writer.finalize()
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.errors

import kvkd
from kvkd.cache import claims, integrity
from kvkd.cache import zarr_adapter as za
from kvkd.cache.codecs import CodecSet, Compressor, StorageCodec, get_codecs
from kvkd.cache.errors import CacheError, CacheMismatchError
from kvkd.cache.schema import FLAG_ARRAY, SCHEMA_VERSION, CacheLayout

RESERVED_KEYS = ("schema_version", "kvkd_version", "created", "completed", "status", "layout", "codec", "codecs", "compressor", "checksums")
VOLATILE_KEYS = frozenset({"created", "completed", "updated", "host", "hostname", "pid", "elapsed_s", "wall_s", "location", "source", "provenance"})
"""Metadata keys (at any depth) that may differ between runs of one extraction."""
_MISSING = "<missing>"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _as_json(d: dict[str, Any], what: str) -> dict[str, Any]:
    """``d`` after a strict JSON round trip (tuples become lists; NaN and objects are refused)."""
    try:
        return json.loads(json.dumps(d, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be plain JSON (no NaN, no objects): {e}") from None


def first_difference(stored: Any, given: Any, prefix: str = "", keys: str = "given") -> tuple[str, Any, Any] | None:
    """First dotted path where two JSON values differ, as ``(path, stored, given)``.

    Args:
        keys: ``"given"`` compares only keys present in ``given`` (and skips ``VOLATILE_KEYS``);
            ``"both"`` compares the union of keys.
    """
    if isinstance(stored, dict) and isinstance(given, dict):
        names = list(given) + ([k for k in stored if k not in given] if keys == "both" else [])
        for k in names:
            if keys == "given" and k in VOLATILE_KEYS:
                continue
            diff = first_difference(stored.get(k, _MISSING), given.get(k, _MISSING), f"{prefix}{k}.", keys)
            if diff:
                return diff
        return None
    return None if stored == given else (prefix.rstrip("."), stored, given)


class CacheWriter:
    """Writer of one cache group (use ``CacheWriter.open``).

    Attributes:
        url: where the cache lives (local path or fsspec URL).
        layout: the resolved layout (``examples_per_shard`` > 0).
        codecs: the storage codec of each of ``keys``/``values``/``hidden`` (``CodecSet``).
        compressor: byte compressor of every array.
    """

    def __init__(self, url: str, group: zarr.Group, layout: CacheLayout, codecs: CodecSet, compressor: Compressor):
        self.url, self.group, self.layout, self.codecs, self.compressor = url, group, layout, codecs, compressor
        self._claims_dir = claims.claims_dir(url)  # local only (zarr's temporary files live there too)
        self._claims = claims.location(url)  # local folder, S3 prefix, or None
        self._held: dict[int, claims.Claim] = {}
        self._names = data_array_names(layout, codecs)
        self._arrays = self._ensure_arrays()

    # ---- opening ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        url: str | Path,
        layout: CacheLayout,
        metadata: dict[str, Any],
        codec: str | dict[str, Any] | StorageCodec | CodecSet = "float16",
        compressor: Compressor = Compressor("zstd", 3),
        overwrite: bool = False,
    ) -> CacheWriter:
        """Create the cache at ``url``, or reopen it to resume.

        Args:
            url: local path or fsspec URL of the Zarr group.
            layout: sizes; ``examples_per_shard=0`` picks ~32 MiB shards.
            metadata: JSON dict (teacher, tokenizer, dataset with ``fingerprint``, prompt,
                compression ...) stored as group attributes, next to ``schema_version``,
                ``kvkd_version``, ``created``, ``status``, ``layout``, ``codec``, ``codecs``, ``compressor``.
            codec: the per-array storage codecs: a preset (``"fp16"``, ``"int8"``, ``"int4"``), one
                codec for every array (``"float16"``, ``"bfloat16"`` ... or JSON), a dict array ->
                codec, or a ``CodecSet`` (see ``kvkd.cache.codecs.get_codecs``).
            compressor: byte compressor.
            overwrite: delete an existing cache at ``url`` and start afresh (single writer only).
        Raises:
            CacheMismatchError: the existing cache differs (names the field and both values).
            CacheError: ``url`` is a non-empty directory that is not a Zarr group.
            ValueError: metadata is not plain JSON or uses a reserved key.
        """
        url = str(url)
        refuse_read_only(url)
        local = claims.claims_dir(url)
        # Local URLs go through zarr's LocalStore (atomic writes, creates folders); fsspec's
        # file:// store needs auto_mkdir and writes in place.
        target = str(local.parent) if local is not None else url
        codecs = get_codecs(codec)
        layout = layout.resolved(codecs)
        meta = _as_json(metadata, "cache metadata")
        reserved = sorted(set(meta) & set(RESERVED_KEYS))
        if reserved:
            raise ValueError(f"metadata keys {reserved} are reserved for the cache itself")
        header = {
            "schema_version": SCHEMA_VERSION,
            "layout": layout.to_json(),
            "codec": codecs.legacy_json(),
            "codecs": codecs.to_json(),
            "compressor": compressor.to_json(),
            "checksums": {"chunks": "crc32c", "shards": list(integrity.DIGEST_FIELDS), "arrays": data_array_names(layout, codecs)},
        }
        _refuse_foreign_directory(local)
        if not overwrite:
            existing = _open_existing(target)
            if existing is not None:
                _check_same(url, existing.attrs.asdict(), header, meta)
                if local is not None:
                    clean_partials(local.parent)  # a killed writer's temporary files
                return cls(url, existing, layout, codecs, compressor)
        attrs = {**meta, **header, "kvkd_version": kvkd.__version__, "created": now_iso(), "status": "incomplete"}
        try:
            group = zarr.open_group(target, mode="w" if overwrite else "w-", attributes=attrs, zarr_format=3)
        except (zarr.errors.ContainsGroupError, FileExistsError):  # another writer is creating it right now
            existing = _wait_for_group(target)
            if existing is None:
                raise CacheError(f"{url} appeared while this writer was creating it, but is still not a Zarr group after "
                                 f"{_CREATE_WAIT_S:.0f} s: another process may have died while creating it; remove it and retry") from None
            _check_same(url, existing.attrs.asdict(), header, meta)
            group = existing
        return cls(url, group, layout, codecs, compressor)

    @staticmethod
    def precheck(
        url: str | Path,
        metadata: dict[str, Any],
        codec: str | dict[str, Any] | StorageCodec | CodecSet = "float16",
        compressor: Compressor = Compressor("zstd", 3),
    ) -> None:
        """Refuse early (before a teacher loads) to resume a cache at ``url`` made otherwise.

        Compares what is known so far (``metadata``, a subset of what ``open`` will get, with
        the codec, compressor and schema) with an existing cache; nothing is created or changed.

        Raises:
            CacheMismatchError: as ``open`` would (names the field, both values, and for the
                data set what differs: rows, offset, source).
        """
        url = str(url)
        local = claims.claims_dir(url)
        if local is not None and not (local.parent / "zarr.json").is_file():
            return
        try:
            existing = zarr.open_group(str(local.parent) if local is not None else url, mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.NodeNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.ContainsArrayError):
            return
        codecs = get_codecs(codec)
        header = {"schema_version": SCHEMA_VERSION, "codec": codecs.legacy_json(), "codecs": codecs.to_json(), "compressor": compressor.to_json()}
        _check_same(url, existing.attrs.asdict(), header, _as_json(metadata, "cache metadata"))

    def _ensure_arrays(self) -> dict[str, zarr.Array]:
        """Open every array, creating missing ones (identical specs for concurrent creators).

        Every chunk ends with its crc32c and is stored even when equal to the fill value.
        """
        eps, n = self.layout.examples_per_shard, self.layout.num_examples
        specs = {name: (spec.shape, spec.dtype, True) for name, spec in self.layout.arrays(self.codecs).items()}
        specs[FLAG_ARRAY] = ((), np.dtype(np.uint8), False)
        specs[integrity.CHECKSUM_ARRAY] = ((len(self._names), len(integrity.DIGEST_FIELDS)), np.dtype(np.uint64), None)
        out = {}
        for name, (shape, dtype, sharded) in specs.items():
            try:
                out[name] = za.with_empty_chunks(self.group[name])
                continue
            except KeyError:
                pass
            rows = self.layout.num_shards if sharded is None else n
            chunks = (1, *shape) if sharded is None else ((1, *shape) if sharded else (eps,))
            try:
                out[name] = self.group.create_array(
                    name,
                    shape=(rows, *shape),
                    dtype=dtype,
                    chunks=chunks,
                    shards=(eps, *shape) if sharded else None,
                    compressors=[*self.compressor.zarr_codecs(), za.checksum_codec()],
                    filters=None,
                    fill_value=-1 if name == "slot_pos" else 0,
                    config={"write_empty_chunks": True},
                )
            except zarr.errors.ContainsArrayError:
                out[name] = za.with_empty_chunks(self.group[name])
        return out

    @property
    def metadata(self) -> dict[str, Any]:
        """The group attributes as stored when this writer opened the cache."""
        return self.group.attrs.asdict()

    # ---- work list ----------------------------------------------------------------------------

    def _flags(self) -> np.ndarray:
        return np.asarray(self._arrays[FLAG_ARRAY][:])  # (N,) uint8

    def pending_shards(self, part: tuple[int, int] | None = None) -> list[int]:
        """Shards whose ``written`` flags are not all 1, ascending.

        Args:
            part: ``(index, count)`` keeps shards with ``shard % count == index`` (one of
                ``count`` parallel writers).
        Raises:
            ValueError: if ``count < 1`` or ``index`` not in ``[0, count)``.
        """
        if part is not None:
            index, count = part
            if count < 1 or not 0 <= index < count:
                raise ValueError(f"part must be (index, count) with 0 <= index < count, got {part}")
        flags = self._flags()
        pending = []
        for shard in range(self.layout.num_shards):
            if part is not None and shard % part[1] != part[0]:
                continue
            start, stop = self.layout.shard_range(shard)
            if not (flags[start:stop] == 1).all():
                pending.append(shard)
        return pending

    # ---- writing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def claim(self, shard: int) -> Iterator[None]:
        """Hold shard ``shard`` for this writer (re-entrant); see ``kvkd.cache.claims``.

        Raises:
            CacheError: if another live writer holds it.
        """
        self.layout.shard_range(shard)  # IndexError if out of range
        if shard in self._held:
            yield
            return
        self._held[shard] = claims.acquire(self._claims, shard)
        try:
            yield
        finally:
            self._held.pop(shard).release()

    def write_shard(self, shard: int, rows: dict[str, np.ndarray]) -> None:
        """Write all examples of ``shard``: data arrays first, then its ``written`` flags.

        Args:
            shard: shard index in ``[0, layout.num_shards)``.
            rows: every array of ``layout.row_specs()``, each ``(n, *per_example_shape)`` with
                ``n = stop - start`` of ``layout.shard_range(shard)``; float32 for keys, values,
                hidden; int32 slot_pos/cot_len/answer_len, float32 slot_importance/slot_score/
                answer_nll, bool slot_valid. Floats must be finite.
        Raises:
            CacheError: wrong names/shapes/dtypes, non-finite or unrepresentable values (names
                the array), shard already written, or shard held by another writer.
        """
        start, stop = self.layout.shard_range(shard)
        stored = self._encode_rows(rows, stop - start)
        with self.claim(shard):
            if (self._flags()[start:stop] == 1).all():
                raise CacheError(
                    f"shard {shard} of {self.url} is already written; overlapping writers? "
                    "take work from pending_shards()"
                )
            for name, data in stored.items():  # data first ...
                arr = self._arrays[name]
                key = za.shard_key(arr, shard)
                za.delete_object(arr, key)  # never merge into a stale shard object
                if self._claims_dir is not None:  # a killed writer's temporary file of this shard (we hold its claim)
                    clean_partials(self._claims_dir.parent / name / Path(key).parent, 0.0, f"{Path(key).name}.*.partial")
                arr[start:stop] = data
            digests = integrity.shard_digests(self._arrays, self._names, shard)  # ... then their checksums ...
            self._arrays[integrity.CHECKSUM_ARRAY][shard] = digests
            self._write_flags(shard, 1)  # ... flags last

    def _write_flags(self, shard: int, value: int) -> None:
        start, stop = self.layout.shard_range(shard)
        self._arrays[FLAG_ARRAY][start:stop] = np.full(stop - start, value, dtype=np.uint8)

    def _encode_rows(self, rows: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """Validate logical rows and return stored arrays by name (codec parts expanded)."""
        specs = self.layout.row_specs()
        missing, extra = sorted(set(specs) - set(rows)), sorted(set(rows) - set(specs))
        if missing or extra:
            raise CacheError(f"rows must hold exactly {sorted(specs)}; missing {missing}, unexpected {extra}")
        stored = {}
        for name, spec in specs.items():
            x = np.asarray(rows[name])
            want = (n, *spec.shape)
            if x.shape != want:
                raise CacheError(f"array {name!r}: expected shape {want}, got {x.shape}")
            if x.dtype != spec.dtype:
                raise CacheError(f"array {name!r}: expected dtype {spec.dtype}, got {x.dtype}")
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                bad = int(np.argwhere(~np.isfinite(x).reshape(n, -1).all(axis=1))[0, 0])
                raise CacheError(f"array {name!r}: non-finite values (first at shard row {bad})")
            if not spec.encoded:
                stored[name] = x
                continue
            try:
                parts = self.codecs[name].encode(x)
            except ValueError as e:
                raise CacheError(f"array {name!r}: {e}") from None
            stored.update({name + suffix: part for suffix, part in parts.items()})
        return stored

    # ---- completion ---------------------------------------------------------------------------

    def stored_bytes(self) -> int:
        """Bytes the cache's arrays take in the store now (compressed, all arrays)."""
        return sum(int(arr.nbytes_stored()) for arr in self._arrays.values())

    def finalize(self, sole_writer: bool = False) -> bool:
        """Mark the cache ``complete`` iff every ``written`` flag is 1; return whether it is.

        Zarr's temporary files a killed writer left are removed then (those of the group's own
        ``zarr.json`` only once a minute old, unless ``sole_writer``: other parts may be
        finalising at the same moment).
        """
        if not (self._flags() == 1).all():
            return False
        self.group.update_attributes({"status": "complete", "completed": now_iso()})
        claims.remove_claims_dir(self._claims)
        if self._claims_dir is not None:  # every shard is written: temporary files left are a killed writer's,
            root = self._claims_dir.parent  # but for the group's own zarr.json, which other parts may be updating
            clean_partials(root, 0.0, "*/**/*.partial")
            clean_partials(root, 0.0 if sole_writer else _STALE_PARTIAL_S, "*.partial")
        return True


# ---- helpers ------------------------------------------------------------------------------------


READ_ONLY_PROTOCOLS = ("http", "https")


def refuse_read_only(url: str) -> None:
    """Refuse to write a cache where no writer can: ``http(s)://`` is read-only in fsspec/zarr.

    Raises:
        CacheError: naming the URL and what to do instead.
    """
    protocol = url.split("::")[-1].split("://", 1)[0] if "://" in url else ""
    if protocol in READ_ONLY_PROTOCOLS:
        raise CacheError(f"{url}: HTTP(S) caches are read-only; write the cache to a local folder or an object store "
                         "(s3://...) and serve that folder over HTTP for readers")


def data_array_names(layout: CacheLayout, codec: StorageCodec | CodecSet) -> list[str]:
    """Stored per-example arrays with a shard digest, in ``shard_checksums`` order (flags excluded)."""
    return [name for name in layout.arrays(codec) if name != FLAG_ARRAY]


def _open_existing(url: str) -> zarr.Group | None:
    try:
        return zarr.open_group(url, mode="r+", zarr_format=3)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError, zarr.errors.GroupNotFoundError):
        return None


_CREATE_WAIT_S = 30.0


def _wait_for_group(url: str, deadline_s: float = _CREATE_WAIT_S) -> zarr.Group | None:
    """The group another writer is creating at ``url``, once its ``zarr.json`` exists (or None
    after ``deadline_s`` seconds)."""
    deadline = time.monotonic() + deadline_s
    while True:
        existing = _open_existing(url)
        if existing is not None or time.monotonic() > deadline:
            return existing
        time.sleep(0.05)


_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")
"""Temporary files of zarr's LocalStore (``{name}.{uuid4 hex}.partial``), renamed once complete."""
_STALE_PARTIAL_S = 60.0


def _is_partial(path: Path) -> bool:
    return path.is_file() and _PARTIAL.search(path.name) is not None


def clean_partials(root: Path, min_age_s: float = _STALE_PARTIAL_S, pattern: str = "**/*.partial") -> int:
    """Remove zarr's leftover temporary files under ``root`` older than ``min_age_s``; return how many.

    A writer killed mid-write (SIGKILL, power loss) leaves them; a live writer's temporary file
    is younger than a write takes, so ``min_age_s`` keeps concurrent writers safe (``0`` only
    where this process holds the claim).
    """
    removed, now = 0, time.time()
    for p in root.glob(pattern):
        try:
            if _is_partial(p) and now - p.stat().st_mtime >= min_age_s:
                p.unlink()
                removed += 1
        except FileNotFoundError:  # renamed or removed meanwhile
            pass
    return removed


def _refuse_foreign_directory(claims_dir: Path | None) -> None:
    """Never create in (or wipe) a local non-empty directory that is not a Zarr group (our own
    claims folder, which a concurrent writer may create first, does not count).

    A folder holding only zarr's temporary files (a writer killed before the group's
    ``zarr.json`` landed) is a half-created cache: its leftovers are removed and it is created
    afresh, unless they are young (another writer creating it now: its group is waited for).
    """
    root = claims_dir.parent if claims_dir is not None else None
    if root is None or not root.is_dir() or (root / "zarr.json").exists():
        return
    entries = [p for p in root.iterdir() if p.name != claims_dir.name]
    if not entries:
        return
    if all(_is_partial(p) for p in entries):
        newest = max((p.stat().st_mtime for p in entries if p.exists()), default=0.0)
        if _wait_for_group(str(root), deadline_s=newest + 10 - time.time()) is not None:  # a live creator finishes in < 10 s
            return
        clean_partials(root, 0.0, "*.partial")
        return
    being_created = claims_dir.is_dir() or time.time() - root.stat().st_mtime < 10  # by a concurrent writer
    if not being_created or _wait_for_group(str(root)) is None:
        raise CacheError(f"{root} exists and is not a kvkd cache; choose another path")


def _check_same(url: str, stored: dict[str, Any], header: dict[str, Any], meta: dict[str, Any]) -> None:
    """Raise CacheMismatchError on the first field where the existing cache differs."""
    if "schema_version" not in stored:
        raise CacheMismatchError(
            f"{url} holds a Zarr group that is not a kvkd cache (no schema_version); "
            "choose another --out, or pass --overwrite to replace it",
            "schema_version",
            {"existing": _MISSING, "requested": SCHEMA_VERSION},
        )
    diff = None
    for key, value in header.items():  # the cache's own description: every sub-field counts
        diff = diff or first_difference(stored.get(key, _MISSING), value, f"{key}.", keys="both")
    diff = diff or first_difference(stored, meta, keys="given")
    if diff is None:
        return
    field, old, new = diff
    detail = ""
    if field.startswith("dataset.") and isinstance(meta.get("dataset"), dict):
        detail = f" (the cache holds {_rows_text(stored.get('dataset', {}))}; this run selects {_rows_text(meta['dataset'])})"
        if field.endswith("fingerprint"):
            detail += ": same selection, different row content"
    raise CacheMismatchError(
        f"cache at {url} was created with {field} = {old!r}, this run asks for {new!r}{detail}; "
        "choose another --out, or pass --overwrite to replace the cache",
        field,
        {"existing": old, "requested": new},
    )


def _rows_text(ds: dict[str, Any]) -> str:
    """``"8 rows from offset 0 of split train of /data/gsm8k/train.jsonl"`` from a dataset record."""
    rows = ds.get("selected_rows", ds.get("rows", "?"))
    return f"{rows} rows from offset {ds.get('offset', 0)} of split {ds.get('split')} of {ds.get('source', '?')}"
