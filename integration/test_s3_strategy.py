"""The S3 strategy against a real S3-compatible server (SeaweedFS) on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

import covalent_lot
from covalent_lot import ChecksumMismatchError

MiB = 1024 * 1024


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


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
def strategy(s3_server):
    from covalent_lot.strategies.s3 import S3Strategy

    return S3Strategy(endpoint_url=s3_server.endpoint, region_name="us-east-1", max_attempts=2, base_delay=0.05)


def no_partials(folder) -> bool:
    return not any(".lot-partial-" in name for _, _, names in os.walk(folder) for name in names)


def test_file_round_trip_multipart(strategy, bucket, s3_client, tmp_path):
    source = tmp_path / "src.bin"
    digest = write_random(source, 40 * MiB + 123)  # above the 16 MiB multipart threshold
    up = strategy.put(str(source), f"s3://{bucket}/a/src.bin")
    assert up.files == 1 and up.bytes == 40 * MiB + 123 and up.verified == 1
    head = s3_client.head_object(Bucket=bucket, Key="a/src.bin")
    assert head["Metadata"]["lot-sha256"] == digest
    target = tmp_path / "out" / "dst.bin"
    down = strategy.get(f"s3://{bucket}/a/src.bin", str(target))
    assert sha256(target) == digest
    assert down.verified == 1 and not down.unverified
    assert no_partials(tmp_path)


def test_zero_byte_and_unicode_names(strategy, bucket, tmp_path):
    empty = tmp_path / "empty file ü.dat"
    empty.write_bytes(b"")
    strategy.put(str(empty), f"s3://{bucket}/dir with space/ü ñ.dat")
    target = tmp_path / "got" / "e.dat"
    stats = strategy.get(f"s3://{bucket}/dir with space/ü ñ.dat", str(target))
    assert target.read_bytes() == b"" and stats.verified == 1


def test_folder_round_trip_nested(strategy, bucket, tmp_path):
    src = tmp_path / "shards"
    files = {"a.txt": b"a" * 10, "sub/b.bin": os.urandom(1000), "sub/deeper/c": b"", "z z.txt": b"zz"}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    up = strategy.put(str(src), f"s3://{bucket}/run/shards/")
    assert up.files == 4
    out = tmp_path / "out"
    down = strategy.get(f"s3://{bucket}/run/shards/", str(out))
    assert down.files == 4 and down.verified == 4
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data


def test_folder_listing_paginates(strategy, bucket, s3_client, tmp_path):
    # list_objects_v2 returns at most 1000 keys a page.
    for i in range(1005):
        s3_client.put_object(Bucket=bucket, Key=f"many/{i:05d}", Body=b"x")
    stats = strategy.get(f"s3://{bucket}/many/", str(tmp_path / "many"))
    assert stats.files == 1005
    assert len(os.listdir(tmp_path / "many")) == 1005


def test_server_side_copy_keeps_checksum(strategy, bucket, s3_client, tmp_path):
    source = tmp_path / "c.bin"
    digest = write_random(source, 20 * MiB)
    strategy.put(str(source), f"s3://{bucket}/c/one.bin")
    strategy.copy(f"s3://{bucket}/c/one.bin", f"s3://{bucket}/c/two.bin")
    assert s3_client.head_object(Bucket=bucket, Key="c/two.bin")["Metadata"]["lot-sha256"] == digest
    strategy.copy(f"s3://{bucket}/c/", f"s3://{bucket}/d/")
    stats = strategy.get(f"s3://{bucket}/d/two.bin", str(tmp_path / "two.bin"))
    assert stats.verified == 1 and sha256(tmp_path / "two.bin") == digest


def test_plain_boto3_object_downloads_unverified(strategy, bucket, s3_client, tmp_path, caplog):
    s3_client.put_object(Bucket=bucket, Key="foreign.txt", Body=b"written by another tool")
    caplog.set_level("DEBUG", logger="covalent_lot")
    stats = strategy.get(f"s3://{bucket}/foreign.txt", str(tmp_path / "f.txt"))
    assert (tmp_path / "f.txt").read_bytes() == b"written by another tool"
    assert stats.verified == 0 and stats.unverified == [f"s3://{bucket}/foreign.txt"]
    assert "not verified" in caplog.text


def test_strategy_object_is_plain_for_boto3(strategy, bucket, s3_client, tmp_path):
    source = tmp_path / "plain.bin"
    write_random(source, 17 * MiB)
    strategy.put(str(source), f"s3://{bucket}/plain.bin")
    body = s3_client.get_object(Bucket=bucket, Key="plain.bin")["Body"].read()
    assert body == source.read_bytes()


def test_tampered_object_fails_and_leaves_destination_untouched(strategy, bucket, s3_client, tmp_path):
    source = tmp_path / "t.bin"
    write_random(source, 3 * MiB)
    strategy.put(str(source), f"s3://{bucket}/t.bin")
    head = s3_client.head_object(Bucket=bucket, Key="t.bin")
    # Another client overwrites the bytes but keeps the stored checksum.
    s3_client.put_object(Bucket=bucket, Key="t.bin", Body=os.urandom(3 * MiB), Metadata=head["Metadata"])
    target = tmp_path / "dest" / "t.bin"
    target.parent.mkdir()
    target.write_bytes(b"old content")
    with pytest.raises(ChecksumMismatchError, match="checksum mismatch") as info:
        strategy.get(f"s3://{bucket}/t.bin", str(target))
    assert isinstance(info.value, OSError)
    assert target.read_bytes() == b"old content"
    assert os.listdir(target.parent) == ["t.bin"]


def test_tampered_large_object_detected_with_parallel_ranges(strategy, bucket, s3_client, tmp_path):
    source = tmp_path / "big.bin"
    write_random(source, 48 * MiB)
    strategy.put(str(source), f"s3://{bucket}/big.bin")
    head = s3_client.head_object(Bucket=bucket, Key="big.bin")
    data = bytearray(source.read_bytes())
    data[40 * MiB] ^= 0xFF  # one flipped byte in a late range
    s3_client.put_object(Bucket=bucket, Key="big.bin", Body=bytes(data), Metadata=head["Metadata"])
    target = tmp_path / "d" / "big.bin"
    with pytest.raises(ChecksumMismatchError):
        strategy.get(f"s3://{bucket}/big.bin", str(target))
    assert not target.exists() and no_partials(tmp_path / "d")


# --- bad input ---------------------------------------------------------------------------

def test_malformed_uri(strategy, tmp_path):
    with pytest.raises(ValueError, match="s3:/bkt"):
        strategy.get("s3:/bkt/key", str(tmp_path / "x"))
    with pytest.raises(ValueError, match="no key"):
        covalent_lot.handoff("s3://bucketname")


def test_missing_bucket(strategy, tmp_path):
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket-lot' does not exist") as info:
        strategy.get("s3://no-such-bucket-lot/k.bin", str(tmp_path / "k.bin"))
    assert "127.0.0.1" in str(info.value)
    assert not (tmp_path / "k.bin").exists()


def test_missing_key(strategy, bucket, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/nope.bin"):
        strategy.get(f"s3://{bucket}/nope.bin", str(tmp_path / "n.bin"))
    assert not (tmp_path / "n.bin").exists()
    with pytest.raises(FileNotFoundError, match="no objects under"):
        strategy.get(f"s3://{bucket}/no-folder/", str(tmp_path / "nf"))


def test_wrong_credentials(strategy, bucket, tmp_path, monkeypatch):
    source = tmp_path / "w.bin"
    source.write_bytes(b"w")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrongkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrongsecret")
    with pytest.raises(PermissionError, match="access denied") as info:
        strategy.put(str(source), f"s3://{bucket}/w.bin")
    assert "wrongsecret" not in str(info.value)
    with pytest.raises(PermissionError):
        strategy.get(f"s3://{bucket}/w.bin", str(tmp_path / "w2.bin"))


def test_unknown_option_in_covalent_conf(s3_server):
    from covalent._shared_files import config

    from covalent_lot.strategies.s3 import S3Strategy

    config.update_config({"lot": {"s3": {"endpoint": "http://x"}}})
    try:
        with pytest.raises(ValueError, match=r"unknown key 'endpoint' in \[lot.s3\].*endpoint_url"):
            S3Strategy()
    finally:
        config.get_config("lot")["s3"].pop("endpoint")
        config._config_manager.write_config()


def test_bad_chunk_size(s3_server):
    from covalent_lot.strategies.s3 import S3Strategy

    with pytest.raises(ValueError, match="multipart_chunksize"):
        S3Strategy(multipart_chunksize=-1)
    with pytest.raises(ValueError, match="multipart_chunksize"):
        S3Strategy(multipart_chunksize="1MiB")


def test_local_source_missing(strategy, bucket, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        strategy.put(str(tmp_path / "never-written.npy"), f"s3://{bucket}/x.npy")


# --- bounded memory ----------------------------------------------------------------------

def test_memory_stays_bounded_for_large_objects(strategy, bucket, s3_server, tmp_path):
    """Peak RSS of a process moving 384 MiB stays well below the object size."""
    size = 384 * MiB
    source = tmp_path / "large.bin"
    write_random(source, size)
    script = textwrap.dedent(
        """
        import json, resource, sys
        from covalent_lot.strategies.s3 import S3Strategy
        s = S3Strategy(endpoint_url=sys.argv[1], region_name="us-east-1")
        import boto3, botocore  # imports counted in the baseline
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.argv[2] == "up":
            s.put(sys.argv[3], sys.argv[4])
        else:
            s.get(sys.argv[3], sys.argv[4])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"base_mib": base / 1024, "peak_mib": peak / 1024}))
        """
    )
    uri = f"s3://{bucket}/large.bin"
    for direction, args in (("up", [str(source), uri]), ("down", [uri, str(tmp_path / "l2.bin")])):
        out = subprocess.run(
            [sys.executable, "-c", script, s3_server.endpoint, direction, *args],
            capture_output=True, text=True, check=True, env=os.environ.copy(), timeout=300,
        )
        rss = json.loads(out.stdout.strip().splitlines()[-1])
        assert rss["peak_mib"] - rss["base_mib"] < 160, (direction, rss)
    assert sha256(tmp_path / "l2.bin") == sha256(source)
