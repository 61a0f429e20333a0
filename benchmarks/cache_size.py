"""Cache size and error per storage codec (presets, single codecs, mixed sets) x byte compressor,
on real SmolLM2 caches.

    python benchmarks/cache_size.py --rows 64 --slots 6 --compressors none,zstd:3,blosc:5:byte

The SmolLM2 cache is extracted once in float32 without compression; its rows are then
rewritten with every variant: the presets (``fp16``, ``int8``, ``int4``), every registered
codec applied to all three arrays, and a few mixed per-array sets (``MIXED``), each x every
compressor. For each: stored bytes per example (whole example, and keys / values / hidden
alone, codec parts included), the ratio to raw (uncompressed) float16, the relative RMSE of
keys, values and hidden separately (``rmse(decoded - x) / rms(x)``, over all elements, empty
slots included as stored zeros), write and read throughput (rows/s; reads are 4-row random
batches as the loader reads them).

Two side studies on the same rows (uncompressed bytes, computed):
- keys per channel: scale over the M slots of one example (what ``int8-channel`` stores) or
  over the examples of a shard (``--shard-examples``), int8 and int4;
- hidden outliers: the error of ``int8-outlier`` / ``int4-outlier`` against the number of fp16
  outliers kept per (example, layer) vector.

Targets (issue 12): the int8 preset <= 0.55 of raw fp16 with rel. RMSE <= 1% on every array;
moonshot <= 0.30 of raw fp16. Writes ``results/cache_size.json`` and two plots: bytes per
compressor (``cache_size.png``) and size vs error (``cache_size_error.png``).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

import _common as C
from kvkd.cache.codecs import CODECS, PRESETS, get_codec, get_codecs
from kvkd.cache.reader import CacheReader
from kvkd.cache.writer import RESERVED_KEYS, CacheWriter
from kvkd.pipeline.extract import parse_compressor

COMPRESSORS = ["none", "zstd:1", "zstd:3", "zstd:9", "zstd:19", "blosc:5:none", "blosc:5:byte", "blosc:5:bit"]
ARRAYS = ("keys", "values", "hidden")
MIXED = {
    "k8c-v4-h8o": {"keys": "int8-channel", "values": "int4-token", "hidden": "int8-outlier"},
    "k4c-v4-h8o": {"keys": "int4-channel", "values": "int4-token", "hidden": "int8-outlier"},
    "k8c-v8-h4o": {"keys": "int8-channel", "values": "int8", "hidden": "int4-outlier"},
}
"""Mixed per-array sets measured next to the presets (candidates for the moonshot)."""


def variants() -> dict[str, object]:
    """Name -> codec spec for ``get_codecs``: presets, every codec on all arrays, mixed sets."""
    out: dict[str, object] = {name: name for name in PRESETS}
    out.update({f"all:{name}": get_codec(name) for name in CODECS.names()})
    out.update(MIXED)
    return out


def rel_rmse(x: np.ndarray, y: np.ndarray) -> float:
    x = x.astype(np.float64)
    return float(np.sqrt(np.mean((x - y) ** 2)) / np.sqrt(np.mean(x**2)))


def array_bytes(per_array: dict[str, int], name: str, parts: list[str]) -> int:
    """Stored bytes of a logical array: its main array and its codec's companion parts."""
    return sum(per_array[name + suffix] for suffix in parts)


def measure(rows: dict, src: CacheReader, variant: str, spec, compressor: str, tmp: str, read_batches: list[list[int]]) -> dict:
    url = f"{tmp}/{variant.replace(':', '-')}-{compressor.replace(':', '-')}.zarr"
    meta = {k: v for k, v in src.metadata.items() if k not in RESERVED_KEYS}
    layout = src.layout
    codecs = get_codecs(spec)
    t = time.perf_counter()
    writer = CacheWriter.open(url, layout, meta, codec=codecs, compressor=parse_compressor(compressor), overwrite=True)
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
    raw16 = layout.arrays(get_codec("float16"))
    specs = layout.row_specs()
    by_array = {a: array_bytes(per_array, a, list(codecs[a].storage_dtypes(specs[a].shape))) / n for a in ARRAYS}
    total = sum(per_array.values()) / n
    raw16_total = layout.bytes_per_example(get_codec("float16"))
    return {
        "variant": variant,
        "codecs": {a: c.name for a, c in codecs.items()},
        "compressor": compressor,
        "bytes_per_example": total,
        "ratio_to_raw_fp16": total / raw16_total,
        "bytes_per_example_by_array": by_array,
        "ratio_to_raw_fp16_by_array": {a: by_array[a] / raw16[a].nbytes() for a in ARRAYS},
        "rel_rmse": {a: rel_rmse(rows[a], back[a]) for a in ARRAYS},
        "write_s": write_s,
        "write_rows_per_s": n / write_s,
        "read_rows_per_s": sum(len(b) for b in read_batches) / read_s,
    }


def keys_scale_scope(keys: np.ndarray, shard_examples: int) -> list[dict]:
    """Per-channel key scales over one example's M slots vs over a shard's examples and slots.

    Args:
        keys: (N, L, H_kv, M, D) float32.
    Returns: rows of {bits, scope, rel_rmse, bytes_per_example} (uncompressed: values + fp16 scales).
    """
    N, L, H, M, D = keys.shape
    out = []
    for bits in (8, 4):
        qmax = 2 ** (bits - 1) - 1
        value_bytes = L * H * M * D * bits / 8
        for scope, group in (("example", 1), ("shard", shard_examples)):
            y = np.empty_like(keys)
            for lo in range(0, N, group):
                x = keys[lo : lo + group]  # (g, L, H, M, D)
                s = np.abs(x).max(axis=(0, 3), keepdims=True).astype(np.float16).astype(np.float32) / qmax  # (1, L, H, 1, D)
                with np.errstate(divide="ignore", invalid="ignore"):
                    q = np.clip(np.where(s > 0, np.rint(x / s), 0), -qmax, qmax)
                y[lo : lo + group] = q * s
            out.append({"bits": bits, "scope": scope, "examples_per_scale": group, "rel_rmse": rel_rmse(keys, y),
                        "bytes_per_example": value_bytes + L * H * D * 2 / group})
    return out


def hidden_outliers(hidden: np.ndarray, counts: list[int]) -> list[dict]:
    """Error of the outlier codecs on hidden (N, L+1, d) against fp16 outliers per vector (0 = plain)."""
    out = []
    for bits, plain, name in ((8, "int8", "int8-outlier"), (4, "int4-token", "int4-outlier")):
        for k in counts:
            codec = get_codec(plain) if k == 0 else get_codec({"name": name, "outliers": k})
            y = codec.decode(codec.encode(hidden))
            nbytes = sum(int(np.prod(s)) * dt.itemsize for s, dt in codec.storage_dtypes(hidden.shape[1:]).values())
            out.append({"bits": bits, "outliers": k, "rel_rmse": rel_rmse(hidden, y), "bytes_per_example": nbytes})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--slots", type=int, default=6)
    ap.add_argument("--compressors", default=",".join(COMPRESSORS))
    ap.add_argument("--shard-examples", type=int, default=16, help="examples per scale in the keys-scale study")
    ap.add_argument("--tag", default="cache_size", help="name of the JSON/PNG results")
    args = ap.parse_args()
    src = CacheReader.open(C.smollm2_cache(args.rows, args.slots, codec="float32", compressor="none"))
    rows = src.read(slice(None))
    rng = np.random.default_rng(0)
    read_batches = [rng.choice(len(src), 4, replace=False).tolist() for _ in range(16)]
    comps = args.compressors.split(",")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant, spec in variants().items():
            for comp in comps:
                r = measure(rows, src, variant, spec, comp, tmp, read_batches)
                results.append(r)
                e = r["rel_rmse"]
                print(f"{variant:17s} {comp:13s} {r['bytes_per_example']:>10,.0f} B/ex  {r['ratio_to_raw_fp16']:.3f} x raw fp16  "
                      f"rel.RMSE % k {100 * e['keys']:.2f} v {100 * e['values']:.2f} h {100 * e['hidden']:.2f}  "
                      f"write {r['write_rows_per_s']:,.0f} rows/s  read {r['read_rows_per_s']:,.0f} rows/s", flush=True)
    scope = keys_scale_scope(rows["keys"], args.shard_examples)
    outliers = hidden_outliers(rows["hidden"], [0, 1, 2, 4, 8, 16, 32])
    for r in scope:
        print(f"keys int{r['bits']} per channel over {r['scope']:7s}: rel.RMSE {100 * r['rel_rmse']:.2f}%  {r['bytes_per_example']:,.0f} B/ex (uncompressed)")
    for r in outliers:
        print(f"hidden int{r['bits']} with {r['outliers']:2d} fp16 outliers/vector: rel.RMSE {100 * r['rel_rmse']:.2f}%  {r['bytes_per_example']:,} B/ex")
    raw16 = src.layout.bytes_per_example(get_codec("float16"))
    res = {"command": f"python benchmarks/cache_size.py --rows {args.rows} --slots {args.slots} --compressors {args.compressors}",
           "args": vars(args), "layout": src.layout.to_json(), "raw_fp16_bytes_per_example": raw16, "results": results,
           "keys_scale_scope": scope, "hidden_outliers": outliers}
    path = C.save(args.tag, res)
    names = list(variants())

    def plot_bytes(ax):
        width = 0.8 / len(names)
        for j, variant in enumerate(names):
            ys = [next(r["ratio_to_raw_fp16"] for r in results if r["variant"] == variant and r["compressor"] == c) for c in comps]
            ax.bar(np.arange(len(comps)) + j * width, ys, width, label=variant)
        ax.axhline(0.55, color="k", lw=0.8, ls="--", label="int8 target 0.55")
        ax.axhline(0.30, color="k", lw=0.8, ls=":", label="moonshot 0.30")
        ax.set_xticks(np.arange(len(comps)) + 0.4 - width / 2, comps, rotation=30, fontsize=7)
        ax.set_ylabel("bytes / raw fp16 bytes")
        ax.set_title(f"SmolLM2 cache size per example (M={args.slots})", fontsize=9)
        ax.legend(fontsize=5, ncol=2)

    def plot_error(ax):
        comp = "zstd:3" if "zstd:3" in comps else comps[-1]
        for r in (r for r in results if r["compressor"] == comp):
            worst = max(r["rel_rmse"].values())
            ax.scatter(r["ratio_to_raw_fp16"], max(worst, 1e-5) * 100, s=14)
            ax.annotate(r["variant"], (r["ratio_to_raw_fp16"], max(worst, 1e-5) * 100), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.axhline(1.0, color="k", lw=0.8, ls="--", label="1% bound")
        ax.axvline(0.55, color="k", lw=0.8, ls="-.", label="0.55 x fp16")
        ax.axvline(0.30, color="k", lw=0.8, ls=":", label="0.30 x fp16")
        ax.set_yscale("log")
        ax.set_xlabel(f"bytes / raw fp16 bytes ({comp})")
        ax.set_ylabel("worst rel. RMSE over keys/values/hidden, %")
        ax.set_title(f"SmolLM2 cache: size vs error (M={args.slots})", fontsize=9)
        ax.legend(fontsize=6)

    C.figure(args.tag, plot_bytes)
    C.figure(f"{args.tag}_error", plot_error)
    print(f"raw fp16: {raw16:,} bytes/example -> {path}")


if __name__ == "__main__":
    main()
