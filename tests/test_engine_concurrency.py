"""Folder transfers move several files at once (``max_files``), with the same guarantees."""

from __future__ import annotations

import os
import threading
import time

import pytest

from covalent_lot import parse_uri
from covalent_lot._engine import Engine
from covalent_lot._retry import RetryPolicy
from covalent_lot._stream import TEMP_MARK

from .lot_fakes import FakeServiceError, MemoryBackend, checksum_of
from covalent_lot._errors import ErrorKind


class SlowBackend(MemoryBackend):
    """Records how many transfers overlap; optionally fails one key."""

    def __init__(self, settings, fail_key=None):
        super().__init__(settings)
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.started: list[str] = []
        self.fail_key = fail_key

    def _enter(self, key):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.started.append(key)
        time.sleep(0.01)
        if key == self.fail_key:
            with self.lock:
                self.active -= 1
            raise FakeServiceError(ErrorKind.DENIED, f"AccessDenied {key}")

    def _leave(self):
        with self.lock:
            self.active -= 1

    def put_file(self, local_path, location, size, sha256):
        self._enter(location.key)
        try:
            return super().put_file(local_path, location, size, sha256)
        finally:
            self._leave()

    def get_into(self, obj, sink, start=0):
        self._enter(obj.location.key)
        try:
            return super().get_into(obj, sink, start)
        finally:
            self._leave()


def make_engine(request, max_files, fail_key=None):
    backend = SlowBackend({"fake_store": request.node.nodeid, "max_files": max_files}, fail_key)
    backend.objects.clear()
    return Engine(backend, RetryPolicy(max_attempts=1, base_delay=0, max_delay=0)), backend


def write_tree(root, n=30):
    files = {}
    for i in range(n):
        data = os.urandom(100 + i)
        path = root / f"d{i % 3}" / f"f{i:03d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[f"d{i % 3}/f{i:03d}.bin"] = data
    return files


def test_folder_round_trip_runs_files_concurrently(tmp_path, request):
    engine, backend = make_engine(request, max_files=4)
    files = write_tree(tmp_path / "src")
    up = engine.upload(str(tmp_path / "src"), parse_uri("s3://bkt/run/"))
    assert (up.files, up.verified, up.bytes) == (30, 30, sum(map(len, files.values())))
    assert 1 < backend.peak <= 4
    for key, data in files.items():
        assert backend.objects[("bkt", "run/" + key)].checksum == checksum_of(data)

    backend.peak = 0
    down = engine.download(parse_uri("s3://bkt/run/"), str(tmp_path / "dst"))
    assert (down.files, down.verified) == (30, 30)
    assert 1 < backend.peak <= 4
    for key, data in files.items():
        assert (tmp_path / "dst" / key).read_bytes() == data


def test_max_files_1_is_sequential(tmp_path, request):
    engine, backend = make_engine(request, max_files=1)
    write_tree(tmp_path / "src", n=6)
    engine.upload(str(tmp_path / "src"), parse_uri("s3://bkt/run/"))
    assert backend.peak == 1
    assert backend.started == sorted(backend.started)  # in walk order


def test_a_failing_file_stops_new_ones_and_raises_a_builtin(tmp_path, request):
    engine, backend = make_engine(request, max_files=3, fail_key="run/d1/f004.bin")
    write_tree(tmp_path / "src", n=30)
    with pytest.raises(PermissionError, match="f004"):
        engine.upload(str(tmp_path / "src"), parse_uri("s3://bkt/run/"))
    # Only files already running went on: far fewer than all 30 started.
    assert len(backend.started) < 30
    assert backend.active == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("covalent-lot-file-")]


def test_failed_folder_download_leaves_no_partial_files(tmp_path, request):
    engine, backend = make_engine(request, max_files=4)
    files = write_tree(tmp_path / "src", n=12)
    engine.upload(str(tmp_path / "src"), parse_uri("s3://bkt/run/"))
    backend.serve_instead["run/d2/f005.bin"] = b"tampered"
    with pytest.raises(OSError, match="checksum mismatch"):
        engine.download(parse_uri("s3://bkt/run/"), str(tmp_path / "dst"))
    dst = tmp_path / "dst"
    for dirpath, _, names in os.walk(dst):
        for name in names:
            assert TEMP_MARK not in name
            rel = os.path.relpath(os.path.join(dirpath, name), dst).replace(os.sep, "/")
            assert (dst / rel).read_bytes() == files[rel]  # every file present is whole
    assert not (dst / "d2" / "f005.bin").exists()


def test_max_files_option_is_validated():
    from covalent_lot.strategies.s3 import S3Strategy

    pytest.importorskip("boto3")
    with pytest.raises(ValueError, match="max_files.*>= 1"):
        S3Strategy(max_files=0)
    assert S3Strategy().settings["max_files"] == 8
