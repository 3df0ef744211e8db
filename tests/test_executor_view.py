"""What a transfer sees on the executor: its own settings, clear errors when the
executor lacks covalent-lot or the backend's SDK, and Covalent's own File and
FileTransfer used with covalent-lot strategies directly."""

from __future__ import annotations

import os

import pytest

import covalent_lot as lot

from .lot_fakes import run_python

PICKLED_HOOKS = """
    import cloudpickle, covalent_lot as lot
    h = lot.handoff({uri!r}, staging_dir={staging!r})
    pre, call = h.upload().cp()
    open({path!r}, "wb").write(cloudpickle.dumps((pre, call)))
"""


def pickled_hooks(tmp_path, uri: str) -> str:
    path = str(tmp_path / "hooks.pkl")
    result = run_python(PICKLED_HOOKS.format(uri=uri, staging=str(tmp_path / "staging"), path=path))
    assert result.returncode == 0, result.stderr
    return path


def load_elsewhere(path: str, blocked: str, then: str = "") -> str:
    """Unpickle the hooks in a Python where ``blocked`` cannot be imported."""
    result = run_python(f"""
        import sys, cloudpickle
        import covalent
        sys.modules[{blocked!r}] = None
        try:
            pre, call = cloudpickle.load(open({path!r}, "rb"))
            {then or "pass"}
        except Exception as exc:
            print(type(exc).__name__ + ":", exc)
        else:
            print("NO ERROR")
    """)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("uri, extra", [
    ("s3://bkt/runs/x.npy", "s3"), ("gs://bkt/x.npy", "gcs"), ("az://cont/x.npy", "azure"),
])
def test_executor_without_covalent_lot_names_what_to_install(tmp_path, uri, extra):
    out = load_elsewhere(pickled_hooks(tmp_path, uri), "covalent_lot")
    assert out.count("\n") == 0, out  # one line
    assert out.startswith("ModuleNotFoundError: covalent-lot is not installed in the Python that runs")
    assert f"pip install covalent-lot[{extra}] there" in out and "ct.DepsPip" in out


@pytest.mark.parametrize("uri, sdk, extra", [
    ("s3://bkt/runs/x.npy", "boto3", "s3"), ("gs://bkt/x.npy", "google.cloud.storage", "gcs"),
    ("az://cont/x.npy", "azure.storage.blob", "azure"),
])
def test_executor_without_the_sdk_fails_in_the_pre_exec_hook(tmp_path, uri, sdk, extra):
    """Before the electron runs, so before any byte moves."""
    out = load_elsewhere(pickled_hooks(tmp_path, uri), sdk, then="pre()")
    assert out.startswith(f"ImportError: the {extra} backend of covalent-lot needs the {sdk} module: "
                          f"pip install covalent-lot[{extra}] in the Python that runs it")
    assert not os.path.exists(tmp_path / "staging")


def test_settings_come_from_the_executor(tmp_path, monkeypatch):
    """Explicit options travel; environment and covalent.conf values are the
    executor's own (here: changed between building the hook and running it)."""
    import cloudpickle

    monkeypatch.setenv("COVALENT_LOT_S3_ENDPOINT_URL", "http://dispatcher:1")
    h = lot.handoff("s3://bkt/x.npy", max_attempts=2)
    _, call = h.upload().cp()
    blob = cloudpickle.dumps(call)
    assert b"dispatcher" not in blob
    monkeypatch.setenv("COVALENT_LOT_S3_ENDPOINT_URL", "http://executor:2")
    settings = cloudpickle.loads(blob).settings()
    assert settings["endpoint_url"] == "http://executor:2"
    assert settings.sources["endpoint_url"] == "environment COVALENT_LOT_S3_ENDPOINT_URL"
    assert settings["max_attempts"] == 2 and settings.sources["max_attempts"] == "argument"


def test_covalent_file_is_dir_without_trailing_slash_is_a_folder(tmp_path):
    import covalent as ct
    from covalent_lot.strategies.s3 import S3Strategy

    strategy = S3Strategy()
    remote = ct.fs.File("s3://bkt/runs/features", is_dir=True)
    local = ct.fs.File(str(tmp_path / "features"), is_dir=True)
    call = strategy.download(remote, local)
    assert call.source == "s3://bkt/runs/features/"
    assert call.destination == str(tmp_path / "features") + "/"
    pre = strategy.pre_transfer_hook(remote, local)
    assert pre.folder is True
    up = strategy.upload(local, remote)
    assert (up.source, up.destination) == (str(tmp_path / "features") + "/", "s3://bkt/runs/features/")


@pytest.mark.parametrize("module, cls, uri, options", [
    ("azure", "AzureStrategy", "az://cont/data.bin", "account_url='http://127.0.0.1:9/acct'"),
    ("sftp", "SFTPStrategy", "sftp://user@host/srv/data.bin", ""),
])
def test_covalent_filetransfer_with_a_strategy_needs_no_register(module, cls, uri, options):
    """Covalent's File refuses schemes it does not know; building a strategy
    (or importing its module) makes the scheme known."""
    result = run_python(f"""
        import covalent as ct
        from covalent_lot.strategies.{module} import {cls}
        ft = ct.fs.FileTransfer({uri!r}, "/tmp/lot-x/data.bin", strategy={cls}({options}))
        pre, call = ft.cp()
        print(call.action, call.source, call.destination)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"download {uri} /tmp/lot-x/data.bin"
