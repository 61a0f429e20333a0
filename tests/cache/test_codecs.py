"""Storage codecs and compressors: one round-trip suite over every registered codec."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from kvkd.cache import CODECS, CacheError, CacheReader, CacheWriter, Compressor, codec_from_json, get_codec
from kvkd.cache.codecs import (
    PRESETS,
    CodecSet,
    bfloat16_bits_to_float32,
    codec_choices,
    e4m3_bits_to_float32,
    float32_to_bfloat16_bits,
    float32_to_e4m3_bits,
    get_codecs,
    pack_int4,
    unpack_int4,
)

from .helpers import METADATA, TINY, write_all

COMPRESSORS = [Compressor("zstd", 3), Compressor("blosc", 5, "bit"), Compressor("none")]


def rel_rmse(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((x - y) ** 2)) / np.sqrt(np.mean(x**2)))


@pytest.mark.parametrize("shape", [(64, 3, 64), (16, 31, 576)], ids=["D=64", "d=576"])
@pytest.mark.parametrize("name", CODECS.names())
def test_codec_round_trip_within_declared_bound(name, shape):
    codec = get_codec(name)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    parts = codec.encode(x)
    want = codec.storage_dtypes(x.shape)
    assert {k: (p.shape, p.dtype) for k, p in parts.items()} == want
    y = codec.decode(parts)
    assert y.dtype == np.float32 and y.shape == x.shape
    err = rel_rmse(x, y)
    assert err <= codec.max_rel_rmse
    if codec.max_rel_rmse == 0:
        np.testing.assert_array_equal(x, y)
    else:  # the bound is a real one, not a blanket
        assert err > codec.max_rel_rmse / 10


@pytest.mark.parametrize("compressor", COMPRESSORS, ids=lambda c: f"{c.name}-{c.shuffle}")
@pytest.mark.parametrize("name", codec_choices())
def test_codec_round_trip_through_cache(tmp_path, name, compressor):
    """Every preset and every codec (applied to all arrays) survives the store bit for bit."""
    layout = dataclasses.replace(TINY, head_dim=16)  # D > 8 outliers: an outlier codec fits keys too
    writer = CacheWriter.open(str(tmp_path / "c.zarr"), layout, METADATA, codec=name, compressor=compressor)
    rows = write_all(writer)
    assert writer.finalize()
    reader = CacheReader.open(str(tmp_path / "c.zarr"))
    out = reader.read(slice(None))
    codecs = get_codecs(name)
    assert reader.codecs == codecs
    for key in ("keys", "values", "hidden"):
        codec = codecs[key]
        np.testing.assert_array_equal(out[key], codec.decode(codec.encode(rows[key])))  # storage is lossless
        assert rel_rmse(rows[key], out[key]) <= codec.max_rel_rmse
    for key in ("slot_pos", "slot_importance", "slot_score", "slot_valid", "cot_len", "answer_len", "answer_nll"):
        np.testing.assert_array_equal(out[key], rows[key])
        assert out[key].dtype == rows[key].dtype
    assert reader.metadata["compressor"] == compressor.to_json()
    inner = reader.info()["arrays"]["keys"]["codecs"][0]["configuration"]["codecs"]
    assert [c["name"] for c in inner] == ["bytes"] + ([] if compressor.name == "none" else [compressor.name]) + ["crc32c"]


def test_bfloat16_bits_match_torch():
    rng = np.random.default_rng(1)
    specials = np.array(
        [0.0, -0.0, 1.0, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.0e38, -3.4e38, 1e-40, -1e-42,
         np.inf, -np.inf, np.nan, 65504.0, 2.0**-126],
        dtype=np.float32,
    )
    wide = rng.standard_normal(10_000) * 10.0 ** rng.integers(-30, 30, 10_000)  # all exponents
    x = np.concatenate([specials, wide.astype(np.float32)])
    ours = float32_to_bfloat16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(bfloat16_bits_to_float32(ours[nan])).all()  # any NaN payload is a NaN
    back = torch.from_numpy(ours.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bfloat16_bits_to_float32(ours), back)


def test_bfloat16_rounds_to_nearest_even_by_hand():
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20], dtype=np.float32)
    # ties go to the even mantissa (0x3F80, 0x3F82); just above a tie rounds up
    assert float32_to_bfloat16_bits(x).tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F81]


def test_int8_by_hand():
    codec = get_codec({"name": "int8", "scale_dtype": "float32"})
    parts = codec.encode(np.array([[1.0, -3.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32))
    assert parts[""].tolist() == [[32, -95, 16, 127], [0, 0, 0, 0]]  # round(x * 127 / 4)
    np.testing.assert_allclose(parts["_scale"], [4 / 127, 0.0], rtol=1e-7)
    assert codec.decode(parts)[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_float16_overflow_is_an_error_naming_a_fix():
    with pytest.raises(ValueError, match="bfloat16"):
        get_codec("float16").encode(np.array([1.0, 70000.0], dtype=np.float32))
    with pytest.raises(ValueError, match="float32"):
        get_codec("float16").encode(np.array([1.0, 2.0]))  # float64 input


@pytest.mark.parametrize("name", CODECS.names())
def test_codec_json_round_trip(name):
    codec = get_codec(name)
    d = json.loads(json.dumps(codec.to_json()))
    assert d["name"] == name and codec_from_json(d) == codec
    assert get_codec("bfloat16").to_json()["logical_dtype"] == "bfloat16"


def test_codec_errors():
    with pytest.raises(KeyError, match="unknown codec 'fp8'.*float16"):
        get_codec("fp8")
    with pytest.raises(ValueError, match="scale_dtype"):
        get_codec({"name": "int8", "scale_dtype": "int4"})
    with pytest.raises(ValueError, match="no field"):
        codec_from_json({"name": "float16", "bits": 3})


def test_compressor_json_and_validation():
    for c in COMPRESSORS:
        assert Compressor.from_json(json.loads(json.dumps(c.to_json()))) == c
    blosc = Compressor("blosc", 5, "bit").zarr_codecs()[0]
    assert blosc.shuffle.value == "bitshuffle" and blosc.clevel == 5 and blosc.cname.value == "zstd"
    assert Compressor("none").zarr_codecs() == []
    with pytest.raises(ValueError, match="needs compressor 'blosc'"):
        Compressor("zstd", 3, "bit")
    with pytest.raises(ValueError, match="level"):
        Compressor("blosc", 12)
    with pytest.raises(ValueError, match="compressor must be"):
        Compressor("lz4")


# ---- the quantising codecs by hand -----------------------------------------------------------------


def test_int4_packing_by_hand():
    q = np.array([[-8, 7, 0, -1], [3, -3, 5, 1]], dtype=np.int8)
    b = pack_int4(q)
    # (q + 8): low nibble = element 2i, high nibble = element 2i+1
    assert b.dtype == np.uint8 and b.tolist() == [[0 | 15 << 4, 8 | 7 << 4], [11 | 5 << 4, 13 | 9 << 4]]
    np.testing.assert_array_equal(unpack_int4(b), q)
    with pytest.raises(ValueError, match="even"):
        get_codec("int4-token").encode(np.ones((2, 5), np.float32))


def test_int8_channel_scales_each_channel_over_the_slots():
    codec = get_codec({"name": "int8-channel", "scale_dtype": "float32"})
    x = np.array([[1.2, 100.0], [-2.0, 52.0], [0.5, -25.0]], dtype=np.float32)  # (M=3, D=2)
    parts = codec.encode(x)
    np.testing.assert_allclose(parts["_scale"], [2 / 127, 100 / 127], rtol=1e-7)  # per channel (column)
    assert parts[""].tolist() == [[76, 127], [-127, 66], [32, -32]]  # round(x / scale)
    assert codec.storage_dtypes((4, 3, 2)) == {"": ((4, 3, 2), np.dtype(np.int8)), "_scale": ((4, 2), np.dtype(np.float32))}
    int4 = get_codec({"name": "int4-channel", "scale_dtype": "float32"}).encode(x)
    assert unpack_int4(int4[""]).tolist() == [[4, 7], [-7, 4], [2, -2]]  # round(x * 7 / absmax)


def test_outlier_codec_keeps_the_largest_entries_apart(url):
    codec = get_codec({"name": "int8-outlier", "scale_dtype": "float32", "outliers": 2})
    x = np.array([[0.5, -300.0, 1.0, 0.25, 40.0, -1.0]], dtype=np.float32)
    parts = codec.encode(x)
    assert parts["_outlier_idx"].tolist() == [[1, 4]] and parts["_outlier_idx"].dtype == np.uint16
    assert parts["_outlier_val"].tolist() == [[-300.0, 40.0]] and parts["_outlier_val"].dtype == np.float16
    np.testing.assert_allclose(parts["_scale"], [1 / 127], rtol=1e-7)  # the rest's absmax, not 300
    assert parts[""].tolist() == [[64, 0, 127, 32, 0, -127]]
    np.testing.assert_allclose(codec.decode(parts), x, rtol=0, atol=0.5 / 127 + 1e-6)  # half a step; outliers exact
    with pytest.raises(ValueError, match="fewer than the vector length"):
        codec.encode(np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="outliers must be"):
        get_codec({"name": "int4-outlier", "outliers": 0})
    with pytest.raises(ValueError, match=r"outliers \(8\) must be fewer than the vector length 8"):
        CacheWriter.open(url, TINY, METADATA, codec="int8-outlier")  # keys of D = 8


def test_e4m3_bits_match_torch():
    rng = np.random.default_rng(2)
    specials = np.array([0.0, -0.0, 448.0, -448.0, 2.0**-9, 2.0**-6, 1.0, 1.0625, 1.1875, 240.0, 3 * 2.0**-10], np.float32)
    wide = (rng.standard_normal(20_000) * 10.0 ** rng.uniform(-4, 2.6, 20_000)).clip(-448, 448)
    x = np.concatenate([specials, wide.astype(np.float32)])
    ours = float32_to_e4m3_bits(x)
    theirs = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(ours, theirs)  # ties (1.0625, 1.1875, 3*2^-10) to even, subnormals
    back = torch.from_numpy(theirs).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(e4m3_bits_to_float32(ours), back)


def _with_outlier_channels(rng, shape, channels, factor):
    x = rng.standard_normal(shape, dtype=np.float32)
    x[..., channels] *= factor
    return x


def test_per_channel_keys_meet_1pct_where_per_token_does_not():
    """Pre-RoPE keys have outlier channels: per-token absmax misses 1%, per-channel meets it (KIVI)."""
    keys = _with_outlier_channels(np.random.default_rng(3), (8, 4, 3, 24, 64), [5, 40], 15.0)  # (n, L, H, M, D)
    per_token, per_channel = (get_codec(n) for n in ("int8", "int8-channel"))
    assert rel_rmse(keys, per_token.decode(per_token.encode(keys))) > 0.01
    assert rel_rmse(keys, per_channel.decode(per_channel.encode(keys))) < 0.006


def test_outliers_in_fp16_meet_1pct_on_massive_activations():
    """Hidden states with massive activations (a few entries ~300x): plain int8 misses 1% of the
    small entries' scale, int8-outlier keeps the planted channels exactly where they are."""
    rng = np.random.default_rng(4)
    hidden = rng.standard_normal((8, 31, 576), dtype=np.float32)  # (n, L+1, d)
    hidden[:, :, [7, 300]] = rng.choice([-1, 1], (8, 31, 2)) * rng.uniform(200, 400, (8, 31, 2))
    small = np.ones(576, bool)
    small[[7, 300]] = False
    plain, outlier = get_codec("int8"), get_codec("int8-outlier")
    y_plain, parts = plain.decode(plain.encode(hidden)), outlier.encode(hidden)
    y_out = outlier.decode(parts)
    assert rel_rmse(hidden[..., small], y_plain[..., small]) > 0.1  # the step is set by the outliers
    assert rel_rmse(hidden[..., small], y_out[..., small]) < 0.01
    assert rel_rmse(hidden, y_out) < 0.01
    assert (np.isin(parts["_outlier_idx"], [7, 300]).sum(-1) == 2).all()  # both planted channels found


# ---- per-array codecs, presets and their metadata ---------------------------------------------------


def test_presets_and_choices():
    int8 = get_codecs("int8")
    assert {a: c.name for a, c in int8.items()} == {"keys": "int8-channel", "values": "int8", "hidden": "int8-outlier"}
    assert int8.name == "int8" and int8.uniform() is None
    assert get_codecs("fp16").to_json() == get_codecs("float16").to_json()  # fp16 = float16 everywhere
    assert get_codecs("bfloat16").uniform() == get_codec("bfloat16")
    mixed = get_codecs({"keys": "int8-channel", "values": "int4-token", "hidden": {"name": "float16"}})
    assert mixed.name == "keys=int8-channel,values=int4-token,hidden=float16"
    assert set(PRESETS) <= set(codec_choices()) and set(CODECS.names()) <= set(codec_choices())
    from kvkd.pipeline.extract import _codec_names

    assert _codec_names() == codec_choices()  # what --codec accepts
    with pytest.raises(KeyError, match="unknown codec 'int3'.*fp16, int8, int4"):
        get_codecs("int3")
    with pytest.raises(ValueError, match="exactly"):
        get_codecs({"keys": "float16", "values": "float16"})


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_bound_holds_per_array(preset):
    """Each preset's arrays stay within their own codecs' bounds on realistic shapes."""
    rng = np.random.default_rng(5)
    rows = {"keys": rng.standard_normal((4, 3, 2, 6, 64), dtype=np.float32), "values": rng.standard_normal((4, 3, 2, 6, 64), dtype=np.float32),
            "hidden": rng.standard_normal((4, 4, 576), dtype=np.float32)}
    for array, codec in get_codecs(preset).items():
        assert rel_rmse(rows[array], codec.decode(codec.encode(rows[array]))) <= codec.max_rel_rmse


def test_per_array_metadata_and_old_readers(url):
    writer = CacheWriter.open(url, TINY, METADATA, codec="int8")
    write_all(writer)
    assert writer.finalize()
    attrs = CacheReader.open(url).metadata
    assert {a: d["name"] for a, d in attrs["codecs"].items()} == {"keys": "int8-channel", "values": "int8", "hidden": "int8-outlier"}
    assert attrs["codecs"]["hidden"]["outliers"] == 8
    assert attrs["codec"]["name"] == "per-array" and attrs["codec"]["preset"] == "int8"
    with pytest.raises(KeyError, match="unknown codec 'per-array'"):  # what a one-codec kvkd does with it
        codec_from_json(attrs["codec"])
    assert CodecSet.from_metadata(json.loads(json.dumps(attrs))) == get_codecs("int8")
    assert CodecSet.from_metadata(attrs).name == "int8"
    for name in ("float16", "fp16"):  # a uniform cache keeps the old one-codec record
        assert get_codecs(name).legacy_json() == get_codec("float16").to_json()


@pytest.mark.parametrize("name", ["float16", "int8", "bfloat16"])
def test_schema_1_cache_of_one_codec_still_reads(url, tmp_path, name):
    """A schema-1 cache (one ``codec`` entry; ``int8`` = the per-vector registry codec, not the
    preset) reads as that codec on every array."""
    old_codec = get_codec(name)
    writer = CacheWriter.open(url, TINY, METADATA, codec=CodecSet(dict.fromkeys(("keys", "values", "hidden"), old_codec)))
    rows = write_all(writer)
    assert writer.finalize()
    old = tmp_path / "old.zarr"
    shutil.copytree(url, old)
    shutil.rmtree(old / "shard_checksums")
    meta = json.loads((old / "zarr.json").read_text())
    attrs = meta["attributes"]
    attrs["schema_version"] = 1
    del attrs["checksums"], attrs["codecs"]  # as kvkd wrote schema 1: {"codec": {"name": "int8", ...}}
    assert attrs["codec"] == old_codec.to_json()
    (old / "zarr.json").write_text(json.dumps(meta))
    reader = CacheReader.open(str(old))
    assert all(c == old_codec for _, c in reader.codecs.items())
    out = reader.read(slice(None))
    for key in ("keys", "values", "hidden"):
        np.testing.assert_array_equal(out[key], old_codec.decode(old_codec.encode(rows[key])))
    if name == "int8":  # the preset reads differently: the record, not the name, decides
        assert reader.codecs != get_codecs("int8")


def test_unreadable_codec_record_is_a_cache_error(url):
    writer = CacheWriter.open(url, TINY, METADATA, codec="fp16")
    write_all(writer)
    assert writer.finalize()
    writer.group.update_attributes({"codecs": {"keys": {"name": "int3"}, "values": {"name": "float16"}, "hidden": {"name": "float16"}}})
    with pytest.raises(CacheError, match="codec record.*unknown codec 'int3'"):
        CacheReader.open(url)


def test_int8_preset_bytes_by_hand():
    # TINY: L=2, H_kv=3, M=4, D=8, d=16
    keys = 2 * 3 * 4 * 8 + 2 * 3 * 8 * 2  # int8 + fp16 scale per (layer, head, channel)
    values = 2 * 3 * 4 * 8 + 2 * 3 * 4 * 2  # int8 + fp16 scale per (layer, head, slot)
    hidden = 3 * 16 + 3 * 2 + 3 * 8 * 2 + 3 * 8 * 2  # int8, scale per layer, 8 uint16 positions + 8 fp16 values per layer
    rest = 3 * 24 * 4 + 24 + 3 * 4 + 1  # slot_pos/importance/score, slot_valid, cot_len/answer_len/answer_nll, written
    assert TINY.bytes_per_example(get_codecs("int8")) == keys + values + hidden + rest == 1003
    arrays = TINY.arrays(get_codecs("int4"))
    assert arrays["keys"].shape == (2, 3, 4, 4) and arrays["keys"].dtype == np.uint8  # two per byte
    assert arrays["keys_scale"].shape == (2, 3, 8) and arrays["hidden_outlier_idx"].shape == (3, 8)


def test_kvkd_extract_codec_presets_end_to_end(tmp_path, tiny_teacher, shared_data):
    """``kvkd extract --codec int8/int4`` on a tiny model: the per-array codecs are recorded, the
    cache verifies, and each array is within its codec's bound of the float32 extraction."""
    from typer.testing import CliRunner

    from kvkd.cli import app

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:6]) + "\n")
    runner = CliRunner()

    def extract(codec):
        out = tmp_path / f"{codec}.zarr"
        r = runner.invoke(app, ["extract", "--model", str(tiny_teacher), "--data", str(data), "--out", str(out), "--slots", "3", "--codec", codec])
        assert r.exit_code == 0, r.output
        return str(out)

    exact = CacheReader.open(extract("float32")).read(slice(None))
    for preset in ("int8", "int4"):
        url = extract(preset)
        reader = CacheReader.open(url)
        assert reader.codecs == get_codecs(preset) and reader.metadata["codecs"]["keys"]["name"] == PRESETS[preset]["keys"]
        assert reader.verify() == []
        out = reader.read(slice(None))
        for array, codec in reader.codecs.items():
            assert 0 < rel_rmse(exact[array], out[array]) <= codec.max_rel_rmse, array
        np.testing.assert_array_equal(out["slot_pos"], exact["slot_pos"])  # slot metadata stored exactly
    r = runner.invoke(app, ["extract", "--model", str(tiny_teacher), "--data", str(data), "--out", str(tmp_path / "x.zarr"), "--codec", "int3"])
    assert r.exit_code == 2 and "--codec" in r.output and "int8" in r.output
