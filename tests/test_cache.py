"""The staging folder as a bounded cache (``_cache``): what eviction removes and keeps."""

from __future__ import annotations

import fcntl
import os
import threading
import time

import pytest

from covalent_lot import _cache
from covalent_lot._checksum import Checksum
from covalent_lot._stream import TEMP_MARK, atomic_download, mark_verified
from tests.lot_fakes import xattrs_work


@pytest.fixture
def root(tmp_path):
    if not xattrs_work(tmp_path):
        pytest.skip("no user xattrs on this file system: no verified copies to evict")
    return tmp_path / "staging"


def copy(root, name: str, size: int, used: float, checksum=Checksum("crc32c", "0" * 8)) -> str:
    """A verified copy last used ``used`` seconds ago (its access time)."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    mark_verified(str(path), checksum)
    st = os.stat(path)
    os.utime(path, ns=(time.time_ns() - int(used * 1e9), st.st_mtime_ns))
    return str(path)


def test_least_recently_used_copies_go_first_until_under_the_limit(root):
    old = copy(root, "a/old.npy", 400, used=300)
    middle = copy(root, "b/middle.npy", 400, used=200)
    new = copy(root, "c/new.npy", 400, used=10)
    report = _cache.trim(str(root), 900)
    assert (report.evicted, report.evicted_bytes) == (1, 400)
    assert not os.path.exists(old) and os.path.exists(middle) and os.path.exists(new)
    assert (report.size_before, report.size_after) == (1200, 800)


def test_copies_verified_with_either_checksum_are_evicted(root):
    """Copies recorded with crc32c (the default) and with sha256 (offloads, older records)."""
    sha = copy(root, "a/sha.npy", 400, used=300, checksum="0" * 64)
    crc = copy(root, "b/crc.npy", 400, used=200)
    report = _cache.trim(str(root), 0)
    assert report.evicted == 2 and not os.path.exists(sha) and not os.path.exists(crc)


def test_under_the_limit_nothing_goes(root):
    kept = copy(root, "x.npy", 100, used=10_000)
    assert _cache.trim(str(root), 100).evicted == 0 and os.path.exists(kept)


def test_files_that_are_not_verified_copies_stay(root):
    mine = root / "results" / "mine.csv"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"y" * 1000)
    changed = copy(root, "changed.npy", 100, used=100)
    with open(changed, "ab") as f:  # modified after it was verified: no longer a copy
        f.write(b"z")
    report = _cache.trim(str(root), 0)
    assert report.evicted == 0 and mine.exists() and os.path.exists(changed)
    assert report.size_after == 1101


def test_a_held_file_is_never_evicted(root):
    held = copy(root, "held.npy", 500, used=1_000)
    other = copy(root, "other.npy", 500, used=10)
    with _cache.pin(held) as there:
        assert there
        report = _cache.trim(str(root), 0)
        assert os.path.exists(held) and not os.path.exists(other)
        assert report.held_skipped == 1
    assert _cache.trim(str(root), 0).evicted == 1 and not os.path.exists(held)


def test_a_pin_after_eviction_reports_the_file_gone(root):
    path = copy(root, "gone.npy", 10, used=10)
    _cache.trim(str(root), 0)
    with _cache.pin(path) as there:
        assert not there


def test_pinning_marks_the_file_used(root):
    first = copy(root, "first.npy", 100, used=500)
    second = copy(root, "second.npy", 100, used=100)
    with _cache.pin(first):
        pass
    _cache.trim(str(root), 100)
    assert os.path.exists(first) and not os.path.exists(second)


def test_hold_until_exit_keeps_a_bounded_number(root, monkeypatch):
    monkeypatch.setattr(_cache, "MAX_HELD", 2)  # earlier holds of this process are let go too
    paths = [copy(root, f"h{i}.npy", 10, used=100 - i) for i in range(3)]
    for path in paths:
        _cache.hold_until_exit(path)
    _cache.trim(str(root), 0)
    assert [os.path.exists(p) for p in paths] == [False, True, True]  # the oldest hold was let go


def test_an_abandoned_partial_is_removed_and_a_live_one_kept(root):
    root.mkdir(parents=True)
    abandoned = root / f".x.npy{TEMP_MARK}dead"
    abandoned.write_bytes(b"p" * 100)
    old = time.time() - 3600
    os.utime(abandoned, (old, old))
    fresh = root / f".y.npy{TEMP_MARK}fresh"  # unlocked but written to a moment ago
    fresh.write_bytes(b"p")
    ready, release = threading.Event(), threading.Event()
    live_path = []

    def writer():
        with atomic_download(str(root / "z.npy"), fsync=False) as (f, temp):
            f.write(b"q" * 10)
            f.flush()
            os.utime(temp, (old, old))
            live_path.append(temp)
            ready.set()
            release.wait(10)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert ready.wait(10)
        report = _cache.trim(str(root), 10**9)
        assert report.stale_partials == 1 and not abandoned.exists()
        assert fresh.exists() and os.path.exists(live_path[0])
    finally:
        release.set()
        thread.join()
    assert (root / "z.npy").read_bytes() == b"q" * 10


def test_a_writer_holds_its_partial_exclusively(tmp_path):
    with atomic_download(str(tmp_path / "f.bin"), fsync=False) as (_f, temp):
        fd = os.open(temp, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def test_empty_folders_left_by_eviction_go_once_they_are_old(root):
    path = copy(root, "run-1/tag/x.npy", 10, used=100)
    _cache.trim(str(root), 0)
    assert not os.path.exists(path) and (root / "run-1" / "tag").is_dir()  # just made: kept
    old = time.time() - 3600
    for folder in (root / "run-1" / "tag", root / "run-1"):
        os.utime(folder, (old, old))
    copy(root, "y.npy", 10, used=100)
    _cache.trim(str(root), 0)
    # The parent was just changed by that removal: it goes on a later trim.
    assert not (root / "run-1" / "tag").exists() and root.is_dir()


def test_everything_removes_every_copy_no_one_holds(root):
    copies = [copy(root, f"c{i}.npy", 10, used=i) for i in range(3)]
    report = _cache.trim(str(root), 10**9, everything=True)
    assert report.evicted == 3 and not any(os.path.exists(p) for p in copies)


def test_a_transfer_into_the_staging_folder_trims_it(root, monkeypatch):
    """keep_bounded: what every hook transfer calls after it moved bytes."""
    from covalent_lot._strategy import keep_bounded

    old = copy(root, "old.npy", 600, used=500)
    new = copy(root, "run/tag/new.npy", 600, used=0)
    settings = {"staging_dir": str(root), "cache_limit": 1000}
    keep_bounded(settings, new, hold=True)
    assert not os.path.exists(old) and os.path.exists(new)
    keep_bounded(settings, str(root.parent / "elsewhere.npy"))  # outside: nothing happens


def test_gc_local_empties_the_staging_folder(root, monkeypatch, capsys):
    from covalent_lot.cli import main

    monkeypatch.setenv("COVALENT_LOT_STAGING_DIR", str(root))
    copies = [copy(root, f"run/c{i}.npy", 1000, used=i) for i in range(2)]
    mine = root / "mine.txt"
    mine.write_text("keep me")
    assert main(["gc", "--local", "--dry-run"]) == 0
    assert all(os.path.exists(p) for p in copies)
    assert main(["gc", "--local"]) == 0
    out = capsys.readouterr().out
    assert "removed 2 verified copies (2.0 KB)" in out or "removed 2 verified copies" in out
    assert not any(os.path.exists(p) for p in copies) and mine.exists()


def test_gc_local_takes_no_prefix(capsys):
    from covalent_lot.cli import main

    with pytest.raises(SystemExit) as info:
        main(["gc", "--local", "s3://bkt/x/"])
    assert info.value.code == 2
    assert "gc --local empties this machine's staging folder" in capsys.readouterr().err
