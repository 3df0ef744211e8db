"""A download onto a local file that already holds the stored bytes is skipped."""

from __future__ import annotations

import os

import pytest

from covalent_lot import parse_uri
from covalent_lot._engine import Engine
from covalent_lot._retry import RetryPolicy
from covalent_lot._stream import LOCAL_ATTR, holds_verified, mark_verified

from .lot_fakes import MemoryBackend, checksum_of

URI = parse_uri("s3://bkt/run/x.bin")


@pytest.fixture(autouse=True)
def need_xattrs(tmp_path):
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError:
        pytest.skip("this filesystem has no user xattrs (the shortcut is off there)")


def make(request, **settings):
    backend = MemoryBackend({"fake_store": request.node.nodeid, **settings})
    backend.objects.clear()
    return Engine(backend, RetryPolicy(1, 0, 0), verify=settings.get("verify", True)), backend


def test_consumer_on_the_producers_path_skips_the_download(tmp_path, request):
    engine, backend = make(request)
    path = tmp_path / "x.bin"
    path.write_bytes(b"payload" * 1000)
    engine.upload(str(path), URI)
    stats = engine.download(URI, str(path))
    assert (stats.files, stats.verified, stats.kept) == (1, 1, 1)
    assert backend.calls["get_into"] == 0
    assert "already here" in stats.summary()


def test_a_verified_download_is_kept_for_the_next_consumer(tmp_path, request):
    engine, backend = make(request)
    backend.add("bkt", "run/x.bin", b"stored bytes")
    target = tmp_path / "y.bin"
    assert engine.download(URI, str(target)).kept == 0
    assert engine.download(URI, str(target)).kept == 1
    assert backend.calls["get_into"] == 1


def test_a_changed_local_file_is_downloaded_again(tmp_path, request):
    engine, backend = make(request)
    path = tmp_path / "x.bin"
    path.write_bytes(b"A" * 100)
    engine.upload(str(path), URI)
    with open(path, "r+b") as f:  # same size, new bytes, new mtime
        f.write(b"B")
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    stats = engine.download(URI, str(path))
    assert stats.kept == 0 and path.read_bytes() == b"A" * 100


def test_a_changed_remote_object_is_downloaded(tmp_path, request):
    engine, backend = make(request)
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")
    engine.upload(str(path), URI)
    backend.add("bkt", "run/x.bin", b"new!")  # another writer replaced it
    stats = engine.download(URI, str(path))
    assert stats.kept == 0 and path.read_bytes() == b"new!"


@pytest.mark.parametrize("settings", [{"reuse_local": False}, {"verify": False}])
def test_the_shortcut_can_be_switched_off(tmp_path, request, settings):
    engine, backend = make(request, **settings)
    path = tmp_path / "x.bin"
    path.write_bytes(b"payload")
    engine.upload(str(path), URI)
    stats = engine.download(URI, str(path))
    assert stats.kept == 0 and backend.calls["get_into"] == 1


def test_record_format_and_mismatches(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    digest = checksum_of(b"abc")
    assert not holds_verified(str(path), digest, 3)  # no record
    mark_verified(str(path), digest)
    assert os.getxattr(path, LOCAL_ATTR).decode().split()[0] == str(digest) == f"crc32c:{digest.value}"
    assert holds_verified(str(path), digest, 3)
    assert not holds_verified(str(path), digest, 4)  # the stored size differs
    assert not holds_verified(str(path), checksum_of(b"abd"), 3)
    assert not holds_verified(str(tmp_path / "missing"), digest, 3)
    os.setxattr(path, LOCAL_ATTR, b"garbage")
    assert not holds_verified(str(path), digest, 3)


@pytest.mark.parametrize("setting, expected", [({}, 0), ({"fsync": True}, 1), ({"fsync": False}, 0)])
def test_fsync_option(tmp_path, request, monkeypatch, setting, expected):
    engine, backend = make(request, **setting)
    backend.add("bkt", "run/x.bin", b"bytes")
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    engine.download(URI, str(tmp_path / "out.bin"))
    assert len(calls) == expected
    assert (tmp_path / "out.bin").read_bytes() == b"bytes"
