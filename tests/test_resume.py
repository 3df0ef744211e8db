"""Resuming instead of starting over: downloads keep the bytes a failed attempt
received in order (engine + sink); SFTP uploads go on from the confirmed
bytes; GCS uploads retry one request (chunk) at a time."""

from __future__ import annotations

import hashlib
import os

import pytest

from covalent_lot import ChecksumMismatchError, parse_uri
from covalent_lot._backend import RemoteObject
from covalent_lot._engine import Engine
from covalent_lot._errors import ErrorKind
from covalent_lot._retry import RetryPolicy
from covalent_lot._stream import TEMP_MARK, VerifyingSink

from .lot_fakes import FakeServiceError, MemoryBackend, counting, checksum_of


@pytest.fixture
def backend(request):
    b = MemoryBackend({"fake_store": request.node.nodeid})
    b.objects.clear()
    b.chunk = 1000
    return b


@pytest.fixture
def engine(backend):
    return Engine(backend, RetryPolicy(max_attempts=4, base_delay=0, max_delay=0))


def reset() -> FakeServiceError:
    return FakeServiceError(ErrorKind.CONNECTION, "connection reset")


# --- the sink ---------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["sha256", "crc32c"])
def test_rewind_keeps_the_in_order_prefix_and_cuts_early_ranges(tmp_path, algorithm):
    data = os.urandom(10_000)
    with open(tmp_path / "f", "wb+") as f:
        sink = VerifyingSink(f, algorithm)
        sink.write_at(0, data[:3000])
        sink.write_at(6000, data[6000:8000])  # arrived early, past a gap
        assert sink.rewind() == 3000
        assert os.path.getsize(tmp_path / "f") == 3000
        sink.write(data[3000:])  # the resumed read, in order from where the sink stands
        assert sink.checksum() == checksum_of(data, algorithm)
        sink.close()


@pytest.mark.parametrize("algorithm", ["sha256", "crc32c"])
def test_rewind_without_the_prefix_starts_over(tmp_path, algorithm):
    with open(tmp_path / "f", "wb+") as f:
        sink = VerifyingSink(f, algorithm)
        sink.write_at(0, b"stale bytes")
        assert sink.rewind(keep_prefix=False) == 0
        sink.write(b"fresh")
        assert sink.checksum() == checksum_of(b"fresh", algorithm)
        sink.close()
    assert (tmp_path / "f").read_bytes() == b"fresh"


@pytest.mark.parametrize("algorithm", ["sha256", "crc32c", None])
def test_the_first_attempt_does_not_truncate_the_empty_file(tmp_path, algorithm):
    # ext4 (auto_da_alloc) writes a file truncated to 0 back to disk when it is
    # closed: ~0.2 s per 512 MiB on every download when the sink truncated always.
    class NoTruncate:
        def __init__(self, f):
            self._f = f

        def truncate(self, size=None):
            raise AssertionError(f"truncated to {size} with nothing to cut")

        def __getattr__(self, name):
            return getattr(self._f, name)

    with open(tmp_path / "f", "wb+") as f:
        sink = VerifyingSink(NoTruncate(f), algorithm)
        assert sink.rewind() == 0
        sink.write(b"data")
        assert sink.checksum() == (checksum_of(b"data", algorithm) if algorithm else None)
        sink.close()


# --- engine downloads -------------------------------------------------------------------
def test_a_failed_download_resumes_where_it_stopped(tmp_path, engine, backend):
    data = os.urandom(20_000)
    backend.add("bkt", "k", data)
    backend.read_failures = [reset(), reset()]  # each fails halfway through what it was asked
    stats = engine.download(parse_uri("s3://bkt/k"), str(tmp_path / "k"))
    assert (tmp_path / "k").read_bytes() == data
    assert stats.retries == 2 and stats.verified == 1
    assert backend.starts == [0, 10_000, 15_000]
    assert backend.served == len(data)  # not one byte sent twice
    assert not [n for n in os.listdir(tmp_path) if TEMP_MARK in n]


def test_a_download_not_pinned_to_a_version_starts_over(tmp_path, engine, backend, monkeypatch):
    data = os.urandom(8_000)
    backend.add("bkt", "k", data)
    unpinned = RemoteObject(parse_uri("s3://bkt/k"), len(data), checksum_of(data), None)
    monkeypatch.setattr(backend, "stat", lambda location: unpinned)
    backend.read_failures = [reset()]
    engine.download(parse_uri("s3://bkt/k"), str(tmp_path / "k"))
    assert (tmp_path / "k").read_bytes() == data
    assert backend.starts == [0, 0]


def test_a_resumed_download_is_still_verified_end_to_end(tmp_path, engine, backend):
    """Bytes joined across attempts pass the same sha256 check: a prefix that
    went bad is caught, and the destination keeps its old content."""
    data = os.urandom(8_000)
    backend.add("bkt", "k", data)
    (tmp_path / "k").write_bytes(b"old")
    backend.read_failures = [reset()]
    backend.serve_instead["k"] = b"X" * len(data)  # what the first attempt wrote is wrong ...

    original = backend.get_into

    def then_right(obj, sink, start=0):
        if start:
            backend.serve_instead.clear()  # ... the resumed part is right
        return original(obj, sink, start)

    backend.get_into = then_right
    with pytest.raises(ChecksumMismatchError, match="s3://bkt/k"):
        engine.download(parse_uri("s3://bkt/k"), str(tmp_path / "k"))
    assert (tmp_path / "k").read_bytes() == b"old"
    assert not [n for n in os.listdir(tmp_path) if TEMP_MARK in n]


def test_a_download_with_checksums_off_starts_over(tmp_path, backend):
    engine = Engine(backend, RetryPolicy(max_attempts=2, base_delay=0, max_delay=0), verify=False)
    data = os.urandom(6_000)
    backend.add("bkt", "k", data)
    backend.read_failures = [reset()]
    engine.download(parse_uri("s3://bkt/k"), str(tmp_path / "k"))
    assert (tmp_path / "k").read_bytes() == data
    assert backend.starts == [0, 0]


# --- resumable uploads (SFTP) -------------------------------------------------------------
def test_confirmed_prefix_grows_only_without_gaps():
    from covalent_lot._stream import ConfirmedPrefix

    upload = ConfirmedPrefix()
    assert upload.add(100, 150)  # confirmed out of order
    assert upload.prefix == 0
    assert upload.add(0, 100)
    assert upload.prefix == 150
    assert upload.add(200, 210)
    assert upload.prefix == 150
    assert not upload.add(140, 160)  # bytes confirmed twice: refused


# --- GCS upload requests ------------------------------------------------------------------
@pytest.fixture
def gcs_backend():
    gcs = pytest.importorskip("covalent_lot.strategies.gcs")
    strategy = gcs.GCSStrategy(endpoint="http://127.0.0.1:1", max_attempts=3, base_delay=0, max_delay=0)
    return gcs, gcs.GCSBackend(strategy.settings.as_dict())


def test_gcs_retries_one_upload_request_at_a_time(gcs_backend):
    gcs, backend = gcs_backend
    requests = pytest.importorskip("requests")
    chunk = counting(requests.ConnectionError("reset"), requests.ConnectionError("reset"), "sent")
    assert backend.retrying(chunk)() == "sent"
    assert chunk.calls == 3


def test_gcs_does_not_retry_a_permanent_upload_error(gcs_backend):
    gcs, backend = gcs_backend
    denied = counting(ValueError("not the service's error"))
    with pytest.raises(ValueError):
        backend.retrying(denied)()
    assert denied.calls == 1
