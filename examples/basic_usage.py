"""The five examples of the original ``embedding_tools`` package, on embtools' public API.

1. array backend operations, on every backend installed here (NumPy, PyTorch, MLX);
2. ``EmbeddingStore`` usage: an in-memory store with ids and labels, similarity search, memory info;
3. Matryoshka slicing: prefixes of the stored vectors, re-normalised;
4. configuration versioning: ``compute_config_hash`` / ``compute_param_hash``;
5. cross-backend conversion with ``convert``.

All data is generated; nothing is downloaded. Run it with::

    python examples/basic_usage.py
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

import embtools as et


def array_backends() -> None:
    print("== 1. array backend operations ==")
    print(f"installed backends: {et.available_backends()}")
    data = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    reference = unit[:2] @ unit.T  # cosine similarities computed with plain NumPy
    for name in et.available_backends():
        b = et.get_backend(name, device="cpu")
        r = b.random_normal((3, 4), seed=0)  # each framework's own generator
        x = b.create_array(data)  # six 8-dim vectors, the same on every backend
        a = b.create_array([[1.0, 2.0], [3.0, 4.0]])
        xn = b.normalize(x)
        sims = b.cosine_similarity(x[:2], x)  # (2, 6)
        idx, top = b.top_k_cosine_neighbors(x[:2], x, k=2)
        print(
            f"{b.name:>5} on {b.device}: array type {type(x).__module__}.{type(x).__name__}, "
            f"shape {b.get_shape(x)}, dtype {b.get_dtype(x)}, {b.get_memory_usage(x)} bytes"
        )
        print(f"      random_normal((3, 4), seed=0) -> {b.get_shape(r)} {b.get_dtype(r)}")
        print(f"      dot(a, a) = {b.to_numpy(b.dot(a, a)).tolist()}")
        norms = np.linalg.norm(b.to_numpy(xn), axis=1)
        print(f"      normalize -> row norms {np.round(norms.astype(float), 4).tolist()}")
        same = bool(np.allclose(b.to_numpy(sims), reference, atol=1e-5))
        print(f"      cosine_similarity(x[:2], x) shape {b.get_shape(sims)}, "
              f"matches the NumPy reference: {same}")
        print(f"      top_k_cosine_neighbors: indices {b.to_numpy(idx).tolist()}, "
              f"similarities {np.round(b.to_numpy(top).astype(float), 3).tolist()}")
        with tempfile.TemporaryDirectory() as tmp:
            b.save(x, os.path.join(tmp, "x.npy"))  # .npy/.npz only, never pickle
            loaded = b.load(os.path.join(tmp, "x.npy"))
        print(f"      save/load .npy round trip equal: "
              f"{bool(np.array_equal(b.to_numpy(loaded), data))}")
        parts = [b.zeros((1, 8)), b.ones((1, 8)), b.slice_last_dim(x, 4)]
        print(f"      zeros/ones/concatenate/stack: {b.get_shape(b.concatenate(parts[:2]))} "
              f"{b.get_shape(b.stack(parts[:2]))}; slice_last_dim(x, 4) -> {b.get_shape(parts[2])}")


def store_usage() -> None:
    print("\n== 2. EmbeddingStore usage ==")
    rng = np.random.default_rng(0)
    n, d = 1000, 384
    vectors = rng.standard_normal((n, d)).astype(np.float32)
    ids = [f"doc-{i:04d}" for i in range(n)]
    labels = ["even" if i % 2 == 0 else "odd" for i in range(n)]
    # path=None keeps the store in memory (the seed's form); backend="numpy" works everywhere
    store = et.EmbeddingStore(backend="numpy", max_memory_gb=1.0)
    version = store.add_embeddings(vectors, dimension=d, text_ids=ids, labels=labels)
    print(f"added {store.num_rows} rows of dimension {d} -> version {version}: {store!r}")

    query = vectors[42] + 0.05 * rng.standard_normal(d).astype(np.float32)  # close to doc-0042
    sims, indices = store.compute_similarity(query, dimension=d, top_k=3)
    print(f"compute_similarity top 3: indices {indices.tolist()}, "
          f"similarities {np.round(store.backend.to_numpy(sims).astype(float), 3).tolist()}")
    hits = store.search(query, k=3, dimension=d)
    print(f"store.search top hit: {hits['text_id'][0]} (label {hits['label'][0]}, "
          f"score {hits['score'][0]:.3f})")
    info = store.get_memory_info()
    print(f"memory: {info['held_bytes'] / 1024**2:.2f} MiB held of a "
          f"{info['max_memory_gb']} GB cap ({info['usage_percent']:.2f}%)")


def matryoshka() -> None:
    print("\n== 3. Matryoshka slicing ==")
    rng = np.random.default_rng(1)
    full = rng.standard_normal((200, 256)).astype(np.float32)
    store = et.EmbeddingStore(backend="numpy")
    store.add({256: full, 64: full[:, :64]}, text_ids=[f"t{i}" for i in range(200)])
    print(f"stored dimensions: {store.dimensions}")
    for target in (32, 64, 128):
        # first `target` values, re-normalised to unit length (the default is the raw prefix)
        sliced = store.slice_to_dimension(256, target, normalize=True)
        norms = np.linalg.norm(store.backend.to_numpy(sliced), axis=1)
        print(f"slice_to_dimension(256, {target}) -> shape {store.backend.get_shape(sliced)}, "
              f"norms in [{norms.min():.4f}, {norms.max():.4f}]")
    q = full[7]
    for dim in (32, 64, 256):  # a prefix of a stored dimension can be searched directly
        top = store.search(q[:dim], k=1, dimension=dim)["text_id"][0]
        print(f"search with the {dim}-dim prefix of t7 -> top hit {top}")


def config_versioning() -> None:
    print("\n== 4. configuration versioning ==")
    config = {"model": "all-MiniLM-L6-v2", "dims": [64, 128, 384], "normalize": True}
    h1 = et.compute_config_hash(config)
    h2 = et.compute_config_hash({"normalize": True, "dims": (64, 128, 384),
                                 "model": "all-MiniLM-L6-v2"})
    h3 = et.compute_param_hash(model="all-MiniLM-L6-v2", dims=[64, 128, 384], normalize=True)
    h4 = et.compute_config_hash({**config, "dims": [64, 384]})
    print(f"config hash:                     {h1}")
    print(f"same config, other key order:    {h2} (equal: {h1 == h2})")
    print(f"compute_param_hash(**config):    {h3} (equal: {h1 == h3})")
    print(f"different dims:                  {h4} (equal: {h1 == h4})")
    print(f"e.g. a cache file name: embeddings-{h1}.parquet")


def conversion() -> None:
    print("\n== 5. cross-backend conversion ==")
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    names = et.available_backends()
    for src in names:
        x = et.convert(a, src)
        for dst in names:
            y = et.convert(x, dst)
            back = et.convert(y, "numpy")
            print(f"{src:>5} -> {dst:<5}: {type(y).__module__}.{type(y).__name__}, "
                  f"round trip equal: {bool(np.array_equal(back, a))}")


def main() -> None:
    array_backends()
    store_usage()
    matryoshka()
    config_versioning()
    conversion()
    print("\nbasic_usage: all five examples ran")


if __name__ == "__main__":
    main()
