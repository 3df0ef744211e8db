"""Shared objects used from many threads at once: a backend's lazy client, one
engine, one strategy, option resolution, and the log line each transfer prints.

Covalent can run several electrons' transfers in threads of one worker, and users
call ``put``/``get`` from their own pools; nothing here may mix one transfer's
bytes, counts or log lines with another's. Every test starts its threads on a
barrier so that they really overlap.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
import time

import pytest

from covalent_lot import parse_uri
from covalent_lot._engine import Engine
from covalent_lot._errors import ErrorKind
from covalent_lot._retry import RetryPolicy

from .lot_fakes import STORES, FakeServiceError, MemoryBackend, checksum_of

THREADS = 8
WAIT = 30  # seconds for any thread


def in_threads(fn, count: int = THREADS) -> list:
    """``fn(i, barrier)`` in ``count`` threads that start together; their results, in order."""
    barrier = threading.Barrier(count, timeout=WAIT)
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(fn, i, barrier) for i in range(count)]
        return [f.result(timeout=WAIT) for f in futures]


def write_files(root, i: int) -> dict[str, bytes]:
    """Thread ``i``'s own file and folder, with sizes no other thread has."""
    files = {"f.bin": os.urandom(20_000 + i), "dir/a.bin": os.urandom(3_000 + i), "dir/sub/b.bin": os.urandom(i)}
    for rel, data in files.items():
        path = root / f"t{i}" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


class SlowConnect(MemoryBackend):
    """connect() takes a while and counts its calls: a race would make two clients."""

    def __init__(self, settings):
        super().__init__(settings)
        self.connects = 0

    def connect(self):
        self.connects += 1
        time.sleep(0.02)
        return object()


def test_lazy_client_is_made_once_under_contention():
    backend = SlowConnect({"fake_store": "thread-safety-connect"})

    def use(i, barrier):
        barrier.wait()
        return backend.client

    clients = in_threads(use, 16)
    assert backend.connects == 1
    assert all(client is clients[0] for client in clients)


@pytest.fixture
def shared_engine(request):
    backend = MemoryBackend({"fake_store": request.node.nodeid, "max_files": 4})
    backend.objects.clear()
    backend.chunk = 4096
    return Engine(backend, RetryPolicy(max_attempts=5, base_delay=0, max_delay=0))


def test_one_engine_many_threads_keeps_bytes_and_stats_apart(tmp_path, shared_engine):
    backend = shared_engine.backend
    # Transient read failures, taken by whichever threads read first: every retry is
    # counted in the stats of the transfer that made it, and nowhere else.
    failures = 5
    backend.read_failures.extend(FakeServiceError(ErrorKind.THROTTLED, "SlowDown") for _ in range(failures))

    def own_transfers(i, barrier):
        files = write_files(tmp_path / "src", i)
        out = tmp_path / "out" / f"t{i}"
        barrier.wait()
        stats = [
            shared_engine.upload(str(tmp_path / "src" / f"t{i}" / "f.bin"), parse_uri(f"s3://bkt/t{i}/f.bin")),
            shared_engine.upload(str(tmp_path / "src" / f"t{i}" / "dir"), parse_uri(f"s3://bkt/t{i}/dir/")),
            shared_engine.download(parse_uri(f"s3://bkt/t{i}/f.bin"), str(out / "f.bin")),
            shared_engine.download(parse_uri(f"s3://bkt/t{i}/dir/"), str(out / "dir")),
        ]
        folder = len(files["dir/a.bin"]) + len(files["dir/sub/b.bin"])
        assert [(s.files, s.bytes, s.verified) for s in stats] == [
            (1, len(files["f.bin"]), 1), (2, folder, 2), (1, len(files["f.bin"]), 1), (2, folder, 2)]
        for rel, data in files.items():
            assert (out / rel).read_bytes() == data, (i, rel)
            assert backend.objects[("bkt", f"t{i}/{rel}")].checksum == checksum_of(data)
        return sum(s.retries for s in stats)

    retries = in_threads(own_transfers)
    assert sum(retries) == failures and not backend.read_failures
    assert len(backend.keys()) == 3 * THREADS


def test_threads_downloading_one_object_to_one_path(tmp_path, shared_engine):
    """Each download lands whole (temp file + rename): the last rename wins, intact."""
    data = os.urandom(200_000)
    shared_engine.backend.add("bkt", "shared.bin", data)
    target = tmp_path / "same" / "shared.bin"
    # reuse_local would let most threads skip the download: make every one move bytes.
    shared_engine.backend.settings["reuse_local"] = False

    def fetch(i, barrier):
        barrier.wait()
        return shared_engine.download(parse_uri("s3://bkt/shared.bin"), str(target)).bytes

    assert in_threads(fetch) == [len(data)] * THREADS
    assert target.read_bytes() == data
    assert os.listdir(target.parent) == ["shared.bin"]


# --- one strategy -----------------------------------------------------------------------


@pytest.fixture
def memory_strategy(s3):
    """An S3Strategy whose transfers run on the in-memory backend (as the executor would)."""

    class MemoryStrategy(s3.S3Strategy):
        backend_path = "tests.lot_fakes:MemoryBackend"

    STORES.pop("default", None)
    return MemoryStrategy(endpoint_url="http://127.0.0.1:9", base_delay=0, max_delay=0)


def test_one_strategy_many_threads(tmp_path, memory_strategy):
    settings = memory_strategy.settings.as_dict()

    def round_trip(i, barrier):
        files = write_files(tmp_path / "src", i)
        barrier.wait()
        memory_strategy.put(str(tmp_path / "src" / f"t{i}"), f"s3://bkt/t{i}/")
        memory_strategy.get(f"s3://bkt/t{i}/", str(tmp_path / "out" / f"t{i}"))
        return all((tmp_path / "out" / f"t{i}" / rel).read_bytes() == data for rel, data in files.items())

    assert in_threads(round_trip) == [True] * THREADS
    assert memory_strategy.settings.as_dict() == settings
    assert len([key for bucket, key in STORES["default"] if bucket == "bkt"]) == 3 * THREADS


@contextlib.contextmanager
def unconfigured_logging():
    """No handler anywhere, as in a fresh worker. Entered inside the test: pytest
    puts its capturing handlers on the root logger again for each test phase."""
    root = logging.getLogger()
    lot_logger = logging.getLogger("covalent_lot")
    saved = (root.handlers[:], lot_logger.handlers[:], lot_logger.level)
    root.handlers.clear()
    lot_logger.handlers.clear()
    lot_logger.setLevel(logging.NOTSET)
    try:
        yield lot_logger
    finally:
        root.handlers[:], lot_logger.handlers[:] = saved[0], saved[1]
        lot_logger.setLevel(saved[2])


def test_each_transfer_logs_its_line_once_from_many_threads(tmp_path, memory_strategy, capsys):
    def upload(i, barrier):
        source = tmp_path / f"f{i}.bin"
        source.write_bytes(os.urandom(1000 + i))
        barrier.wait()
        memory_strategy.put(str(source), f"s3://bkt/log/f{i}.bin")

    with unconfigured_logging() as lot_logger:
        # One at a time, each line shows once (the test's own sanity check) ...
        in_threads(upload, 1)
        assert capsys.readouterr().err.count("/f0.bin -> s3://bkt/log/f0.bin: 1 file(s)") == 1
        for _ in range(5):  # ... and at once, too (a race needs a few rounds to show).
            in_threads(upload)
            err = capsys.readouterr().err
            counts = [err.count(f"/f{i}.bin -> s3://bkt/log/f{i}.bin: 1 file(s)") for i in range(THREADS)]
            assert counts == [1] * THREADS, err
            assert lot_logger.handlers == [] and lot_logger.level == logging.NOTSET


def test_options_resolve_the_same_from_many_threads(covalent_conf, monkeypatch):
    import covalent_lot as lot

    covalent_conf({"max_attempts": 3, "s3": {"endpoint_url": "http://conf:1", "max_concurrency": 3}})
    monkeypatch.setenv("COVALENT_LOT_S3_MAX_CONCURRENCY", "6")

    def build(i, barrier):
        barrier.wait()
        strategy = lot.strategy_for("s3://bkt/key", multipart_chunksize=f"{5 + i}MiB")
        return strategy.settings.as_dict(), dict(strategy.settings.sources)

    for i, (values, sources) in enumerate(in_threads(build, 16)):
        assert (values["endpoint_url"], values["max_concurrency"], values["max_attempts"]) == ("http://conf:1", 6, 3)
        assert values["multipart_chunksize"] == (5 + i) * 1024 * 1024
        assert sources["max_concurrency"] == "environment COVALENT_LOT_S3_MAX_CONCURRENCY"
        assert sources["endpoint_url"] == "covalent.conf [lot.s3]"
