"""check_compatible: caches agree with each other and with the training data."""

import copy

import pytest

from kvkd.cache import CacheMismatchError, CacheReader, CacheWriter, check_compatible

from .helpers import METADATA, TINY, write_all


def _meta(**changes):
    meta = copy.deepcopy(METADATA)
    for dotted, value in changes.items():
        head, leaf = dotted.split("__")
        meta[head][leaf] = value
    return meta


def test_agreeing_caches_pass(tmp_path):
    urls = []
    for name, codec in (("a", "float16"), ("b", "int8")):  # other teachers may store differently
        writer = CacheWriter.open(str(tmp_path / name), TINY, _meta(teacher__model=name), codec=codec)
        write_all(writer)
        writer.finalize()
        urls.append(str(tmp_path / name))
    caches = [(u, CacheReader.open(u).metadata) for u in urls]
    check_compatible(caches, expected={"dataset.fingerprint": "fp-1", "compression.slots": 4})


@pytest.mark.parametrize(
    "field, change",
    [
        ("dataset.fingerprint", {"dataset__fingerprint": "fp-2"}),
        ("tokenizer.hash", {"tokenizer__hash": "tok-hash-2"}),
        ("compression.slots", {"compression__slots": 8}),
    ],
)
def test_disagreement_names_field_caches_and_values(field, change):
    caches = [("teacher-a.zarr", _meta()), ("teacher-b.zarr", _meta(**change)), ("teacher-c.zarr", _meta())]
    with pytest.raises(CacheMismatchError) as err:
        check_compatible(caches)
    msg = str(err.value)
    assert err.value.field == field and field in msg
    assert "teacher-a.zarr" in msg and "teacher-b.zarr" in msg
    new = list(change.values())[0]
    assert err.value.values["teacher-b.zarr"] == new and repr(new) in msg


def test_missing_field_and_expected_value():
    meta = _meta()
    del meta["tokenizer"]["hash"]
    with pytest.raises(CacheMismatchError, match="tokenizer.hash.*t2: '<missing>'"):
        check_compatible([("t1", _meta()), ("t2", meta)])
    check_compatible([("t1", _meta()), ("t2", meta)], fields=("dataset.fingerprint",))  # mixed tokenizers
    with pytest.raises(CacheMismatchError) as err:
        check_compatible([("t1", _meta()), ("t2", _meta())], expected={"dataset.fingerprint": "train-fp"})
    assert err.value.field == "dataset.fingerprint"
    assert err.value.values == {"t1": "fp-1", "t2": "fp-1", "expected": "train-fp"}
    assert "'train-fp'" in str(err.value) and "t1: 'fp-1'" in str(err.value)
