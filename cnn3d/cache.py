"""Content-addressed on-disk cache of teacher embeddings, shared safely by several processes.

Key: ``blake2b(canonical JSON of the namespace spec + text)``, where the namespace spec is the teacher's
``identity`` (model name or folder plus a fingerprint of its files), pooling, normalisation, max length and
the version of the pooling code. Changing any of them, or one character of the text, gives a new key.

On disk, under ``cache_dir``::

    ns-<16 hex of the spec digest>-<f16|f32>/   one folder per namespace and storage dtype (dim fixed within)
        namespace.json                           the spec, dim and dtype (informational: ``cnn3d-cache stats``)
        lock                                     flock'ed while a process fills the namespace
        <mtime ns>-<pid>-<random>.shard          immutable shards, see below
    .evict.lock                                  flock'ed while a process evicts

A shard is one little-endian file: a 64-byte header (``struct "<8sIIQII16s"``: magic ``CNN3DEMB``, format
version, dtype code 1=float16 / 2=float32, count, dim, digest size 16, blake2b-128 checksum of the header's
first 32 bytes plus the body), then ``count`` 16-byte keys, then ``count x dim`` vectors. Shards are written
to a temporary file in the same folder and ``os.replace``'d into place, so readers only ever see whole files.
A shard whose size, header or checksum is wrong is logged, deleted and its sentences recomputed.

Last use is the shard file's mtime: set when written and touched whenever the shard serves a hit. Beyond
``max_size_gb`` (10^9 bytes; 0 = no cap) the shards with the oldest mtime, across all namespaces, are deleted.

Filling: look up without a lock; for what is missing take the namespace's ``fcntl.flock``, look again (another
process may have just written it), compute the rest with the teacher, write one new shard, release. So
concurrent workers never compute the same sentence twice. Needs a local filesystem with working ``flock``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import secrets
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .config import DataConfig
from .errors import UserError

__all__ = [
    "CacheStats",
    "EmbeddingCache",
    "NamespaceInfo",
    "cache_key",
    "embed_with_cache",
    "namespace_spec",
]

log = logging.getLogger(__name__)

DIGEST_SIZE = 16
MAGIC = b"CNN3DEMB"
FORMAT_VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQII16s")
_CHECKED_HEADER_BYTES = _HEADER.size - DIGEST_SIZE  # the header fields the checksum covers
_DTYPES: dict[str, tuple[int, np.dtype]] = {"float16": (1, np.dtype("<f2")), "float32": (2, np.dtype("<f4"))}
_DTYPE_BY_CODE = {code: dt for code, dt in _DTYPES.values()}
_SHORT = {"float16": "f16", "float32": "f32"}
_SHARD_SUFFIX = ".shard"
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 3600
GB = 10**9


class TeacherLike(Protocol):
    """What the cache needs from a teacher (``cnn3d.teacher.Teacher`` is one)."""

    identity: str
    pooling: str
    normalize: bool
    max_length: int
    dim: int

    def embed(self, texts: Sequence[str], progress: bool = False) -> torch.Tensor: ...


@dataclass
class CacheStats:
    """Counters of one ``EmbeddingCache`` in this process.

    ``hits``/``misses`` count looked-up texts (a text filled by another process while we waited for the lock
    is a hit); ``computed`` counts distinct sentences sent to the teacher; ``bytes_on_disk`` is the size of all
    shards under the cache folder when last measured.
    """

    hits: int = 0
    misses: int = 0
    computed: int = 0
    bytes_on_disk: int = 0
    shards_written: int = 0
    shards_evicted: int = 0
    shards_corrupt: int = 0

    @property
    def hit_rate(self) -> float:
        """Share of looked-up texts served from the cache (0.0 before any lookup)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def as_metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow/logging: ``cache_hit_rate``, ``cache_hits``, ... ."""
        out = {f"cache_{k}": float(v) for k, v in dataclasses.asdict(self).items()}
        out["cache_hit_rate"] = self.hit_rate
        return out


@dataclass(frozen=True)
class NamespaceInfo:
    """One namespace folder as ``cnn3d-cache stats`` shows it."""

    name: str
    path: Path
    spec: dict[str, Any]
    dim: int
    dtype: str
    shards: int
    vectors: int
    bytes: int
    last_used: float  # seconds since the epoch; 0.0 when there is no shard


# --------------------------------------------------------------------------- keys


def namespace_spec(teacher: TeacherLike) -> dict[str, Any]:
    """The part of every key that depends on the teacher and its pooling, not on the text."""
    from .teacher import EMBED_VERSION

    return {
        "identity": str(teacher.identity),
        "pooling": str(teacher.pooling),
        "normalize": bool(teacher.normalize),
        "max_length": int(teacher.max_length),
        "embed_version": EMBED_VERSION,
    }


def _canonical(spec: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(spec), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _key_hasher(spec: Mapping[str, Any]) -> Callable[[str], bytes]:
    base = hashlib.blake2b(_canonical(spec) + b"\n", digest_size=DIGEST_SIZE)

    def key(text: str) -> bytes:
        h = base.copy()
        h.update(text.encode("utf-8", "surrogatepass"))
        return h.digest()

    return key


def cache_key(spec: Mapping[str, Any], text: str) -> bytes:
    """The 16-byte key of ``text`` under ``spec`` (see ``namespace_spec``)."""
    return _key_hasher(spec)(text)


def namespace_name(spec: Mapping[str, Any], dtype: str) -> str:
    """Folder name of a namespace: digest of the spec plus the storage dtype."""
    return f"ns-{hashlib.blake2b(_canonical(spec), digest_size=8).hexdigest()}-{_SHORT[dtype]}"


# --------------------------------------------------------------------------- shards


class CorruptShard(Exception):
    """A shard file failed its size, header or checksum test."""


@dataclass
class _Shard:
    path: Path
    keys: list[bytes]
    vectors: np.ndarray  # [count, dim], storage dtype, read-only
    size: int


def _checksum(header_fields: bytes, body: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(header_fields, digest_size=DIGEST_SIZE)
    h.update(body)
    return h.digest()


def _encode_shard(keys: Sequence[bytes], vectors: np.ndarray, dtype: str) -> bytes:
    code, np_dtype = _DTYPES[dtype]
    arr = np.ascontiguousarray(vectors, dtype=np_dtype)
    body = b"".join(keys) + arr.tobytes()
    fields = _HEADER.pack(MAGIC, FORMAT_VERSION, code, len(keys), arr.shape[1], DIGEST_SIZE, b"\0" * DIGEST_SIZE)
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, code, len(keys), arr.shape[1], DIGEST_SIZE,
        _checksum(fields[:_CHECKED_HEADER_BYTES], body),
    )
    return header.ljust(HEADER_SIZE, b"\0") + body


def _read_header(data: bytes) -> tuple[np.dtype, int, int, bytes]:
    if len(data) < HEADER_SIZE:
        raise CorruptShard(f"{len(data)} bytes, shorter than the header")
    magic, version, code, count, dim, digest_size, checksum = _HEADER.unpack_from(data)
    if magic != MAGIC or version != FORMAT_VERSION or digest_size != DIGEST_SIZE or code not in _DTYPE_BY_CODE:
        raise CorruptShard("bad header")
    return _DTYPE_BY_CODE[code], int(count), int(dim), checksum


def _decode_shard(path: Path, data: bytes, dim: int) -> _Shard:
    np_dtype, count, shard_dim, checksum = _read_header(data)
    if shard_dim != dim:
        raise CorruptShard(f"dim {shard_dim}, expected {dim}")
    keys_end = HEADER_SIZE + count * DIGEST_SIZE
    expected = keys_end + count * dim * np_dtype.itemsize
    if len(data) != expected:
        raise CorruptShard(f"{len(data)} bytes, expected {expected} (truncated or padded)")
    body = memoryview(data)[HEADER_SIZE:]
    if _checksum(data[:_CHECKED_HEADER_BYTES], body) != checksum:
        raise CorruptShard("checksum mismatch")
    keys = [data[i : i + DIGEST_SIZE] for i in range(HEADER_SIZE, keys_end, DIGEST_SIZE)]
    vectors = np.frombuffer(data, dtype=np_dtype, count=count * dim, offset=keys_end).reshape(count, dim)
    return _Shard(path=path, keys=keys, vectors=vectors, size=len(data))


def _atomic_write(folder: Path, final_name: str, data: bytes, mtime_ns: int | None = None) -> Path:
    """Write ``data`` to a temp file in ``folder`` and rename it into place (readers never see half a file)."""
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        final = folder / final_name
        os.replace(tmp, final)
        return final
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _touch(path: Path) -> None:
    # Last use = mtime; explicit nanoseconds because the kernel's own timestamps are only ms-coarse.
    now = time.time_ns()
    with contextlib.suppress(OSError):
        os.utime(path, ns=(now, now))


# --------------------------------------------------------------------------- namespaces


class _Namespace:
    """The shards of one namespace loaded in this process, plus a key -> (shard, row) index."""

    def __init__(self, folder: Path, spec: Mapping[str, Any], dim: int, dtype: str, stats: CacheStats) -> None:
        self.folder = folder
        self.spec = dict(spec)
        self.dim = dim
        self.dtype = dtype
        self.stats = stats
        self.key = _key_hasher(spec)
        self.shards: dict[str, _Shard] = {}
        self.index: dict[bytes, tuple[str, int]] = {}
        self._bad: set[str] = set()

    def ensure_folder(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "namespace.json"
        if not meta.exists():
            info = {"format": FORMAT_VERSION, "spec": self.spec, "dim": self.dim, "dtype": self.dtype}
            _atomic_write(self.folder, meta.name, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())

    def shard_files(self) -> dict[str, Path]:
        return {e.name: Path(e.path) for e in _scandir(self.folder) if e.name.endswith(_SHARD_SUFFIX) and not e.name.startswith(".")}

    def refresh(self) -> None:
        """Follow the folder: load shards other processes wrote, forget shards that were evicted."""
        files = self.shard_files()
        gone = [name for name in self.shards if name not in files]
        for name in gone:
            del self.shards[name]
        if gone:
            self._rebuild_index()
        for name, path in sorted(files.items()):
            if name not in self.shards and name not in self._bad:
                self._load(name, path)

    def _load(self, name: str, path: Path) -> None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return  # evicted between listing and reading
        try:
            shard = _decode_shard(path, data, self.dim)
        except CorruptShard as exc:
            log.warning("embedding cache: discarding corrupt shard %s (%s); its sentences will be recomputed", path, exc)
            self.stats.shards_corrupt += 1
            self._bad.add(name)
            with contextlib.suppress(OSError):
                path.unlink()
            return
        self._add(name, shard)

    def _add(self, name: str, shard: _Shard) -> None:
        self.shards[name] = shard
        for row, key in enumerate(shard.keys):
            self.index[key] = (name, row)

    def _rebuild_index(self) -> None:
        self.index = {}
        for name, shard in self.shards.items():
            for row, key in enumerate(shard.keys):
                self.index[key] = (name, row)

    def fill(self, keys: Sequence[bytes], out: np.ndarray, positions: Sequence[int]) -> list[int]:
        """Copy cached rows for ``keys[p]`` into ``out[p]``; return the positions still missing."""
        missing: list[int] = []
        per_shard: dict[str, tuple[list[int], list[int]]] = {}
        for p in positions:
            hit = self.index.get(keys[p])
            if hit is None:
                missing.append(p)
            else:
                dst, rows = per_shard.setdefault(hit[0], ([], []))
                dst.append(p)
                rows.append(hit[1])
        for name, (dst, rows) in per_shard.items():
            shard = self.shards[name]
            out[dst] = shard.vectors[rows]
            _touch(shard.path)
        return missing

    def write(self, keys: list[bytes], vectors: np.ndarray) -> _Shard:
        """Store a new shard; returns it (already indexed) so callers can read back stored-precision values."""
        data = _encode_shard(keys, vectors, self.dtype)
        now = time.time_ns()
        name = f"{now:020d}-{os.getpid()}-{secrets.token_hex(4)}{_SHARD_SUFFIX}"
        path = _atomic_write(self.folder, name, data, mtime_ns=now)
        shard = _decode_shard(path, data, self.dim)
        self._add(name, shard)
        self.stats.shards_written += 1
        return shard

    def compact(self) -> None:
        """Merge every shard of this namespace into one (call with the namespace lock held)."""
        if len(self.shards) < 2:
            return
        merged: dict[bytes, np.ndarray] = {}
        last_used = 0
        for shard in self.shards.values():
            with contextlib.suppress(OSError):
                last_used = max(last_used, shard.path.stat().st_mtime_ns)
            for row, key in enumerate(shard.keys):
                merged[key] = shard.vectors[row]
        old = dict(self.shards)
        keys = list(merged)
        vectors = np.stack([merged[k] for k in keys]) if keys else np.zeros((0, self.dim))
        data = _encode_shard(keys, vectors, self.dtype)
        name = f"{last_used or time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}{_SHARD_SUFFIX}"
        path = _atomic_write(self.folder, name, data, mtime_ns=last_used or None)
        for shard in old.values():
            with contextlib.suppress(OSError):
                shard.path.unlink()
        self.shards = {}
        self.index = {}
        self._add(name, _decode_shard(path, data, self.dim))
        log.info("embedding cache: merged %d shards of %s into one", len(old), self.folder.name)


# --------------------------------------------------------------------------- the cache


class EmbeddingCache:
    """Teacher embeddings on disk under ``cache_dir``, keyed by content; see the module docstring for the format.

    One instance per process is enough (it keeps loaded shards and the key index in memory and follows what
    other processes write). Thread-safe: calls from several threads are serialised.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        max_size_gb: float = 10.0,
        dtype: str = "float32",
        max_shards_per_namespace: int = 64,
    ) -> None:
        if dtype not in _DTYPES:
            raise UserError(f"data.cache_dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.cache_dir = Path(cache_dir).expanduser()
        self.max_bytes = int(max_size_gb * GB) if max_size_gb > 0 else 0
        self.dtype = dtype
        self.max_shards_per_namespace = max(2, max_shards_per_namespace)
        self.stats = CacheStats()
        self._namespaces: dict[str, _Namespace] = {}
        self._lock = threading.RLock()

    @classmethod
    def from_config(cls, data: DataConfig) -> EmbeddingCache | None:
        """The cache described by ``cfg.data``, or ``None`` when ``data.cache`` is off."""
        if not data.cache:
            return None
        return cls(data.cache_dir, max_size_gb=data.max_cache_size_gb, dtype=data.cache_dtype)

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.cache_dir)!r}, max_bytes={self.max_bytes}, dtype={self.dtype!r})"

    # ----------------------------------------------------------------- filling

    def get_or_compute(
        self,
        spec: Mapping[str, Any],
        texts: Sequence[str],
        dim: int,
        compute: Callable[[list[str]], torch.Tensor | np.ndarray],
    ) -> np.ndarray:
        """Vectors ``[len(texts), dim]`` float32 in input order; ``compute`` gets only the missing distinct texts.

        Freshly computed vectors are returned at storage precision, so a cold and a warm pass agree exactly.
        """
        texts = list(texts)
        out = np.empty((len(texts), dim), dtype=np.float32)
        if not texts:
            return out
        with self._lock:
            ns = self._namespace(spec, dim)
            keys = [ns.key(t) for t in texts]
            ns.refresh()
            missing = ns.fill(keys, out, range(len(texts)))
            if missing:
                missing = self._fill_locked(ns, texts, keys, out, missing, compute)
            else:  # nothing written, so eviction did not measure the folder: measure it here
                self.disk_usage()
            self.stats.misses += len(missing)
            self.stats.hits += len(texts) - len(missing)
        return out

    def _fill_locked(
        self,
        ns: _Namespace,
        texts: list[str],
        keys: list[bytes],
        out: np.ndarray,
        missing: list[int],
        compute: Callable[[list[str]], torch.Tensor | np.ndarray],
    ) -> list[int]:
        """Under the namespace lock: look again, compute what is still missing, store it. Returns what was computed."""
        written: list[Path] = []
        try:
            ns.ensure_folder()
            (ns.folder / "lock").touch()
        except OSError as exc:
            log.warning("embedding cache: cannot use %s (%s); computing without it", ns.folder, exc)
            unique_texts = list(dict.fromkeys(texts[p] for p in missing))
            vectors = _as_array(compute(unique_texts), len(unique_texts), ns.dim)
            self.stats.computed += len(unique_texts)
            row_of = {t: i for i, t in enumerate(unique_texts)}
            out[missing] = vectors[[row_of[texts[p]] for p in missing]]
            return missing
        with _flocked(ns.folder / "lock"):
            ns.refresh()
            missing = ns.fill(keys, out, missing)
            if not missing:
                return missing
            unique = list(dict.fromkeys(keys[p] for p in missing))
            first_text = {}
            for p in missing:
                first_text.setdefault(keys[p], texts[p])
            vectors = _as_array(compute([first_text[k] for k in unique]), len(unique), ns.dim)
            self.stats.computed += len(unique)
            stored = self._store(ns, unique, vectors, written)
            row_of = {k: i for i, k in enumerate(unique)}
            out[missing] = stored[[row_of[keys[p]] for p in missing]]
            if len(ns.shards) > self.max_shards_per_namespace:
                self._compact(ns, written)
        self.evict(keep=written)
        return missing

    def _store(self, ns: _Namespace, keys: list[bytes], vectors: np.ndarray, written: list[Path]) -> np.ndarray:
        try:
            shard = ns.write(keys, vectors)
        except OSError as exc:
            # A full disk or a read-only folder must not stop training: serve the values, skip the cache.
            log.warning("embedding cache: could not write a shard in %s (%s)", ns.folder, exc)
            return vectors.astype(_DTYPES[self.dtype][1]).astype(np.float32)
        written.append(shard.path)
        return shard.vectors

    def _compact(self, ns: _Namespace, written: list[Path]) -> None:
        try:
            ns.compact()
        except OSError as exc:
            log.warning("embedding cache: could not merge shards of %s (%s)", ns.folder, exc)
            return
        written[:] = [shard.path for shard in ns.shards.values()]

    def _namespace(self, spec: Mapping[str, Any], dim: int) -> _Namespace:
        name = namespace_name(spec, self.dtype)
        ns = self._namespaces.get(name)
        if ns is None or ns.dim != dim:
            ns = _Namespace(self.cache_dir / name, spec, dim, self.dtype, self.stats)
            self._namespaces[name] = ns
        return ns

    # ----------------------------------------------------------------- size

    def evict(self, keep: Sequence[Path] = ()) -> int:
        """Delete least-recently-used shards until the cache fits ``max_size_gb``; returns bytes freed.

        ``keep`` (the shards just written) is spared; if they alone exceed the cap, a warning says so.
        """
        if not self.cache_dir.is_dir():
            return 0
        freed = 0
        with self._lock, _flocked(self.cache_dir / ".evict.lock"):
            self._remove_stale_temp_files()
            shards = self._all_shards()
            total = sum(size for _, size, _ in shards)
            if self.max_bytes and total > self.max_bytes:
                keep_set = {Path(p) for p in keep}
                for _, size, path in sorted(shards):
                    if total <= self.max_bytes:
                        break
                    if path in keep_set:
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        freed += size
                        self.stats.shards_evicted += 1
                    total -= size
                if total > self.max_bytes:
                    log.warning(
                        "embedding cache: %d bytes of newest shards exceed the cap of %d bytes (data.max_cache_size_gb)",
                        total, self.max_bytes,
                    )
            self.stats.bytes_on_disk = total
        if freed:
            log.info("embedding cache: evicted %d bytes of least-recently-used shards", freed)
        return freed

    def disk_usage(self) -> int:
        """Bytes of all shards under ``cache_dir`` (also stored in ``stats.bytes_on_disk``)."""
        self.stats.bytes_on_disk = sum(size for _, size, _ in self._all_shards())
        return self.stats.bytes_on_disk

    def _all_shards(self) -> list[tuple[int, int, Path]]:
        """``(mtime_ns, size, path)`` of every shard under ``cache_dir``."""
        out = []
        for folder in self._namespace_folders():
            for entry in _scandir(folder):
                if entry.name.endswith(_SHARD_SUFFIX) and not entry.name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        st = entry.stat()
                        out.append((st.st_mtime_ns, st.st_size, Path(entry.path)))
        return out

    def _namespace_folders(self) -> list[Path]:
        return sorted(Path(e.path) for e in _scandir(self.cache_dir) if e.name.startswith("ns-") and e.is_dir())

    def _remove_stale_temp_files(self) -> None:
        # Left by processes killed mid-write; anything this old is not being written any more.
        cutoff = time.time() - _STALE_TMP_SECONDS
        for folder in self._namespace_folders():
            for entry in _scandir(folder):
                if entry.name.startswith(_TMP_PREFIX):
                    with contextlib.suppress(OSError):
                        if entry.stat().st_mtime < cutoff:
                            os.unlink(entry.path)

    # ----------------------------------------------------------------- inspection

    def namespaces(self) -> list[NamespaceInfo]:
        """What each namespace folder holds (reads only shard headers)."""
        infos = []
        for folder in self._namespace_folders():
            meta = _read_meta(folder / "namespace.json")
            shards = vectors = size = 0
            last = 0
            for entry in _scandir(folder):
                if not entry.name.endswith(_SHARD_SUFFIX) or entry.name.startswith("."):
                    continue
                with contextlib.suppress(OSError, CorruptShard):
                    st = entry.stat()
                    with open(entry.path, "rb") as f:
                        _, count, _, _ = _read_header(f.read(HEADER_SIZE))
                    shards, vectors, size, last = shards + 1, vectors + count, size + st.st_size, max(last, st.st_mtime_ns)
            infos.append(NamespaceInfo(
                name=folder.name, path=folder, spec=meta.get("spec", {}), dim=int(meta.get("dim", 0)),
                dtype=str(meta.get("dtype", "?")), shards=shards, vectors=vectors, bytes=size, last_used=last / 1e9,
            ))
        return infos

    def clear(self) -> int:
        """Delete every namespace folder this cache made under ``cache_dir``; returns bytes freed.

        Do not run it while other processes fill the cache: they may lose their lock file.
        """
        freed = 0
        with self._lock:
            for folder in self._namespace_folders():
                for entry in _scandir(folder):
                    with contextlib.suppress(OSError):
                        if entry.name.endswith(_SHARD_SUFFIX):
                            freed += entry.stat().st_size
                        os.unlink(entry.path)
                with contextlib.suppress(OSError):
                    folder.rmdir()
            with contextlib.suppress(OSError):
                (self.cache_dir / ".evict.lock").unlink()
            self._namespaces.clear()
            self.stats.bytes_on_disk = 0
        return freed


def embed_with_cache(
    teacher: TeacherLike,
    texts: Sequence[str],
    cache: EmbeddingCache | None,
    progress: bool = False,
) -> torch.Tensor:
    """Teacher vectors ``[len(texts), teacher.dim]`` float32 on CPU in input order, through ``cache`` if given.

    Only sentences missing from the cache reach the teacher; with ``cache=None`` all of them do.
    """
    if cache is None:
        return teacher.embed(list(texts), progress=progress).float().cpu()
    vectors = cache.get_or_compute(
        namespace_spec(teacher), texts, teacher.dim, lambda missing: teacher.embed(missing, progress=progress)
    )
    return torch.from_numpy(vectors)


# --------------------------------------------------------------------------- helpers


def _as_array(vectors: torch.Tensor | np.ndarray, count: int, dim: int) -> np.ndarray:
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().float().cpu().numpy()
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.shape != (count, dim):
        raise ValueError(f"teacher returned shape {arr.shape}, expected {(count, dim)}")
    return arr


def _scandir(folder: Path) -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
