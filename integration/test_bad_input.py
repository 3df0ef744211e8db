"""Bad input against the real servers: each case names its exception and its message.

The same three checks as tests/test_bad_input.py (exact built-in type, the
offending value named, a fix suggested), for what only a server can answer:
missing buckets and objects, missing, wrong and expired credentials, SSH keys,
names over the service's limits, names that are not UTF-8, empty objects, and an
object rewritten between the listing and the read. Cases already in
test_contract.py (missing bucket/object on download, wrong credentials on a
file) and test_sftp_security.py (unknown/changed host key, wrong or missing
key) are not repeated.

Run: LOT_BACKENDS=s3 python -m pytest integration/test_bad_input.py -q
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any, Callable

import pytest

def expect(call: Callable[[], Any], error: type[Exception], value: str, hint: str | tuple) -> str:
    """Run ``call``; check the exception's exact type, the value and a hint in its message.

    ``hint`` may be a tuple of alternatives: services differ in what they tell apart.
    """
    with pytest.raises(Exception) as info:
        call()
    message = str(info.value)
    assert type(info.value) is error, f"{type(info.value).__name__}: {message}"
    assert value in message, f"{value!r} not named in: {message}"
    hints = hint if isinstance(hint, tuple) else (hint,)
    assert any(h in message for h in hints), f"no hint {hint!r} in: {message}"
    return message


def only(kit, *names: str) -> None:
    if kit.name not in names:
        pytest.skip(f"not a case for {kit.name}")


@pytest.fixture
def strategy(kit):
    return kit.strategy(max_attempts=2, base_delay=0.05)


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.bin"
    path.write_bytes(b"small")
    return path


def with_env(monkeypatch, env: dict[str, str | None]) -> None:
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)


# --- what does not exist --------------------------------------------------------------------

# Servers on which a write makes the bucket: no error to check there.
CREATES_BUCKET_ON_WRITE = {
    "s3": "SeaweedFS creates a missing bucket on the first write (AWS answers NoSuchBucket)",
    "sftp": "SFTP uploads create missing parent directories (documented)",
}


def test_upload_to_missing_bucket(kit, strategy, small):
    if kit.name in CREATES_BUCKET_ON_WRITE:
        pytest.skip(CREATES_BUCKET_ON_WRITE[kit.name])
    missing = kit.unique("no-such")
    expect(lambda: strategy.put(str(small), kit.uri(missing, "k.bin")), FileNotFoundError, missing,
           "create the")


def test_folder_download_from_missing_bucket(kit, strategy, tmp_path):
    missing = kit.unique("no-such")
    expect(lambda: strategy.get(kit.uri(missing, "d/"), str(tmp_path / "d")), FileNotFoundError,
           missing, ("create the", "check the bucket"))
    assert not (tmp_path / "d").exists() or not os.listdir(tmp_path / "d")


def test_copy_of_missing_object(kit, strategy, bucket):
    source = kit.uri(bucket, "nope.bin")
    expect(lambda: strategy.copy(source, kit.uri(bucket, "copy.bin")), FileNotFoundError, source,
           ("check the bucket and key", "check the container and blob name"))
    assert kit.list_keys(bucket) == []


# --- credentials ----------------------------------------------------------------------------

# Environment under which the executor has no credentials at all, and the option
# that then says which ones it looked for.
NO_CREDENTIALS = {
    "s3": ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, {}, "credentials"),
    "azure": ({"AZURE_STORAGE_CONNECTION_STRING": None}, {"credential": "connection_string"},
              "AZURE_STORAGE_CONNECTION_STRING"),
    "sftp": ({"COVALENT_LOT_SFTP_KEY_FILENAME": None, "HOME": "/nonexistent"}, {"allow_agent": False},
             "key_filename"),
}


def test_no_credentials(kit, bucket, small, monkeypatch):
    if kit.name not in NO_CREDENTIALS:
        pytest.skip(f"the {kit.name} emulator accepts anonymous requests")
    env, options, value = NO_CREDENTIALS[kit.name]
    with_env(monkeypatch, env)
    strategy = kit.strategy(max_attempts=1, **options)
    expect(lambda: strategy.put(str(small), kit.uri(bucket, "n.bin")), PermissionError, value, "set")
    assert kit.list_keys(bucket) == []


def test_gcs_credentials_file_missing(kit, bucket, small, tmp_path):
    only(kit, "gcs")
    path = str(tmp_path / "no-such-key.json")
    strategy = kit.strategy(max_attempts=1, credentials_file=path)
    expect(lambda: strategy.put(str(small), kit.uri(bucket, "n.bin")), PermissionError,
           "credentials_file", "service-account")


def test_wrong_credentials_on_a_folder_listing(kit, bucket, tmp_path, monkeypatch):
    if not kit.enforces_credentials:
        pytest.skip(f"the {kit.name} emulator accepts any credentials")
    kit.put_bytes(bucket, "d/a.bin", b"a")
    with_env(monkeypatch, kit.wrong_credentials())
    strategy = kit.strategy(max_attempts=1)
    message = expect(lambda: strategy.get(kit.uri(bucket, "d/"), str(tmp_path / "d")), PermissionError,
                     bucket, "check")
    for secret in kit.wrong_credentials().values():
        if secret and len(secret) > 8:
            assert secret not in message


def test_azure_expired_sas(kit, bucket, small, monkeypatch):
    only(kit, "azure")
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    azure_kit = sys.modules[type(kit).__module__]
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
    sas = generate_container_sas(
        azure_kit.ACCOUNT, bucket, account_key=azure_kit.ACCOUNT_KEY,
        permission=ContainerSasPermissions(read=True, write=True, list=True, create=True),
        start=past - datetime.timedelta(hours=1), expiry=past,
    )
    with_env(monkeypatch, {"AZURE_STORAGE_CONNECTION_STRING": None, "AZURE_STORAGE_SAS_TOKEN": sas})
    strategy = kit.strategy(max_attempts=1, credential="sas_token")
    # Azurite, like Azure, does not say the SAS expired: the hint names where credentials come from.
    message = expect(lambda: strategy.put(str(small), kit.uri(bucket, "e.bin")), PermissionError,
                     kit.uri(bucket, "e.bin"), "$AZURE_STORAGE_SAS_TOKEN")
    assert "sig=" not in message
    assert kit.list_keys(bucket) == []


def test_sftp_known_hosts_file_missing(kit, bucket, small, tmp_path):
    only(kit, "sftp")
    missing = str(tmp_path / "no_known_hosts")
    strategy = kit.strategy(max_attempts=1, known_hosts=missing)
    expect(lambda: strategy.put(str(small), kit.uri(bucket, "h.bin")), PermissionError, missing,
           "known_hosts at an existing file")


def test_sftp_unknown_user(kit, bucket, small):
    only(kit, "sftp")
    strategy = kit.strategy(max_attempts=1, username="nosuchuser")
    uri = kit.uri(bucket, "u.bin").replace("root@", "")
    expect(lambda: strategy.put(str(small), uri), PermissionError, "nosuchuser", "authorized")


# --- names --------------------------------------------------------------------------------

def _key_of(length: int, char: str) -> str:
    """``length`` characters in 99-character segments (under every per-segment limit)."""
    return ((char * 99 + "/") * (length // 100 + 1))[:length - 1] + char


# Per service: the longest name that works, one over it, and what the message says.
LIMITS = {
    "s3": (_key_of(1024, "k"), _key_of(1025, "k"), "1024 bytes"),
    "gcs": (_key_of(1024, "g"), _key_of(1025, "g"), "1024 bytes"),
    "azure": (_key_of(1024, "a"), _key_of(1025, "a"), "1024 characters"),
    # 255 bytes per path segment, less the ".lot-crc32c" of the checksum sidecar.
    "sftp": ("d/" + "s" * 244, "d/" + "s" * 245, "sidecar"),
}


def test_name_over_the_service_limit(kit, strategy, bucket, small):
    _, key, hint = LIMITS[kit.name]
    name = key.rsplit("/", 1)[-1]
    expect(lambda: strategy.put(str(small), kit.uri(bucket, key)), ValueError, name[:30], hint)
    assert kit.list_keys(bucket) == []


def test_name_at_the_service_limit_round_trips(kit, strategy, bucket, small, tmp_path):
    key = LIMITS[kit.name][0]
    strategy.put(str(small), kit.uri(bucket, key))
    assert strategy.get(kit.uri(bucket, key), str(tmp_path / "back.bin")).verified == 1
    assert (tmp_path / "back.bin").read_bytes() == b"small"


def test_local_name_that_is_not_utf8(kit, strategy, bucket, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "ok.bin").write_bytes(b"ok")
    bad = tree / os.fsdecode(b"bad-\xff.bin")
    bad.write_bytes(b"x")
    expect(lambda: strategy.put(str(tree), kit.uri(bucket, "t/")), ValueError, repr(str(bad)), "rename")
    assert kit.list_keys(bucket) == []  # refused before any file was sent


# --- empty objects ------------------------------------------------------------------------

def test_folder_of_empty_files_round_trips(kit, strategy, bucket, tmp_path):
    src = tmp_path / "empty"
    for rel in ("a", "sub/b", "sub/deeper/c.bin"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"")
    assert strategy.put(str(src), kit.uri(bucket, "e/")).files == 3
    strategy.copy(kit.uri(bucket, "e/a"), kit.uri(bucket, "copied/a"))
    down = strategy.get(kit.uri(bucket, "e/"), str(tmp_path / "out"))
    assert down.files == 3 and down.verified == 3 and down.bytes == 0
    for rel in ("a", "sub/b", "sub/deeper/c.bin"):
        assert (tmp_path / "out" / rel).read_bytes() == b""
    single = strategy.get(kit.uri(bucket, "copied/a"), str(tmp_path / "one"))
    assert single.verified == 1 and (tmp_path / "one").stat().st_size == 0


# --- an object rewritten between the listing and the read -----------------------------------

def engine_that_changes_after_listing(strategy, change: Callable[[], None]):
    """The strategy's engine, running ``change`` once the folder was listed (before any read)."""
    from covalent_lot._engine import Engine
    from covalent_lot._strategy import build_engine

    class ChangesAfterListing(Engine):
        def _list(self, prefix, stats):
            objects = super()._list(prefix, stats)
            change()
            return objects

    engine = build_engine(strategy.backend_path, strategy.settings.as_dict())
    return ChangesAfterListing(engine.backend, engine.policy, engine.verify)


@pytest.mark.parametrize("keep_checksum", [False, True], ids=["plain-rewrite", "stale-checksum"])
def test_object_rewritten_after_listing(kit, strategy, bucket, tmp_path, keep_checksum):
    from covalent_lot import ChecksumMismatchError
    from covalent_lot._uri import parse_uri

    old, new = b"old " * 1000, b"NEW!" * 1500
    for name in ("a.bin", "b.bin"):
        kit.put_bytes(bucket, f"d/{name}", old)
    strategy.put(str(_write(tmp_path / "b.bin", old)), kit.uri(bucket, "d/b.bin"))
    metadata = kit.get_metadata(bucket, "d/b.bin") if keep_checksum else None
    engine = engine_that_changes_after_listing(
        strategy, lambda: kit.put_bytes(bucket, "d/b.bin", new, metadata))
    out = tmp_path / "out"
    try:
        stats = engine.download(parse_uri(kit.uri(bucket, "d/")), str(out))
    except (ChecksumMismatchError, FileExistsError, FileNotFoundError) as exc:
        assert kit.uri(bucket, "d/b.bin") in str(exc)
        assert not (out / "b.bin").exists()
    else:
        assert not keep_checksum, "bytes that do not match the stored checksum were accepted"
        assert (out / "b.bin").read_bytes() == new  # whole, never a mix of old and new
        assert kit.uri(bucket, "d/b.bin") in stats.unverified
    finally:
        engine.backend.close()


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
