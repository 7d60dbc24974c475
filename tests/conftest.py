"""Shared fixtures: a replayable random generator and real stores (on disk or in memory).

Helper functions (data generators, the float64 brute force, ``check_top_k``) live in
:mod:`tests.helpers`; the crash and concurrency tests' writer child in ``tests/_store_writer.py``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embtools as et

# Ray reads these when it is first imported (a doctest or a test module may import it before
# tests/test_ray.py starts its cluster): the local node binds 127.0.0.1 and reports no usage.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture
def rng() -> np.random.Generator:
    """A generator seeded from ``EMBTOOLS_TEST_SEED`` or fresh entropy (printed, to replay)."""
    seed = int(os.environ.get("EMBTOOLS_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"random seed: {seed} (replay with EMBTOOLS_TEST_SEED={seed})")
    return np.random.default_rng(seed)


@pytest.fixture(params=["disk", "memory"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """``"disk"`` (a store directory in tmp_path) and ``"memory"`` (``path=None``)."""
    return str(request.param)


@pytest.fixture
def new_store(tmp_path: Path) -> Iterator[Callable[..., et.EmbeddingStore]]:
    """``new_store(kind, **kwargs)``: a fresh EmbeddingStore of that kind (closed at teardown)."""
    made: list[et.EmbeddingStore] = []
    count = 0

    def make(kind: str = "disk", **kwargs: Any) -> et.EmbeddingStore:
        nonlocal count
        count += 1
        path = tmp_path / f"store{count}" if kind == "disk" else None
        kwargs.setdefault("backend", "numpy")
        store = et.EmbeddingStore(path, **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


# -- object storage: a local S3 server (moto) ------------------------------------------------------

S3_KEY, S3_SECRET = "AKIDEMBTOOLSTEST", "embtools-test-secret-value"


@dataclass
class S3Server:
    """A moto S3 server on 127.0.0.1: ``endpoint``, the client options, ``bucket()`` makes a bucket."""

    endpoint: str
    server: Any = field(repr=False)

    def options(self, **extra: Any) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "allow_http": True, "access_key_id": S3_KEY,
                "secret_access_key": S3_SECRET, "region": "us-east-1", **extra}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY,
                            aws_secret_access_key=S3_SECRET, region_name="us-east-1")

    def bucket(self) -> str:
        name = f"b{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's ThreadedMotoServer on 127.0.0.1 (a free port), for the whole session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(f"http://{host}:{port}", server)
    finally:
        server.stop()


@dataclass
class Location:
    """Where a test's stores live: ``kind`` "dir" (tmp_path) or "s3" (a fresh moto bucket)."""

    kind: str
    base: str
    options: dict[str, Any] | None

    def url(self, name: str = "s") -> str:
        return f"{self.base}/{name}"

    def open(self, name: str = "s", **kwargs: Any) -> et.EmbeddingStore:
        """``EmbeddingStore`` of store ``name`` here (``storage_options`` added for S3)."""
        if self.options is not None:
            kwargs.setdefault("storage_options", self.options)
        return et.EmbeddingStore(self.url(name), **kwargs)


@pytest.fixture(params=["dir", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """The same store tests on a local directory and on S3 (moto)."""
    if request.param == "dir":
        return Location("dir", str(tmp_path), None)
    server: S3Server = request.getfixturevalue("s3_server")
    return Location("s3", f"s3://{server.bucket()}", server.options())
