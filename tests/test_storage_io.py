"""The storage I/O interface: one conformance class (``StorageTests``) run against every
implementation (a local directory here; S3 and ``file://`` through obstore in
``tests/test_object_store.py``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from embtools.storage.io import LocalStorage, Storage, as_storage, is_url


class StorageTests:
    """Subclass with a ``storage`` fixture returning an empty :class:`Storage`."""

    @pytest.fixture
    def storage(self, tmp_path: Path) -> Iterator[Storage]:  # pragma: no cover - overridden
        raise NotImplementedError

    def test_put_read_and_ranges(self, storage: Storage) -> None:
        data = bytes(range(256)) * 40
        storage.put("data/a.parquet", data)
        assert storage.read("data/a.parquet") == data
        ranges = [(0, 10), (10, 20), (5000, 5003), (100, 100), (10230, 10240)]
        assert storage.read_ranges("data/a.parquet", ranges) == [data[a:b] for a, b in ranges]
        info = storage.head("data/a.parquet")
        assert (info.key, info.size) == ("data/a.parquet", len(data)) and info.mtime > 0
        storage.put("data/a.parquet", b"replaced")
        assert storage.read("data/a.parquet") == b"replaced"

    def test_missing_objects_are_file_not_found(self, storage: Storage) -> None:
        with pytest.raises(FileNotFoundError):
            storage.read("data/none.parquet")
        with pytest.raises(FileNotFoundError):
            storage.head("_versions/none.json")
        assert not storage.exists("data/none.parquet")
        storage.delete("data/none.parquet")              # removing a missing object is fine

    def test_create_only_once(self, storage: Storage) -> None:
        assert storage.create("_versions/00000000000000000001.json", b"first")
        assert not storage.create("_versions/00000000000000000001.json", b"second")
        assert storage.read("_versions/00000000000000000001.json") == b"first"

    def test_racing_creates_have_one_winner(self, storage: Storage) -> None:
        wins: list[int] = []
        lock = threading.Lock()

        def create(i: int) -> None:
            if storage.create("_versions/00000000000000000007.json", str(i).encode()):
                with lock:
                    wins.append(i)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1
        assert storage.read("_versions/00000000000000000007.json") == str(wins[0]).encode()

    def test_list_by_prefix_sorted_and_after(self, storage: Storage) -> None:
        for v in (3, 1, 2):
            assert storage.create(f"_versions/{v:020d}.json", b"{}")
        storage.put("data/x.parquet", b"12345")
        keys = [o.key for o in storage.list("_versions/")]
        assert keys == [f"_versions/{v:020d}.json" for v in (1, 2, 3)]
        assert [o.key for o in storage.list("_versions/", after=f"_versions/{1:020d}.json")] == keys[1:]
        assert [(o.key, o.size) for o in storage.list("data/")] == [("data/x.parquet", 5)]
        assert storage.list("nothing/") == []
        storage.delete("data/x.parquet")
        assert storage.list("data/") == []

    def test_fetch_and_upload_round_trip(self, storage: Storage) -> None:
        path = Path(storage.local_path("data/b.parquet"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"PAR1 local bytes")
        storage.upload("data/b.parquet")
        assert storage.read("data/b.parquet") == b"PAR1 local bytes"
        assert Path(storage.fetch("data/b.parquet")).read_bytes() == b"PAR1 local bytes"
        try:                                             # a directory returns the (missing) path
            missing = storage.fetch("data/never-written.parquet")
        except FileNotFoundError:
            pass
        else:
            assert not Path(missing).exists()


class TestLocalStorage(StorageTests):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> Iterator[Storage]:
        yield LocalStorage(tmp_path / "store")


def test_as_storage_and_is_url(tmp_path: Path) -> None:
    s = as_storage(tmp_path)
    assert isinstance(s, LocalStorage) and s.local_root == str(tmp_path) and as_storage(s) is s
    assert is_url("s3://bucket/x") and is_url("file:///tmp/x") and is_url("gs://b/p")
    assert not is_url("/tmp/x") and not is_url("relative/dir") and not is_url("C:\\x") and not is_url(3)
