"""Storage codecs (float32 -> stored parts -> float32), per-array codec sets and presets, and the
byte compressor of a cache.

A *storage codec* turns a float32 tensor of a cache (``keys``, ``values`` or ``hidden``) into
one or more plain NumPy arrays that Zarr can store, and back. Each codec is a small frozen
dataclass registered in ``CODECS`` by name; it describes itself as JSON (stored in the cache's
group attributes) and declares the relative RMSE its round trip may cost on standard Gaussian
data, which ``tests/cache/test_codecs.py`` checks for every registered codec.

    name          stored parts                                            max_rel_rmse
    float32       "" float32                                              0
    float16       "" float16                                              1e-3
    bfloat16      "" uint16 (bf16 bits, RNE rounding)                     5e-3
    int8          "" int8, "_scale" (per last-axis vector: per token)     1e-2
    int8-channel  "" int8, "_scale" (per channel over axis -2: keys)      1e-2
    int8-outlier  "" int8, "_scale", "_outlier_idx", "_outlier_val"       1e-2  (top-k per vector in fp16)
    int4-token    "" uint8 (two per byte), "_scale" per token             0.15
    int4-channel  "" uint8 (two per byte), "_scale" per channel           0.15
    int4-outlier  "" uint8 (two per byte), "_scale", outliers in fp16     0.15
    fp8-e4m3      "" uint8 (e4m3fn bits), "_scale" per vector (absmax -> 448)  5e-2

Part suffixes: ``""`` is the main array (stored under the logical name, e.g. ``keys``), the
others companion arrays (``keys_scale`` ...) with the example axis first like every array.

Each encoded array has its own codec (``CodecSet``, recorded per array in the metadata as
``codecs``); ``PRESETS`` names the sets ``--codec`` offers (``fp16``, ``int8``, ``int4``), and a
registered codec name applies that codec to all three arrays.

The *compressor* (``Compressor``) is the lossless byte stage applied to every stored chunk:
zstd, blosc (zstd inside, with byte/bit shuffle) or none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from kvkd.registry import Registry

CODECS: Registry[type[StorageCodec]] = Registry("codec")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class StorageCodec:
    """Base class: a lossy-or-exact map float32 <-> stored parts.

    Subclasses set ``name``, ``max_rel_rmse`` (relative RMSE bound, rmse(x - decode(encode(x))) /
    rms(x), on standard Gaussian data) and ``logical_dtype`` (the dtype the values have once
    decoded from storage, recorded in the metadata).
    """

    name: ClassVar[str]
    max_rel_rmse: ClassVar[float]
    logical_dtype: ClassVar[str]

    def storage_dtypes(self, shape: Shape) -> dict[str, tuple[Shape, np.dtype]]:
        """Stored parts for a float32 tensor of ``shape``: suffix -> (shape, NumPy dtype)."""
        raise NotImplementedError

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Encode float32 ``x`` (any shape) into its stored parts (keys as in ``storage_dtypes``).

        Raises:
            ValueError: if ``x`` is not float32 or holds values the storage dtype cannot represent.
        """
        raise NotImplementedError

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        """Decode stored parts back to a float32 array of the original shape."""
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        """JSON description: ``{"name", **fields, "logical_dtype"}``; read back by ``codec_from_json``."""
        return {"name": self.name, **asdict(self), "logical_dtype": self.logical_dtype}


def _check_float32(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise ValueError(f"codecs encode float32 arrays, got {x.dtype}")
    return x


def _cast_checked(x: np.ndarray, dtype: type, name: str) -> np.ndarray:
    """Cast finite float32 ``x`` to ``dtype``; raise if a finite value overflows to inf."""
    with np.errstate(over="ignore"):
        y = x.astype(dtype)
    overflow = ~np.isfinite(y) & np.isfinite(x)
    if overflow.any():
        big = float(np.max(np.abs(x[overflow])))
        raise ValueError(
            f"value {big:.4g} overflows codec {name!r}; store this cache with codec 'bfloat16' or 'float32'"
        )
    return y


@CODECS.register("float32")
@dataclass(frozen=True)
class Float32Codec(StorageCodec):
    """Exact storage as float32."""

    name: ClassVar[str] = "float32"
    max_rel_rmse: ClassVar[float] = 0.0
    logical_dtype: ClassVar[str] = "float32"

    def storage_dtypes(self, shape: Shape) -> dict[str, tuple[Shape, np.dtype]]:
        return {"": (tuple(shape), np.dtype(np.float32))}

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"": np.ascontiguousarray(_check_float32(x))}

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(parts[""], dtype=np.float32)


@CODECS.register("float16")
@dataclass(frozen=True)
class Float16Codec(StorageCodec):
    """IEEE half precision, round to nearest even; |x| above 65504 raises (use bfloat16)."""

    name: ClassVar[str] = "float16"
    max_rel_rmse: ClassVar[float] = 1e-3
    logical_dtype: ClassVar[str] = "float16"

    def storage_dtypes(self, shape: Shape) -> dict[str, tuple[Shape, np.dtype]]:
        return {"": (tuple(shape), np.dtype(np.float16))}

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"": _cast_checked(_check_float32(x), np.float16, self.name)}

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(parts[""]).astype(np.float32)


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the bits as uint16.

    Matches ``torch.Tensor.to(torch.bfloat16)`` bit for bit on every non-NaN input (infinities,
    subnormals and overflow to inf included); NaN becomes the quiet NaN 0x7FC0 with its sign
    (torch's NaN payload differs between kernels, e.g. 0xFFFF on CPU).
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = ((bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)  # wraps only for NaN
    nan = np.isnan(x)
    if nan.any():
        sign = (bits >> np.uint32(16)).astype(np.uint16) & np.uint16(0x8000)
        rounded = np.where(nan, sign | np.uint16(0x7FC0), rounded)
    return rounded


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bits (uint16) to float32, exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


@CODECS.register("bfloat16")
@dataclass(frozen=True)
class BFloat16Codec(StorageCodec):
    """bfloat16 (Zarr has no bf16 dtype: the bits are stored as uint16; logical dtype recorded)."""

    name: ClassVar[str] = "bfloat16"
    max_rel_rmse: ClassVar[float] = 5e-3
    logical_dtype: ClassVar[str] = "bfloat16"

    def storage_dtypes(self, shape: Shape) -> dict[str, tuple[Shape, np.dtype]]:
        return {"": (tuple(shape), np.dtype(np.uint16))}

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = _check_float32(x)
        bits = float32_to_bfloat16_bits(x)
        overflow = np.isinf(bfloat16_bits_to_float32(bits)) & np.isfinite(x)
        if overflow.any():
            raise ValueError(f"value overflows codec {self.name!r}; store this cache with codec 'float32'")
        return {"": bits}

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        return bfloat16_bits_to_float32(parts[""])


def _absmax_scale(x: np.ndarray, axis: int, qmax: float, scale_dtype: str, name: str) -> np.ndarray:
    """Stored scale ``absmax(|x|, axis) / qmax`` (axis dropped), in ``scale_dtype`` (overflow checked)."""
    absmax = np.max(np.abs(x), axis=axis) if x.size else np.zeros(np.delete(x.shape, axis), np.float32)
    return _cast_checked(absmax / np.float32(qmax), np.dtype(scale_dtype).type, name)


def _quantise(x: np.ndarray, s: np.ndarray, qmax: int) -> np.ndarray:
    """``clip(round(x / s), -qmax, qmax)`` as int8 (``s`` broadcast to ``x``; 0 where ``s`` is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.rint(x / s), 0.0)
    return np.clip(q, -qmax, qmax).astype(np.int8)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Pack int8 values in [-8, 7] two per byte along the last axis (even length): (..., n) -> (..., n/2) uint8.

    Element ``2i`` goes to the low nibble of byte ``i``, ``2i+1`` to the high one, each stored as
    ``q + 8`` (0..15).
    """
    u = (np.asarray(q, dtype=np.int16) + 8).astype(np.uint8)  # (..., n) in 0..15
    return u[..., 0::2] | (u[..., 1::2] << np.uint8(4))


def unpack_int4(b: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_int4`: (..., n/2) uint8 -> (..., n) int8 in [-8, 7]."""
    b = np.asarray(b, dtype=np.uint8)
    out = np.empty((*b.shape[:-1], 2 * b.shape[-1]), dtype=np.int8)
    out[..., 0::2] = (b & np.uint8(0x0F)).astype(np.int8) - 8
    out[..., 1::2] = (b >> np.uint8(4)).astype(np.int8) - 8
    return out


@dataclass(frozen=True)
class AbsmaxIntCodec(StorageCodec):
    """Symmetric absmax integer quantisation with one scale per vector (base of the int8/int4 codecs).

    ``q = clip(round(x / s), -qmax, qmax)`` with ``s = absmax(x over the scaled axis) / qmax``
    stored in ``scale_dtype`` (quantisation uses the stored, rounded scale, so decode is ``q * s``);
    an all-zero vector gets ``s = 0`` and decodes to zeros. ``qmax`` is 127 for 8 bits and 7 for
    4 bits (two values packed per byte along the last axis, which must then be even).

    Subclasses set ``bits`` and ``over``: ``"token"`` scales each last-axis vector (one scale per
    D- or d-vector: per token for KV, per layer for hidden; ``_scale`` drops the last axis),
    ``"channel"`` scales each channel over the second-to-last axis (per (layer, head, channel)
    over the M slots of one example, KIVI/KVQuant keys; ``_scale`` drops axis -2).

    Args:
        scale_dtype: ``"float16"`` or ``"float32"``.
    Raises:
        ValueError: an unknown scale dtype; a shape with too few axes or (4 bits) an odd last axis.
    """

    bits: ClassVar[int] = 8
    over: ClassVar[str] = "token"
    scale_dtype: str = "float16"

    def __post_init__(self):
        if self.scale_dtype not in ("float16", "float32"):
            raise ValueError(f"{self.name} scale_dtype must be 'float16' or 'float32', got {self.scale_dtype!r}")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def _axis(self) -> int:
        return -1 if self.over == "token" else -2

    def _main_shape(self, shape: Shape) -> Shape:
        if self.bits == 4:
            if shape[-1] % 2:
                raise ValueError(f"{self.name} packs two values per byte: the last axis must be even, got {shape}")
            return (*shape[:-1], shape[-1] // 2)
        return tuple(shape)

    def storage_dtypes(self, shape: Shape) -> dict[str, tuple[Shape, np.dtype]]:
        shape = tuple(shape)
        if len(shape) < -self._axis:
            raise ValueError(f"{self.name} needs at least {-self._axis} axes (scales per {self.over}), got {shape}")
        main = np.dtype(np.int8) if self.bits == 8 else np.dtype(np.uint8)
        scale_shape = shape[:-1] if self.over == "token" else (*shape[:-2], shape[-1])
        return {"": (self._main_shape(shape), main), "_scale": (scale_shape, np.dtype(self.scale_dtype))}

    def _scaled(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(quantised int8 values of ``x``, stored scale)."""
        scale = _absmax_scale(x, self._axis, self.qmax, self.scale_dtype, self.name)
        s = np.expand_dims(scale.astype(np.float32), self._axis)
        return _quantise(x, s, self.qmax), scale

    def _pack(self, q: np.ndarray) -> np.ndarray:
        if self.bits == 4:
            self._main_shape(q.shape)  # odd last axis -> ValueError
            return pack_int4(q)
        return q

    def _unpack(self, stored: np.ndarray) -> np.ndarray:
        return unpack_int4(stored) if self.bits == 4 else np.asarray(stored)

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        q, scale = self._scaled(_check_float32(x))
        return {"": self._pack(q), "_scale": scale}

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        q = self._unpack(parts[""]).astype(np.float32)
        return q * np.expand_dims(np.asarray(parts["_scale"]).astype(np.float32), self._axis)


@CODECS.register("int8")
@dataclass(frozen=True)
class Int8Codec(AbsmaxIntCodec):
    """int8, one absmax scale per last-axis vector (per token: KIVI's choice for values).

    Heavy-tailed vectors (massive activations in hidden states, outlier channels of pre-RoPE
    keys) lose precision on their small entries: use ``int8-outlier`` / ``int8-channel`` there.
    """

    name: ClassVar[str] = "int8"
    max_rel_rmse: ClassVar[float] = 1e-2
    logical_dtype: ClassVar[str] = "int8"


@CODECS.register("int8-channel")
@dataclass(frozen=True)
class Int8ChannelCodec(AbsmaxIntCodec):
    """int8 with one scale per channel over axis -2: keys (L, H_kv, M, D) get a scale per
    (layer, head, channel) over the M slots of one example (KIVI, Liu et al. 2024; KVQuant,
    Hooper et al. 2024, quantise pre-RoPE keys per channel), so an outlier channel does not
    coarsen the others."""

    name: ClassVar[str] = "int8-channel"
    max_rel_rmse: ClassVar[float] = 1e-2
    logical_dtype: ClassVar[str] = "int8"
    over: ClassVar[str] = "channel"


@CODECS.register("int4-token")
@dataclass(frozen=True)
class Int4TokenCodec(AbsmaxIntCodec):
    """int4 in [-7, 7], one scale per last-axis vector (per token), two values per byte."""

    name: ClassVar[str] = "int4-token"
    max_rel_rmse: ClassVar[float] = 0.15
    logical_dtype: ClassVar[str] = "int4"
    bits: ClassVar[int] = 4


@CODECS.register("int4-channel")
@dataclass(frozen=True)
class Int4ChannelCodec(AbsmaxIntCodec):
    """int4 in [-7, 7], one scale per channel over axis -2 (keys: per (layer, head, channel))."""

    name: ClassVar[str] = "int4-channel"
    max_rel_rmse: ClassVar[float] = 0.15
    logical_dtype: ClassVar[str] = "int4"
    bits: ClassVar[int] = 4
    over: ClassVar[str] = "channel"


@dataclass(frozen=True)
class OutlierIntCodec(AbsmaxIntCodec):
    """Per-vector int8/int4 with the ``outliers`` largest-magnitude entries of every vector kept in fp16.

    Hidden states carry a few *massive activations* (Sun et al. 2024, "Massive Activations in
    Large Language Models"): entries 100-1000x the rest, in fixed channels. With a plain
    absmax scale they set the step for every other entry; here the top-``outliers`` entries
    of each last-axis vector (per example and layer: detected per vector, their positions
    recorded) are stored apart in fp16 (the dense-and-sparse split of KVQuant, Hooper et al.
    2024) and the rest is quantised with its own, smaller absmax.

    Stored parts: ``""`` the quantised rest (outlier positions hold 0), ``_scale`` (..., ) the
    scale of the rest, ``_outlier_idx`` (..., outliers) uint16 (int32 for vectors longer than
    65535) positions in the vector, ``_outlier_val`` (..., outliers) float16 values.

    Args:
        outliers: entries kept in fp16 per vector, 1 <= outliers < vector length.
    Raises:
        ValueError: as ``AbsmaxIntCodec``; ``outliers`` out of range; an outlier over fp16's range.
    """

    outliers: int = 8

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.outliers, int) or self.outliers < 1:
            raise ValueError(f"{self.name} outliers must be an int >= 1, got {self.outliers!r}")

    def storage_dtypes(self, shape: Shape) -> dict[str, tuple[Shape, np.dtype]]:
        out = super().storage_dtypes(shape)
        if not self.outliers < shape[-1]:
            raise ValueError(f"{self.name}: outliers ({self.outliers}) must be fewer than the vector length {shape[-1]}")
        side = (*shape[:-1], self.outliers)
        out["_outlier_idx"] = (side, np.dtype(np.uint16 if shape[-1] <= 2**16 else np.int32))
        out["_outlier_val"] = (side, np.dtype(np.float16))
        return out

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = _check_float32(x)
        k = self.outliers
        if not k < x.shape[-1]:
            raise ValueError(f"{self.name}: outliers ({k}) must be fewer than the vector length {x.shape[-1]}")
        idx = np.argpartition(-np.abs(x), k - 1, axis=-1)[..., :k]  # (..., k) the k largest |x|
        idx = np.sort(idx, axis=-1)
        val = _cast_checked(np.take_along_axis(x, idx, axis=-1), np.float16, self.name)  # (..., k)
        rest = x.copy()
        np.put_along_axis(rest, idx, 0.0, axis=-1)
        q, scale = self._scaled(rest)
        idx_dtype = np.uint16 if x.shape[-1] <= 2**16 else np.int32
        return {"": self._pack(q), "_scale": scale, "_outlier_idx": idx.astype(idx_dtype), "_outlier_val": val}

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        y = super().decode(parts)
        idx = np.asarray(parts["_outlier_idx"]).astype(np.int64)
        np.put_along_axis(y, idx, np.asarray(parts["_outlier_val"]).astype(np.float32), axis=-1)
        return y


@CODECS.register("int8-outlier")
@dataclass(frozen=True)
class Int8OutlierCodec(OutlierIntCodec):
    """int8 per vector (hidden: per layer) with the top-``outliers`` entries of each vector in fp16."""

    name: ClassVar[str] = "int8-outlier"
    max_rel_rmse: ClassVar[float] = 1e-2
    logical_dtype: ClassVar[str] = "int8"


@CODECS.register("int4-outlier")
@dataclass(frozen=True)
class Int4OutlierCodec(OutlierIntCodec):
    """int4 per vector with the top-``outliers`` entries of each vector in fp16, two values per byte."""

    name: ClassVar[str] = "int4-outlier"
    max_rel_rmse: ClassVar[float] = 0.15
    logical_dtype: ClassVar[str] = "int4"
    bits: ClassVar[int] = 4


def _e4m3_table() -> np.ndarray:
    """The 127 non-negative finite float8 e4m3fn values, by code 0..126 (ascending; code 127 is NaN)."""
    code = np.arange(127)
    e, m = code >> 3, code & 7
    return np.where(e == 0, m * 2.0**-9, (1 + m / 8) * 2.0 ** (e - 7)).astype(np.float32)


_E4M3 = _e4m3_table()
_E4M3_MID = (_E4M3[:-1] + _E4M3[1:]) / 2  # rounding boundaries between neighbouring codes
E4M3_MAX = float(_E4M3[-1])  # 448


def float32_to_e4m3_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to float8 e4m3fn (nearest, ties to even), saturating at +-448; bits as uint8.

    Matches ``torch.Tensor.to(torch.float8_e4m3fn)`` bit for bit on finite inputs within +-448
    (subnormals included). NaN is not accepted (the codecs refuse non-finite input earlier).
    """
    x = np.asarray(x, dtype=np.float32)
    a = np.minimum(np.abs(x), np.float32(E4M3_MAX))
    code = np.searchsorted(_E4M3_MID, a, side="left")  # lower code on an exact tie ...
    tie = a == _E4M3_MID[np.minimum(code, _E4M3_MID.size - 1)]
    code = np.where(tie & (code % 2 == 1), code + 1, code)  # ... moved to the even one
    sign = np.signbit(x).astype(np.uint8) << np.uint8(7)
    return sign | code.astype(np.uint8)


def e4m3_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen float8 e4m3fn bits (uint8) to float32, exactly (code 127/255 is NaN)."""
    b = np.asarray(bits, dtype=np.uint8)
    mag = np.append(_E4M3, np.float32(np.nan))[b & np.uint8(0x7F)]
    return np.where(b & np.uint8(0x80), -mag, mag).astype(np.float32)


@CODECS.register("fp8-e4m3")
@dataclass(frozen=True)
class FP8E4M3Codec(StorageCodec):
    """float8 e4m3fn (OCP FP8, 4 exponent / 3 mantissa bits) with one fp16 scale per last-axis
    vector mapping its absmax to 448 (stored as uint8 bits; for comparison with int8)."""

    name: ClassVar[str] = "fp8-e4m3"
    max_rel_rmse: ClassVar[float] = 5e-2
    logical_dtype: ClassVar[str] = "float8_e4m3fn"

    def storage_dtypes(self, shape: Shape) -> dict[str, tuple[Shape, np.dtype]]:
        if len(shape) < 1:
            raise ValueError(f"{self.name} needs at least one axis (scales are per last-axis vector)")
        return {"": (tuple(shape), np.dtype(np.uint8)), "_scale": (tuple(shape[:-1]), np.dtype(np.float16))}

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = _check_float32(x)
        scale = _absmax_scale(x, -1, E4M3_MAX, "float16", self.name)
        s = scale.astype(np.float32)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.where(s > 0, x / s, 0.0).astype(np.float32)
        return {"": float32_to_e4m3_bits(y), "_scale": scale}

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        return e4m3_bits_to_float32(parts[""]) * np.asarray(parts["_scale"]).astype(np.float32)[..., None]


_INFORMATIONAL_KEYS = ("name", "logical_dtype")


def codec_from_json(d: dict[str, Any]) -> StorageCodec:
    """Rebuild a codec from ``StorageCodec.to_json()`` output.

    Raises:
        KeyError: unknown codec name (lists the registered ones).
        ValueError: unknown fields, or a ``logical_dtype`` that disagrees with the codec.
    """
    cls = CODECS.get(d["name"])
    known = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in d.items() if k not in _INFORMATIONAL_KEYS}
    unknown = set(kwargs) - known
    if unknown:
        raise ValueError(f"codec {d['name']!r} has no field(s) {sorted(unknown)}")
    if "logical_dtype" in d and d["logical_dtype"] != cls.logical_dtype:
        raise ValueError(f"codec {d['name']!r} stores {cls.logical_dtype}, metadata says {d['logical_dtype']}")
    return cls(**kwargs)


def get_codec(spec: str | dict[str, Any] | StorageCodec) -> StorageCodec:
    """Resolve one codec given by registered name (``"float16"``), JSON dict, or instance.

    A preset name (``"int8"`` as a preset, ``"fp16"``) is resolved by ``get_codecs``; here
    ``"int8"`` is the per-vector int8 codec of the registry.
    """
    if isinstance(spec, StorageCodec):
        return spec
    if isinstance(spec, str):
        return CODECS.get(spec)()
    return codec_from_json(spec)


# ---- per-array codecs and presets ----------------------------------------------------------------

ENCODED_ARRAYS = ("keys", "values", "hidden")
"""The float tensors of a cache that go through a storage codec, each through its own."""

PRESETS: dict[str, dict[str, str]] = {
    "fp16": {"keys": "float16", "values": "float16", "hidden": "float16"},
    "int8": {"keys": "int8-channel", "values": "int8", "hidden": "int8-outlier"},
    "int4": {"keys": "int4-channel", "values": "int4-token", "hidden": "int4-outlier"},
}
"""``--codec`` presets: array -> codec name. ``int8``: keys per channel (KIVI/KVQuant), values per
token, hidden per layer with its outliers in fp16; ``int4``: the same at 4 bits. A preset name
wins over a registry name (``--codec int8`` is the per-array preset; the per-vector int8 codec of
old caches keeps its registry name ``int8`` in their metadata)."""


@dataclass(frozen=True)
class CodecSet:
    """The storage codec of each encoded array of a cache (keys, values, hidden).

    Stored in the cache metadata as ``codecs`` (array -> ``StorageCodec.to_json()``), next to a
    ``codec`` entry for kvkd versions that knew one codec per cache: the codec itself when all
    arrays share it (old readers still read such caches), else ``{"name": "per-array", ...}``,
    which they refuse as an unknown codec instead of decoding it wrongly.

    Args:
        codecs: array name -> codec, exactly the names of ``ENCODED_ARRAYS``.
        preset: the preset it came from (``"int8"``), or None; not compared (``fp16`` equals
            ``float16`` on every array).
    Raises:
        ValueError: missing or unknown array names.
    """

    codecs: dict[str, StorageCodec]
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self):
        if set(self.codecs) != set(ENCODED_ARRAYS):
            raise ValueError(f"a codec set names a codec for exactly {list(ENCODED_ARRAYS)}, got {sorted(self.codecs)}")

    def __getitem__(self, array: str) -> StorageCodec:
        return self.codecs[array]

    def items(self):
        return ((a, self.codecs[a]) for a in ENCODED_ARRAYS)

    def uniform(self) -> StorageCodec | None:
        """The codec every array shares, or None for a mixed set."""
        first = self.codecs[ENCODED_ARRAYS[0]]
        return first if all(c == first for c in self.codecs.values()) else None

    @property
    def name(self) -> str:
        """Preset name, else the shared codec's name, else ``keys=...,values=...,hidden=...``."""
        if self.preset:
            return self.preset
        one = self.uniform()
        return one.name if one else ",".join(f"{a}={c.name}" for a, c in self.items())

    def to_json(self) -> dict[str, dict[str, Any]]:
        """``codecs`` entry of the metadata: array -> codec JSON."""
        return {a: c.to_json() for a, c in self.items()}

    def legacy_json(self) -> dict[str, Any]:
        """``codec`` entry of the metadata, for readers of one codec per cache (see the class doc)."""
        one = self.uniform()
        return one.to_json() if one else {"name": "per-array", "preset": self.preset, "see": "codecs"}

    @classmethod
    def from_metadata(cls, attrs: dict[str, Any]) -> CodecSet:
        """The codecs of a cache from its metadata: ``codecs`` if present, else the single
        ``codec`` of older caches (used for every array).

        Raises:
            KeyError: an unknown codec name, or no codec entry at all.
            ValueError: a malformed codec record.
        """
        if "codecs" in attrs:
            preset = attrs.get("codec", {}).get("preset") if isinstance(attrs.get("codec"), dict) else None
            return cls({a: codec_from_json(d) for a, d in attrs["codecs"].items()}, preset)
        if "codec" not in attrs:
            raise KeyError("cache metadata has neither 'codecs' nor 'codec'")
        one = codec_from_json(attrs["codec"])
        return cls(dict.fromkeys(ENCODED_ARRAYS, one))


def codec_choices() -> list[str]:
    """Names ``--codec`` accepts: the presets, then the registered codecs (applied to every array)."""
    return list(PRESETS) + [n for n in CODECS.names() if n not in PRESETS]


def get_codecs(spec: str | dict[str, Any] | StorageCodec | CodecSet) -> CodecSet:
    """Resolve the per-array codecs of a cache.

    Args:
        spec: a preset name (``"fp16"``, ``"int8"``, ``"int4"``); a registered codec name, JSON
            dict or instance (used for every array); a ``CodecSet``; or a dict array -> any
            one-codec spec (``{"keys": "int8-channel", "values": "int4-token", "hidden": "float16"}``).
    Raises:
        KeyError: an unknown preset/codec name (lists the known ones).
        ValueError: a malformed dict (missing or unknown arrays, unknown fields).
    """
    if isinstance(spec, CodecSet):
        return spec
    if isinstance(spec, str) and spec in PRESETS:
        return CodecSet({a: get_codec(n) for a, n in PRESETS[spec].items()}, preset=spec)
    if isinstance(spec, str) and spec not in CODECS:
        raise KeyError(f"unknown codec {spec!r}; choose one of: {', '.join(codec_choices())}")
    if isinstance(spec, dict) and "name" not in spec:
        return CodecSet({a: get_codec(s) for a, s in spec.items()})
    return CodecSet(dict.fromkeys(ENCODED_ARRAYS, get_codec(spec)))


_BLOSC_SHUFFLE = {"byte": "shuffle", "bit": "bitshuffle", "none": "noshuffle"}


@dataclass(frozen=True)
class Compressor:
    """Lossless byte compressor applied to every stored chunk (inside each shard).

    Args:
        name: ``"zstd"``, ``"blosc"`` (blosc with its zstd back end) or ``"none"``.
        level: compression level (zstd: 1..22, blosc: 0..9; ignored for ``"none"``).
        shuffle: blosc only: ``"byte"``, ``"bit"`` or ``"none"`` (bit-shuffle helps fp16/bf16).
    Raises:
        ValueError: on an unknown name/shuffle, a level out of range, or a shuffle without blosc.
    """

    name: str
    level: int = 3
    shuffle: str = "none"

    def __post_init__(self):
        if self.name not in ("zstd", "blosc", "none"):
            raise ValueError(f"compressor must be 'zstd', 'blosc' or 'none', got {self.name!r}")
        if self.shuffle not in _BLOSC_SHUFFLE:
            raise ValueError(f"shuffle must be 'byte', 'bit' or 'none', got {self.shuffle!r}")
        if self.shuffle != "none" and self.name != "blosc":
            raise ValueError(f"shuffle={self.shuffle!r} needs compressor 'blosc', not {self.name!r}")
        lo, hi = {"zstd": (1, 22), "blosc": (0, 9), "none": (-(2**31), 2**31)}[self.name]
        if not lo <= self.level <= hi:
            raise ValueError(f"{self.name} level must be in [{lo}, {hi}], got {self.level}")

    def zarr_codecs(self) -> list:
        """The Zarr v3 bytes->bytes codecs (``compressors=`` of ``create_array``); ``[]`` for none."""
        from zarr.codecs import BloscCodec, ZstdCodec

        if self.name == "zstd":
            return [ZstdCodec(level=self.level)]
        if self.name == "blosc":
            # typesize is left unset: Zarr fills it from the array's dtype.
            return [BloscCodec(cname="zstd", clevel=self.level, shuffle=_BLOSC_SHUFFLE[self.shuffle])]
        return []

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Compressor:
        return cls(**d)

    @classmethod
    def parse(cls, text: str) -> Compressor:
        """``zstd:3`` / ``blosc:5:bit`` / ``none`` -> Compressor (blosc's shuffle defaults to bit).

        Raises:
            ValueError: on an unknown name, a level that is not an integer or out of range, an
                unknown shuffle, or extra fields; the message quotes the text and the forms.
        """
        forms = "use zstd:LEVEL, blosc:LEVEL:byte|bit|none, or none"
        parts = str(text).split(":")
        name = parts[0]
        if name == "none" and len(parts) == 1:
            return cls("none")
        if name not in ("zstd", "blosc") or len(parts) > (3 if name == "blosc" else 2):
            raise ValueError(f"unknown compressor {text!r}; {forms}")
        try:
            level = int(parts[1]) if len(parts) > 1 else 3
        except ValueError:
            raise ValueError(f"compressor {text!r}: level {parts[1]!r} is not an integer; {forms}") from None
        shuffle = parts[2] if len(parts) > 2 else ("bit" if name == "blosc" else "none")
        try:
            return cls(name, level, shuffle)
        except ValueError as e:
            raise ValueError(f"compressor {text!r}: {e}") from None
