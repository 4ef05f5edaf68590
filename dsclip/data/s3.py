"""Opening shards as byte streams: S3 (fsspec/s3fs), http(s), local files and ``pipe:`` commands.

Remote shards stream through ``RetryingReader``: a transient failure (5xx, reset connection,
timeout, refused connection) re-opens the object at the byte offset already delivered and
carries on, with exponential backoff, so the tar parser above never notices.  After
``retries`` consecutive failures without progress the shard is given up (``ShardReadError``)
and the caller counts it as skipped.  The default schedule (``backoff_delays``: 0.25 s doubling,
capped at 8 s, 10 retries) waits 47.75 s in all, so a storage outage of 30 s is ridden out.  Memory stays bounded by one read-ahead block per open
shard; nothing is written to disk.

Credentials come from the standard AWS chain (environment, profile, instance metadata); the
endpoint from ``--s3-endpoint-url`` or ``AWS_ENDPOINT_URL``.  Messages never include
credentials: URLs are masked before they are printed.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import queue
import shlex
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import IO, Any

from ..config import ConfigError, mask_url_credentials

log = logging.getLogger(__name__)

# 8 MiB range reads: large enough that per-request latency is noise next to decode time,
# small enough that a few open shards per worker stay well under 100 MB.
DEFAULT_BLOCK_SIZE = 8 << 20
DEFAULT_RETRIES = 10
DEFAULT_BACKOFF, DEFAULT_MAX_BACKOFF = 0.25, 8.0


def backoff_delays(retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
                   max_backoff: float = DEFAULT_MAX_BACKOFF) -> list[float]:
    """The sleep before each retry: ``backoff`` doubling, capped at ``max_backoff``."""
    return [min(max_backoff, backoff * 2 ** i) for i in range(retries)]


class ShardReadError(OSError):
    """A shard could not be read even after retries."""


class StorageAuthError(ShardReadError):
    """Storage refused the credentials (expired, invalid or missing).  Every other shard would
    fail the same way, so this stops the run instead of skipping the shard."""


def safe_url(url: str) -> str:
    """The URL with any ``user:password@`` part hidden."""
    return mask_url_credentials(url)


def s3_endpoint(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


_FILESYSTEMS: dict = {}


def s3_filesystem(endpoint: str | None = None):
    """One s3fs filesystem per (process, endpoint).

    botocore does not retry here and s3fs only retries its own short list: ``RetryingReader``
    owns the backoff so a shard resumes at its offset and every retry is counted.
    """
    import s3fs

    key = (os.getpid(), endpoint)
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
        fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True, use_listings_cache=False,
                               config_kwargs={"retries": {"max_attempts": 1, "mode": "standard"},
                                              "connect_timeout": 10, "read_timeout": 60})
        fs.retries = 1  # s3fs's own retry loop (a class attribute, not a constructor argument)
        _FILESYSTEMS[key] = fs
    return fs


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    return bucket, key


def is_permanent(exc: BaseException) -> bool:
    """Errors that retrying cannot fix: missing object, denied access, bad request."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, ConfigError)):
        return True
    if isinstance(exc, urllib.error.HTTPError):
        return 400 <= exc.code < 500 and exc.code not in (408, 429)
    name = type(exc).__name__
    return name in ("NoCredentialsError", "PartialCredentialsError", "ParamValidationError")


_AUTH_CODES = ("ExpiredToken", "InvalidToken", "TokenRefreshRequired", "InvalidAccessKeyId",
               "SignatureDoesNotMatch", "RequestTimeTooSkewed", "AccessDenied")


def auth_failure(exc: BaseException) -> str | None:
    """Why ``exc`` means the credentials were refused, or None.

    S3 answers a HEAD request without a body, so an expired session token shows up only as
    "400 Bad Request" there (s3fs turns it into ``OSError(EINVAL)``); with a body the code
    (``ExpiredToken``, ``InvalidAccessKeyId``, ...) is named."""
    text = f"{type(exc).__name__}: {exc}"
    code = next((c for c in _AUTH_CODES if c in text), None)
    if code is not None:
        return code
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return type(exc).__name__
    if isinstance(exc, PermissionError):
        return f"access denied: {str(exc)[:120]}"
    if isinstance(exc, urllib.error.HTTPError) and exc.code in (401, 403):
        return f"HTTP {exc.code}"
    if isinstance(exc, OSError) and exc.errno == errno.EINVAL and "Bad Request" in str(exc):
        return "400 Bad Request (S3 sends no error code for HEAD requests; usually an expired session token)"
    return None


class RetryingReader(io.RawIOBase):
    """A read-only stream over ``opener(offset)`` that survives transient errors.

    ``opener(offset)`` returns a fresh file-like object positioned at ``offset``.  On an
    error the stream is re-opened at the offset reached so far; ``on_retry`` is called for
    each retry (the pipeline counts them).
    """

    def __init__(self, opener: Callable[[int], IO[bytes]], name: str, retries: int = DEFAULT_RETRIES,
                 backoff: float = DEFAULT_BACKOFF, max_backoff: float = DEFAULT_MAX_BACKOFF, size: int | None = None,
                 on_retry: Callable[[str, int, BaseException], None] | None = None):
        super().__init__()
        self._opener, self.name, self.retries = opener, name, retries
        self.backoff, self.max_backoff, self.size, self.on_retry = backoff, max_backoff, size, on_retry
        self.pos = 0
        self._f: IO[bytes] | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def read(self, n: int = -1) -> bytes:
        failures = 0
        while True:
            try:
                if self._f is None:
                    self._f = self._opener(self.pos)
                data = self._f.read(n)
                if not data and n != 0 and self.size is not None and self.pos < self.size:
                    raise ConnectionError(f"stream ended at byte {self.pos} of {self.size}")
                self.pos += len(data)
                return data
            except Exception as e:  # noqa: BLE001 - classified below
                self._drop()
                why = auth_failure(e)
                if why is not None:
                    raise StorageAuthError(f"{safe_url(self.name)}: storage refused the credentials ({why}); "
                                           f"refresh them (AWS_* variables, AWS_PROFILE or the instance role) "
                                           f"and restart with --resume latest") from None
                if is_permanent(e) or failures >= self.retries:
                    raise ShardReadError(f"{safe_url(self.name)}: {type(e).__name__}: {e} "
                                         f"(at byte {self.pos}, {failures} retries)") from None
                failures += 1
                if self.on_retry:
                    self.on_retry(self.name, self.pos, e)
                time.sleep(backoff_delays(failures, self.backoff, self.max_backoff)[-1])

    def _drop(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception as e:  # noqa: BLE001 - a broken connection may fail to close
                log.debug("closing %s: %s", safe_url(self.name), e)
            self._f = None

    def close(self) -> None:
        self._drop()
        super().close()


class ReadAhead(io.RawIOBase):
    """Reads ``raw`` on a background thread, up to ``depth`` chunks ahead of the consumer.

    Remote reads then overlap decoding, and a shard opened before it is needed has its first
    bytes waiting.  Memory is bounded by ``depth * chunk``.  Errors are re-raised to the reader.
    """

    def __init__(self, raw: IO[bytes], chunk: int = 1 << 20, depth: int = 4):
        super().__init__()
        self._raw, self._chunk = raw, chunk
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pending = b""
        self._done = False
        self._thread = threading.Thread(target=self._fill, daemon=True, name="dsclip-readahead")
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    item: Any = self._raw.read(self._chunk)
                except BaseException as e:  # noqa: BLE001 - handed to the consumer
                    item = e
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if not isinstance(item, bytes) or not item:
                    return
        finally:
            if self._stop.is_set():  # closed while a read was in flight: the thread cleans up
                self._raw.close()

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if not self._pending and not self._done:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if not item:
                self._done = True
            self._pending = item
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._stop.set()
            self._thread.join(timeout=1)
            if not self._thread.is_alive():
                self._raw.close()
        super().close()


class _HttpRange:
    """An http(s) GET from ``offset`` (Range request; skips ahead if the server ignores it)."""

    def __init__(self, url: str, offset: int, timeout: float = 60):
        req = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        self._resp = urllib.request.urlopen(req, timeout=timeout)
        if offset and self._resp.status == 200:
            remaining = offset
            while remaining:
                chunk = self._resp.read(min(remaining, 1 << 20))
                if not chunk:
                    raise ConnectionError("stream ended before the resume offset")
                remaining -= len(chunk)
        length = self._resp.headers.get("Content-Length")
        self.size = offset + int(length) if length is not None and self._resp.status == 206 else (
            int(length) if length is not None else None)

    def read(self, n: int = -1) -> bytes:
        return self._resp.read(n)

    def close(self) -> None:
        self._resp.close()


class _PipeStream(io.RawIOBase):
    """stdout of a shell command; a non-zero exit status surfaces as an error at EOF."""

    def __init__(self, command: str):
        super().__init__()
        self.command = command
        self._proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self._proc.stdout.readinto(buf)
        if n == 0:
            code = self._proc.wait()
            if code != 0:
                raise ShardReadError(f"pipe:{shlex.quote(self.command)[:80]} exited with status {code}")
        return n

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.stdout.close()
        self._proc.wait()
        super().close()


def open_shard(url: str, retries: int = DEFAULT_RETRIES, endpoint: str | None = None,
               block_size: int = DEFAULT_BLOCK_SIZE,
               on_retry: Callable[[str, int, BaseException], None] | None = None,
               read_ahead: bool = True) -> IO[bytes]:
    """A buffered binary stream over one shard, whatever its scheme.

    Remote streams are read ahead on a thread (see ``ReadAhead``) unless ``read_ahead`` is off;
    nothing touches the network until the first read or, with read-ahead, the thread starts.
    """
    if url.startswith("pipe:"):
        return io.BufferedReader(_PipeStream(url[len("pipe:"):]), buffer_size=1 << 20)
    if url.startswith("s3://"):
        fs = s3_filesystem(endpoint)
        path = url[len("s3://"):]

        def opener(offset: int):
            f = fs.open(path, "rb", block_size=block_size, cache_type="readahead")
            if offset:
                f.seek(offset)
            return f

        raw = RetryingReader(opener, url, retries=retries, on_retry=on_retry)
        if read_ahead:
            return io.BufferedReader(ReadAhead(raw, chunk=min(block_size, 1 << 20)), buffer_size=1 << 16)
        return io.BufferedReader(raw, buffer_size=1 << 16)
    if url.startswith(("http://", "https://")):
        def opener(offset: int):
            r = _HttpRange(url, offset)
            if r.size is not None:
                raw.size = r.size
            return r

        raw = RetryingReader(opener, url, retries=retries, on_retry=on_retry)
        if read_ahead:
            return io.BufferedReader(ReadAhead(raw), buffer_size=1 << 16)
        return io.BufferedReader(raw, buffer_size=1 << 20)
    path = url.removeprefix("file://")
    return open(path, "rb", buffering=1 << 20)


def with_retries(fn: Callable[[], Any], attempts: int = 3, backoff: float = 0.5) -> Any:
    """``fn()`` retried on transient errors (for listing and small reads at start-up)."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:
            if is_permanent(e) or attempt == attempts - 1:
                raise
            time.sleep(backoff * 2 ** attempt)


def read_small(url: str, endpoint: str | None = None) -> bytes | None:
    """The whole content of a small file (sizes.json, __len__), or None when it does not exist."""
    try:
        if url.startswith("s3://"):
            fs = s3_filesystem(endpoint)
            return with_retries(lambda: fs.cat_file(url[len("s3://"):]))
        if url.startswith(("http://", "https://")):
            with urllib.request.urlopen(url, timeout=30) as r:
                return r.read()
        with open(url.removeprefix("file://"), "rb") as fh:
            return fh.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except urllib.error.HTTPError as e:
        if e.code in (403, 404):
            return None
        raise
