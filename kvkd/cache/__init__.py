"""The teacher cache: one sharded Zarr v3 group per teacher x data set x extraction config.

    schema.py   arrays, shapes, dtypes, shards (CacheLayout)
    codecs.py   storage codecs (float/int8/int4/fp8), per-array codec sets and presets, byte compressors
    writer.py   CacheWriter: create/resume, one writer per shard, data first, flags last
    claims.py   shard claim files that keep a second writer out
    reader.py   CacheReader: any Zarr URL, refuses unwritten examples and incomplete caches
    compat.py   check_compatible: caches agree with each other and with the training data
    store.py    CacheStore: a cache root of content-keyed caches and names; ls, verified cp, rm

This package knows nothing of extraction or training; torch is only imported by
``CacheReader.row``.
"""

from kvkd.cache.codecs import CODECS, PRESETS, CodecSet, Compressor, StorageCodec, codec_from_json, get_codec, get_codecs
from kvkd.cache.compat import check_compatible
from kvkd.cache.errors import CacheError, CacheMismatchError
from kvkd.cache.reader import CacheReader
from kvkd.cache.schema import SCHEMA_VERSION, ArraySpec, CacheLayout
from kvkd.cache.writer import CacheWriter

__all__ = [
    "CODECS",
    "PRESETS",
    "SCHEMA_VERSION",
    "ArraySpec",
    "CacheError",
    "CacheLayout",
    "CacheMismatchError",
    "CacheReader",
    "CacheWriter",
    "CodecSet",
    "Compressor",
    "StorageCodec",
    "check_compatible",
    "codec_from_json",
    "get_codec",
    "get_codecs",
]
