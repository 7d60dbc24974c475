"""Stores on object storage (S3, GCS, Azure, ``file://``) through obstore.

:class:`ObjectStorage` implements :class:`~embtools.storage.io.Storage`: manifests are created with
conditional puts (``PutMode "create"``: S3 ``If-None-Match: *``, GCS generation 0, Azure
``If-None-Match: *``), so two writers racing for one version cannot both win; data files are
uploaded before the manifest that names them, read whole or by coalesced byte ranges, and kept in a
local cache folder (``cache_dir``, else a temporary folder removed when the process exits): data
files are immutable (every name is new), so a cached copy never goes stale.

``storage_options`` are obstore's settings (``endpoint``, ``region``, ``access_key_id``,
``secret_access_key``, ``allow_http``, ...; the usual environment variables are read too). They
are split here: client settings (``allow_http``, timeouts, proxies; obstore 0.12 panics when
``allow_http`` reaches the S3 config) go to the client options, ``max_retries``/``retry_timeout``
to the retry settings, the rest to the store's config. Values never appear in messages.

Errors: a missing object is ``FileNotFoundError``; denied or bad credentials
:class:`~embtools.errors.StorageAccessError`; a store that stays unreachable or throttles past the
retries :class:`~embtools.errors.StorageUnavailableError`; bad options
:class:`~embtools.errors.InvalidArgumentError`.

Examples
--------
>>> import tempfile
>>> s = ObjectStorage("file://" + tempfile.mkdtemp())
>>> s.create("_versions/a.json", b"{}"), s.create("_versions/a.json", b"[]")
(True, False)
>>> s.read_ranges("_versions/a.json", [(0, 1)]), [o.key for o in s.list("_versions/")]
([b'{'], ['_versions/a.json'])
>>> s.close()
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from embtools.errors import (
    CorruptStoreError,
    InvalidArgumentError,
    StorageAccessError,
    StorageUnavailableError,
)
from embtools.storage.footer import Footer, FooterError, decode_footer
from embtools.storage.io import ObjectInfo, Storage

__all__ = ["SCHEMES", "ObjectStorage", "split_options"]

SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss", "azure", "file", "memory", "http", "https")
_CLIENT_KEYS = {
    "allow_http", "allow_invalid_certificates", "connect_timeout", "default_content_type",
    "default_headers", "http1_only", "http2_keep_alive_interval", "http2_keep_alive_timeout",
    "http2_keep_alive_while_idle", "http2_only", "pool_idle_timeout", "pool_max_idle_per_host",
    "proxy_url", "proxy_ca_certificate", "proxy_excludes", "randomize_addresses", "read_timeout",
    "root_certificate", "timeout", "user_agent",
}
_RETRY_KEYS = {"max_retries", "retry_timeout"}
_ALIASES = {  # fsspec / boto spellings users bring along
    "endpoint_url": "endpoint", "region_name": "region", "key": "access_key_id",
    "secret": "secret_access_key", "token": "session_token",
    "aws_endpoint_url": "endpoint",
}
_BOOL_CLIENT = {"allow_http", "allow_invalid_certificates", "http1_only", "http2_only",
                "http2_keep_alive_while_idle", "randomize_addresses"}
_SECRET_HINTS = ("secret", "key", "token", "password", "credential", "sas", "signature")
_T = TypeVar("_T")
#: ranges closer than this (and than 1/16 of what they hold) are fetched in one request
COALESCE_BYTES = 16 * 1024
#: the first read of a file's footer fetches this many bytes from its end, at most 1/64 of the
#: file (more when the footer is longer: then a second request)
TAIL_BYTES = 8 * 1024
_RANGES = ".ranges"
_FIXED_MTIME_NS = 10**18  # a partial file's mtime stays put, so the page checks' cache holds


def _obstore() -> Any:
    try:
        import obstore
    except ImportError:  # pragma: no cover - obstore is a dependency
        raise InvalidArgumentError(
            "object-store URLs need obstore: pip install 'embtools[s3]'") from None
    return obstore


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def split_options(options: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(config, client_options, retry_config)`` of user ``storage_options``.

    >>> split_options({"endpoint_url": "http://127.0.0.1:9000", "allow_http": "true",
    ...                "max_retries": 2, "region": "us-east-1"})
    ({'endpoint': 'http://127.0.0.1:9000', 'region': 'us-east-1'}, {'allow_http': True}, {'max_retries': 2})
    """
    if options is None:
        return {}, {}, {}
    if not isinstance(options, Mapping):
        raise InvalidArgumentError(
            f"storage_options must be a dict of settings, got {type(options).__name__}")
    config: dict[str, Any] = {}
    client: dict[str, Any] = {}
    retry: dict[str, Any] = {}
    for raw_key, value in options.items():
        if not isinstance(raw_key, str):
            raise InvalidArgumentError(f"storage_options keys are strings, got {type(raw_key).__name__}")
        key = raw_key.lower()
        key = _ALIASES.get(key, key)
        for prefix in ("aws_", "google_", "azure_"):
            if key.startswith(prefix) and key[len(prefix):] in _CLIENT_KEYS:
                key = key[len(prefix):]
        if key in _CLIENT_KEYS:
            client[key] = _truthy(value) if key in _BOOL_CLIENT else value
        elif key == "max_retries":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgumentError(f"storage option max_retries must be an int >= 0, got {value!r}")
            retry[key] = value
        elif key == "retry_timeout":
            seconds = value.total_seconds() if isinstance(value, _dt.timedelta) else value
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
                raise InvalidArgumentError(
                    f"storage option retry_timeout must be seconds > 0, got {value!r}")
            retry[key] = _dt.timedelta(seconds=float(seconds))
        else:
            config[key] = value
    return config, client, retry


def _secrets(options: Mapping[str, Any] | None) -> list[str]:
    """The option values that must never appear in a message."""
    out = []
    for k, v in (options or {}).items():
        if isinstance(k, str) and any(h in k.lower() for h in _SECRET_HINTS) and isinstance(v, str) and len(v) >= 4:
            out.append(v)
    return out


_FORBIDDEN = re.compile(r"\b403\b|Forbidden|InvalidAccessKeyId|SignatureDoesNotMatch")
"""What an obstore error says when the server refused the credentials."""


class ObjectStorage(Storage):
    """A store under ``url`` (``s3://bucket/prefix``, ``gs://``, ``az://``, ``file://``) via obstore.

    ``cache_dir``: a folder keeping downloaded data files across sessions (one sub-folder per
    store URL); without it, a temporary folder removed when the process exits. Partial copies
    (only the byte ranges read so far) are sparse files with a ``.ranges`` record beside them.
    """

    is_local = False

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
        scheme = url.split("://", 1)[0].lower()
        if scheme not in SCHEMES:
            raise InvalidArgumentError(
                f"unsupported URL scheme {scheme!r} in {url!r}; use one of s3://, gs://, az://, file://")
        self.url = url.rstrip("/")
        config, client, retry = split_options(storage_options)
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        self._secrets = _secrets(storage_options)
        obs = _obstore()
        kwargs: dict[str, Any] = {}
        if config:
            kwargs["config"] = config
        if client:
            kwargs["client_options"] = client
        if retry:
            kwargs["retry_config"] = retry
        if scheme == "file":
            kwargs = {"mkdir": True}
            if config or client or retry:
                raise InvalidArgumentError("file:// URLs take no storage_options")
        try:
            self.store = obs.store.from_url(self.url, **kwargs)
        except BaseException as exc:  # obstore panics (a BaseException) on some settings
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise InvalidArgumentError(
                f"cannot open {self.url!r} with these storage_options "
                f"({self._redact(f'{type(exc).__name__}: {exc}')})") from None
        #: what this handle asked of the store: requests, bytes read, creates refused (lost commit
        #: races), data files uploaded
        self.requests = 0
        self.bytes_read = 0
        self.create_conflicts = 0
        self.uploads = 0
        self._count_lock = threading.Lock()
        self._footers: dict[str, Footer] = {}
        self._locks: dict[str, threading.Lock] = {}
        digest = hashlib.sha256(self.url.encode("utf-8")).hexdigest()[:16]
        base = _process_cache() if cache_dir is None else os.fspath(cache_dir)
        self.local_root = os.path.join(base, digest)
        os.makedirs(self.local_root, exist_ok=True)

    # -- errors ------------------------------------------------------------------------------
    def _redact(self, text: str) -> str:
        """The first part of an obstore message, without any secret option value."""
        text = text.split("Debug source:")[0]
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return " ".join(text.split())[:400]

    def _call(self, what: str, key: str, fn: Callable[[], _T]) -> _T:
        """Run one obstore call, translating its errors (see the module doc)."""
        from obstore import exceptions as ex

        try:
            return fn()
        except (ex.NotFoundError, FileNotFoundError):
            raise FileNotFoundError(f"{self.display(key)}: no such object") from None
        except (ex.PermissionDeniedError, ex.UnauthenticatedError) as exc:
            raise StorageAccessError(
                f"{self.display(key)}: {what} refused: check the credentials and permissions "
                f"({self._redact(str(exc))})") from None
        except (ex.UnknownConfigurationKeyError, ex.InvalidPathError) as exc:
            raise InvalidArgumentError(f"{self.display(key)}: {self._redact(str(exc))}") from None
        except (ex.BaseError, OSError, TimeoutError) as exc:
            text = self._redact(str(exc))
            # a whole-word 403: bucket names and timings in the message may contain those digits
            if _FORBIDDEN.search(text):
                raise StorageAccessError(
                    f"{self.display(key)}: {what} refused: check the credentials and permissions "
                    f"({text})") from None
            raise StorageUnavailableError(
                f"{self.display(key)}: {what} failed after retries ({type(exc).__name__}: {text})"
            ) from None

    def _count(self, nbytes: int, requests: int = 1) -> None:
        with self._count_lock:
            self.requests += requests
            self.bytes_read += nbytes

    # -- Storage -----------------------------------------------------------------------------
    def read(self, key: str) -> bytes:
        obs = _obstore()
        data = self._call("read", key, lambda: bytes(obs.get(self.store, key).bytes()))
        self._count(len(data))
        return data

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        obs = _obstore()
        wanted = [(int(a), int(b)) for a, b in ranges]
        nonempty = [(a, b) for a, b in wanted if b > a]
        got: dict[tuple[int, int], bytes] = {}
        if nonempty:
            starts = [a for a, _ in nonempty]
            ends = [b for _, b in nonempty]
            parts = self._call("read", key, lambda: obs.get_ranges(self.store, key, starts=starts,
                                                                    ends=ends, coalesce=0))
            got = {r: bytes(p) for r, p in zip(nonempty, parts, strict=True)}
            self._count(sum(b - a for a, b in nonempty), len(nonempty))
            for (a, b), p in got.items():
                if len(p) != b - a:
                    raise CorruptStoreError(
                        f"{self.display(key)}: a range read returned {len(p)} bytes, not {b - a}")
        return [got.get((a, b), b"") for a, b in wanted]

    def put(self, key: str, data: bytes) -> None:
        obs = _obstore()
        self._call("write", key, lambda: obs.put(self.store, key, data))

    def create(self, key: str, data: bytes) -> bool:
        from obstore import exceptions as ex

        obs = _obstore()

        def put() -> bool:
            try:
                obs.put(self.store, key, data, mode="create")
            except (ex.AlreadyExistsError, ex.PreconditionError):
                with self._count_lock:
                    self.create_conflicts += 1
                return False
            return True

        return self._call("create", key, put)

    def list(self, prefix: str, after: str | None = None) -> list[ObjectInfo]:
        obs = _obstore()
        folder = prefix.rpartition("/")[0]

        def run() -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            for chunk in obs.list(self.store, prefix=folder or None, offset=after):
                out.extend(chunk)
            return out

        metas = self._call("list", folder, run)
        self._count(0)
        objects = [ObjectInfo(str(m["path"]), int(m["size"]), m["last_modified"].timestamp())
                   for m in metas if str(m["path"]).startswith(prefix)]
        return sorted(objects, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        obs = _obstore()
        with contextlib.suppress(FileNotFoundError):
            self._call("delete", key, lambda: obs.delete(self.store, key))

    def head(self, key: str) -> ObjectInfo:
        obs = _obstore()
        meta = self._call("head", key, lambda: obs.head(self.store, key))
        self._count(0)
        return ObjectInfo(key, int(meta["size"]), meta["last_modified"].timestamp())

    # -- data files on this machine ----------------------------------------------------------
    def fetch(self, key: str) -> str:
        path = self.local_path(key)
        if os.path.exists(path) and not os.path.exists(path + _RANGES):
            return path
        obs = _obstore()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.part"

        def download() -> int:
            result = obs.get(self.store, key)
            n = 0
            with open(tmp, "wb") as fh:
                for chunk in _chunks(result):
                    fh.write(chunk)
                    n += len(chunk)
            return n

        try:
            n = self._call("read", key, download)
            with self._file_lock(key):
                os.replace(tmp, path)  # the whole file, replacing a partial copy
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path + _RANGES)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._count(n)
        return path

    # -- byte ranges of data files -----------------------------------------------------------
    def prefetch(self, key: str, size: int, columns: Collection[str] | None = (),
                 row_groups: Collection[int] | None = None) -> str:
        path = self.local_path(key)
        if os.path.exists(path) and not os.path.exists(path + _RANGES):
            return path  # the whole file is here
        footer = self.footer(key, size)
        wanted = None if columns is None else set(columns)
        ranges = [(c.start, c.start + c.length)
                  for g, (_, chunks) in enumerate(footer.row_groups)
                  if row_groups is None or g in row_groups
                  for c in chunks if wanted is None or c.name in wanted]
        self._ensure(key, size, ranges)
        return path

    def footer(self, key: str, size: int) -> Footer:
        """The decoded footer of data file ``key`` (fetching the file's first 4 bytes and everything
        from the end of its data to its end, when not here yet)."""
        with self._count_lock:
            cached = self._footers.get(key)
        if cached is not None:
            return cached
        if size < 12:
            raise CorruptStoreError(f"{self.display(key)}: {size} bytes is too short for Parquet")
        tail_start = max(0, size - max(1024, min(TAIL_BYTES, size // 64)))
        self._ensure(key, size, [(0, 4), (tail_start, size)])
        path = self.local_path(key)
        with open(path, "rb") as fh:
            fh.seek(size - 8)
            n = int.from_bytes(fh.read(4), "little")
            if n > size - 12:
                raise CorruptStoreError(f"{self.display(key)}: bad Parquet magic or footer length")
            if size - 8 - n < tail_start:
                self._ensure(key, size, [(size - 8 - n, size)])
            fh.seek(size - 8 - n)
            raw = fh.read(n)
        try:
            footer = decode_footer(raw, size)
        except FooterError as exc:
            raise CorruptStoreError(f"{self.display(key)}: bad footer: {exc}") from None
        self._ensure(key, size, [(footer.data_end, size)])  # page indexes, if any, with the footer
        with self._count_lock:
            self._footers[key] = footer
        return footer

    def _ensure(self, key: str, size: int, ranges: Sequence[tuple[int, int]]) -> None:
        """Fetch the parts of ``ranges`` the local (sparse) copy of ``key`` lacks, coalesced."""
        path = self.local_path(key)
        marker = path + _RANGES
        with self._file_lock(key):
            if os.path.exists(path) and not os.path.exists(marker):
                return
            have = _read_marker(marker) if os.path.exists(path) else []
            missing = _coalesce(_subtract(sorted((max(0, a), min(size, b)) for a, b in ranges if b > a),
                                          have))
            if not missing:
                return
            try:
                parts = self.read_ranges(key, missing)
            except (StorageUnavailableError, CorruptStoreError):
                actual = self.head(key).size   # a truncated or replaced object: damage, not a fault
                if actual != size:
                    raise CorruptStoreError(
                        f"{self.display(key)}: {actual} bytes, the manifest says {size}") from None
                raise
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not os.path.exists(path):
                _write_marker(marker, [])  # first: a copy without a marker is a whole file
                with contextlib.suppress(FileExistsError):  # another process made it meanwhile
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                    os.ftruncate(fd, size)
                    os.close(fd)
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                for (a, b), data in zip(missing, parts, strict=True):
                    if len(data) != b - a:
                        raise CorruptStoreError(f"{self.display(key)}: short range read")
                    os.pwrite(fd, data, a)
            finally:
                os.close(fd)
            os.utime(path, ns=(_FIXED_MTIME_NS, _FIXED_MTIME_NS))
            _write_marker(marker, _merge([*have, *missing]))

    def _file_lock(self, key: str) -> threading.Lock:
        with self._count_lock:
            return self._locks.setdefault(key, threading.Lock())

    def upload(self, key: str) -> None:
        obs = _obstore()
        path = self.local_path(key)
        self._call("write", key, lambda: obs.put(self.store, key, path))
        with self._count_lock:
            self.uploads += 1



_PROCESS_CACHE: list[str] = []


def _process_cache() -> str:
    """This process's temporary cache folder (removed when the process exits): lazy frames over
    a store's files may outlive the store object, so its copies stay until then."""
    with _CACHE_LOCK:
        if not _PROCESS_CACHE:
            folder = tempfile.mkdtemp(prefix="embtools-cache-")
            atexit.register(shutil.rmtree, folder, True)
            _PROCESS_CACHE.append(folder)
        return _PROCESS_CACHE[0]


_CACHE_LOCK = threading.Lock()


def _chunks(result: Any) -> Iterator[bytes]:
    for chunk in result:
        yield bytes(chunk)


def _subtract(ranges: Sequence[tuple[int, int]], have: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of sorted ``ranges`` not covered by the sorted, disjoint ``have``."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        for h0, h1 in have:
            if h1 <= a or h0 >= b:
                continue
            if h0 > a:
                out.append((a, h0))
            a = max(a, h1)
            if a >= b:
                break
        if a < b:
            out.append((a, b))
    return _merge(out)


def _merge(ranges: Sequence[tuple[int, int]], gap: int = 0) -> list[tuple[int, int]]:
    """Sorted ranges merged where they overlap or lie at most ``gap`` bytes apart."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + gap:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _coalesce(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ranges merged into one request where the gap between them is small: at most
    :data:`COALESCE_BYTES` and at most 1/16 of the bytes the merged request wants, so that a
    read fetches at most about 6% more than it needs.

    >>> _coalesce([(0, 100), (110, 200), (10_000, 10_050)])
    [(0, 200), (10000, 10050)]
    """
    out: list[tuple[int, int]] = []
    wanted: list[int] = []
    for a, b in _merge(ranges):
        if out and a - out[-1][1] <= min(COALESCE_BYTES, (wanted[-1] + b - a) // 16):
            out[-1] = (out[-1][0], b)
            wanted[-1] += b - a
        else:
            out.append((a, b))
            wanted.append(b - a)
    return out


def _read_marker(path: str) -> list[tuple[int, int]]:
    """The byte ranges a partial copy holds (recorded next to it; unreadable: none)."""
    try:
        with open(path, encoding="ascii") as fh:
            data = json.load(fh)
        return _merge([(int(a), int(b)) for a, b in data])
    except (OSError, ValueError, TypeError):
        return []


def _write_marker(path: str, ranges: Sequence[tuple[int, int]]) -> None:
    tmp = f"{path}.{uuid.uuid4().hex}"
    with open(tmp, "w", encoding="ascii") as fh:
        json.dump([list(r) for r in ranges], fh)
    os.replace(tmp, path)
