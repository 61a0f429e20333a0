"""Storage codecs (float32 -> stored parts -> float32) and the byte compressor of a cache.

A *storage codec* turns the float32 tensors of a cache (``keys``, ``values``, ``hidden``) into
one or more plain NumPy arrays that Zarr can store, and back. Each codec is a small frozen
dataclass registered in ``CODECS`` by name; it describes itself as JSON (stored in the cache's
group attributes, as JSON) and declares the relative RMSE its round trip may cost on
Gaussian data, which ``tests/cache/test_codecs.py`` checks for every registered codec.

    name        stored parts                         max_rel_rmse
    float32     "" float32                           0
    float16     "" float16 (default)                 1e-3
    bfloat16    "" uint16 (bf16 bits, RNE rounding)  5e-3
    int8        "" int8, "_scale" fp16/fp32          1e-2  (absmax per vector, last axis)

Part suffixes: ``""`` is the main array (stored under the logical name, e.g. ``keys``), ``"_scale"``
a companion array (``keys_scale``) whose shape drops the last axis.

The *compressor* (``Compressor``) is the lossless byte stage applied to every stored chunk:
zstd, blosc (zstd inside, with byte/bit shuffle) or none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
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


@CODECS.register("int8")
@dataclass(frozen=True)
class Int8Codec(StorageCodec):
    """Symmetric absmax int8 over the last axis (one scale per D- or d-vector).

    ``q = round(x / s)`` clipped to [-127, 127] with ``s = absmax(x) / 127`` stored in
    ``scale_dtype`` (quantisation uses the stored, rounded scale, so decode is ``q * s``).
    All-zero vectors get ``s = 0`` and decode to zeros. Heavy-tailed vectors (massive
    activations in hidden states) lose precision on their small entries: prefer float16 there.
    """

    name: ClassVar[str] = "int8"
    max_rel_rmse: ClassVar[float] = 1e-2
    logical_dtype: ClassVar[str] = "int8"
    scale_dtype: str = "float16"

    def __post_init__(self):
        if self.scale_dtype not in ("float16", "float32"):
            raise ValueError(f"int8 scale_dtype must be 'float16' or 'float32', got {self.scale_dtype!r}")

    def storage_dtypes(self, shape: Shape) -> dict[str, tuple[Shape, np.dtype]]:
        if len(shape) < 1:
            raise ValueError("int8 codec needs at least one axis (scales are per last-axis vector)")
        return {"": (tuple(shape), np.dtype(np.int8)), "_scale": (tuple(shape[:-1]), np.dtype(self.scale_dtype))}

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = _check_float32(x)
        absmax = np.max(np.abs(x), axis=-1) if x.size else np.zeros(x.shape[:-1], np.float32)  # (...)
        scale = _cast_checked(absmax / np.float32(127.0), np.dtype(self.scale_dtype).type, self.name)
        s = scale.astype(np.float32)[..., None]  # (..., 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s > 0, np.rint(x / s), 0.0)
        q = np.clip(q, -127, 127).astype(np.int8)
        return {"": q, "_scale": scale}

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        q = np.asarray(parts[""]).astype(np.float32)
        return q * np.asarray(parts["_scale"]).astype(np.float32)[..., None]


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
    """Resolve a codec given by name (``"float16"``), JSON dict, or instance."""
    if isinstance(spec, StorageCodec):
        return spec
    if isinstance(spec, str):
        return CODECS.get(spec)()
    return codec_from_json(spec)


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
