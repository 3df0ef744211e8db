"""The public surface: pinned names, a light import, a clear message without the SDK."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import covalent_lot as lot

from .lot_fakes import import_error_without, run_python

# The pinned surface, by what each name is: adding or dropping a public name is a
# change here as well (and the kinds are checked, not just the spelling).
PUBLIC_CLASSES = {"ChecksumMismatchError", "Handoff", "Ref", "RetryPolicy", "StoreURI", "TransferStats"}
PUBLIC_FUNCTIONS = {"cleanup", "download", "handoff", "offload", "parse_uri", "register", "strategy_for", "upload"}

HEAVY = [
    "covalent", "boto3", "botocore", "s3transfer", "google.cloud.storage", "google.cloud",
    "azure.storage.blob", "azure", "paramiko", "numpy", "pandas", "pyarrow",
]


def test_all_is_pinned():
    assert set(lot.__all__) == PUBLIC_CLASSES | PUBLIC_FUNCTIONS
    assert lot.__all__ == sorted(set(lot.__all__))


def test_every_public_name_resolves():
    for name in lot.__all__:
        assert getattr(lot, name) is not None, name
    assert all(isinstance(getattr(lot, name), type) for name in PUBLIC_CLASSES)
    assert all(callable(getattr(lot, name)) and not isinstance(getattr(lot, name), type)
               for name in PUBLIC_FUNCTIONS)
    assert set(lot.__all__) <= set(dir(lot))


def test_unknown_attribute():
    with pytest.raises(AttributeError, match="no_such_thing"):
        lot.no_such_thing  # noqa: B018


def test_checksum_mismatch_is_an_oserror():
    assert issubclass(lot.ChecksumMismatchError, OSError)


def test_import_is_light():
    result = run_python(f"""
        import json, sys
        import covalent_lot
        from covalent_lot import parse_uri, RetryPolicy, StoreURI, ChecksumMismatchError
        parse_uri("s3://bkt/k")
        RetryPolicy()
        dir(covalent_lot)
        print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
    """)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_import_reads_no_configuration(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), COVALENT_CONFIG_DIR=str(home / "cfg"))
    result = subprocess.run(
        [sys.executable, "-c", "import covalent_lot"], capture_output=True, text=True, env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert list(home.iterdir()) == []


@pytest.mark.parametrize(
    "statement",
    [
        "from covalent_lot.strategies.s3 import S3Strategy; S3Strategy()",
        "import covalent_lot; covalent_lot.handoff('s3://bkt/x')",
        "import covalent_lot; covalent_lot.strategy_for('s3://bkt/x')",
    ],
)
def test_missing_boto3_says_how_to_install(statement):
    message = import_error_without("boto3", statement)
    assert "pip install covalent-lot[s3]" in message
    assert "boto3" in message


def test_cli_without_a_command_prints_help(capsys):
    from covalent_lot.cli import main

    assert main([]) == 0
    assert "covalent-lot" in capsys.readouterr().out


def test_cli_reports_errors_as_one_line(capsys, monkeypatch):
    from covalent_lot.cli import main

    # Should fail on the bucket name before any request; if it does not, these
    # keep it local (no credentials are set either, so nothing is sent).
    monkeypatch.setenv("COVALENT_LOT_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("COVALENT_LOT_MAX_ATTEMPTS", "1")

    assert main(["cp", "s3://Bad_Bucket/x", "/tmp/lot-unit-never"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("covalent-lot: ValueError:") and "'Bad_Bucket'" in err


def test_cli_needs_one_uri():
    from covalent_lot.cli import main

    with pytest.raises(SystemExit):
        main(["cp", "/tmp/a", "/tmp/b"])
