"""Streaming checksums (crc32c, sha256) over in-order and ranged writes, and atomic local files."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import google_crc32c
import pytest

from covalent_lot import _stream
from covalent_lot._stream import TEMP_MARK, VerifyingSink, atomic_download, sha256_file


def leftovers(folder) -> list[str]:
    return [name for name in os.listdir(folder) if TEMP_MARK in name]


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture(params=[_stream.CHUNK, 4096, 5], ids=["chunk-default", "chunk-4k", "chunk-5"])
def read_back_chunk(request, monkeypatch):
    """Run with the read-back chunk at its size and tiny, so its loop runs many times."""
    monkeypatch.setattr(_stream, "CHUNK", request.param)
    return request.param


ALGORITHM = {"name": "sha256"}


@pytest.fixture(autouse=True, params=["sha256", "crc32c"])
def algorithm(request):
    """Every sink test runs with both checksums."""
    ALGORITHM["name"] = request.param
    return request.param


def expected(data: bytes) -> str:
    if ALGORITHM["name"] == "crc32c":
        return f"{google_crc32c.value(data):08x}"
    return hashlib.sha256(data).hexdigest()


def sink_for(tmp_path, name="out.bin", hashing=True):
    f = open(tmp_path / name, "wb+")
    return f, VerifyingSink(f, ALGORITHM["name"] if hashing else None)


def ranges(size: int, rng: random.Random, largest: int = 5000) -> list[tuple[int, int]]:
    out, start = [], 0
    while start < size:
        end = min(size, start + rng.randint(1, largest))
        out.append((start, end))
        start = end
    return out


# --- sha256_file --------------------------------------------------------------------

def test_sha256_file(tmp_path, read_back_chunk):
    data = payload(100_003)
    (tmp_path / "x").write_bytes(data)
    assert sha256_file(str(tmp_path / "x")) == (hashlib.sha256(data).hexdigest(), len(data))
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(str(tmp_path / "empty")) == (hashlib.sha256(b"").hexdigest(), 0)


# --- VerifyingSink ------------------------------------------------------------------

def test_in_order_writes(tmp_path, read_back_chunk):
    data = payload(250_000, seed=1)
    f, sink = sink_for(tmp_path)
    with f:
        rng = random.Random(1)
        for start, end in ranges(len(data), rng):
            assert sink.write(data[start:end]) == end - start
        assert sink.tell() == len(data)
        assert sink.hexdigest() == expected(data)
        assert sink.bytes_written == len(data)
    assert (tmp_path / "out.bin").read_bytes() == data


@pytest.mark.parametrize("seed", range(12))
def test_shuffled_ranged_writes(tmp_path, read_back_chunk, seed):
    rng = random.Random(seed)
    data = payload(rng.randint(1, 300_000), seed=seed)
    parts = ranges(len(data), rng)
    rng.shuffle(parts)
    f, sink = sink_for(tmp_path)
    with f:
        for i, (start, end) in enumerate(parts):
            if i % 2:
                sink.seek(start)
                sink.write(data[start:end])
            else:
                sink.write_at(start, data[start:end])
        assert sink.hexdigest() == expected(data)
    assert (tmp_path / "out.bin").read_bytes() == data


@pytest.mark.parametrize("seed", range(12))
def test_shuffled_writes_with_duplicate_and_overlapping_rewrites(tmp_path, read_back_chunk, seed):
    rng = random.Random(100 + seed)
    data = payload(rng.randint(1000, 200_000), seed=seed)
    parts = ranges(len(data), rng)
    # An SDK retrying a range rewrites the same bytes; some rewrites straddle
    # the boundaries of the original ranges.
    extra = [rng.choice(parts) for _ in range(max(1, len(parts) // 4))]
    for _ in range(max(1, len(parts) // 4)):
        a = rng.randrange(len(data))
        extra.append((a, min(len(data), a + rng.randint(1, 20_000))))
    writes = parts + extra
    rng.shuffle(writes)
    f, sink = sink_for(tmp_path)
    with f:
        for start, end in writes:
            sink.write_at(start, data[start:end])
        assert sink.hexdigest() == expected(data)
    assert (tmp_path / "out.bin").read_bytes() == data


def test_rewrite_just_after_an_in_order_write(tmp_path, read_back_chunk):
    data = payload(1000, seed=7)
    f, sink = sink_for(tmp_path)
    with f:
        sink.write_at(500, data[500:800])  # early
        sink.write_at(0, data[0:600])  # in order, overlaps the early range
        sink.write_at(600, data[600:1000])
        assert sink.hexdigest() == expected(data)


def test_early_ranges_merge_in_either_order(tmp_path, read_back_chunk):
    data = payload(90, seed=8)
    for order in ([(60, 90), (30, 60), (0, 30)], [(30, 60), (60, 90), (0, 30)],
                  [(60, 90), (0, 30), (30, 60)], [(30, 45), (60, 90), (45, 60), (0, 30)]):
        f, sink = sink_for(tmp_path)
        with f:
            for start, end in order:
                sink.write_at(start, data[start:end])
            assert sink.hexdigest() == expected(data), order


def test_last_write_wins_when_bytes_change(tmp_path):
    # A retried range may bring other bytes; the digest is of the file as it ends up.
    f, sink = sink_for(tmp_path)
    with f:
        sink.write_at(0, b"aaaa")
        sink.write_at(4, b"bbbb")
        sink.write_at(2, b"XX")
        assert sink.hexdigest() == expected(b"aaXXbbbb")


def test_concurrent_ranged_writes(tmp_path, read_back_chunk):
    rng = random.Random(42)
    data = payload(400_000, seed=42)
    parts = ranges(len(data), rng, largest=9000)
    rng.shuffle(parts)
    f, sink = sink_for(tmp_path)
    barrier = threading.Barrier(8)

    def write(part):
        start, end = part
        sink.write_at(start, data[start:end])

    with f:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: barrier.wait(), range(8)))
            list(pool.map(write, parts))
        assert sink.hexdigest() == expected(data)


def test_empty_file(tmp_path):
    f, sink = sink_for(tmp_path)
    with f:
        assert sink.hexdigest() == expected(b"")
    f, sink = sink_for(tmp_path, "empty2")
    with f:
        assert sink.write(b"") == 0
        assert sink.hexdigest() == expected(b"")
        assert sink.bytes_written == 0


def test_hexdigest_can_be_asked_twice(tmp_path):
    f, sink = sink_for(tmp_path)
    with f:
        sink.write_at(3, b"def")
        sink.write_at(0, b"abc")
        first = sink.hexdigest()
        assert sink.hexdigest() == first == expected(b"abcdef")


def test_hashing_off(tmp_path):
    f, sink = sink_for(tmp_path, hashing=False)
    with f:
        sink.write_at(5, b"world")
        sink.write_at(0, b"hello")
        assert sink.hexdigest() is None
        assert sink.bytes_written == 10
    assert (tmp_path / "out.bin").read_bytes() == b"helloworld"


def test_file_like_surface(tmp_path):
    f, sink = sink_for(tmp_path)
    with f:
        assert sink.seekable() and sink.writable() and not sink.readable()
        assert sink.seek(10) == 10
        assert sink.seek(-4, os.SEEK_CUR) == 6
        sink.write(b"xy")
        assert sink.tell() == 8
        sink.flush()
        assert sink.seek(0, os.SEEK_END) == 8
        sink.seek(0)
        sink.write(b"\0" * 6)
        assert sink.hexdigest() == expected(b"\0" * 6 + b"xy")


def test_memoryview_and_bytearray_writes(tmp_path):
    f, sink = sink_for(tmp_path)
    with f:
        sink.write(bytearray(b"abc"))
        sink.write(memoryview(b"xxdefxx")[2:5])
        assert sink.hexdigest() == expected(b"abcdef")


# --- atomic_download -----------------------------------------------------------------

class Boom(Exception):
    pass


def test_success_moves_into_place(tmp_path):
    target = tmp_path / "sub" / "dir" / "out.bin"
    with atomic_download(str(target)) as (f, temp):
        assert TEMP_MARK in os.path.basename(temp)
        assert os.path.dirname(temp) == str(target.parent)
        assert not target.exists()
        f.write(b"payload")
    assert target.read_bytes() == b"payload"
    assert leftovers(target.parent) == []


def test_failure_mid_stream_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(Boom):
        with atomic_download(str(target)) as (f, temp):
            f.write(b"half of it")
            f.flush()
            assert os.path.exists(temp)
            raise Boom("connection dropped")
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_failure_keeps_the_old_content(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old content")
    with pytest.raises(Boom):
        with atomic_download(str(target)) as (f, _):
            f.write(b"new but partial")
            raise Boom()
    assert target.read_bytes() == b"old content"
    assert leftovers(tmp_path) == []


def test_success_replaces_the_old_content(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old content that is longer than the new one")
    with atomic_download(str(target)) as (f, _):
        f.write(b"new")
    assert target.read_bytes() == b"new"
    assert leftovers(tmp_path) == []


def test_interrupt_also_cleans_up(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_download(str(target)) as (f, _):
            f.write(b"x")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_empty_download_creates_an_empty_file(tmp_path):
    target = tmp_path / "empty.bin"
    with atomic_download(str(target)):
        pass
    assert target.read_bytes() == b""


def test_directory_destination_is_refused(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as info:
        with atomic_download(str(folder)):
            pytest.fail("must not get here")
    assert repr(str(folder)) in str(info.value)
    assert os.listdir(folder) == [] and leftovers(tmp_path) == []


def test_two_downloads_of_one_path_use_distinct_temp_files(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_download(str(target)) as (f1, temp1):
        with atomic_download(str(target)) as (f2, temp2):
            assert temp1 != temp2
            f2.write(b"second")
        f1.write(b"first")
    assert target.read_bytes() == b"first"
    assert leftovers(tmp_path) == []
