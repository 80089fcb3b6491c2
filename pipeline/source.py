"""Shard sources: expand shard specs, order them per epoch, split by rank and worker, read raw samples.

The first stages of the loader pipeline (composed in pipeline/loader.py):

    epoch_shards(...)                          -> list of shard URLs for one (epoch, rank, worker)
    tar_members(allow_pipe)(urls)              -> {"__url__", "name", "data"} per tar member
    group_samples()(members)                   -> {"__key__", "__url__", "<suffix>": bytes, ...}
    shuffle(buffer_size, rng)(samples)         -> the same samples, reordered

Nothing here decodes an image: a sample is the raw bytes of its tar members,
grouped webdataset-style (``<key>.<suffix>``, key = path up to the first dot of
the file name). That keeps a resume replay (loader.py) cheap: re-reading tar
bytes costs I/O, not JPEG decoding.

Shard specs (``expand_shards``): a local ``.tar`` path, a folder (its ``*.tar``
files, sorted; ``.tar.tmp`` leftovers of an interrupted write are ignored), a
glob, a brace pattern (``/data/shard-{000000..000099}.tar``), an http(s) URL
(streamed by the standard library: no curl binary needed; opening retries on
connection errors, 429 and 5xx, a 404 fails at once naming the status, and a
dropped connection resumes with a Range request), or several of these joined by
``::`` or given as a list. ``pipe:`` URLs run a shell command, so they are
refused unless the caller passes ``allow_pipe=True``.

Splitting: every epoch all ranks compute the same permutation of the shard list
from ``(seed, epoch)``; rank r, worker w of W takes ``perm[r::world][w::W]``
(webdataset's split_by_node then split_by_worker). In one-pass mode each shard is
read by exactly one (rank, worker), so there must be at least ``world x workers``
shards: ``check_split`` raises at start rather than letting a DDP job hang on a
rank that got nothing. In resampled mode every worker draws shards with
replacement from the whole list (an endless stream; no count requirement).

Error policy (one for the whole loader): a sample that cannot be used is skipped
with a ``SampleSkipped`` warning naming the shard and the key; a shard that
cannot be opened or whose tar stream breaks is skipped from that point with the
same warning (the samples already read are kept). Stages take the policy as
``on_skip(url, key, reason)``; the default warns every time (inspect, embed).
Training passes a :class:`SkipLog`: it warns once per shard and kind of damage
rather than once per sample and epoch, counts the skips (``data_skipped`` in the
metrics) against the samples read, and stops the run with a ``JobError`` when more
than ``max_fraction`` of them was bad (after at least ``MIN_BAD_TO_STOP`` bad ones,
so one bad clip among the first few read does not end a run). A sample skipped
after the loader counted its position still counts as consumed, so resume stays
exact; a truncated tar counts as one bad sample (the one cut) and its rest is
simply absent, the same on every pass.
"""
from __future__ import annotations

import glob
import http.client
import os
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

import braceexpand
import numpy as np

from abvid.pipeline.errors import JobError, UsageError

Stage = Callable[[Iterator[dict]], Iterator[dict]]
SkipPolicy = Callable[[str, "str | None", str], None]     # on_skip(url, key or None, reason)
MIN_BAD_TO_STOP = 10

URL_SCHEMES = ("http://", "https://")
HTTP_TIMEOUT_S = 60.0        # per socket operation (connect, each read)
HTTP_OPEN_ATTEMPTS = 5       # opening an http(s) shard: tries on connection errors, 429 and 5xx
HTTP_BACKOFF_S = 1.0         # first wait between tries; doubles, at most 8 s
SHARD_SUFFIX = ".tar"


class SampleSkipped(RuntimeWarning):
    """A sample (or the rest of a shard) was skipped; the message names the shard, the key and why."""


def warn_skip(url: str, key: str | None, reason: str) -> None:
    where = f"shard {url}" + (f", key {key}" if key else "")
    warnings.warn(f"skipping {where}: {reason}", SampleSkipped, stacklevel=2)


class ShardSpecError(UsageError):
    """A shard spec names nothing readable, or a pipe: URL without allow_pipe (exit 2)."""


class SkipLog:
    """Skip policy of one reader (a DataLoader worker, or the main process): count, log once, give up.

    ``read()`` counts a sample the reader consumed; calling the object with (url, key, reason)
    counts a skip, warns the first time this shard shows this kind of damage, and raises
    ``JobError`` once more than ``max_fraction`` of the samples seen so far was bad (and at
    least ``MIN_BAD_TO_STOP`` were). ``take()`` returns the skips since the last call (the
    loader puts them in each batch as ``data_skipped``).
    """

    def __init__(self, max_fraction: float = 0.1):
        if not 0.0 <= max_fraction <= 1.0:
            raise UsageError(f"data.max_bad_fraction must be in [0, 1], got {max_fraction}")
        self.max_fraction = max_fraction
        self.samples = self.skipped = self._pending = 0
        self._logged: set[tuple[str, str]] = set()

    def read(self) -> None:
        self.samples += 1

    def take(self) -> int:
        n, self._pending = self._pending, 0
        return n

    def __call__(self, url: str, key: str | None, reason: str) -> None:
        self.skipped += 1
        self._pending += 1
        if key is None:                  # a broken tar stream: the sample it cut was never counted as read
            self.samples += 1
        kind = reason.split("(", 1)[0].strip()
        if (url, kind) not in self._logged:
            self._logged.add((url, kind))
            warn_skip(url, key, f"{reason} [further samples of this shard with this fault are skipped and "
                                "counted in data_skipped, not logged]")
        seen = max(self.samples, 1)
        if self.skipped >= MIN_BAD_TO_STOP and self.skipped > self.max_fraction * seen:
            raise JobError(f"{self.skipped} of the {seen} samples read so far are unreadable (more than "
                           f"data.max_bad_fraction={self.max_fraction:g}; last: shard {url}, {reason}); check the "
                           "shards (abvid inspect SHARDS), rerun preprocess on the damaged ones, or raise "
                           "data.max_bad_fraction")


def _check_url(url: str, allow_pipe: bool) -> None:
    if url.startswith("pipe:") and not allow_pipe:
        raise ShardSpecError(f"shard '{url}' is a pipe: URL, which runs a shell command; "
                         "enable it explicitly with allow_pipe=True (data.allow_pipe=true) if you trust the list")
    if "://" in url and not url.startswith(URL_SCHEMES) and not url.startswith(("pipe:", "file://")):
        raise ShardSpecError(f"shard '{url}': unsupported URL scheme; use http(s)://, a local path, or "
                         "'pipe:<command writing the tar to stdout>' with allow_pipe=True (e.g. pipe:aws s3 cp URL -)")


def expand_shards(spec: str | Sequence[str], allow_pipe: bool = False) -> list[str]:
    """Shard spec(s) -> list of shard URLs/paths, in the given order; raises ShardSpecError naming the bad spec."""
    items = [spec] if isinstance(spec, str) else list(spec)
    parts = [p for item in items for p in str(item).split("::") if p.strip()]
    if not parts:
        raise ShardSpecError("no shards given: set data.shards to a .tar path, a folder, a brace pattern or a URL")
    urls: list[str] = []
    for part in parts:
        part = part.strip()
        for url in braceexpand.braceexpand(part):
            _check_url(url, allow_pipe)
            if url.startswith(URL_SCHEMES) or url.startswith("pipe:"):
                urls.append(url)
                continue
            path = url[len("file://"):] if url.startswith("file://") else url
            if os.path.isdir(path):
                found = sorted(str(p) for p in Path(path).glob(f"*{SHARD_SUFFIX}"))
                if not found:
                    raise ShardSpecError(f"shard folder {path} holds no *{SHARD_SUFFIX} files "
                                     "(did preprocessing finish? .tar.tmp files are incomplete shards)")
                urls.extend(found)
            elif glob.has_magic(path):
                found = sorted(p for p in glob.glob(path) if p.endswith(SHARD_SUFFIX))
                if not found:
                    raise ShardSpecError(f"shard pattern {path} matches no {SHARD_SUFFIX} files")
                urls.extend(found)
            elif os.path.isfile(path):
                urls.append(path)
            else:
                raise ShardSpecError(f"shard {path} (from spec '{part}') does not exist; check the path or pattern")
    return urls


def check_split(num_shards: int, world_size: int, num_workers: int) -> None:
    """One-pass (and epoch) mode gives each shard to one (rank, worker): every one must get at least one."""
    need = world_size * max(num_workers, 1)
    if num_shards < need:
        raise UsageError(
            f"{num_shards} shard(s) for {world_size} rank(s) x {max(num_workers, 1)} worker(s) = {need} readers: "
            "some readers would get no shard (in DDP that hangs the job). Use fewer workers "
            f"(data.workers <= {max(num_shards // world_size, 0)}), write more, smaller shards (abvid preprocess "
            "--shard-clips N), or use resampled mode (data.resampled=true)")


def epoch_shards(urls: Sequence[str], *, epoch: int, seed: int, rank: int, world_size: int, worker: int,
                 num_workers: int, resampled: bool, shuffle: bool) -> list[str]:
    """The shards one (rank, worker) reads in one epoch; a pure function of its arguments."""
    readers = world_size * max(num_workers, 1)
    if resampled:
        # Each reader draws its share of one pass, with replacement, from the whole list.
        draws = max(1, -(-len(urls) // readers))
        rng = np.random.default_rng([seed, epoch, rank, worker, 1])
        return [urls[i] for i in rng.integers(0, len(urls), size=draws)]
    order = np.random.default_rng([seed, epoch, 0]).permutation(len(urls)) if shuffle else np.arange(len(urls))
    mine = order[rank::world_size][worker::max(num_workers, 1)]
    return [urls[i] for i in mine]


def open_shard(url: str, allow_pipe: bool = False) -> IO[bytes]:
    """A readable byte stream of a shard: local file, http(s) (``_HttpStream``, urllib: no external binary),
    or pipe: (webdataset.gopen)."""
    _check_url(url, allow_pipe)
    if url.startswith(URL_SCHEMES):
        return _HttpStream(url)
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen
        return gopen(url, "rb")
    return open(url[len("file://"):] if url.startswith("file://") else url, "rb")


def _http_response(url: str, start: int = 0):
    """urlopen(url) from byte ``start`` (a Range request when > 0). Opening is retried (``HTTP_OPEN_ATTEMPTS``,
    backoff from ``HTTP_BACKOFF_S``) on connection errors, timeouts, 429 and 5xx; any other HTTP status fails at
    once. Failures are OSErrors naming the URL and the status or reason, so the error policy reports them
    like a broken local shard."""
    import time
    import urllib.error
    import urllib.request

    headers = {"User-Agent": "abvid"} | ({"Range": f"bytes={start}-"} if start else {})
    request, attempt = urllib.request.Request(url, headers=headers), 0
    while True:
        attempt += 1
        try:
            return urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code != 429 and e.code < 500:
                raise OSError(f"HTTP {e.code} {e.reason} for {url}") from None
            why = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, OSError) as e:
            why = str(getattr(e, "reason", e))
        if attempt == HTTP_OPEN_ATTEMPTS:
            raise OSError(f"cannot open {url} after {attempt} tries: {why}")
        time.sleep(min(HTTP_BACKOFF_S * 2 ** (attempt - 1), 8.0))


class _HttpStream:
    """An http(s) body that survives a dropped connection: where the body stops short of its Content-Length
    (or the connection errors), it reopens from that byte with a Range request, up to ``HTTP_OPEN_ATTEMPTS``
    times per shard, so a transient drop costs a reconnect, not the rest of the shard, and the bytes read are
    exactly the file's (resume stays exact). A server that ignores ranges, or a body still short after the
    tries, raises OSError: never a silently truncated shard."""

    def __init__(self, url: str):
        self.url, self.pos, self.resumes = url, 0, 0
        self.resp = _http_response(url)
        length = self.resp.headers.get("Content-Length")
        self.length = int(length) if length and length.isdigit() else None

    def read(self, n: int = -1) -> bytes:
        while True:
            try:
                data = self.resp.read(n) if n is not None and n >= 0 else self.resp.read()
                error = None
            except (OSError, http.client.HTTPException) as e:
                data, error = b"", e
            if data or n == 0:
                self.pos += len(data)
                return data
            if self.length is None or self.pos >= self.length:     # the end (or no length to check against)
                if error is not None:
                    raise OSError(f"{self.url}: connection broke at byte {self.pos} "
                                  f"({type(error).__name__}: {error})") from error
                return b""
            self._resume(error)

    def _resume(self, error: BaseException | None) -> None:
        why = f"{type(error).__name__}: {error}" if error is not None else "the body ended early"
        if self.resumes >= HTTP_OPEN_ATTEMPTS:
            raise OSError(f"{self.url}: body short at byte {self.pos} of {self.length} after {self.resumes} "
                          f"resumes ({why})")
        self.resumes += 1
        self.resp.close()
        self.resp = _http_response(self.url, start=self.pos)
        got = self.resp.headers.get("Content-Range", "")
        if self.resp.status != 206 or not got.startswith(f"bytes {self.pos}-"):
            raise OSError(f"{self.url}: connection broke at byte {self.pos} of {self.length} ({why}) and the "
                          f"server does not resume it (HTTP {self.resp.status}, Content-Range {got!r})")

    def close(self) -> None:
        self.resp.close()

    def __enter__(self) -> "_HttpStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Counting:
    """Read-only wrapper that counts the bytes read (to tell a complete tar from a truncated one)."""

    def __init__(self, raw: IO[bytes]):
        self.raw, self.count = raw, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 16):
            pass


def _split_name(name: str) -> tuple[str, str] | None:
    """'dir/<key>.000.jpg' -> ('dir/<key>', '000.jpg'): key = path up to the first dot of the file name."""
    head, _, base = name.rpartition("/")
    if "." not in base:
        return None
    stem, suffix = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), suffix


def tar_members(allow_pipe: bool = False, strict: bool = False, on_skip: SkipPolicy | None = None) -> Stage:
    """Stage: shard URLs (as ``{"url": ...}`` dicts or plain strings) -> regular tar members, in order.

    A broken or truncated tar stream is reported to ``on_skip`` (default: a warning) and the rest of
    that shard skipped (training keeps going); ``strict=True`` raises ``tarfile.ReadError`` instead
    (embedding reports the shard as failed).
    """
    skip = on_skip or warn_skip

    def stage(urls: Iterable) -> Iterator[dict]:
        for item in urls:
            url = item["url"] if isinstance(item, dict) else str(item)
            last = None
            try:
                with open_shard(url, allow_pipe) as raw, tarfile.open(fileobj=(stream := _Counting(raw)),
                                                                      mode="r|*") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        f = tar.extractfile(member)
                        data = f.read() if f is not None else b""
                        last = member.name
                        yield {"__url__": url, "name": member.name, "data": data}
                    # tarfile ends quietly on a header cut short; a whole archive has two zero blocks after it.
                    stream.drain()
                    if stream.count < tar.offset + 1024:
                        raise tarfile.ReadError(f"archive ends inside a header at byte {stream.count}")
            except (OSError, tarfile.TarError, EOFError) as e:
                after = f"after member {last}" if last else "at the start"
                if strict:
                    raise tarfile.ReadError(f"{url}: tar stream broken {after} ({type(e).__name__}: {e})") from e
                skip(url, None, f"tar stream broken {after} ({type(e).__name__}: {e}); rest of the shard skipped")
    return stage


def group_samples() -> Stage:
    """Stage: consecutive tar members sharing a key -> one sample dict of raw bytes per key."""
    def stage(members: Iterable[dict]) -> Iterator[dict]:
        current: dict | None = None
        for m in members:
            split = _split_name(m["name"])
            if split is None:
                warn_skip(m["__url__"], m["name"], "tar member without a '.suffix' ignored")
                continue
            key, suffix = split
            if current is not None and (key != current["__key__"] or m["__url__"] != current["__url__"]):
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": m["__url__"]}
            if suffix in current:
                warn_skip(m["__url__"], key, f"duplicate member '{suffix}' (the last one is kept)")
            current[suffix] = m["data"]
        if current is not None:
            yield current
    return stage


def shuffle(buffer_size: int, rng: np.random.Generator) -> Stage:
    """Stage: reservoir-style shuffle buffer (webdataset's ``shuffle``), deterministic given ``rng``.

    Fills ``buffer_size`` samples, then for each new sample emits a random buffered one and keeps the
    new one in its place; at the end drains the buffer in random order. ``buffer_size <= 1`` is a no-op.
    Memory: buffer_size raw clips (16 JPEGs of ~25 kB each: ~0.4 MB a clip) per worker.
    """
    def stage(samples: Iterable[dict]) -> Iterator[dict]:
        if buffer_size <= 1:
            yield from samples
            return
        buf: list[dict] = []
        for s in samples:
            if len(buf) < buffer_size:
                buf.append(s)
                continue
            i = int(rng.integers(buffer_size))
            out, buf[i] = buf[i], s
            yield out
        while buf:
            i = int(rng.integers(len(buf)))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    return stage
