"""The contract every backend's strategy keeps, against its real server.

Each test runs once per backend (the ``kit`` fixture: s3 on SeaweedFS, gcs on
fake-gcs-server, azure on Azurite); a new backend joins by adding a kit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import covalent_lot
from covalent_lot import ChecksumMismatchError
from covalent_lot._stream import sha256_file
from integration._kits import crc32c_of, stored_checksum

MiB = 1024 * 1024


def sha256(path) -> str:
    return sha256_file(str(path))[0]


def write_random(path, size: int) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MiB))
            f.write(block)
            left -= len(block)
    return sha256(path)


@pytest.fixture
def strategy(kit):
    return kit.strategy(max_attempts=2, base_delay=0.05)


def no_partials(folder) -> bool:
    return not any(".lot-partial-" in name for _, _, names in os.walk(folder) for name in names)


def test_file_round_trip(kit, strategy, bucket, tmp_path):
    source = tmp_path / "src.bin"
    digest = write_random(source, 40 * MiB + 123)  # above multipart/chunk thresholds
    up = strategy.put(str(source), kit.uri(bucket, "a/src.bin"))
    assert up.files == 1 and up.bytes == 40 * MiB + 123 and up.verified == 1
    assert stored_checksum(kit, bucket, "a/src.bin") == crc32c_of(source)
    target = tmp_path / "out" / "dst.bin"
    down = strategy.get(kit.uri(bucket, "a/src.bin"), str(target))
    assert sha256(target) == digest
    assert down.verified == 1 and not down.unverified
    assert no_partials(tmp_path)


def test_zero_byte_and_unicode_names(kit, strategy, bucket, tmp_path):
    empty = tmp_path / "empty file ü.dat"
    empty.write_bytes(b"")
    uri = kit.uri(bucket, "dir with space/ü ñ.dat")
    strategy.put(str(empty), uri)
    target = tmp_path / "got" / "e.dat"
    stats = strategy.get(uri, str(target))
    assert target.read_bytes() == b"" and stats.verified == 1


def test_single_object_is_exactly_that_object(kit, strategy, bucket, tmp_path):
    # Covalent's GCloud strategy lists by prefix and would also fetch model.pt.bak.
    kit.put_bytes(bucket, "m/model.pt.bak", b"backup")
    kit.put_bytes(bucket, "m/model.pt", b"model")
    strategy.get(kit.uri(bucket, "m/model.pt"), str(tmp_path / "model.pt"))
    assert os.listdir(tmp_path) == ["model.pt"]
    assert (tmp_path / "model.pt").read_bytes() == b"model"


def test_folder_round_trip_nested(kit, strategy, bucket, tmp_path):
    src = tmp_path / "shards"
    files = {"a.txt": b"a" * 10, "sub/b.bin": os.urandom(1000), "sub/deeper/c": b"", "z z ü.txt": b"zz"}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    up = strategy.put(str(src), kit.uri(bucket, "run/shards/"))
    assert up.files == 4
    out = tmp_path / "out"
    down = strategy.get(kit.uri(bucket, "run/shards/"), str(out))
    assert down.files == 4 and down.verified == 4
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data


def test_server_side_copy_keeps_checksum(kit, strategy, bucket, tmp_path):
    source = tmp_path / "c.bin"
    digest = write_random(source, 20 * MiB)
    strategy.put(str(source), kit.uri(bucket, "c/one.bin"))
    strategy.copy(kit.uri(bucket, "c/one.bin"), kit.uri(bucket, "c/two.bin"))
    assert stored_checksum(kit, bucket, "c/two.bin") == crc32c_of(source)
    strategy.copy(kit.uri(bucket, "c/"), kit.uri(bucket, "d/"))
    stats = strategy.get(kit.uri(bucket, "d/two.bin"), str(tmp_path / "two.bin"))
    assert stats.verified == 1 and sha256(tmp_path / "two.bin") == digest


def test_plain_sdk_object_downloads_unverified(kit, strategy, bucket, tmp_path, caplog):
    kit.put_bytes(bucket, "foreign.txt", b"written by another tool")
    caplog.set_level("DEBUG", logger="covalent_lot")
    stats = strategy.get(kit.uri(bucket, "foreign.txt"), str(tmp_path / "f.txt"))
    assert (tmp_path / "f.txt").read_bytes() == b"written by another tool"
    assert stats.verified == 0 and stats.unverified == [kit.uri(bucket, "foreign.txt")]
    assert "not verified" in caplog.text


def test_strategy_object_is_plain_for_the_sdk(kit, strategy, bucket, tmp_path):
    source = tmp_path / "plain.bin"
    write_random(source, 17 * MiB)
    strategy.put(str(source), kit.uri(bucket, "plain.bin"))
    assert kit.get_bytes(bucket, "plain.bin") == source.read_bytes()


def test_tampered_object_fails_and_leaves_destination_untouched(kit, strategy, bucket, tmp_path):
    source = tmp_path / "t.bin"
    write_random(source, 3 * MiB)
    strategy.put(str(source), kit.uri(bucket, "t.bin"))
    metadata = kit.get_metadata(bucket, "t.bin")
    # Another client overwrites the bytes but keeps the stored checksum.
    kit.put_bytes(bucket, "t.bin", os.urandom(3 * MiB), metadata)
    target = tmp_path / "dest" / "t.bin"
    target.parent.mkdir()
    target.write_bytes(b"old content")
    with pytest.raises(ChecksumMismatchError, match="checksum mismatch") as info:
        strategy.get(kit.uri(bucket, "t.bin"), str(target))
    assert isinstance(info.value, OSError)
    assert target.read_bytes() == b"old content"
    assert os.listdir(target.parent) == ["t.bin"]


def test_tampered_large_object_detected(kit, strategy, bucket, tmp_path):
    source = tmp_path / "big.bin"
    write_random(source, 48 * MiB)
    strategy.put(str(source), kit.uri(bucket, "big.bin"))
    metadata = kit.get_metadata(bucket, "big.bin")
    data = bytearray(source.read_bytes())
    data[40 * MiB] ^= 0xFF  # one flipped byte in a late range
    kit.put_bytes(bucket, "big.bin", bytes(data), metadata)
    target = tmp_path / "d" / "big.bin"
    with pytest.raises(ChecksumMismatchError):
        strategy.get(kit.uri(bucket, "big.bin"), str(target))
    assert not target.exists() and no_partials(tmp_path / "d")


def test_failed_upload_leaves_no_object(kit, strategy, bucket, tmp_path):
    with pytest.raises(FileNotFoundError):
        strategy.put(str(tmp_path / "never-written.npy"), kit.uri(bucket, "x.npy"))
    assert kit.list_keys(bucket) == []


# --- bad input ---------------------------------------------------------------------------

def test_malformed_uri(kit, strategy, tmp_path):
    with pytest.raises(ValueError, match=f"{kit.scheme}:/bkt"):
        strategy.get(f"{kit.scheme}:/bkt/key", str(tmp_path / "x"))
    with pytest.raises(ValueError, match="no key"):
        covalent_lot.handoff(f"{kit.scheme}://bucketname")


def test_missing_bucket(kit, strategy, tmp_path):
    with pytest.raises(FileNotFoundError, match="'no-such-bucket-lot' does not exist") as info:
        strategy.get(kit.uri("no-such-bucket-lot", "k.bin"), str(tmp_path / "k.bin"))
    assert "127.0.0.1" in str(info.value)
    assert not (tmp_path / "k.bin").exists()


def test_missing_object(kit, strategy, bucket, tmp_path):
    with pytest.raises(FileNotFoundError, match=kit.uri(bucket, "nope.bin")):
        strategy.get(kit.uri(bucket, "nope.bin"), str(tmp_path / "n.bin"))
    assert not (tmp_path / "n.bin").exists()
    with pytest.raises(FileNotFoundError, match="no objects under"):
        strategy.get(kit.uri(bucket, "no-folder/"), str(tmp_path / "nf"))


def test_wrong_credentials(kit, bucket, tmp_path, monkeypatch):
    if not kit.enforces_credentials:
        pytest.skip(f"the {kit.name} emulator accepts any credentials")
    source = tmp_path / "w.bin"
    source.write_bytes(b"w")
    for key, value in kit.wrong_credentials().items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    # Built after the change: options resolve on the client, credentials by
    # reference on the executor (here the same process).
    strategy = kit.strategy(max_attempts=2, base_delay=0.05)
    with pytest.raises(PermissionError) as info:
        strategy.put(str(source), kit.uri(bucket, "w.bin"))
    for value in kit.wrong_credentials().values():
        if value and len(value) > 8:
            assert value not in str(info.value)
    with pytest.raises(PermissionError):
        strategy.get(kit.uri(bucket, "w.bin"), str(tmp_path / "w2.bin"))


def test_unknown_option_in_covalent_conf(kit):
    from covalent._shared_files import config

    config.update_config({"lot": {kit.name: {"endpoint_typo": "http://x"}}})
    try:
        with pytest.raises(ValueError, match=rf"unknown key 'endpoint_typo' in \[lot.{kit.name}\]"):
            kit.strategy()
    finally:
        config.get_config("lot")[kit.name].pop("endpoint_typo")
        config._config_manager.write_config()


def test_negative_sizes_are_refused(kit):
    sizes = [name for name, spec in kit.strategy().options.items() if spec.kind == "size"]
    assert sizes, f"{kit.name} has no size options"
    for name in sizes:
        with pytest.raises(ValueError, match=name):
            kit.strategy(**{name: -1})


# --- scale -------------------------------------------------------------------------------

def test_folder_listing_paginates(kit, strategy, bucket, tmp_path):
    count = getattr(kit, "listing_page_size", 1000) + 5
    for i in range(count):
        kit.put_bytes(bucket, f"many/{i:05d}", b"x")
    stats = strategy.get(kit.uri(bucket, "many/"), str(tmp_path / "many"))
    assert stats.files == count
    assert len(os.listdir(tmp_path / "many")) == count


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import covalent_lot

    def high_water_mib():
        # VmHWM, not ru_maxrss: on Linux a spawned child's ru_maxrss starts at
        # its parent's peak, which would hide the child's own.
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024

    s = covalent_lot.strategy_for(sys.argv[1])   # from the environment, as on an executor
    # (building the strategy imported its SDK: it is part of the baseline)
    base = high_water_mib()
    if sys.argv[2] == "up":
        s.put(sys.argv[3], sys.argv[4])
    else:
        s.get(sys.argv[3], sys.argv[4])
    print(json.dumps({"base_mib": base, "peak_mib": high_water_mib()}))
    """
)


def test_memory_stays_bounded_for_large_objects(kit, bucket, tmp_path):
    """Peak RSS of a process moving 256 MiB stays well below the object size."""
    size = 256 * MiB
    source = tmp_path / "large.bin"
    write_random(source, size)
    uri = kit.uri(bucket, "large.bin")
    for direction, args in (("up", [str(source), uri]), ("down", [uri, str(tmp_path / "l2.bin")])):
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, uri, direction, *args],
            capture_output=True, text=True, env=os.environ.copy(), timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        rss = json.loads(out.stdout.strip().splitlines()[-1])
        assert rss["peak_mib"] - rss["base_mib"] < 128, (kit.name, direction, rss)
    assert sha256(tmp_path / "l2.bin") == sha256(source)
