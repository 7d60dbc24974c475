"""``small_frame`` builds through polars' typed column constructors the frame its public
constructors build (the same schema, values and float bits), and falls back to the public path
when the typed ones are missing or differ."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from embtools.storage import small_frame as sf


@pytest.fixture(autouse=True)
def _fresh_builder():
    sf._builder.cache_clear()
    yield
    sf._builder.cache_clear()


def _columns(rng, n: int) -> list:
    texts = [None if i % 4 == 1 else ("", "é€😀", "x" * i, f"t{i}")[i % 4] for i in range(n)]
    scores = rng.standard_normal(n).astype(np.float32)
    scores[: n // 3] = np.nan
    return [("query", pl.Int64, np.repeat(np.arange(2), n)[:n]),
            ("row_id", pl.Int64, [None if i % 5 == 2 else int(x) for i, x in enumerate(rng.integers(-2**62, 2**62, n))]),
            ("text_id", pl.String, texts), ("label", pl.String, [None] * n),
            ("score", pl.Float32, scores)]


@pytest.mark.parametrize("n", [0, 1, 10, 300])
def test_the_typed_constructors_build_the_public_frame(rng, n):
    cols = _columns(rng, n)
    got, want = sf.small_frame(cols), sf._public(cols)
    assert sf._builder() is not sf._public  # this polars has them: the typed path ran
    assert got.schema == want.schema == pl.Schema({"query": pl.Int64, "row_id": pl.Int64,
                                                   "text_id": pl.String, "label": pl.String,
                                                   "score": pl.Float32})
    assert sf._same(got, want)
    assert got["text_id"].to_list() == cols[2][2] and got["row_id"].to_list() == cols[1][2]
    np.testing.assert_array_equal(got["score"].to_numpy().view(np.uint32), cols[4][2].view(np.uint32))


def test_a_non_contiguous_or_other_typed_array_is_converted(rng):
    ids = np.arange(20, dtype=np.int32)[::2]
    scores = np.arange(20, dtype=np.float64)[::2]
    got = sf.small_frame([("i", pl.Int64, ids), ("s", pl.Float32, scores)])
    assert got.schema == pl.Schema({"i": pl.Int64, "s": pl.Float32})
    assert got["i"].to_list() == ids.tolist() and got["s"].to_list() == scores.tolist()


def test_falls_back_to_the_public_constructors(monkeypatch, rng):
    monkeypatch.setattr(sf, "_typed_constructors", lambda: None)  # an older or newer polars
    assert sf._builder() is sf._public
    cols = _columns(rng, 7)
    assert sf._same(sf.small_frame(cols), sf._public(cols))
    sf._builder.cache_clear()

    def wrong(columns):  # typed constructors that build something else (a changed signature)
        return sf._public([(name, pl.Float64 if dtype == pl.Float32 else dtype, values)
                           for name, dtype, values in columns])
    monkeypatch.setattr(sf, "_typed_constructors", lambda: wrong)
    assert sf._builder() is sf._public
    sf._builder.cache_clear()

    def broken(columns):
        raise TypeError("new_str() takes 2 positional arguments")
    monkeypatch.setattr(sf, "_typed_constructors", lambda: broken)
    assert sf._builder() is sf._public
