"""A catalogue of bad input, no servers: each case names its exception and its message.

Every case asserts three things about the error a user sees:

- its type, a built-in (``ValueError``, ``FileNotFoundError``, ...), exactly;
- that the message names the offending value (URI, option value, path);
- that the message says how to fix it (a hint word).

The same catalogue against real servers is integration/test_bad_input.py.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest

from covalent_lot._engine import Engine, local_path_for_key
from covalent_lot._retry import RetryPolicy
from covalent_lot._uri import parse_uri

from . import lot_fakes

BACKEND_OF = {"s3": "s3", "gs": "gcs", "az": "azure", "sftp": "sftp"}
STRATEGY_CLASS = {
    "s3": "covalent_lot.strategies.s3:S3Strategy",
    "gcs": "covalent_lot.strategies.gcs:GCSStrategy",
    "azure": "covalent_lot.strategies.azure:AzureStrategy",
    "sftp": "covalent_lot.strategies.sftp:SFTPStrategy",
}


def expect(call: Callable[[], Any], error: type[Exception], value: str, hint) -> str:
    """Run ``call``; check the exception's exact type, the value and the hint in its message."""
    with pytest.raises(Exception) as info:
        call()
    message = str(info.value)
    assert type(info.value) is error, f"{type(info.value).__name__}: {message}"
    assert value in message, f"{value!r} not named in: {message}"
    assert hint in message, f"no hint {hint!r} in: {message}"
    return message


def strategy_class(backend: str):
    from covalent_lot._strategy import _load

    return _load(STRATEGY_CLASS[backend])


@pytest.fixture(scope="module")
def strategies():
    """One default strategy per URI scheme (built once: construction imports the SDKs)."""
    from covalent_lot import strategy_for

    return {scheme: strategy_for(scheme) for scheme in BACKEND_OF}


# --- malformed URIs, per scheme ------------------------------------------------------------

LONG_KEY = "k" * 1025
URI_CASES = [
    # (id, uri, value named, hint)
    ("no-bucket-s3", "s3:///key", "'s3:///key'", "s3://bucket/key"),
    ("no-bucket-gs", "gs:///key", "'gs:///key'", "gs://bucket/key"),
    ("no-key-gs", "gs://bkt", "'gs://bkt'", "gs://bkt/"),
    ("no-key-az", "az://ctr", "'az://ctr'", "az://ctr/"),
    ("no-scheme-s3", "bkt/key", "'bkt/key'", "e.g. s3://"),
    ("other-scheme-az", "abfs://ctr/key", "'abfs'", "strategy_for"),
    ("query-s3", "s3://bkt/a?versionId=3", "'s3://bkt/a?versionId=3'", "as arguments"),
    ("fragment-gs", "gs://bkt/a#frag", "'gs://bkt/a#frag'", "as arguments"),
    ("sas-query-az", "az://ctr/blob?sv=2020&sig=x", "'az://ctr/blob?sv=2020&sig=x'", "as arguments"),
    ("query-sftp", "sftp://host/tmp/x?mode=0600", "'sftp://host/tmp/x?mode=0600'", "as arguments"),
    ("newline-sftp", "sftp://host/tmp/a\nb", "'\\n'", "remove"),
    ("nul-s3", "s3://bkt/a\x00b", "'\\x00'", "remove"),
    ("dotdot-s3", "s3://bkt/a/../b", "'..'", "in full"),
    ("dot-az", "az://ctr/./b", "'.'", "in full"),
    ("double-slash-gs", "gs://bkt/a//b", "'//'", "single '/'"),
    ("leading-slash-az", "az://ctr//blob", "'az://ctr//blob'", "one '/' after the bucket"),
    ("placeholder-bucket-s3", "s3://b-{dispatch_id}/k", "'s3://b-{dispatch_id}/k'", "to the key"),
    ("unknown-placeholder-gs", "gs://bkt/{run_id}/x", "{run_id}", "{dispatch_id}"),
    ("unbalanced-brace-az", "az://ctr/{node_id/x", "'{node_id/x'", "single braces"),
    ("s3-bucket-uppercase", "s3://My_Bucket/k", "'My_Bucket'", "lowercase"),
    ("s3-bucket-short", "s3://ab/k", "'ab'", "3-63 characters"),
    ("s3-bucket-ip", "s3://192.168.0.1/k", "'192.168.0.1'", "not an IP address"),
    ("s3-bucket-dotdot", "s3://a..b/k", "'a..b'", "no '..'"),
    ("gs-bucket-goog", "gs://goog-data/k", "'goog-data'", "no 'goog' prefix"),
    ("gs-bucket-long", "gs://" + "b" * 64 + "/k", "b" * 64, "3-63 characters"),
    ("az-container-upper", "az://Data/k", "'Data'", "lowercase"),
    ("az-container-hyphens", "az://a--b/k", "'a--b'", "single hyphens"),
    ("s3-key-1025-bytes", "s3://bkt/" + LONG_KEY, "'kkkkkkkkkk", "at most 1024 bytes"),
    ("s3-key-utf8-bytes", "s3://bkt/" + "é" * 513, "'éééééééééé", "at most 1024 bytes"),
    ("gs-key-1025-bytes", "gs://bkt/" + LONG_KEY, "'kkkkkkkkkk", "at most 1024 bytes"),
    ("gs-acme-prefix", "gs://bkt/.well-known/acme-challenge/x", "acme-challenge/x",
     "use another prefix"),
    ("az-blob-1025-chars", "az://ctr/" + LONG_KEY, "'kkkkkkkkkk", "at most 1024 characters"),
    ("sftp-name-256-bytes", "sftp://host/d/" + "s" * 256 + "/x", "'ssssssssss", "at most 255 bytes"),
    ("sftp-name-and-sidecar", "sftp://host/d/" + "s" * 245, "'ssssssssss", "sidecar"),
    ("az-blob-255-segments", "az://ctr/" + "a/" * 254 + "b", "az://ctr/a/a", "at most 254 path segments"),
    ("sftp-port-too-big", "sftp://host:99999/tmp/x", "'99999'", "1-65535"),
    ("sftp-port-not-numeric", "sftp://host:abc/tmp/x", "'abc'", "1-65535"),
    ("sftp-no-host", "sftp://user@/tmp/x", "'user@'", "sftp://[user@]host[:port]/"),
]


@pytest.mark.parametrize("uri, value, hint", [c[1:] for c in URI_CASES], ids=[c[0] for c in URI_CASES])
def test_malformed_uri(strategies, uri, value, hint):
    scheme = uri.split("://")[0] if uri.split("://")[0] in BACKEND_OF else "s3"
    expect(lambda: strategies[scheme].parse(uri), ValueError, value, hint)


@pytest.mark.parametrize("via, uri", [
    ("s3", "gs://bkt/k"), ("gs", "az://ctr/k"), ("az", "sftp://host/tmp/k"), ("sftp", "s3://bkt/k"),
], ids=lambda v: v.split("://")[0])
def test_uri_of_another_backend(strategies, via, uri):
    scheme = uri.split("://")[0]
    expect(lambda: strategies[via].parse(uri), ValueError, repr(uri), f"the strategy for {scheme}://")


@pytest.mark.parametrize("uri", ["s4://bkt/k", "http://host/k", "file:///tmp/x"])
def test_unsupported_scheme(uri):
    from covalent_lot import handoff

    expect(lambda: handoff(uri), ValueError, uri.split("://")[0], "supported: az, gs, s3, sftp")


def test_child_of_an_object_uri():
    expect(lambda: parse_uri("s3://bkt/file.npy").child("x"), ValueError,
           "s3://bkt/file.npy", "s3://bkt/file.npy/ for a folder")


# --- keys that would leave the destination ------------------------------------------------

ESCAPING_KEYS = ["../x", "a/../../x", "/etc/passwd", "a\\..\\..\\x", "a//b", "./x", "a\x00b", ""]


@pytest.mark.parametrize("key", ESCAPING_KEYS, ids=repr)
def test_key_that_escapes_the_destination(tmp_path, key):
    uri = f"s3://bkt/pre/{key}"
    shown = uri if uri.isprintable() else repr(uri)
    expect(lambda: local_path_for_key(str(tmp_path), key, uri), ValueError, shown,
           "download it on its own")


def test_symlink_inside_destination_is_not_followed_out(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    expect(lambda: local_path_for_key(str(root), "link/x", "s3://bkt/pre/link/x"), ValueError,
           "s3://bkt/pre/link/x", "download it on its own")
    assert not (outside / "x").exists()


@pytest.fixture
def memory(request):
    """An engine over a fresh in-memory store, one attempt, no waits."""
    store = f"bad-input-{request.node.name}"
    lot_fakes.STORES.pop(store, None)
    backend = lot_fakes.MemoryBackend({"fake_store": store})
    yield Engine(backend, RetryPolicy(1, 0, 0)), backend
    lot_fakes.STORES.pop(store, None)


def test_stored_key_with_dotdot_is_refused_before_any_byte(memory, tmp_path):
    engine, backend = memory
    backend.add("bkt", "pre/ok.bin", b"fine")
    backend.add("bkt", "pre/../../evil.bin", b"evil")  # another tool can store such a key
    expect(lambda: engine.download(parse_uri("s3://bkt/pre/"), str(tmp_path / "out")), ValueError,
           "s3://bkt/pre/../../evil.bin", "download it on its own")
    assert not list(tmp_path.rglob("*.bin")), "a file moved although a key was refused"


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_symlink_in_uploaded_folder(memory, tmp_path, kind):
    engine, backend = memory
    target = tmp_path / "target"
    target.mkdir()
    (target / "secret").write_bytes(b"s")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_bytes(b"a")
    link = tree / "link"
    link.symlink_to(target / "secret" if kind == "file" else target, target_is_directory=kind == "dir")
    expect(lambda: engine.upload(str(tree), parse_uri("s3://bkt/up/")), ValueError,
           repr(str(link)), "copy the target into the folder")
    assert backend.keys() == []


# --- covalent.conf: unknown keys and sections -----------------------------------------------

CONF_KEY_CASES = [
    # (id, [lot] table, value named, hint)
    ("s3-enpoint_url", {"s3": {"enpoint_url": "http://x:1"}}, "'enpoint_url'", "did you mean 'endpoint_url'"),
    ("gcs-chunksize", {"gcs": {"chunksize": "32MiB"}}, "'chunksize'", "did you mean 'chunk_size'"),
    ("azure-acount_url", {"azure": {"acount_url": "http://x:1/a"}}, "'acount_url'",
     "did you mean 'account_url'"),
    ("sftp-knownhosts", {"sftp": {"knownhosts": "/k"}}, "'knownhosts'", "did you mean 'known_hosts'"),
    ("lot-max_atempts", {"max_atempts": 3}, "'max_atempts'", "did you mean 'max_attempts'"),
    ("section-s4", {"s4": {"endpoint_url": "http://x:1"}}, "[lot.s4]", "known names: azure, gcs, s3, sftp"),
    ("section-azur", {"azur": {"account_url": "http://x:1/a"}}, "[lot.azur]", "did you mean 'azure'"),
    ("backend-option-in-lot", {"endpoint_url": "http://x:1"}, "'endpoint_url'", "known names"),
]


@pytest.mark.parametrize("table, value, hint", [c[1:] for c in CONF_KEY_CASES],
                         ids=[c[0] for c in CONF_KEY_CASES])
def test_unknown_key_in_covalent_conf(covalent_conf, table, value, hint):
    section = next((name for name in table if name in STRATEGY_CLASS), "s3")
    covalent_conf(table)
    expect(strategy_class(section), ValueError, value, hint)


ARGUMENT_CASES = [
    ("s3", "endpoint", "'endpoint_url'"),
    ("gcs", "chunksize", "'chunk_size'"),
    ("azure", "acount_name", "'account_name'"),
    ("sftp", "key_file", "'key_filename'"),
]


@pytest.mark.parametrize("backend, name, suggestion", ARGUMENT_CASES, ids=[c[0] for c in ARGUMENT_CASES])
def test_mistyped_argument(backend, name, suggestion):
    expect(lambda: strategy_class(backend)(**{name: "x"}), TypeError, repr(name),
           f"did you mean {suggestion}")


# --- option values: wrong types and ranges, from each source ---------------------------------

# (backend, option, raw value, source, value named, hint)
VALUE_CASES = [
    ("s3", "multipart_chunksize", -1, "argument", "-1", ">= 5,242,880 bytes"),
    ("s3", "max_concurrency", "0", "environment", "'0'", ">= 1"),
    ("s3", "read_timeout", "fast", "conf", "'fast'", "e.g. 30"),
    ("s3", "addressing_style", "sideways", "argument", "'sideways'", "auto, path, virtual"),
    ("s3", "sse", "aes256", "environment", "'aes256'", "AES256"),
    ("gcs", "chunk_size", 300_000, "argument", "300,000", "multiple of 256 KiB"),
    ("gcs", "timeout", "soon", "environment", "'soon'", "e.g. 30"),
    ("gcs", "endpoint", "127.0.0.1:4443", "conf", "'127.0.0.1:4443'", "http://"),
    ("gcs", "credentials_file", "key.json", "argument", "'key.json'", "absolute path"),
    ("azure", "max_concurrency", 0, "conf", "0", ">= 1"),
    ("azure", "credential", "password", "environment", "'password'", "connection_string"),
    ("azure", "connect_timeout", "nan", "argument", "'nan'", "e.g. 30"),
    ("azure", "max_block_size", "1KiB", "environment", "'1KiB'", ">= 1,048,576 bytes"),
    ("azure", "account_url", "ftp://acct", "argument", "'ftp://acct'", "https://myaccount"),
    ("sftp", "port", "0", "environment", "'0'", ">= 1"),
    ("sftp", "request_size", "1KiB", "conf", "'1KiB'", ">= 4,096 bytes"),
    ("sftp", "transport", "fastest", "argument", "'fastest'", "auto, paramiko, asyncssh"),
    ("sftp", "max_requests", "many", "environment", "'many'", "whole number"),
    ("sftp", "io_timeout", -1, "argument", "-1", ">= 0.001"),
    ("sftp", "allow_agent", "maybe", "conf", "'maybe'", "true or false"),
    ("s3", "max_attempts", 0, "conf-lot", "0", ">= 1"),
    ("gcs", "max_files", "eight", "environment-common", "'eight'", "whole number"),
    ("azure", "verify", "perhaps", "environment-common", "'perhaps'", "true or false"),
    ("sftp", "port", 70000, "argument", "70000", "<= 65535"),
]


def _case_id(case) -> str:
    values = case.values if hasattr(case, "values") else case
    return f"{values[0]}-{values[1]}-{values[3]}"


@pytest.mark.parametrize("backend, option, raw, source, value, hint", VALUE_CASES,
                         ids=[_case_id(c) for c in VALUE_CASES])
def test_bad_option_value(covalent_conf, monkeypatch, backend, option, raw, source, value, hint):
    explicit = {}
    if source == "argument":
        explicit = {option: raw}
    elif source == "environment":
        monkeypatch.setenv(f"COVALENT_LOT_{backend.upper()}_{option.upper()}", str(raw))
    elif source == "environment-common":
        monkeypatch.setenv(f"COVALENT_LOT_{option.upper()}", str(raw))
    elif source == "conf":
        covalent_conf({backend: {option: raw}})
    else:  # conf-lot: the shared [lot] table
        covalent_conf({option: raw})
    expect(lambda: strategy_class(backend)(**explicit), ValueError, value, hint)


def test_secret_pasted_as_env_name_is_not_echoed():
    secret = "sv=2024-01-01&sig=c2VjcmV0"
    message = expect(lambda: strategy_class("azure")(sas_token_env=secret), ValueError,
                     "sas_token_env", "NAME of an environment variable")
    assert secret not in message


@pytest.mark.parametrize("args, value", [((0, 0.1, 1), "0"), ((3, -1, 1), "-1")], ids=["attempts", "delay"])
def test_bad_retry_policy(args, value):
    expect(lambda: RetryPolicy(*args), ValueError, value, ">= ")


# --- local sources and destinations ----------------------------------------------------------

def test_missing_local_source(memory, tmp_path):
    engine, backend = memory
    path = str(tmp_path / "never-written.npy")
    expect(lambda: engine.upload(path, parse_uri("s3://bkt/x.npy")), FileNotFoundError, repr(path),
           "did the electron write it?")
    assert backend.keys() == []


def test_local_source_that_is_not_a_file(memory, tmp_path):
    engine, _ = memory
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    expect(lambda: engine.upload(str(fifo), parse_uri("s3://bkt/x")), ValueError, repr(str(fifo)),
           "upload a regular file")


def test_folder_uploaded_to_an_object_uri(memory, tmp_path):
    engine, backend = memory
    (tmp_path / "a.txt").write_bytes(b"a")
    expect(lambda: engine.upload(str(tmp_path), parse_uri("s3://bkt/obj")), IsADirectoryError,
           "s3://bkt/obj", "end the URI with '/'")
    assert backend.keys() == []


def test_file_downloaded_onto_a_folder(memory, tmp_path):
    engine, backend = memory
    backend.add("bkt", "f.bin", b"data")
    expect(lambda: engine.download(parse_uri("s3://bkt/f.bin"), str(tmp_path)), IsADirectoryError,
           repr(str(tmp_path)), "give a file path")


@pytest.mark.parametrize("where", ["destination", "parent-of-a-key"])
def test_folder_downloaded_onto_a_file(memory, tmp_path, where):
    engine, backend = memory
    backend.add("bkt", "d/a/b.bin", b"b")
    existing = tmp_path / "out" if where == "destination" else tmp_path / "out" / "a"
    existing.parent.mkdir(exist_ok=True)
    existing.write_bytes(b"a file")
    expect(lambda: engine.download(parse_uri("s3://bkt/d/"), str(tmp_path / "out")),
           NotADirectoryError, str(existing), "folder")
    assert existing.read_bytes() == b"a file"


def test_copy_between_folder_and_object(memory):
    engine, backend = memory
    backend.add("bkt", "d/x", b"x")
    expect(lambda: engine.copy(parse_uri("s3://bkt/d/"), parse_uri("s3://bkt/obj")), ValueError,
           "s3://bkt/obj", "both must be folders (ending in '/') or both objects")


@pytest.mark.parametrize("what", ["in-a-folder", "single-file"])
def test_local_name_that_is_not_utf8(memory, tmp_path, what):
    engine, backend = memory
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "ok.bin").write_bytes(b"ok")  # sorted first: nothing may be sent before the refusal
    bad = tree / os.fsdecode(b"bad-\xff.bin")
    bad.write_bytes(b"x")
    source = tree if what == "in-a-folder" else bad
    expect(lambda: engine.upload(str(source), parse_uri("s3://bkt/up/")), ValueError,
           repr(str(bad)), "rename")
    assert backend.keys() == []


def test_relative_local_path_in_a_handoff():
    from covalent_lot import handoff

    expect(lambda: handoff("s3://bkt/k", local_path="rel/x.npy"), ValueError, "'rel/x.npy'", "absolute")


# --- an object that changes between the listing and the read --------------------------------

class ChangesAfterListing(lot_fakes.MemoryBackend):
    """Runs ``after_listing`` once the folder was listed, before any byte is read."""

    after_listing: Callable[["ChangesAfterListing"], None] = staticmethod(lambda backend: None)

    def iter_objects(self, prefix):
        listed = list(super().iter_objects(prefix))
        self.after_listing(self)
        return iter(listed)


@pytest.fixture
def changing(request):
    store = f"bad-input-{request.node.name}"
    lot_fakes.STORES.pop(store, None)
    backend = ChangesAfterListing({"fake_store": store})
    backend.add("bkt", "d/a.bin", b"old a")
    backend.add("bkt", "d/b.bin", b"old b")
    yield Engine(backend, RetryPolicy(1, 0, 0)), backend
    lot_fakes.STORES.pop(store, None)


def test_object_rewritten_after_listing_downloads_the_new_verified_bytes(changing, tmp_path):
    engine, backend = changing
    backend.after_listing = lambda b: b.add("bkt", "d/b.bin", b"new bytes of b")
    stats = engine.download(parse_uri("s3://bkt/d/"), str(tmp_path))
    assert (tmp_path / "b.bin").read_bytes() == b"new bytes of b"
    assert stats.verified == 2 and not stats.unverified


def test_object_rewritten_with_a_stale_checksum_after_listing_fails(changing, tmp_path):
    from covalent_lot import ChecksumMismatchError

    engine, backend = changing
    stale = lot_fakes.checksum_of(b"old b")
    backend.after_listing = lambda b: b.add("bkt", "d/b.bin", b"tampered", checksum=stale)
    with pytest.raises(ChecksumMismatchError, match="s3://bkt/d/b.bin"):
        engine.download(parse_uri("s3://bkt/d/"), str(tmp_path))
    assert not (tmp_path / "b.bin").exists()


def test_object_deleted_after_listing(changing, tmp_path):
    engine, backend = changing
    backend.after_listing = lambda b: b.delete(parse_uri("s3://bkt/d/b.bin"))
    expect(lambda: engine.download(parse_uri("s3://bkt/d/"), str(tmp_path)), FileNotFoundError,
           "s3://bkt/d/b.bin", "check the bucket and key")
    assert not (tmp_path / "b.bin").exists()


def test_download_of_a_name_near_the_local_limit(memory, tmp_path):
    """The partial file's name must fit in 255 bytes too (it was the name + 26 bytes)."""
    engine, backend = memory
    name = "n" * 250
    backend.add("bkt", f"d/{name}", b"x")
    engine.download(parse_uri("s3://bkt/d/"), str(tmp_path))
    assert (tmp_path / name).read_bytes() == b"x"
