"""Offloaded return values: an electron returns a value, a consumer receives it.

    @ct.electron
    @lot.offload(to="s3://my-bucket/lot/")
    def produce():
        return make_features()          # 512 MiB array: stored, a Ref returned

    @ct.electron
    @lot.offload
    def consume(features):              # the array again (loaded, verified)
        return features.sum()

A value of at least ``min_size`` bytes is encoded into the local cache
(``<staging>/objects/``), uploaded through the engine (sha256, atomic,
retries) and replaced by a :class:`Ref`: the URI, checksums, sizes, codec and
compression, a few hundred bytes that Covalent passes by value and that is the
data dependency between the electrons. A decorated electron receives the
value of every ``Ref`` among its arguments, also inside lists, tuples and
dicts; anything else gets the ``Ref`` and calls ``.load()``.

Encodings (the ``_objects`` codecs): a numpy array ``.npy``; a DataFrame
parquet with pyarrow (else pickle); bytes raw; str UTF-8; anything else
cloudpickle (pickle runs code when loaded: load only from stores you trust).

The local cache is content-addressed by the encoded bytes' sha256, so a
consumer on the producer's machine finds the producer's verified copy and
reads it without a download, and the cache stays bounded (see ``_cache``).

Keys: ``<prefix><dispatch_id>/<node_id>/<function>-<sha256[:16]><suffix>``
(``run-<random>/`` where the executor does not tell the dispatch), so
``covalent-lot gc --dispatch`` and ``--older-than`` find them. With
``dedup=True``: ``<prefix>sha256/<sha256><suffix>``, shared by every value
with these bytes and uploaded once (``gc --older-than`` finds them, ``gc
--dispatch`` does not: they belong to no single dispatch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import pickle
import time
import uuid
from typing import Any, Callable

from . import _cache, _objects, _portable
from ._config import parse_size
from ._covalent import is_electron, run_context
from ._errors import ChecksumMismatchError
from ._logs import log_to_stderr_if_unconfigured
from ._strategy import (
    STRATEGIES, Portable, _load, build_engine, keep_bounded, settings_here, staging_dir, strategy_for,
)
from ._stream import CHUNK, atomic_download, holds_verified, mark_verified, sha256_file
from ._uri import parse_uri

__all__ = ["offload", "Ref", "DEFAULT_MIN_SIZE", "COMPRESS_CHOICES"]

log = logging.getLogger("covalent_lot")

DEFAULT_MIN_SIZE = 4 * 2**20
COMPRESS_CHOICES = ("auto", True, False)
ZSTD_SUFFIX = ".zst"
ZSTD_LEVEL = 1  # higher levels cost far more time for about the same ratio on numeric data
# "auto" compresses when a sample shrinks to at most this fraction: compression pays
# only on links slower than what zstd and the extra sha256 passes cost, and the
# smaller the ratio the faster the link it still pays on (docs/measurements.md).
AUTO_RATIO = 0.5
SAMPLE_BYTES = 256 * 1024
SAMPLES = 4
OFFLOAD_TO_ENV = "COVALENT_LOT_OFFLOAD_TO"
_SUFFIX = {"numpy": ".npy", "parquet": ".parquet", "bytes": ".bin", "text": ".txt", "pickle": ".pkl"}
_CODECS = {codec.name: codec for codec in _objects.CODECS}


# --- the reference --------------------------------------------------------------------------
@dataclasses.dataclass(eq=False, repr=False)  # equality is Portable's: the same plain values
class Ref(Portable):
    """A value offloaded by :func:`offload`: where it is and how to read it back.

    Plain values only (no credentials): ``uri``; ``sha256``/``size`` of the
    stored bytes; ``raw_sha256``/``raw_size`` of the encoded bytes before
    compression (equal without it); ``codec``; ``compression`` (None or
    "zstd"); the ``dispatch_id``/``node_id`` that stored it (None where
    unknown); the strategy class and the options given in code.
    """

    VERSION = 1

    uri: str
    sha256: str
    size: int
    raw_sha256: str
    raw_size: int
    codec: str
    compression: str | None
    dispatch_id: str | None
    node_id: str | None
    strategy: str
    options: dict
    extra: str = "all"
    version: int = dataclasses.field(default=VERSION, init=False)

    def load(self, *, mmap: bool = False) -> Any:
        """The value, from this machine's verified local copy or downloaded and
        verified (sha256 of the stored bytes, and of the decoded ones after
        decompression). ``mmap=True`` memory-maps a numpy array read-only."""
        with contextlib.ExitStack() as held:
            value = _load_ref(self, mmap, held)
            if mmap and self.codec == "numpy":
                # The array reads the file lazily: hold it as long as this process lives.
                _cache.hold_until_exit(_cached_path(self, _settings(self)))
            return value

    def __repr__(self) -> str:
        where = f", dispatch {self.dispatch_id}" if self.dispatch_id else ""
        packed = f", {self.compression} {self.raw_size:,} -> {self.size:,} bytes" if self.compression else ""
        return (f"lot.Ref({self.uri!r}, {self.codec}, {self.raw_size:,} bytes{packed}, "
                f"sha256 {self.raw_sha256[:12]}{where})")


# --- the decorator --------------------------------------------------------------------------
def offload(fn: Callable | None = None, *, to: str | None = None, min_size: int | str = DEFAULT_MIN_SIZE,
            dedup: bool = False, compress: bool | str = "auto", mmap: bool = False,
            strategy: Any = None, **options: Any) -> Callable:
    """Store an electron's large return value, and load the values it is given.

    Use under ``@ct.electron``::

        @ct.electron
        @lot.offload(to="s3://my-bucket/lot/", min_size="8MiB")
        def produce(): ...

    - ``to``: the folder URI values are stored below; default: ``offload_to``
      in ``[lot]`` of the executor's covalent.conf (or ``COVALENT_LOT_OFFLOAD_TO``).
    - ``min_size``: smaller return values stay by value (bytes or "4MiB").
    - ``dedup``: content-addressed keys; bytes already stored are not uploaded again.
    - ``compress``: "auto" (zstd when a sample shrinks to <= 50%), True, False.
      Needs ``zstandard`` (``pip install covalent-lot[zstd]``) when it compresses.
    - ``mmap``: numpy arrays among the arguments are memory-mapped, read-only.
    - ``strategy``: a built strategy for ``to`` instead of options; other
      keywords: options of the store's strategy (``store="minio"``, ...).
    """
    if fn is None:
        return functools.partial(offload, to=to, min_size=min_size, dedup=dedup,
                                 compress=compress, mmap=mmap, strategy=strategy, **options)
    if not callable(fn):
        raise TypeError(f"offload decorates a function, got {fn!r}; write @lot.offload or @lot.offload(...)")
    if is_electron(fn):
        raise TypeError(
            f"@lot.offload goes under @ct.electron, not above it: write @ct.electron, then "
            f"@lot.offload(...), then def {getattr(fn, '__name__', 'f')}(...)"
        )
    plan = _plan(fn, to, min_size, dedup, compress, mmap, strategy, options)
    return _portable.offloaded(fn, plan, f"{__name__}:run")


def _plan(fn: Callable, to: str | None, min_size: Any, dedup: Any, compress: Any, mmap: Any,
          strategy: Any, options: dict) -> dict:
    """The decorator's arguments, checked on the client, as plain values."""
    try:
        limit = parse_size(min_size)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"offload(min_size={min_size!r}): {exc}") from None
    if limit < 0:
        raise ValueError(f"offload(min_size={min_size!r}) must be >= 0")
    if compress not in COMPRESS_CHOICES or not isinstance(compress, (bool, str)):
        raise ValueError(f"offload(compress={compress!r}) must be 'auto', True or False")
    for name, value in (("dedup", dedup), ("mmap", mmap)):
        if not isinstance(value, bool):
            raise TypeError(f"offload({name}={value!r}) must be True or False")
    if strategy is not None and (options or to is None):
        raise TypeError("offload(strategy=...) goes with to= and without other options")
    if to is not None:
        prefix = _folder(to)
        # Options are checked here, on the client; only the ones given travel.
        built = strategy if strategy is not None else strategy_for(prefix, **options)
        built.parse(prefix)
        strategy, options = built.class_path(), dict(built.explicit)
    else:
        prefix = None
    extra = _load(strategy).extra if strategy is not None else "all"
    return {"to": prefix, "extra": extra, "min_size": limit, "dedup": dedup, "compress": compress, "mmap": mmap,
            "options": options, "strategy": strategy, "name": getattr(fn, "__name__", "value")}


def _folder(to: Any) -> str:
    if not isinstance(to, str):
        raise TypeError(f"offload(to=...) is a folder URI such as 's3://bucket/lot/', got {to!r}")
    prefix = to if to.endswith("/") else to + "/"
    parse_uri(prefix)
    if "{" in prefix:
        raise ValueError(f"offload(to={to!r}): no placeholders here; keys get the dispatch id themselves")
    return prefix


def run(fn: Callable, plan: dict, args: tuple, kwargs: dict) -> Any:
    """The decorated electron: load the Refs among its arguments, call it, store its value."""
    with log_to_stderr_if_unconfigured():
        with contextlib.ExitStack() as held:  # inputs held against eviction while fn runs
            args, kwargs = _resolve_refs((args, kwargs), plan["mmap"], held)
            value = fn(*args, **kwargs)
        return store(value, plan)


def _resolve_refs(value: Any, mmap: bool, held: contextlib.ExitStack) -> Any:
    """``value`` with every Ref in it (also in lists, tuples, dicts) loaded; a
    container without a Ref is passed on as it is, not copied."""
    if isinstance(value, Ref):
        return _load_ref(value, mmap, held)
    if isinstance(value, dict):
        items = {k: _resolve_refs(v, mmap, held) for k, v in value.items()}
        if all(items[k] is value[k] for k in value):
            return value
        if type(value) is dict:
            return items
        try:
            return type(value)(items)  # OrderedDict and the like
        except TypeError:  # a dict subclass built differently (defaultdict): a plain dict
            return items
    if isinstance(value, (list, tuple)):
        items = [_resolve_refs(v, mmap, held) for v in value]
        if all(new is old for new, old in zip(items, value)):
            return value
        if isinstance(value, list):
            return items
        return type(value)._make(items) if hasattr(value, "_make") else tuple(items)
    return value


# --- storing ---------------------------------------------------------------------------------
def _prefix_here(plan: dict) -> tuple[str, str, dict]:
    """(prefix, strategy class path, options) as this machine resolves them."""
    if plan["to"] is not None:
        return plan["to"], plan["strategy"], plan["options"]
    from ._covalent import read_conf_section

    to = os.environ.get(OFFLOAD_TO_ENV) or read_conf_section("lot").get("offload_to")
    if not to:
        import socket

        raise ValueError(
            f"{plan['name']}: offload has no store to write to on {socket.gethostname()}: give "
            f"@lot.offload(to='s3://bucket/prefix/'), or set offload_to in [lot] of this "
            f"machine's covalent.conf (or {OFFLOAD_TO_ENV})"
        )
    prefix = _folder(to)
    scheme = prefix.split("://", 1)[0].lower()
    if scheme not in STRATEGIES:
        strategy_for(prefix)  # the usual "no strategy for scheme" error
    return prefix, STRATEGIES[scheme], plan["options"]


class _TooBig(Exception):
    pass


class _Counter:
    """A file that only counts, and stops the writer once ``limit`` is reached."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0

    def write(self, data) -> int:
        self.count += memoryview(data).nbytes
        if self.count >= self.limit:
            raise _TooBig
        return memoryview(data).nbytes


def _encoder(value: Any) -> str:
    """The name of the ``_objects`` codec for ``value``'s type (object arrays: pickle)."""
    if _objects.NUMPY.accepts(value) and value.dtype.hasobject:
        return "pickle"
    return _objects.codec_for("value" + _objects.suffix_for(value)).name


NPY_HEADER = 128  # np.save's header for any ordinary array (a multiple of 64 bytes)


def _encoded_size(value: Any, codec: str, limit: int) -> int | None:
    """The encoded size of ``value`` (exact enough to compare with ``limit``),
    or None when only encoding tells (DataFrames, pickles)."""
    if codec == "numpy":
        return value.nbytes + NPY_HEADER
    if codec == "bytes":
        return memoryview(value).nbytes
    if codec == "text":  # 1 to 4 UTF-8 bytes per character: encode only when it matters
        if len(value) >= limit or 4 * len(value) < limit:
            return len(value)
        return len(value.encode("utf-8", "surrogatepass"))
    return None


def _pickle_dump(value: Any, f) -> None:
    import cloudpickle  # Covalent's own: lambdas and local classes too

    cloudpickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)


def _write(value: Any, codec: str, f) -> None:
    if codec == "pickle":
        _pickle_dump(value, f)  # cloudpickle: what plain pickle refuses (lambdas, local classes)
    else:
        _CODECS[codec].write(value, f)


def _is_small(value: Any, codec: str, limit: int, name: str) -> bool:
    size = _encoded_size(value, codec, limit)
    if size is not None or codec != "pickle":
        return size is not None and size < limit
    try:
        _pickle_dump(value, _Counter(limit))
    except _TooBig:
        return False
    except Exception as exc:  # noqa: BLE001 - whatever pickling raised, one clear error
        raise _unencodable(value, name, exc) from exc
    return True


def _unencodable(value: Any, name: str, exc: BaseException) -> TypeError:
    return TypeError(
        f"the return value of {name} ({_objects._type_name(value)}) cannot be offloaded: it cannot "
        f"be pickled ({type(exc).__name__}: {exc}). Return data instead (arrays, DataFrames, "
        "bytes, str, or objects that pickle)"
    )


def store(value: Any, plan: dict) -> Any:
    """``value`` itself when small, else a :class:`Ref` to its stored copy."""
    if isinstance(value, Ref):
        return value
    codec = _encoder(value)
    if _is_small(value, codec, plan["min_size"], plan["name"]):
        return value
    prefix, strategy, options = _prefix_here(plan)
    cls = _load(strategy)
    settings = settings_here(strategy, options)
    objects = os.path.join(staging_dir(settings), "objects")
    os.makedirs(objects, exist_ok=True)
    started = time.perf_counter()
    incoming = os.path.join(objects, f"incoming-{uuid.uuid4().hex}{_SUFFIX[codec]}")
    try:
        with atomic_download(incoming, fsync=False) as (f, _temp):
            try:
                _write(value, codec, f)
            except Exception as exc:  # noqa: BLE001
                if codec == "pickle":
                    raise _unencodable(value, plan["name"], exc) from exc
                raise
        raw_sha, raw_size = sha256_file(incoming)
        if raw_size < plan["min_size"]:  # the estimate was low (a DataFrame, say)
            return value
        encoded = _cache_path(objects, raw_sha, codec)
        os.makedirs(os.path.dirname(encoded), exist_ok=True)
        os.replace(incoming, encoded)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(incoming)
    with _cache.pin(encoded):  # no trim elsewhere removes it before it is uploaded
        mark_verified(encoded, raw_sha)
        encode_s = time.perf_counter() - started
        compress = _should_compress(encoded, plan["compress"])
        suffix = _SUFFIX[codec] + (ZSTD_SUFFIX if compress else "")
        ids = run_context()
        if plan["dedup"]:
            key = f"{prefix}sha256/{raw_sha}{suffix}"
        elif ids is not None:
            key = f"{prefix}{ids['dispatch_id']}/{ids['node_id']}/{plan['name']}-{raw_sha[:16]}{suffix}"
        else:
            key = f"{prefix}run-{uuid.uuid4().hex[:16]}/{plan['name']}-{raw_sha[:16]}{suffix}"
        location = parse_uri(key)
        # The reference carries the sha256 of what is stored (computed while
        # encoding, and the cache's address): the object stores that one too.
        engine = build_engine(cls.backend_path, settings.replace("offload", checksum="sha256"))
        try:
            existing = _existing(engine, location) if plan["dedup"] else None
            if existing is not None:
                sha, size = existing
                log.info("%s: %s already holds these bytes (sha256 %s): not uploaded again",
                         plan["name"], key, raw_sha[:12])
            elif compress:
                packed = f"{encoded}.{uuid.uuid4().hex[:8]}{ZSTD_SUFFIX}"
                sha, size = _compress(encoded, packed)
                try:
                    with _cache.pin(packed):
                        mark_verified(packed, sha)  # the upload need not hash it again
                        stats = engine.upload(packed, location)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(packed)
                log.info("%s: stored %s (zstd %d -> %d bytes) in %.2f s", plan["name"], key, raw_size,
                         size, encode_s + stats.seconds)
            else:
                stats = engine.upload(encoded, location)
                sha, size = raw_sha, raw_size
                log.info("%s: stored %s (%d bytes) in %.2f s", plan["name"], key, size, encode_s + stats.seconds)
        finally:
            engine.backend.close()
    keep_bounded(settings, encoded)
    return Ref(key, sha, size, raw_sha, raw_size, codec, "zstd" if compress else None,
               ids and ids["dispatch_id"], ids and ids["node_id"], strategy, dict(options), cls.extra)


def _cache_path(objects: str, raw_sha: str, codec: str) -> str:
    return os.path.join(objects, raw_sha[:2], raw_sha + _SUFFIX[codec])


def _existing(engine, location) -> tuple[str, int] | None:
    try:
        found = engine.ls(location)
    except FileNotFoundError:
        return None
    if len(found) == 1 and found[0].sha256 is not None:
        return found[0].sha256, found[0].size
    return None  # stored without a checksum: upload ours over it


def _zstd():
    try:
        import zstandard
    except ImportError as exc:
        raise ImportError(
            "offload(compress=...) needs the zstandard module: pip install covalent-lot[zstd] "
            "(or zstandard) in the Python that runs the electron, or give compress=False"
        ) from exc
    return zstandard


def _should_compress(path: str, compress: bool | str) -> bool:
    if compress is not True and compress != "auto":
        return False
    zstd = _zstd() if compress is True else _zstd_or_none()
    if zstd is None:
        return False
    if compress is True:
        return True
    size = os.path.getsize(path)
    compressor = zstd.ZstdCompressor(level=ZSTD_LEVEL)
    taken = packed = 0
    with open(path, "rb") as f:
        for i in range(SAMPLES):
            f.seek(max(0, (size - SAMPLE_BYTES) * i // max(1, SAMPLES - 1)))
            sample = f.read(SAMPLE_BYTES)
            taken += len(sample)
            packed += len(compressor.compress(sample))
    return taken > 0 and packed <= AUTO_RATIO * taken


def _zstd_or_none():
    try:
        return _zstd()
    except ImportError:
        return None


class _HashingWriter:
    def __init__(self, f):
        self.f = f
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.f.write(data)


def _compress(source: str, packed: str) -> tuple[str, int]:
    zstd = _zstd()
    with atomic_download(packed, fsync=False) as (f, _temp), open(source, "rb") as src:
        out = _HashingWriter(f)
        zstd.ZstdCompressor(level=ZSTD_LEVEL, threads=-1).copy_stream(src, out, read_size=CHUNK,
                                                                     write_size=CHUNK)
    return out.digest.hexdigest(), out.size


# --- loading ---------------------------------------------------------------------------------
def _settings(ref: Ref):
    return settings_here(ref.strategy, ref.options)


def _cached_path(ref: Ref, settings) -> str:
    return _cache_path(os.path.join(staging_dir(settings), "objects"), ref.raw_sha256, ref.codec)


def _load_ref(ref: Ref, mmap: bool, held: contextlib.ExitStack) -> Any:
    if not isinstance(ref, Ref) or getattr(ref, "version", None) != Ref.VERSION:
        raise ValueError(f"{ref!r} is not a covalent-lot reference this version can read "
                         f"(version {getattr(ref, 'version', None)}, expected {Ref.VERSION})")
    if mmap and ref.codec != "numpy":
        mmap = False  # only arrays map; other values are read whole
    settings = _settings(ref)
    local = _cached_path(ref, settings)
    for _attempt in range(3):
        if holds_verified(local, ref.raw_sha256, ref.raw_size):
            if held.enter_context(_cache.pin(local)):
                log.debug("%s: the verified local copy %s is used", ref.uri, local)
                return _decode(ref, local, mmap)
            continue  # evicted just now: fetch it
        _fetch(ref, settings, local)  # verified by hashing, xattrs or not
        if held.enter_context(_cache.pin(local)):
            keep_bounded(settings, local)  # the cache stays bounded; this copy is held
            return _decode(ref, local, mmap)
    raise OSError(f"{ref.uri}: the local copy {local} was removed each time it was fetched; "
                  "raise cache_limit (covalent.conf [lot]) above the size of the values in use")


def _decode(ref: Ref, local: str, mmap: bool) -> Any:
    return _CODECS[ref.codec].read(local, mmap)


def _fetch(ref: Ref, settings, local: str) -> None:
    """Download ``ref``'s object into the cache at ``local``, verified (and decompressed)."""
    cls = _load(ref.strategy)
    location = parse_uri(ref.uri)
    # A compressed download is a temporary file of this loader's own (others may load it too).
    target = f"{local}.{uuid.uuid4().hex[:8]}{ZSTD_SUFFIX}" if ref.compression else local
    engine = build_engine(cls.backend_path, settings)
    try:
        try:
            found = engine.ls(location)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{ref.uri} is gone: the value offloaded by {_origin(ref)} was removed from the "
                "store (covalent-lot gc or rm, or a lifecycle rule); run the producer again"
            ) from exc
        stored = found[0].checksum if len(found) == 1 else None
        if stored is not None and (found[0].size != ref.size
                                   or (stored.algorithm == "sha256" and stored.value != ref.sha256)):
            raise ChecksumMismatchError(
                f"{ref.uri} now holds other bytes than the ones {_origin(ref)} stored ({stored} and "
                f"{found[0].size} bytes, the reference has sha256:{ref.sha256[:16]}... and {ref.size} "
                "bytes): it was overwritten. Nothing was loaded; run the producer again"
            )
        engine.download(location, target)
    finally:
        engine.backend.close()
    if not holds_verified(target, ref.sha256, ref.size):
        actual, size = sha256_file(target)
        if (actual, size) != (ref.sha256, ref.size):
            os.unlink(target)
            raise ChecksumMismatchError(
                f"{ref.uri}: the downloaded bytes have sha256 {actual[:16]}... ({size} bytes), the "
                f"reference {ref.sha256[:16]}... ({ref.size} bytes); nothing was loaded"
            )
        mark_verified(target, actual)
    if ref.compression:
        try:
            _decompress(ref, target, local)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)


def _decompress(ref: Ref, packed: str, local: str) -> None:
    if ref.compression != "zstd":
        raise ValueError(f"{ref.uri}: unknown compression {ref.compression!r}; upgrade covalent-lot")
    zstd = _zstd()
    with atomic_download(local, fsync=False) as (f, _temp), open(packed, "rb") as src:
        out = _HashingWriter(f)
        zstd.ZstdDecompressor().copy_stream(src, out, read_size=CHUNK, write_size=CHUNK)
        if (out.digest.hexdigest(), out.size) != (ref.raw_sha256, ref.raw_size):
            raise ChecksumMismatchError(
                f"{ref.uri}: decompressed to sha256 {out.digest.hexdigest()[:16]}... ({out.size} "
                f"bytes), the reference has {ref.raw_sha256[:16]}... ({ref.raw_size}); nothing loaded"
            )
    mark_verified(local, ref.raw_sha256)


def _origin(ref: Ref) -> str:
    if ref.dispatch_id:
        return f"dispatch {ref.dispatch_id} (node {ref.node_id})"
    return "a run with no dispatch id"
