"""Train/test contamination: held-out questions that also occur among the training rows.

A question counts as overlapping when its *normalised text* (Unicode NFKC, case-folded,
white space collapsed) equals a training question's, whatever the ids say, or when its id is
a training row's id. Which rows trained a run is read from the run's ``config.json`` (its
teacher caches) and the first cache's ``dataset`` metadata (source, split, format, offset,
rows): training uses exactly the cached rows.

Typical use::

    found = find_overlap(train_rows, test_rows)
    if found: print(found.describe("the test rows", "the training rows"))
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from kvkd.data import DataError, Example, load_examples

__all__ = [
    "Overlap", "cache_training_examples", "find_overlap", "held_out_examples", "question_key", "refuse_cache_overlap",
    "refuse_overlap", "run_training_examples",
]


def question_key(text: str) -> str:
    """The normalised form two questions are compared by: NFKC, case-folded, white space collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


@dataclass
class Overlap:
    """Held-out rows that also occur among the training rows.

    Attributes:
        rows: held-out rows checked.
        same_question: held-out rows whose normalised question is a training question.
        same_id: held-out rows whose id is a training row's id.
        ids: ids of the overlapping held-out rows (either reason), in held-out order.
    """

    rows: int
    same_question: int = 0
    same_id: int = 0
    ids: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Overlapping held-out rows (a row that shares both text and id counts once)."""
        return len(self.ids)

    def __bool__(self) -> bool:
        return self.count > 0

    def describe(self, held_out: str, train: str) -> str:
        """One sentence: how many rows overlap, why, and the first ids."""
        shown = ", ".join(self.ids[:5]) + (f" and {self.count - 5} more" if self.count > 5 else "")
        return (f"{self.count} of {self.rows} {held_out} are among {train} ({self.same_question} by question text, "
                f"{self.same_id} by id): {shown}")


def find_overlap(train: Iterable[Example], held_out: Iterable[Example]) -> Overlap:
    """Count held-out rows whose normalised question or id occurs among the training rows.

    Args:
        train: the training rows.
        held_out: the evaluation (or validation) rows.
    Returns:
        The :class:`Overlap` (falsy when there is none).
    """
    questions, ids = set(), set()
    for ex in train:
        questions.add(question_key(ex.question))
        ids.add(ex.id)
    found = Overlap(rows=0)
    for ex in held_out:
        found.rows += 1
        by_text, by_id = question_key(ex.question) in questions, ex.id in ids
        found.same_question += by_text
        found.same_id += by_id
        if by_text or by_id:
            found.ids.append(ex.id)
    return found


def cache_training_examples(cache: str) -> list[Example]:
    """The rows a teacher cache was extracted from (its ``dataset`` metadata).

    Raises:
        DataError: the recorded source cannot be read any more (names the cache and source).
    """
    from kvkd.cache.reader import CacheReader

    ds = CacheReader.open(cache, allow_incomplete=True).metadata["dataset"]
    try:
        return load_examples(ds["source"], split=ds.get("split"), fmt=ds.get("format", "auto"),
                             offset=ds.get("offset") or 0, limit=ds["rows"]).examples
    except (DataError, ValueError, FileNotFoundError) as err:
        raise DataError(f"cache {cache} records its rows as {ds['source']} but they cannot be read: {err}") from None


def run_training_examples(run: str | Path) -> list[Example]:
    """The rows that trained a run folder (or the run an export folder came from).

    Raises:
        FileNotFoundError: no ``config.json`` (nor ``kvkd_latent.json`` naming a run).
        DataError: the run names no cache, or its cache's rows cannot be read.
    """
    folder = Path(run)
    latent = folder / "kvkd_latent.json"  # an export folder names the run it came from
    if not (folder / "config.json").is_file() and latent.is_file():
        folder = Path(json.loads(latent.read_text()).get("run", ""))
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: cannot tell which rows trained {run}")
    caches = json.loads(path.read_text()).get("caches") or []
    if not caches:
        raise DataError(f"{path} names no teacher cache: cannot tell which rows trained {run}")
    return cache_training_examples(caches[0])


def held_out_examples(spec: str) -> list[Example]:
    """The rows of an evaluation set given as a file or a folder (its ``test`` split if it
    has one, else its only split).

    Raises:
        DataError: unreadable source, or a folder with several splits and no ``test``.
    """
    path = Path(spec).expanduser()
    split = "test" if path.is_dir() and any(path.glob("test.*")) else None
    return load_examples(spec, split=split).examples


def refuse_overlap(train: list[Example], held_out: str | None, flag: str = "--eval-data") -> None:
    """Raise if any row of the evaluation set ``held_out`` is among the training rows.

    ``held_out`` empty or None checks nothing (one line at the start of training).

    Raises:
        DataError: the overlap count, its reasons and the first ids, naming ``flag``.
    """
    if not held_out:
        return
    found = find_overlap(train, held_out_examples(held_out))
    if found:
        raise DataError(f"{flag} {held_out}: {found.describe('evaluation rows', 'the training rows')}. "
                        "Train on rows without them (or evaluate on another set)")


def refuse_cache_overlap(cache: str, eval_sets: Iterable[tuple[str, str, str | None]]) -> None:
    """Raise if any evaluation set shares rows with the rows a teacher cache (hence every run
    trained on it) holds; for ``kvkd sweep``, before any cell.

    Args:
        cache: a teacher cache path or URL.
        eval_sets: ``(name, source, split)`` per evaluation set.
    Raises:
        DataError: names the eval set, the overlap count and the first ids.
    """
    train = cache_training_examples(cache)
    for name, source, split in eval_sets:
        found = find_overlap(train, load_examples(source, split=split).examples)
        if found:
            raise DataError(f"eval set {name}: {found.describe('evaluation rows', 'the rows of cache ' + cache)}. "
                            "Extract the caches from rows without them (or evaluate on another set)")
