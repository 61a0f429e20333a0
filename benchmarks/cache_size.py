"""Cache size per storage codec and byte compressor, with the codec's error on real SmolLM2 caches.

    python benchmarks/cache_size.py           # 32 GSM8K rows, M=6

The SmolLM2 cache is extracted once in float32 without compression; its rows are then
rewritten with every registered codec (float32, float16, bfloat16 as uint16 bits, int8 with
per-vector fp16 scales) x every compressor (none, zstd levels, blosc-zstd with byte / bit /
no shuffle). For each: stored bytes per example (whole example, and keys+values / hidden
alone), the ratio to raw (uncompressed) float16, relative RMSE of keys, values and hidden
(``rmse(decoded - x) / rms(x)``), write time and read throughput (rows/s, 4-row random
batches as the loader reads them). Target (issue 6): int8 <= 0.55 of raw fp16, rel. RMSE <= 1%.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

import _common as C
from kvkd.cache.codecs import CODECS, get_codec
from kvkd.cache.reader import CacheReader
from kvkd.cache.writer import RESERVED_KEYS, CacheWriter
from kvkd.pipeline.extract import parse_compressor

COMPRESSORS = ["none", "zstd:1", "zstd:3", "zstd:9", "zstd:19", "blosc:5:none", "blosc:5:byte", "blosc:5:bit"]
GROUPS = {"kv": ("keys", "values"), "hidden": ("hidden",)}


def rel_rmse(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((x.astype(np.float64) - y) ** 2)) / np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def measure(rows: dict, src: CacheReader, codec: str, compressor: str, tmp: str, read_batches: list[list[int]]) -> dict:
    url = f"{tmp}/{codec}-{compressor.replace(':', '-')}.zarr"
    meta = {k: v for k, v in src.metadata.items() if k not in RESERVED_KEYS}
    layout = src.layout
    t = time.perf_counter()
    writer = CacheWriter.open(url, layout, meta, codec=codec, compressor=parse_compressor(compressor), overwrite=True)
    for shard in writer.pending_shards():
        lo, hi = writer.layout.shard_range(shard)
        writer.write_shard(shard, {k: v[lo:hi] for k, v in rows.items()})
    writer.finalize()
    write_s = time.perf_counter() - t
    reader = CacheReader.open(url)
    per_array = {name: int(arr.nbytes_stored()) for name, arr in reader._arrays.items()}
    n = len(reader)
    back = reader.read(slice(None))
    t = time.perf_counter()
    for b in read_batches:
        reader.read(b)
    read_s = time.perf_counter() - t
    groups = {g: sum(v for k, v in per_array.items() if k.split("_scale")[0] in names) / n for g, names in GROUPS.items()}
    raw16 = layout.bytes_per_example(get_codec("float16"))
    raw16_groups = {g: sum(layout.arrays(get_codec("float16"))[k].nbytes() for k in names) for g, names in GROUPS.items()}
    total = sum(per_array.values()) / n
    return {
        "codec": codec,
        "compressor": compressor,
        "bytes_per_example": total,
        "ratio_to_raw_fp16": total / raw16,
        "bytes_per_example_by_group": groups,
        "ratio_to_raw_fp16_by_group": {g: groups[g] / raw16_groups[g] for g in groups},
        "rel_rmse": {k: rel_rmse(rows[k], back[k]) for k in ("keys", "values", "hidden")},
        "write_s": write_s,
        "read_rows_per_s": sum(len(b) for b in read_batches) / read_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--slots", type=int, default=6)
    ap.add_argument("--compressors", default=",".join(COMPRESSORS))
    args = ap.parse_args()
    src = CacheReader.open(C.smollm2_cache(args.rows, args.slots, codec="float32", compressor="none"))
    rows = src.read(slice(None))
    rng = np.random.default_rng(0)
    read_batches = [rng.choice(len(src), 4, replace=False).tolist() for _ in range(16)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for codec in CODECS.names():
            for comp in args.compressors.split(","):
                r = measure(rows, src, codec, comp, tmp, read_batches)
                results.append(r)
                print(f"{codec:9s} {comp:13s} {r['bytes_per_example']:>10,.0f} B/ex  {r['ratio_to_raw_fp16']:.3f} x raw fp16  "
                      f"rel.RMSE k {r['rel_rmse']['keys']:.2e} v {r['rel_rmse']['values']:.2e} h {r['rel_rmse']['hidden']:.2e}  "
                      f"write {r['write_s']:.2f} s  read {r['read_rows_per_s']:,.0f} rows/s")
    raw16 = src.layout.bytes_per_example(get_codec("float16"))
    res = {"command": f"python benchmarks/cache_size.py --rows {args.rows} --slots {args.slots}", "args": vars(args),
           "layout": src.layout.to_json(), "raw_fp16_bytes_per_example": raw16, "results": results}
    path = C.save("cache_size", res)

    def plot(ax):
        comps = args.compressors.split(",")
        width = 0.8 / len(CODECS.names())
        for j, codec in enumerate(CODECS.names()):
            ys = [next(r["ratio_to_raw_fp16"] for r in results if r["codec"] == codec and r["compressor"] == c) for c in comps]
            ax.bar(np.arange(len(comps)) + j * width, ys, width, label=codec)
        ax.axhline(0.55, color="k", lw=0.8, ls="--", label="int8 target 0.55")
        ax.set_xticks(np.arange(len(comps)) + 0.4 - width / 2, comps, rotation=30, fontsize=7)
        ax.set_ylabel("bytes / raw fp16 bytes")
        ax.set_title(f"SmolLM2 cache size per example (M={args.slots})", fontsize=9)
        ax.legend(fontsize=7)

    C.figure("cache_size", plot)
    print(f"raw fp16: {raw16:,} bytes/example -> {path}")


if __name__ == "__main__":
    main()
