"""The ``covalent-lot`` command line without a server.

Pure helpers (age parsing, gc selection, masking, listing format) are tested
directly; commands run through ``cli.main`` with the real S3Strategy whose
backend is the in-memory one (``STRATEGIES["s3"]`` points at a subclass here),
so option resolution, the engine and its checksums are the real ones.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import pytest

from covalent_lot import cli
from covalent_lot._cli_doctor import MASK, PROBE_PREFIX, is_secret, shown_value
from covalent_lot._backend import RemoteObject
from covalent_lot._errors import ErrorKind
from covalent_lot._uri import StoreURI

from .lot_fakes import STORES, FakeServiceError, MemoryBackend, checksum_of

MiB = 1024 * 1024
NOW = 1_700_000_000.0
MODIFIED: dict[str, float] = {}  # key -> modification time (default: now)
DENIED_WRITES: set[str] = set()  # keys whose upload the fake service refuses


class TimedBackend(MemoryBackend):
    """The in-memory backend with modification times, a client and bigger chunks."""

    def __init__(self, settings=None):
        super().__init__(settings)
        self.chunk = MiB

    def connect(self):
        return self

    def _timed(self, obj: RemoteObject) -> RemoteObject:
        return dataclasses.replace(obj, modified=MODIFIED.get(obj.location.key, time.time()))

    def stat(self, location):
        return self._timed(super().stat(location))

    def iter_objects(self, prefix):
        return (self._timed(obj) for obj in super().iter_objects(prefix))

    def put_file(self, local_path, location, size, sha256):
        if location.key in DENIED_WRITES or any(k.endswith("*") and location.key.startswith(k[:-1])
                                                for k in DENIED_WRITES):
            raise FakeServiceError(ErrorKind.DENIED, "AccessDenied")
        super().put_file(local_path, location, size, sha256)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``cli.main``'s exit status (argparse's SystemExit included), stdout and stderr."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def store(s3, monkeypatch):
    """``s3://`` served from memory through the CLI's own strategy_for; returns the fake service."""
    from covalent_lot import _strategy

    class MemoryS3Strategy(s3.S3Strategy):
        backend_path = f"{__name__}:TimedBackend"

    monkeypatch.setattr(sys.modules[__name__], "MemoryS3Strategy", MemoryS3Strategy, raising=False)
    monkeypatch.setitem(_strategy.STRATEGIES, "s3", f"{__name__}:MemoryS3Strategy")
    monkeypatch.setenv("COVALENT_LOT_BASE_DELAY", "0")
    monkeypatch.setenv("COVALENT_LOT_MAX_DELAY", "0")
    STORES.pop("default", None)
    MODIFIED.clear()
    DENIED_WRITES.clear()
    return TimedBackend()


def obj(key: str, size: int = 10, modified: float | None = NOW, sha256: str | None = None) -> RemoteObject:
    return RemoteObject(StoreURI("s3", "bkt", key), size, sha256, None, modified)


# --- pure helpers -----------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("2w", 1209600),
    ("1.5h", 5400), ("0s", 0), (" 7D ", 604800),
])
def test_parse_age(text, seconds):
    assert cli.parse_age(text) == seconds


@pytest.mark.parametrize("text", ["7", "d", "-1d", "7y", "", "7 days"])
def test_parse_age_refuses(text):
    with pytest.raises(Exception, match="not an age"):
        cli.parse_age(text)


LISTING = [
    obj("runs/d1/a.npy", 100, NOW - 10 * 86400),
    obj("runs/d1/sub/b.npy", 200, NOW - 60),
    obj("runs/d2/a.npy", 400, NOW - 10 * 86400),
    obj("runs/d10/a.npy", 800, NOW - 10 * 86400),  # "d1" is a prefix of its segment, not one
    obj("runs/x/d1", 1600, None),  # d1 as the last segment; no modification time
]


@pytest.mark.parametrize("dispatch, older_than, keys, unknown", [
    ("d1", None, ["runs/d1/a.npy", "runs/d1/sub/b.npy", "runs/x/d1"], 0),
    (None, 86400, ["runs/d1/a.npy", "runs/d2/a.npy", "runs/d10/a.npy"], 1),
    ("d1", 86400, ["runs/d1/a.npy"], 1),
    ("d1", 0, ["runs/d1/a.npy", "runs/d1/sub/b.npy"], 1),
    ("nope", None, [], 0),
])
def test_select_garbage(dispatch, older_than, keys, unknown):
    plan = cli.select_garbage(LISTING, dispatch_id=dispatch, older_than=older_than, now=NOW)
    assert [o.location.key for o in plan.selected] == keys
    assert plan.listed == len(LISTING)
    assert plan.unknown_age == unknown
    assert plan.bytes == sum(o.size for o in plan.selected)


def test_select_garbage_needs_a_condition():
    with pytest.raises(ValueError, match="dispatch_id or older_than"):
        cli.select_garbage(LISTING)


@pytest.mark.parametrize("name, secret", [
    ("connection_string", True), ("account_key", True), ("sas_token", True), ("password", True),
    ("sse_kms_key_id", True), ("credential", True), ("client_secret", True),
    ("connection_string_env", False), ("account_key_env", False), ("sas_token_env", False),
    ("key_filename", False), ("credentials_file", False), ("endpoint_url", False),
    ("region_name", False), ("known_hosts", False),
])
def test_is_secret(name, secret):
    assert is_secret(name) is secret


@pytest.mark.parametrize("name, value, shown", [
    ("sse_kms_key_id", "arn:aws:kms:key/123", MASK),
    ("endpoint_url", "http://h:1", "http://h:1"),
    ("account_key_env", "AZURE_STORAGE_KEY", "AZURE_STORAGE_KEY"),
    ("insecure_skip_host_key_check", False, "False"),  # not a string: nothing to hide
    ("sse_kms_key_id", None, "-"),
])
def test_shown_value(name, value, shown):
    assert shown_value(name, value) == shown


@pytest.mark.parametrize("size, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (int(1.5 * MiB), "1.5 MiB"), (3 * 1024**4, "3.0 TiB"),
])
def test_human_size(size, text):
    assert cli.human_size(size) == text


def test_format_listing():
    digest = checksum_of(b"x")
    objects = [obj("runs/d1/a.npy", 2048, NOW, digest), obj("runs/d1/b", 5, None)]
    short = cli.format_listing(objects, base="runs/")
    assert short[0].split() == ["SIZE", "MODIFIED", "CHECKSUM", "KEY"]
    assert short[1].split()[-2:] == [str(digest), "d1/a.npy"]
    assert short[1].lstrip().startswith("2.0 KiB")
    assert short[2].split()[-3:] == ["-", "-", "d1/b"]
    assert short[-1] == "2 object(s), 2.0 KiB"
    long = cli.format_listing(objects, base="runs/", long=True)
    assert long[1].split()[0] == "2048"
    assert long[1].split()[-2:] == [str(digest), "s3://bkt/runs/d1/a.npy"]
    assert len({len(line.split("s3://")[0]) for line in long[1:3]}) == 1  # columns aligned


def test_progress_bar_only_for_big_transfers():
    with cli.progress_bar(None, "x") as progress:
        assert progress is None
    with cli.progress_bar(cli.BAR_THRESHOLD, "x") as progress:
        assert progress is None
    with cli.progress_bar(cli.BAR_THRESHOLD + 1, "x") as progress:
        progress(cli.BAR_THRESHOLD + 1)


# --- usage and errors -------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["gc", "s3://bkt/runs/"], "needs --dispatch ID and/or --older-than"),
    (["rm", "s3://bkt/runs/"], "add --recursive"),
    (["cp", "a", "b"], "must be a storage URI"),
    (["cp", "s3://bkt/a", "gs://bkt/a"], "not server-side"),
    (["gc", "s3://bkt/", "--older-than", "7y"], "not an age"),
    (["ls"], "required"),
    (["frobnicate"], "invalid choice"),
    (["ls", "-o", "novalue", "s3://bkt/"], "NAME=VALUE"),
])
def test_usage_errors_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert "usage: covalent-lot" in err


@pytest.mark.parametrize("argv", [["--help"], ["gc", "--help"], ["doctor", "--help"], []])
def test_help_has_examples(capsys, argv):
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert ("examples:" in out) if argv[1:] else ("COMMAND" in out)


def test_error_is_one_line_and_debug_adds_the_traceback(capsys):
    code, out, err = run(capsys, "ls", "ftp://host/x")
    assert code == 1
    assert out == ""
    assert err.splitlines() == [err.strip()]
    assert err.startswith("covalent-lot: ValueError: no covalent-lot strategy for scheme 'ftp'")
    code, _, err = run(capsys, "ls", "--debug", "ftp://host/x")
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1].startswith("covalent-lot: ValueError:")


def test_unknown_option_is_an_error_naming_the_close_one(capsys, store):
    code, _, err = run(capsys, "ls", "-o", "endpoint=http://h", "s3://bkt/")
    assert code == 1
    assert "covalent-lot: TypeError:" in err and "endpoint_url" in err


# --- commands on the in-memory store -----------------------------------------------------


def test_cp_up_ls_and_down(capsys, store, tmp_path):
    data = b"covalent-lot" * 1000
    (tmp_path / "a.bin").write_bytes(data)
    code, out, _ = run(capsys, "cp", str(tmp_path / "a.bin"), "s3://bkt/runs/d1/")
    assert code == 0
    assert out.startswith(f"upload {tmp_path / 'a.bin'} -> s3://bkt/runs/d1/a.bin: 1 file(s)")
    assert store.data("runs/d1/a.bin") == data

    code, out, _ = run(capsys, "ls", "s3://bkt/runs/")
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split()[-1] == "d1/a.bin" and lines[-1] == "1 object(s), 11.7 KiB"

    (tmp_path / "down").mkdir()
    code, out, _ = run(capsys, "cp", "s3://bkt/runs/d1/a.bin", str(tmp_path / "down"))
    assert code == 0 and "1/1 crc32c verified" in out
    assert (tmp_path / "down" / "a.bin").read_bytes() == data


def test_cp_folder_and_server_side_copy_json(capsys, store, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x").write_bytes(b"x" * 10)
    (src / "sub" / "y").write_bytes(b"y" * 20)
    assert run(capsys, "cp", "-q", str(src), "s3://bkt/a/") == (0, "", "")
    code, out, _ = run(capsys, "cp", "--json", "s3://bkt/a/", "s3://bkt/b/")
    record = json.loads(out)
    assert code == 0
    assert {k: record[k] for k in ("action", "files", "bytes")} == \
        {"action": "copy", "files": 2, "bytes": 30}
    assert store.keys() == ["a/sub/y", "a/x", "b/sub/y", "b/x"]
    code, _, _ = run(capsys, "cp", "-q", "s3://bkt/b/", str(tmp_path / "out"))
    assert (tmp_path / "out" / "sub" / "y").read_bytes() == b"y" * 20


def test_ls_json_and_long_show_the_stored_checksum(capsys, store):
    store.add("bkt", "k/one", b"1")
    code, out, _ = run(capsys, "ls", "--json", "s3://bkt/k/one")
    assert code == 0
    [record] = json.loads(out)
    assert record["uri"] == "s3://bkt/k/one" and record["checksum"] == str(checksum_of(b"1")) and record["size"] == 1
    code, out, _ = run(capsys, "ls", "-l", "s3://bkt/k/")  # the listing has no checksum: asked per object
    assert out.splitlines()[1].split()[-2:] == [str(checksum_of(b"1")), "s3://bkt/k/one"]
    code, out, _ = run(capsys, "ls", "s3://bkt/k/")
    assert out.splitlines()[1].split()[-2:] == ["-", "one"]


def test_ls_missing_object_is_one_line(capsys, store):
    code, _, err = run(capsys, "ls", "s3://bkt/nothing")
    assert code == 1
    assert err.startswith("covalent-lot: FileNotFoundError: ") and len(err.splitlines()) == 1


def test_rm_object_and_folder(capsys, store):
    for key in ("r/a", "r/b/c", "keep"):
        store.add("bkt", key, b"123")
    assert run(capsys, "rm", "s3://bkt/r/")[0] == 2
    assert store.keys() == ["keep", "r/a", "r/b/c"]
    code, out, _ = run(capsys, "rm", "s3://bkt/r/a")
    assert code == 0 and out.startswith("removed 1 object(s), 3 B from s3://bkt/r/a")
    code, out, _ = run(capsys, "rm", "--json", "--recursive", "s3://bkt/r/")
    assert json.loads(out)["files"] == 1 and json.loads(out)["action"] == "delete"
    assert store.keys() == ["keep"]


def seed_dispatches(store) -> None:
    old = time.time() - 3 * 86400
    for key, modified in [("runs/d1/a", old), ("runs/d1/b/c", None), ("runs/d2/a", old),
                          ("runs/d2/b", None), ("other/d1/a", old)]:
        store.add("bkt", key, b"12345")
        if modified is not None:
            MODIFIED[key] = modified


def test_gc_dry_run_then_by_dispatch(capsys, store):
    seed_dispatches(store)
    code, out, _ = run(capsys, "gc", "--dry-run", "--dispatch", "d1", "s3://bkt/runs")
    assert code == 0
    assert [line.split()[-1] for line in out.splitlines()[1:3]] == ["d1/a", "d1/b/c"]
    assert out.splitlines()[-1] == ("gc s3://bkt/runs/: would remove 2 of 4 object(s), 10 B "
                                    "(dry run: nothing removed)")
    assert len(store.keys()) == 5
    code, out, _ = run(capsys, "gc", "--dispatch", "d1", "s3://bkt/runs/")
    assert code == 0 and out.startswith("gc s3://bkt/runs/: removed 2 of 4 object(s), 10 B in ")
    assert store.keys() == ["other/d1/a", "runs/d2/a", "runs/d2/b"]


def test_gc_by_age_and_both(capsys, store):
    seed_dispatches(store)
    code, out, _ = run(capsys, "gc", "--json", "--older-than", "2d", "--dispatch", "d2", "s3://bkt/runs/")
    record = json.loads(out)
    assert code == 0 and [o["key"] for o in record["objects"]] == ["runs/d2/a"]
    assert record["files"] == 1 and record["bytes"] == 5 and not record["dry_run"]
    code, out, _ = run(capsys, "gc", "--older-than", "1d", "s3://bkt/runs/")
    assert store.keys() == ["other/d1/a", "runs/d1/b/c", "runs/d2/b"]
    assert "removed 1 of 3 object(s)" in out


def test_gc_of_an_empty_prefix_removes_nothing(capsys, store):
    code, out, _ = run(capsys, "gc", "--older-than", "0s", "s3://bkt/empty/")
    assert code == 0 and "removed 0 of 0 object(s)" in out


def test_progress_bar_shown_on_a_terminal(capsys, store, tmp_path, monkeypatch):
    data = b"\x01" * (cli.BAR_THRESHOLD + MiB)
    store.add("bkt", "big.bin", data)
    seen = []
    real = cli.progress_bar

    def spy(total, description):
        seen.append(total)
        return real(total, description)

    monkeypatch.setattr(cli, "progress_bar", spy)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, _ = run(capsys, "cp", "s3://bkt/big.bin", str(tmp_path / "big.bin"))
    assert code == 0 and seen == [len(data)]
    assert (tmp_path / "big.bin").stat().st_size == len(data)
    assert out.splitlines()[-1].startswith("download s3://bkt/big.bin")


# --- doctor -------------------------------------------------------------------------------


def test_doctor_round_trip_leaves_nothing(capsys, store, monkeypatch):
    monkeypatch.setenv("COVALENT_LOT_S3_REGION_NAME", "eu-west-1")
    code, out, err = run(capsys, "doctor", "-o", "sse=aws:kms", "-o", "sse_kms_key_id=arn:hidden",
                         "s3://bkt/probe/")
    assert (code, err) == (0, "")
    assert "region_name" in out and "(environment COVALENT_LOT_S3_REGION_NAME)" in out
    assert f"sse_kms_key_id = {MASK}" in out and "arn:hidden" not in out
    assert "sse            = aws:kms" in out and "(argument)" in out
    assert "store        s3://bkt/probe/: ok, wrote, read back and removed 1.0 KiB" in out
    assert "gcs" not in out  # only the backends of the STOREs given
    assert store.keys() == []


def test_doctor_reports_a_failing_store(capsys, store):
    DENIED_WRITES.add(f"probe/{PROBE_PREFIX}*")
    code, out, err = run(capsys, "doctor", "s3://bkt/probe/")
    assert code == 1
    [line] = err.splitlines()
    assert line.startswith("PROBLEM s3: store s3://bkt/probe/: write failed: PermissionError:")
    assert out.splitlines()[-1] == "1 problem(s)"


def test_doctor_reports_bad_settings(capsys, store, monkeypatch):
    monkeypatch.setenv("COVALENT_LOT_S3_MAX_ATTEMPTS", "many")
    code, _, err = run(capsys, "doctor", "--quiet", "s3://bkt/p/")
    assert code == 1
    assert err.startswith("PROBLEM s3: settings: ValueError: option max_attempts from environment "
                          "COVALENT_LOT_S3_MAX_ATTEMPTS")


def test_doctor_refuses_a_uri_of_no_backend(capsys):
    code, _, err = run(capsys, "doctor", "--quiet", "ftp://host/x/")
    assert code == 1
    assert err.startswith("PROBLEM doctor: 'ftp://host/x/' is not a store URI of a covalent-lot backend")


def test_doctor_reports_a_missing_sdk(capsys, store, monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 now raises ImportError
    code, out, err = run(capsys, "doctor", "s3://bkt/p/")
    assert code == 1
    assert err.strip() == "PROBLEM s3: boto3 not installed: pip install 'covalent-lot[s3]'"


def test_doctor_applies_each_option_to_the_backends_that_have_it(capsys):
    code, out, err = run(capsys, "doctor", "--json", "-o", "endpoint=http://127.0.0.1:9", "-o", "nope=1")
    backends = json.loads(out)["backends"]
    assert backends["gcs"]["settings"]["endpoint"]["source"] == "argument"
    assert "endpoint" not in backends["s3"]["settings"]
    assert err.splitlines()[0] == "PROBLEM doctor: -o nope: no backend checked here has this option"
    assert code == 1


def test_doctor_without_stores_checks_every_backend(capsys, monkeypatch):
    """The unit environment has no credentials: a problem only where something is configured."""
    monkeypatch.setenv("COVALENT_LOT_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    code, out, err = run(capsys, "doctor", "--json")
    record = json.loads(out)
    assert set(record["backends"]) == {"s3", "gcs", "azure", "sftp"}
    assert record["backends"]["s3"]["settings"]["endpoint_url"] == {
        "value": "http://127.0.0.1:9", "source": "environment COVALENT_LOT_S3_ENDPOINT_URL"}
    assert record["problems"] == [line for line in err.splitlines()]
    assert [p.split(":")[0] for p in record["problems"]] == ["PROBLEM s3"]
    assert "no AWS credentials found" in record["problems"][0]
    assert code == 1


def test_named_store(capsys, store, covalent_conf):
    covalent_conf({"s3": {"stores": {"minio": {"region_name": "eu-north-1"}}}})
    code, out, err = run(capsys, "doctor", "--store", "minio", "s3://bkt/p/")
    assert (code, err) == (0, "")
    assert "region_name = eu-north-1  (covalent.conf [lot.s3.stores.minio])" in out
    assert "stores       minio (choose with --store NAME; showing minio)" in out
    code, _, err = run(capsys, "ls", "--store", "minio2", "s3://bkt/p/")
    assert code == 1 and err.startswith("covalent-lot: ValueError: unknown store 'minio2'")
    assert "did you mean 'minio'?" in err


def test_doctor_store_of_one_backend_leaves_the_others_alone(capsys, store, covalent_conf):
    covalent_conf({"s3": {"stores": {"minio": {"region_name": "eu-north-1"}}}})
    code, out, _ = run(capsys, "doctor", "--json", "--store", "minio")
    backends = json.loads(out)["backends"]
    assert backends["s3"]["settings"]["region_name"]["value"] == "eu-north-1"
    assert all("settings" in backends[name] for name in ("gcs", "azure", "sftp"))
    assert json.loads(out)["problems"] == [] and code == 0
