"""Engine pieces for everyday use: listing, removal, progress, start/end logs."""

from __future__ import annotations

import logging
import os
import threading

import pytest

from covalent_lot import parse_uri
from covalent_lot._backend import epoch_seconds
from covalent_lot._engine import Engine
from covalent_lot._retry import RetryPolicy

from .lot_fakes import MemoryBackend


@pytest.fixture
def backend(request):
    b = MemoryBackend({"fake_store": request.node.nodeid})
    b.objects.clear()
    return b


class Progress:
    def __init__(self):
        self.total = 0
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.total += n


@pytest.fixture
def progress():
    return Progress()


@pytest.fixture
def engine(backend, progress):
    return Engine(backend, RetryPolicy(max_attempts=2, base_delay=0, max_delay=0), progress=progress)


def test_ls_lists_a_folder_recursively_or_one_object(engine, backend):
    for key in ("d/a", "d/sub/b", "other"):
        backend.add("bkt", key, key.encode())
    assert [o.location.key for o in engine.ls(parse_uri("s3://bkt/d/"))] == ["d/a", "d/sub/b"]
    (one,) = engine.ls(parse_uri("s3://bkt/d/a"))
    assert (one.location.key, one.size) == ("d/a", 3)
    with pytest.raises(FileNotFoundError, match="s3://bkt/d/missing"):
        engine.ls(parse_uri("s3://bkt/d/missing"))


def test_delete_removes_one_object_or_a_whole_folder(engine, backend):
    for key in ("d/a", "d/sub/b", "keep"):
        backend.add("bkt", key, b"xy")
    stats = engine.delete(parse_uri("s3://bkt/d/"))
    assert (stats.action, stats.files, stats.bytes) == ("delete", 2, 4)
    assert backend.keys() == ["keep"]
    engine.delete(parse_uri("s3://bkt/keep"))
    assert backend.keys() == []
    with pytest.raises(FileNotFoundError, match="no objects under this folder"):
        engine.delete(parse_uri("s3://bkt/d/"))


def test_progress_counts_every_byte_up_down_and_copied(tmp_path, engine, backend, progress):
    data = os.urandom(50_000)
    (tmp_path / "f").write_bytes(data)
    engine.upload(str(tmp_path / "f"), parse_uri("s3://bkt/f"))
    assert progress.total == len(data)
    engine.download(parse_uri("s3://bkt/f"), str(tmp_path / "g"))
    assert progress.total == 2 * len(data)
    engine.copy(parse_uri("s3://bkt/f"), parse_uri("s3://bkt/h"))
    assert progress.total == 3 * len(data)


def test_each_transfer_logs_its_start_and_its_summary(tmp_path, engine, caplog):
    (tmp_path / "f").write_bytes(b"abc")
    with caplog.at_level(logging.DEBUG, logger="covalent_lot"):
        engine.upload(str(tmp_path / "f"), parse_uri("s3://bkt/f"))
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].endswith("-> s3://bkt/f: started")
    assert any(m.startswith("uploaded ") for m in messages)  # DEBUG, per file
    assert "1 file(s)" in messages[-1] and "1/1 crc32c stored" in messages[-1]


def test_epoch_seconds_takes_datetimes_and_numbers():
    import datetime

    moment = datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone.utc)
    assert epoch_seconds(moment) == moment.timestamp()
    assert epoch_seconds(1700000000) == 1700000000.0
    assert epoch_seconds(None) is None
