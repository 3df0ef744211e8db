"""The engine over an in-memory backend: round trips, integrity, refusals."""

from __future__ import annotations

import hashlib
import os

import pytest

from covalent_lot import ChecksumMismatchError, StoreURI, TransferStats, parse_uri
from covalent_lot._engine import Engine, local_path_for_key
from covalent_lot._errors import ErrorKind
from covalent_lot._retry import RetryPolicy
from covalent_lot._stream import TEMP_MARK

from .lot_fakes import FakeServiceError, MemoryBackend, checksum_of


@pytest.fixture
def backend(request):
    b = MemoryBackend({"fake_store": request.node.nodeid})
    b.objects.clear()
    return b


@pytest.fixture
def engine(backend):
    return Engine(backend, RetryPolicy(max_attempts=3, base_delay=0, max_delay=0))


def tree(root) -> dict[str, bytes]:
    """relative path -> bytes of every file below ``root``."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root).replace(os.sep, "/")] = open(full, "rb").read()
    return out


def temp_files(root) -> list[str]:
    return [path for path in tree(root) if TEMP_MARK in path]


# --- round trips --------------------------------------------------------------------

def test_file_round_trip(tmp_path, engine, backend):
    data = os.urandom(10_000)
    (tmp_path / "in.bin").write_bytes(data)
    stats = engine.upload(str(tmp_path / "in.bin"), parse_uri("s3://bkt/runs/in.bin"))
    assert isinstance(stats, TransferStats)
    assert (stats.action, stats.files, stats.bytes, stats.verified) == ("upload", 1, 10_000, 1)
    assert stats.destination == "s3://bkt/runs/in.bin"
    assert backend.objects[("bkt", "runs/in.bin")].checksum == checksum_of(data)

    stats = engine.download(parse_uri("s3://bkt/runs/in.bin"), str(tmp_path / "out" / "out.bin"))
    assert (tmp_path / "out" / "out.bin").read_bytes() == data
    assert (stats.action, stats.files, stats.bytes, stats.verified) == ("download", 1, 10_000, 1)
    assert stats.unverified == [] and stats.retries == 0
    assert temp_files(tmp_path) == []
    assert "1/1 crc32c verified" in stats.summary()


def test_file_to_folder_uri_keeps_its_name(tmp_path, engine, backend):
    (tmp_path / "x.npy").write_bytes(b"abc")
    stats = engine.upload(str(tmp_path / "x.npy"), parse_uri("s3://bkt/runs/"))
    assert backend.keys() == ["runs/x.npy"]
    assert stats.destination == "s3://bkt/runs/x.npy"


def test_out_of_order_reads_are_verified(tmp_path, engine, backend):
    data = os.urandom(5000)
    backend.add("bkt", "k", data)
    backend.reverse_writes = True
    stats = engine.download(parse_uri("s3://bkt/k"), str(tmp_path / "k"))
    assert (tmp_path / "k").read_bytes() == data
    assert stats.verified == 1


def test_zero_byte_file_round_trip(tmp_path, engine, backend):
    (tmp_path / "empty").write_bytes(b"")
    engine.upload(str(tmp_path / "empty"), parse_uri("s3://bkt/empty"))
    assert backend.objects[("bkt", "empty")].checksum == checksum_of(b"")
    stats = engine.download(parse_uri("s3://bkt/empty"), str(tmp_path / "got"))
    assert (tmp_path / "got").read_bytes() == b""
    assert (stats.files, stats.bytes, stats.verified) == (1, 0, 1)


def make_nested(root):
    files = {
        "top.txt": b"top",
        "empty.bin": b"",
        "a/one.bin": os.urandom(3000),
        "a/b/c/deep.npy": os.urandom(777),
        "with space/naïve ü.txt": "unicode ✓".encode(),
        "a/b/.hidden": b"h",
    }
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "only-dirs" / "nothing").mkdir(parents=True)  # no files: uploads nothing
    return files


def test_nested_folder_round_trip(tmp_path, engine, backend):
    files = make_nested(tmp_path / "src")
    stats = engine.upload(str(tmp_path / "src"), parse_uri("s3://bkt/runs/d1/"))
    assert backend.keys() == sorted("runs/d1/" + k for k in files)
    assert stats.files == len(files) and stats.verified == len(files)
    assert stats.bytes == sum(len(v) for v in files.values())

    stats = engine.download(parse_uri("s3://bkt/runs/d1/"), str(tmp_path / "dst"))
    assert tree(tmp_path / "dst") == files
    assert stats.files == len(files) and stats.verified == len(files) and stats.unverified == []


def test_folder_to_object_uri_is_refused(tmp_path, engine, backend):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_bytes(b"a")
    with pytest.raises(IsADirectoryError) as info:
        engine.upload(str(tmp_path / "src"), parse_uri("s3://bkt/runs/obj"))
    assert str(tmp_path / "src") in str(info.value) and "s3://bkt/runs/obj" in str(info.value)
    assert backend.keys() == []


def test_download_replaces_an_existing_file(tmp_path, engine, backend):
    backend.add("bkt", "k", b"new")
    (tmp_path / "k").write_bytes(b"old old old")
    engine.download(parse_uri("s3://bkt/k"), str(tmp_path / "k"))
    assert (tmp_path / "k").read_bytes() == b"new"


def test_upload_skips_our_own_temp_files(tmp_path, engine, backend):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"a")
    (tmp_path / "src" / f".a.bin{TEMP_MARK}0123abcd").write_bytes(b"partial")
    engine.upload(str(tmp_path / "src"), parse_uri("s3://bkt/p/"))
    assert backend.keys() == ["p/a.bin"]


def test_folder_download_skips_temp_objects_and_subfolder_markers(tmp_path, engine, backend):
    backend.add("bkt", "p/a.bin", b"a")
    backend.add("bkt", "p/sub/", b"")
    backend.add("bkt", f"p/.b{TEMP_MARK}0123", b"partial")
    engine.download(parse_uri("s3://bkt/p/"), str(tmp_path / "dst"))
    assert tree(tmp_path / "dst") == {"a.bin": b"a"}


def test_folder_marker_for_the_prefix_itself_is_skipped(tmp_path, engine, backend):
    # Consoles ("Create folder") store a zero-byte object named like the prefix.
    backend.add("bkt", "p/", b"")
    backend.add("bkt", "p/a.bin", b"a")
    engine.download(parse_uri("s3://bkt/p/"), str(tmp_path / "dst"))
    assert tree(tmp_path / "dst") == {"a.bin": b"a"}


def test_empty_folder_download_is_not_found(tmp_path, engine, backend):
    backend.add("bkt", "other/a", b"a")
    with pytest.raises(FileNotFoundError) as info:
        engine.download(parse_uri("s3://bkt/p/"), str(tmp_path / "dst"))
    assert "s3://bkt/p/" in str(info.value) and "memory://fake" in str(info.value)


def test_missing_object_is_not_found_from_the_service_error(tmp_path, engine, backend):
    with pytest.raises(FileNotFoundError) as info:
        engine.download(parse_uri("s3://bkt/nope"), str(tmp_path / "x"))
    assert isinstance(info.value.__cause__, FakeServiceError)
    assert "s3://bkt/nope" in str(info.value)
    assert not (tmp_path / "x").exists()
    assert backend.calls["stat"] == 1  # not found is not retried


# --- integrity -----------------------------------------------------------------------

@pytest.mark.parametrize("existing", [None, b"previous good content"])
def test_checksum_mismatch_leaves_the_destination_untouched(tmp_path, engine, backend, existing):
    backend.add("bkt", "k", b"the stored bytes")
    backend.serve_instead["k"] = b"the other bytes!"
    target = tmp_path / "k"
    if existing is not None:
        target.write_bytes(existing)
    with pytest.raises(ChecksumMismatchError) as info:
        engine.download(parse_uri("s3://bkt/k"), str(target))
    assert isinstance(info.value, OSError)
    message = str(info.value)
    assert "s3://bkt/k" in message and repr(str(target)) in message
    assert str(checksum_of(b"the stored bytes")) in message and str(checksum_of(b"the other bytes!")) in message
    if existing is None:
        assert not target.exists()
    else:
        assert target.read_bytes() == existing
    assert temp_files(tmp_path) == []


def test_checksum_mismatch_in_a_folder(tmp_path, engine, backend):
    backend.add("bkt", "p/a", b"aaaa")
    backend.add("bkt", "p/b", b"bbbb")
    backend.serve_instead["p/b"] = b"BBBB"
    with pytest.raises(ChecksumMismatchError, match="s3://bkt/p/b"):
        engine.download(parse_uri("s3://bkt/p/"), str(tmp_path / "dst"))
    assert not (tmp_path / "dst" / "b").exists()
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("existing", [None, b"keep me"])
def test_transient_failure_mid_stream_is_retried_and_leaves_nothing(tmp_path, engine, backend, existing):
    backend.add("bkt", "k", os.urandom(1000))
    backend.read_failures = [FakeServiceError(ErrorKind.CONNECTION, "reset") for _ in range(3)]
    target = tmp_path / "k"
    if existing is not None:
        target.write_bytes(existing)
    with pytest.raises(ConnectionError) as info:
        engine.download(parse_uri("s3://bkt/k"), str(target))
    assert type(info.value) is ConnectionError
    assert isinstance(info.value.__cause__, FakeServiceError)
    assert backend.calls["get_into"] == 3
    if existing is None:
        assert os.listdir(tmp_path) == []
    else:
        assert target.read_bytes() == existing and temp_files(tmp_path) == []


def test_permanent_failure_mid_stream_is_not_retried(tmp_path, engine, backend):
    backend.add("bkt", "k", os.urandom(1000))
    backend.read_failures = [FakeServiceError(ErrorKind.DENIED, "AccessDenied")]
    with pytest.raises(PermissionError):
        engine.download(parse_uri("s3://bkt/k"), str(tmp_path / "k"))
    assert backend.calls["get_into"] == 1
    assert os.listdir(tmp_path) == []


def test_foreign_failure_mid_stream_leaves_nothing(tmp_path, engine, backend):
    backend.add("bkt", "k", os.urandom(1000))
    backend.read_failures = [RuntimeError("bug in the SDK")]
    with pytest.raises(RuntimeError, match="bug in the SDK"):
        engine.download(parse_uri("s3://bkt/k"), str(tmp_path / "k"))
    assert os.listdir(tmp_path) == []


def test_a_retry_after_a_partial_read_gives_the_whole_file(tmp_path, engine, backend):
    data = os.urandom(2000)
    backend.add("bkt", "k", data)
    backend.read_failures = [FakeServiceError(ErrorKind.THROTTLED, "SlowDown")]
    stats = engine.download(parse_uri("s3://bkt/k"), str(tmp_path / "k"))
    assert (tmp_path / "k").read_bytes() == data
    assert stats.retries == 1 and stats.verified == 1
    assert temp_files(tmp_path) == []


def test_object_without_stored_checksum_downloads_unverified(tmp_path, engine, backend):
    backend.add("bkt", "p/foreign.bin", b"written by another tool", checksum=False)
    backend.add("bkt", "p/ours.bin", b"ours")
    stats = engine.download(parse_uri("s3://bkt/p/"), str(tmp_path / "dst"))
    assert tree(tmp_path / "dst") == {"foreign.bin": b"written by another tool", "ours.bin": b"ours"}
    assert stats.files == 2 and stats.verified == 1
    assert stats.unverified == ["s3://bkt/p/foreign.bin"]
    stats = engine.download(parse_uri("s3://bkt/p/foreign.bin"), str(tmp_path / "one"))
    assert stats.unverified == ["s3://bkt/p/foreign.bin"] and stats.verified == 0


def test_verify_off_stores_and_checks_nothing(tmp_path, backend):
    engine = Engine(backend, RetryPolicy(max_attempts=1), verify=False)
    (tmp_path / "a").write_bytes(b"abc")
    stats = engine.upload(str(tmp_path / "a"), parse_uri("s3://bkt/a"))
    assert backend.objects[("bkt", "a")].checksum is None and stats.verified == 0
    backend.add("bkt", "b", b"xyz", checksum="0" * 64)  # a wrong checksum is not looked at
    stats = engine.download(parse_uri("s3://bkt/b"), str(tmp_path / "b"))
    assert (tmp_path / "b").read_bytes() == b"xyz"
    assert stats.unverified == ["s3://bkt/b"]


# --- keys that would escape the destination --------------------------------------------

@pytest.mark.parametrize(
    "bad_key",
    ["p/../x", "p/../../x", "p/a//b", "p//abs", "p/./x", "p/a\\..\\..\\x", "p/a/..", "p/a\x00b"],
)
def test_escaping_keys_are_refused(tmp_path, engine, backend, bad_key):
    backend.add("bkt", bad_key, b"evil")
    destination = tmp_path / "inner" / "dst"
    destination.parent.mkdir()
    with pytest.raises(ValueError) as info:
        engine.download(StoreURI("s3", "bkt", "p/"), str(destination))
    assert type(info.value) is ValueError
    uri = str(StoreURI("s3", "bkt", bad_key))
    assert (uri if uri.isprintable() else repr(uri)) in str(info.value)
    assert tree(tmp_path) == {}


def test_symlinked_destination_subfolder_cannot_redirect_writes(tmp_path, engine, backend):
    outside = tmp_path / "outside"
    outside.mkdir()
    destination = tmp_path / "dst"
    destination.mkdir()
    os.symlink(outside, destination / "link")
    backend.add("bkt", "p/link/x", b"evil")
    with pytest.raises(ValueError, match="outside"):
        engine.download(parse_uri("s3://bkt/p/"), str(destination))
    assert os.listdir(outside) == []


def test_local_path_for_key():
    assert local_path_for_key("/r", "a/b.txt", "s3://b/p/a/b.txt") == os.path.realpath("/r/a/b.txt")
    for bad in ["", "/abs", "../x", "a/../../x", "a//b", "a/./b", "a\\b"]:
        with pytest.raises(ValueError, match="refusing to download s3://b/p/x"):
            local_path_for_key("/r", bad, "s3://b/p/x")


# --- upload refusals ---------------------------------------------------------------------

def test_missing_local_source(tmp_path, engine, backend):
    missing = str(tmp_path / "never-written.npy")
    with pytest.raises(FileNotFoundError) as info:
        engine.upload(missing, parse_uri("s3://bkt/x"))
    assert repr(missing) in str(info.value)
    assert backend.calls["put_file"] == 0


def test_special_file_source_is_refused(tmp_path, engine, backend):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="neither a file nor a folder"):
        engine.upload(str(fifo), parse_uri("s3://bkt/x"))


@pytest.mark.parametrize("link_name", ["a_link", "z_link"])
def test_symlinked_file_in_folder_is_refused_before_anything_is_uploaded(
    tmp_path, engine, backend, link_name
):
    src = tmp_path / "src"
    src.mkdir()
    (src / "m_real.txt").write_bytes(b"real")
    os.symlink(tmp_path / "elsewhere.txt", src / link_name)
    (tmp_path / "elsewhere.txt").write_bytes(b"secret")
    with pytest.raises(ValueError) as info:
        engine.upload(str(src), parse_uri("s3://bkt/p/"))
    assert repr(str(src / link_name)) in str(info.value)
    assert backend.keys() == []


def test_symlinked_folder_in_folder_is_refused(tmp_path, engine, backend):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"f")
    (tmp_path / "other").mkdir()
    os.symlink(tmp_path / "other", src / "sub" / "linked-dir")
    with pytest.raises(ValueError, match="symbolic link"):
        engine.upload(str(src), parse_uri("s3://bkt/p/"))
    assert backend.keys() == []


def test_file_changed_during_upload_is_removed_again(tmp_path, engine, backend):
    path = tmp_path / "growing.log"
    path.write_bytes(b"first line\n" * 10)

    def append(local_path):
        with open(local_path, "ab") as f:
            f.write(b"more\n")

    backend.during_put = append
    with pytest.raises(OSError) as info:
        engine.upload(str(path), parse_uri("s3://bkt/logs/growing.log"))
    assert type(info.value) is OSError
    assert repr(str(path)) in str(info.value) and "s3://bkt/logs/growing.log" in str(info.value)
    assert backend.keys() == []
    assert backend.calls["delete"] == 1


def test_file_touched_during_upload_is_removed_again(tmp_path, engine, backend):
    path = tmp_path / "same-size.bin"
    path.write_bytes(b"x" * 100)
    st = os.stat(path)
    backend.during_put = lambda p: os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(OSError, match="changed while it was uploaded"):
        engine.upload(str(path), parse_uri("s3://bkt/x"))
    assert backend.keys() == []


def test_transient_upload_failures_are_retried(tmp_path, engine, backend, monkeypatch):
    (tmp_path / "a").write_bytes(b"abc")
    real_put = backend.put_file
    failures = [FakeServiceError(ErrorKind.SERVER, "500")]

    def flaky_put(*args):
        backend.calls["put_file"] += 1
        if failures:
            raise failures.pop()
        return real_put(*args)

    monkeypatch.setattr(backend, "put_file", flaky_put)
    stats = engine.upload(str(tmp_path / "a"), parse_uri("s3://bkt/a"))
    assert stats.retries == 1 and backend.keys() == ["a"]


# --- copy ----------------------------------------------------------------------------------

def test_copy_object_and_folder(engine, backend):
    backend.add("bkt", "p/a", b"a")
    backend.add("bkt", "p/sub/b", b"bb")
    backend.add("bkt", "p/marker/", b"")
    stats = engine.copy(parse_uri("s3://bkt/p/a"), parse_uri("s3://bkt/q/a"))
    assert (stats.files, stats.bytes, stats.verified) == (1, 1, 1)
    stats = engine.copy(parse_uri("s3://bkt/p/"), parse_uri("s3://bkt/r/"))
    assert (stats.files, stats.bytes) == (2, 3)
    assert backend.data("r/sub/b") == b"bb"
    assert "r/marker/" not in backend.keys()


def test_copy_mixed_kinds_and_empty_folder(engine, backend):
    with pytest.raises(ValueError, match="both must be folders"):
        engine.copy(parse_uri("s3://bkt/p/"), parse_uri("s3://bkt/q"))
    with pytest.raises(FileNotFoundError, match="s3://bkt/empty/"):
        engine.copy(parse_uri("s3://bkt/empty/"), parse_uri("s3://bkt/q/"))


def test_stats_summary():
    stats = TransferStats("upload", "/a", "s3://bkt/a", files=2, bytes=2 * 1024 * 1024,
                          seconds=2.0, retries=1, verified=2)
    assert stats.mib_per_s == 1.0
    assert stats.summary() == (
        "upload /a -> s3://bkt/a: 2 file(s), 2.0 MiB in 2.00 s (1.0 MiB/s), 1 retries, 2/2 checksums stored"
    )
    assert TransferStats("download", "a", "b").mib_per_s == 0.0
