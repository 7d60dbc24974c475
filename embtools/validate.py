"""Installation check: ``python -m embtools.validate`` (also ``embtools validate``).

Checks the imports, every installed compute backend (against a NumPy float64 reference), a store
round trip on disk with a search, and config hashing. Prints one line per check and a summary;
exits 0 only when every check passes.

Examples
--------
>>> from embtools.validate import main
>>> main([])  # doctest: +SKIP
0
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["CheckResult", "main", "run_checks"]


@dataclass
class CheckResult:
    """The outcome of one check."""

    name: str
    ok: bool
    detail: str
    seconds: float


def _check_imports() -> str:
    import numpy
    import polars
    import pyarrow

    import embtools

    return (
        f"embtools {embtools.__version__}, numpy {numpy.__version__}, "
        f"pyarrow {pyarrow.__version__}, polars {polars.__version__}"
    )


def _reference_top_k(queries, corpus, k):  # type: ignore[no-untyped-def]
    import numpy as np

    q = queries.astype(np.float64)
    c = corpus.astype(np.float64)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-300)
    c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-300)
    sims = q @ c.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def _backend_check(name: str, device: str | None) -> Callable[[], str]:
    def check() -> str:
        import numpy as np

        from embtools.backends import get_backend

        backend = get_backend(name, device=device)
        rng = np.random.default_rng()
        queries = rng.standard_normal((5, 32)).astype(np.float32)
        corpus = rng.standard_normal((200, 32)).astype(np.float32)
        indices, sims = backend.top_k_cosine_neighbors(
            backend.from_numpy(queries), backend.from_numpy(corpus), 7
        )
        ref_idx, ref_sims = _reference_top_k(queries, corpus, 7)
        if not np.array_equal(np.asarray(backend.to_numpy(indices)), ref_idx):
            raise AssertionError("top-k indices differ from the NumPy float64 reference")
        err = float(np.abs(np.asarray(backend.to_numpy(sims)) - ref_sims).max())
        if err > 1e-4:
            raise AssertionError(f"similarities differ from the reference by {err:.2e}")
        return f"device {backend.device}, top-k matches the float64 reference (max error {err:.1e})"

    return check


def _check_store() -> str:
    import numpy as np

    from embtools.store import EmbeddingStore

    rng = np.random.default_rng()
    vectors = rng.standard_normal((300, 64)).astype(np.float32)
    ids = [f"doc-{i}" for i in range(len(vectors))]
    with tempfile.TemporaryDirectory(prefix="embtools-validate-") as tmp:
        store = EmbeddingStore(f"{tmp}/store")
        store.add(vectors, text_ids=ids, labels=["a", "b", "c"] * 100)
        reopened = EmbeddingStore(f"{tmp}/store", backend="numpy")
        back = np.asarray(reopened.backend.to_numpy(reopened.get_embeddings(64)))
        if not np.array_equal(back, vectors):
            raise AssertionError("embeddings read back differ from those written")
        hits = reopened.search(vectors[:3], k=1)
        if hits["text_id"].to_list() != ids[:3]:
            raise AssertionError("a stored vector is not its own nearest neighbour")
        return f"wrote {len(vectors)} rows, read back bit-identical, search finds each row itself"


def _check_config() -> str:
    from embtools.config import compute_config_hash, compute_param_hash

    a = compute_config_hash({"model": "m", "dims": [64, 384]})
    if a != compute_param_hash(dims=(64, 384), model="m"):
        raise AssertionError("hash depends on key order or container type")
    expected = hashlib.sha256(b'{"dims":[64,384],"model":"m"}').hexdigest()[:16]
    if a != expected:
        raise AssertionError(f"hash {a} differs from the canonical SHA-256 {expected}")
    return f"compute_config_hash -> {a}"


def _checks() -> list[tuple[str, Callable[[], str]]]:
    checks: list[tuple[str, Callable[[], str]]] = [("imports", _check_imports)]
    try:
        from embtools.backends import available_backends

        names = available_backends()
    except Exception:  # reported by the backends check below
        names = ["numpy"]
    for name in names:
        checks.append((f"backend {name}", _backend_check(name, None)))
        if name == "torch":
            checks.append(("backend torch (cpu)", _backend_check("torch", "cpu")))
    checks.append(("store round trip", _check_store))
    checks.append(("config hashing", _check_config))
    return checks


def run_checks() -> list[CheckResult]:
    """Run every check and return the results (never raises)."""
    results = []
    for name, check in _checks():
        start = time.perf_counter()
        try:
            detail, ok = check(), True
        except Exception as err:
            detail, ok = f"{type(err).__name__}: {err}", False
            if "-v" in sys.argv:
                traceback.print_exc()
        results.append(CheckResult(name, ok, detail, time.perf_counter() - start))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Print the checks and a summary; return 0 when all pass, 1 otherwise."""
    del argv  # no options yet; kept for the CLI's sake
    results = run_checks()
    for r in results:
        mark = "PASS" if r.ok else "FAIL"
        print(f"[{mark}] {r.name:<22} {r.detail} ({r.seconds:.2f}s)")
    failed = [r.name for r in results if not r.ok]
    passed = len(results) - len(failed)
    print(f"{passed} passed, {len(failed)} failed")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
