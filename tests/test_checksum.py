"""The stored checksum: crc32c (default) or sha256; ranges that combine; old objects keep verifying."""

from __future__ import annotations

import hashlib
import os
import random

import google_crc32c
import pytest

from covalent_lot._checksum import Checksum, RangeCrc, crc32c_combine, file_checksum, from_metadata
from covalent_lot._engine import Engine
from covalent_lot._retry import RetryPolicy
from covalent_lot._uri import parse_uri

from .lot_fakes import MemoryBackend, checksum_of


@pytest.mark.parametrize("left,right", [(0, 0), (0, 7), (7, 0), (1, 1), (1000, 4096), (3 << 20, 12345)])
def test_crc32c_combine_matches_the_whole(left, right):
    a, b = os.urandom(left), os.urandom(right)
    assert crc32c_combine(google_crc32c.value(a), google_crc32c.value(b), right) == google_crc32c.value(a + b)


@pytest.mark.parametrize("seed", range(5))
def test_ranges_in_any_order_give_the_crc_of_the_whole(seed):
    rng = random.Random(seed)
    data = rng.randbytes(200_000)
    cuts = sorted(rng.sample(range(1, len(data)), 30))
    pieces = [(s, data[s:e]) for s, e in zip([0] + cuts, cuts + [len(data)])]
    rng.shuffle(pieces)
    crc = RangeCrc()
    for offset, piece in pieces:
        assert crc.add(offset, memoryview(bytearray(piece)))  # any buffer, as SDKs hand them
    assert crc.whole(len(data)) == google_crc32c.value(data)
    assert crc.prefix == len(data)


def test_overlaps_and_gaps_are_told():
    crc = RangeCrc()
    assert crc.add(0, b"abcd") and crc.add(8, b"ijkl")
    assert crc.prefix == 4 and crc.whole(12) is None  # a gap
    assert not crc.add(2, b"cdef")  # overlaps what was checked: nothing recorded
    assert crc.add(4, b"efgh") and crc.whole(12) == google_crc32c.value(b"abcdefghijkl")


def test_parse_and_metadata():
    assert Checksum.parse("crc32c:0000ABCD") == Checksum("crc32c", "0000abcd")
    assert Checksum.parse("a" * 64) == Checksum("sha256", "a" * 64)  # records made before crc32c
    assert Checksum.parse("crc32c:xyz") is None and Checksum.parse("md5:" + "0" * 32) is None
    both = {"lot-sha256": "b" * 64, "lot-crc32c": "12345678"}
    assert from_metadata(both) == Checksum("crc32c", "12345678")  # the cheaper one first
    assert from_metadata({"LOT_SHA256": "B" * 64}, "_") == Checksum("sha256", "b" * 64)
    assert from_metadata({"lot-sha256": "short"}) is None and from_metadata(None) is None
    assert Checksum("crc32c", "12345678").metadata() == {"lot-crc32c": "12345678"}


def test_file_checksum_of_a_path_and_of_a_descriptor(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 5)
    (tmp_path / "f").write_bytes(data)
    assert file_checksum(str(tmp_path / "f"), "sha256") == (Checksum("sha256", hashlib.sha256(data).hexdigest()),
                                                           len(data))
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert file_checksum(fd, "crc32c") == (Checksum("crc32c", f"{google_crc32c.value(data):08x}"), len(data))
    finally:
        os.close(fd)
    with pytest.raises(ValueError, match="unknown checksum algorithm 'md5'"):
        file_checksum(str(tmp_path / "f"), "md5")


@pytest.fixture
def backend():
    return MemoryBackend({"fake_store": "checksum-tests", "reuse_local": True})


def engine(backend, **settings):
    backend.settings = {**backend.settings, **settings}
    return Engine(backend, RetryPolicy(max_attempts=1))


def test_uploads_store_crc32c_by_default_and_sha256_when_asked(tmp_path, backend):
    (tmp_path / "a").write_bytes(b"payload")
    assert engine(backend).upload(str(tmp_path / "a"), parse_uri("s3://bkt/a")).checksum == "crc32c"
    assert backend.objects[("bkt", "a")].checksum == checksum_of(b"payload")
    os.utime(tmp_path / "a")  # a new mtime: not the recorded upload any more
    assert engine(backend, checksum="sha256").upload(str(tmp_path / "a"), parse_uri("s3://bkt/b")).verified == 1
    assert backend.objects[("bkt", "b")].checksum == Checksum("sha256", hashlib.sha256(b"payload").hexdigest())


@pytest.mark.parametrize("stored", ["sha256", "crc32c"])
@pytest.mark.parametrize("configured", ["sha256", "crc32c"])
def test_objects_stored_with_either_verify_whatever_the_setting(tmp_path, backend, stored, configured):
    data = os.urandom(50_000)
    backend.reverse_writes = True  # ranges out of order
    backend.add("bkt", "k", data, checksum_of(data, stored))
    stats = engine(backend, checksum=configured).download(parse_uri("s3://bkt/k"), str(tmp_path / "k"))
    assert stats.verified == 1 and (tmp_path / "k").read_bytes() == data
    backend.serve_instead["k"] = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(OSError, match=f"stored {stored}:"):
        engine(backend, checksum=configured).download(parse_uri("s3://bkt/k"), str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()


def test_a_checksum_learnt_only_from_the_read_is_checked_by_reading_back(tmp_path, backend):
    """A listing without metadata: the sink runs the configured crc32c; the read says sha256."""
    data = os.urandom(30_000)
    backend.add("bkt", "d/x", data, checksum_of(data, "sha256"))
    stats = engine(backend).download(parse_uri("s3://bkt/d/"), str(tmp_path / "d"))
    assert stats.verified == 1 and (tmp_path / "d" / "x").read_bytes() == data


def test_stats_name_the_checksum_and_time_the_phases(tmp_path, backend):
    (tmp_path / "a").write_bytes(os.urandom(10_000))
    stats = engine(backend).upload(str(tmp_path / "a"), parse_uri("s3://bkt/p"))
    assert "1/1 crc32c stored" in stats.summary()
    assert set(stats.phases) >= {"hash", "transfer"}
    stats = engine(backend).download(parse_uri("s3://bkt/p"), str(tmp_path / "b"))
    assert "1/1 crc32c verified" in stats.summary() and set(stats.phases) >= {"stat", "hash", "transfer"}


def test_a_download_names_the_checksum_it_checked(tmp_path, backend):
    """The summary says what the objects store, not what this strategy would store."""
    backend.add("bkt", "m/a", b"aaa", checksum_of(b"aaa", "sha256"))
    assert "1/1 sha256 verified" in engine(backend).download(parse_uri("s3://bkt/m/a"), str(tmp_path / "a")).summary()
    backend.add("bkt", "m/b", b"bbb")  # crc32c
    stats = engine(backend, reuse_local=False).download(parse_uri("s3://bkt/m/"), str(tmp_path / "m"))
    assert "2/2 checksums verified" in stats.summary()
