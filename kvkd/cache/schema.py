"""What a teacher cache holds: its arrays, their per-example shapes and dtypes, and its shards.

One cache = one Zarr v3 group per teacher x data set x extraction config. Every array has the
example axis first (N, in data-set order):

    name              per example           dtype      notes
    keys, values      (L, H_kv, M, D)       codec      pre-RoPE compressed KV (+ the codec's parts, e.g. keys_scale)
    hidden            (L+1, d)              codec      hidden states at the token before the answer
    slot_pos          (L, H_kv, M)          int32      CoT token index a slot came from, -1 if empty
    slot_importance   (L, H_kv, M)          float32    importance I of the kept slot
    slot_score        (L, H_kv, M)          float32    eviction score S of the kept slot
    slot_valid        (L, H_kv, M)          bool       False for empty slots (CoT shorter than M)
    cot_len           ()                    int32      CoT tokens
    answer_len        ()                    int32      answer tokens
    answer_nll        ()                    float32    teacher's mean NLL of the gold answer, nats/token
    written           ()                    uint8      1 once the example's shard is fully written

and, per shard (schema 2), ``shard_checksums`` (num_shards, A, 3) uint64: size and crc32c of each
data array's shard object (see ``kvkd.cache.integrity``).

Chunks hold one example; a shard (one object/file) holds ``examples_per_shard`` consecutive
examples of one array. ``written`` is not sharded: its chunks are ``examples_per_shard`` long, so
shard ``i`` of every data array and chunk ``i`` of ``written`` cover the same examples and are
written by the same (single) writer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from kvkd.cache.codecs import ENCODED_ARRAYS, CodecSet, StorageCodec, get_codecs  # noqa: F401 (ENCODED_ARRAYS re-exported)

SCHEMA_VERSION = 2
"""2: every chunk ends with its crc32c, every chunk is stored, shard digests in ``shard_checksums``
(see ``kvkd.cache.integrity``); each encoded array's codec recorded in ``codecs`` (see
``kvkd.cache.codecs.CodecSet``). 1: no checksums on chunk data, one ``codec`` for keys, values
and hidden (still read)."""

FLAG_ARRAY = "written"
SHARD_TARGET_BYTES = 32 * 2**20
"""Auto shard size: uncompressed stored bytes per shard to aim for (~32 MiB)."""


@dataclass(frozen=True)
class ArraySpec:
    """One array of a cache, per example.

    Attributes:
        shape: shape of one example (the array is ``(N, *shape)``).
        dtype: NumPy dtype (stored dtype in ``CacheLayout.arrays``, logical dtype in
            ``CacheLayout.row_specs``).
        encoded: True if the array goes through the storage codec (a codec part, e.g.
            ``keys`` or ``keys_scale``).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    encoded: bool

    def nbytes(self) -> int:
        """Bytes of one example, uncompressed."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class CacheLayout:
    """Sizes of a cache and how it is cut into shards.

    Args:
        num_examples: N, examples in the data set (in order).
        num_layers: L, teacher layers.
        num_kv_heads: H_kv, teacher KV heads.
        head_dim: D, teacher head dim.
        hidden_size: d, teacher hidden size.
        slots: M, compressed KV slots per (layer, KV head).
        examples_per_shard: examples per shard; 0 = auto (see ``resolved``).
    Raises:
        ValueError: if a size is < 1 or examples_per_shard < 0.
    """

    num_examples: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    slots: int
    examples_per_shard: int = 0

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"cache layout: {name} must be an int, got {value!r}")
            least = 0 if name == "examples_per_shard" else 1
            if value < least:
                raise ValueError(f"cache layout: {name} must be >= {least}, got {value}")

    # ---- arrays -------------------------------------------------------------------------------

    def row_specs(self) -> dict[str, ArraySpec]:
        """Logical arrays as written and read: name -> per-example spec (float32 for encoded ones)."""
        L, H, M, D, d = self.num_layers, self.num_kv_heads, self.slots, self.head_dim, self.hidden_size
        f32, slot = np.dtype(np.float32), (L, H, M)
        return {
            "keys": ArraySpec((L, H, M, D), f32, True),
            "values": ArraySpec((L, H, M, D), f32, True),
            "hidden": ArraySpec((L + 1, d), f32, True),
            "slot_pos": ArraySpec(slot, np.dtype(np.int32), False),
            "slot_importance": ArraySpec(slot, f32, False),
            "slot_score": ArraySpec(slot, f32, False),
            "slot_valid": ArraySpec(slot, np.dtype(np.bool_), False),
            "cot_len": ArraySpec((), np.dtype(np.int32), False),
            "answer_len": ArraySpec((), np.dtype(np.int32), False),
            "answer_nll": ArraySpec((), f32, False),
        }

    def arrays(self, codec: StorageCodec | CodecSet) -> dict[str, ArraySpec]:
        """Stored arrays: name -> per-example spec with the stored dtype, ``written`` last.

        Encoded arrays expand into their codec's parts (``keys``, and e.g. ``keys_scale``);
        ``codec`` is one codec for every encoded array or a ``CodecSet``.
        """
        codecs = get_codecs(codec)
        out: dict[str, ArraySpec] = {}
        for name, spec in self.row_specs().items():
            if spec.encoded:
                for suffix, (shape, dtype) in codecs[name].storage_dtypes(spec.shape).items():
                    out[name + suffix] = ArraySpec(tuple(shape), np.dtype(dtype), True)
            else:
                out[name] = spec
        out[FLAG_ARRAY] = ArraySpec((), np.dtype(np.uint8), False)
        return out

    def bytes_per_example(self, codec: StorageCodec | CodecSet) -> int:
        """Uncompressed stored bytes of one example (all arrays, flags included)."""
        return sum(spec.nbytes() for spec in self.arrays(codec).values())

    # ---- shards -------------------------------------------------------------------------------

    def resolved(self, codec: StorageCodec | CodecSet) -> CacheLayout:
        """This layout with ``examples_per_shard`` fixed (auto: ~32 MiB uncompressed per shard).

        The result holds at least 1 and at most ``num_examples`` examples per shard.
        """
        eps = self.examples_per_shard or SHARD_TARGET_BYTES // self.bytes_per_example(codec)
        return replace(self, examples_per_shard=int(max(1, min(eps, self.num_examples))))

    def _eps(self) -> int:
        if self.examples_per_shard == 0:
            raise ValueError("examples_per_shard is 0 (auto): call layout.resolved(codec) first")
        return self.examples_per_shard

    @property
    def num_shards(self) -> int:
        """Number of shards, the last one possibly partial."""
        return -(-self.num_examples // self._eps())

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Examples ``[start, stop)`` of ``shard``.

        Raises:
            IndexError: if shard is not in ``[0, num_shards)``.
        """
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range [0, {self.num_shards})")
        start = shard * self._eps()
        return start, min(start + self._eps(), self.num_examples)

    def shard_of(self, example: int) -> int:
        """Shard holding ``example``."""
        return example // self._eps()

    # ---- JSON ---------------------------------------------------------------------------------

    def to_json(self) -> dict[str, int]:
        return {k: int(v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CacheLayout:
        return cls(**d)
