"""Factories and Handoff without a server: paths, templates, hooks, refusals."""

from __future__ import annotations

import os
import tempfile

import pytest

import covalent_lot as lot

from .lot_fakes import STORES, in_memory, checksum_of

URI = "s3://bkt/runs/{dispatch_id}/x.npy"


@pytest.fixture
def context():
    """Covalent's electron context, as set on the executor while a task runs."""
    from covalent.executor.utils.context import set_context

    return set_context


def fake_backend(call, store_name):
    """Point a TransferCall at the in-memory backend (it is built from a path and a dict)."""
    STORES.pop(store_name, None)
    return in_memory(call, store_name)


def tag(uri):
    import hashlib

    return hashlib.sha256(uri.encode()).hexdigest()[:12]


def test_default_local_path_is_per_dispatch_and_uri():
    h = lot.handoff(URI)
    # The executor's staging folder and the dispatch, both filled where it runs.
    expected = "{staging}/{run}/" + tag(URI) + "/x.npy"
    assert h.local_path == expected
    assert h.uri == URI
    assert repr(h) == f"Handoff({URI!r}, local_path={expected!r})"


def test_default_local_path_is_under_the_default_staging_dir(context):
    h = lot.handoff(URI)
    with context("d-1", 0):
        assert h.path == os.path.join(tempfile.gettempdir(), "covalent-lot", "d-1", tag(URI), "x.npy")


def test_staging_dir_option_and_env(context, tmp_path, monkeypatch):
    h = lot.handoff(URI, staging_dir=str(tmp_path))
    with context("d-1", 0):
        assert h.path == os.path.join(str(tmp_path), "d-1", tag(URI), "x.npy")
    # The environment is read where the electron runs, not where the handoff was made.
    h = lot.handoff(URI)
    monkeypatch.setenv("COVALENT_LOT_STAGING_DIR", str(tmp_path / "env"))
    with context("d-1", 0):
        assert h.path.startswith(str(tmp_path / "env") + os.sep)


def test_folder_handoff_local_path_is_a_folder(context, tmp_path):
    uri = "s3://bkt/runs/{dispatch_id}/features/"
    h = lot.handoff(uri, staging_dir=str(tmp_path))
    assert h.local_path == "{staging}/{run}/" + tag(uri) + "/features/"
    with context("d-1", 0):
        assert h.path == os.path.join(str(tmp_path), "d-1", tag(uri), "features") + "/"


def test_path_outside_an_electron_is_per_process_and_thread(tmp_path):
    """No dispatch known (the client, or an executor that does not say): the default
    path still resolves, to a token of this process and thread."""
    import threading

    h = lot.handoff(URI, staging_dir=str(tmp_path))
    token = f"run-{os.getpid()}-{threading.get_ident()}"
    assert h.path == os.path.join(str(tmp_path), token, tag(URI), "x.npy")
    seen = []
    thread = threading.Thread(target=lambda: seen.append(h.path))
    thread.start()
    thread.join()
    assert seen[0] != h.path and seen[0].startswith(str(tmp_path) + os.sep)


def test_placeholders_outside_an_electron_are_a_runtime_error(tmp_path):
    h = lot.handoff(URI, str(tmp_path / "{dispatch_id}" / "x.npy"))
    with pytest.raises(RuntimeError) as info:
        h.path
    assert repr(h.local_path) in str(info.value)
    assert "{dispatch_id}" in str(info.value) and "create_unique_workdir=True" in str(info.value)


def test_path_inside_an_electron(context, tmp_path):
    h = lot.handoff(URI, staging_dir=str(tmp_path))
    with context("d-123", 4):
        assert h.path == os.path.join(str(tmp_path), "d-123", tag(URI), "x.npy")
    with context("d-123", 7):  # a consumer on the same machine: the same file
        assert h.path == os.path.join(str(tmp_path), "d-123", tag(URI), "x.npy")
    assert "d-123" not in h.path  # the context is gone again


def test_explicit_local_path_without_placeholders(tmp_path):
    h = lot.handoff("s3://bkt/x.npy", str(tmp_path / "x.npy"))
    assert h.path == str(tmp_path / "x.npy")


def test_upload_and_download_transfers(tmp_path):
    from covalent._file_transfer.enums import Order

    h = lot.handoff(URI, staging_dir=str(tmp_path))
    up, down = h.upload(), h.download()
    assert up.order is Order.AFTER and down.order is Order.BEFORE
    assert up.strategy is h.strategy and down.strategy is h.strategy
    assert not up.from_file.is_remote and up.to_file.is_remote
    assert down.from_file.is_remote and not down.to_file.is_remote


def test_pre_hook_resolves_templates_and_makes_the_folder(context, tmp_path):
    h = lot.handoff(URI, staging_dir=str(tmp_path))
    pre_up, call_up = h.upload().cp()
    pre_down, call_down = h.download().cp()
    local = os.path.join(str(tmp_path), "d-9", tag(URI), "x.npy")
    with context("d-9", 2):
        assert pre_up() == (local, "s3://bkt/runs/d-9/x.npy")
        assert os.path.isdir(os.path.dirname(local)) and not os.path.exists(local)
    with context("d-9", 3):
        assert pre_down() == ("s3://bkt/runs/d-9/x.npy", local)
    assert call_up.action == "upload" and call_down.action == "download"
    assert call_up.source == h.local_path and call_up.destination == URI
    assert "upload" in repr(call_up) and URI in repr(call_up)


def test_pre_hook_for_a_folder_makes_the_folder_itself(context, tmp_path):
    uri = "s3://bkt/runs/{dispatch_id}/feat/"
    h = lot.handoff(uri, staging_dir=str(tmp_path))
    pre, _ = h.download().cp()
    with context("d-1", 0):
        source, destination = pre()
    assert source == "s3://bkt/runs/d-1/feat/"
    assert destination == os.path.join(str(tmp_path), "d-1", tag(uri), "feat") + "/"
    assert os.path.isdir(destination)


def test_pre_hook_outside_an_electron_is_a_runtime_error(tmp_path):
    pre, call = lot.handoff(URI, staging_dir=str(tmp_path)).upload().cp()
    with pytest.raises(RuntimeError, match="dispatch_id"):
        pre()
    with pytest.raises(RuntimeError, match="dispatch_id"):
        call()
    assert os.listdir(tmp_path) == []


def test_transfer_calls_resolve_templates_when_they_run(context, tmp_path, request):
    store = request.node.nodeid
    h = lot.handoff(URI, staging_dir=str(tmp_path))
    pre_up, call_up = h.upload().cp()
    pre_down, call_down = h.download().cp()
    fake_backend(call_up, store)
    fake_backend(call_down, store)

    with context("d-7", 1):
        pre_up()
        with open(h.path, "wb") as f:
            f.write(b"features")
        stats = call_up()
    assert stats.destination == "s3://bkt/runs/d-7/x.npy"
    assert stats.verified == 1
    assert STORES[store][("bkt", "runs/d-7/x.npy")].checksum == checksum_of(b"features")

    with context("d-7", 2):  # the consumer, on the producer's machine
        pre_down()
        stats = call_down()
        assert open(h.path, "rb").read() == b"features"
    assert stats.source == "s3://bkt/runs/d-7/x.npy"
    assert stats.destination == os.path.join(str(tmp_path), "d-7", tag(URI), "x.npy")
    # The verified file was already there: no download (where the filesystem has xattrs).
    from tests.lot_fakes import xattrs_work

    assert stats.verified == 1 and stats.kept == (1 if xattrs_work(tmp_path) else 0)


def test_module_level_factories(tmp_path):
    from covalent._file_transfer.enums import Order

    up = lot.upload("s3://bkt/out.npy", str(tmp_path / "out.npy"))
    assert up.order is Order.AFTER
    down = lot.download("s3://bkt/in/", str(tmp_path / "in"))
    assert down.order is Order.BEFORE
    pre, _ = down.cp()
    assert pre()[1] == str(tmp_path / "in") + "/"  # a folder URI makes the local side a folder


def build(factory, uri, local_path):
    """What ``@ct.electron(files=[...])`` does with a factory's result, on the client."""
    made = getattr(lot, factory)(uri, local_path)
    transfer = made.upload() if factory == "handoff" else made
    return transfer.cp()


@pytest.mark.parametrize("factory", ["handoff", "upload", "download"])
def test_relative_local_path_is_refused(factory):
    # Handoff checks when it is made; upload()/download() at the latest when the
    # electron decorator turns them into calls. Either way: on the client.
    with pytest.raises(ValueError) as info:
        build(factory, "s3://bkt/x.npy", "relative/x.npy")
    assert "'relative/x.npy'" in str(info.value) and "absolute" in str(info.value)


@pytest.mark.parametrize("factory", ["handoff", "upload", "download"])
def test_unknown_placeholder_in_local_path_is_refused(factory, tmp_path):
    with pytest.raises(ValueError, match=r"\{task\}"):
        build(factory, "s3://bkt/x.npy", str(tmp_path / "{task}" / "x.npy"))


def test_electron_decorator_refuses_a_relative_path():
    import covalent as ct

    with pytest.raises(ValueError, match="'rel/x.npy' must be absolute"):
        @ct.electron(files=[lot.download("s3://bkt/x.npy", "rel/x.npy")])
        def consume(files=[]):
            return files


@pytest.mark.parametrize("uri", ["foo://bkt/x", "ftp://bkt/x", "bkt/x"])
def test_unknown_scheme(uri):
    with pytest.raises(ValueError) as info:
        lot.handoff(uri)
    assert repr(uri) in str(info.value)


def test_bad_uri_is_refused_on_the_client():
    with pytest.raises(ValueError, match="'Bad_Bucket'"):
        lot.handoff("s3://Bad_Bucket/x")
    with pytest.raises(ValueError, match=r"\{foo\}"):
        lot.handoff("s3://bkt/{foo}/x")


def test_strategy_and_options_together_are_a_type_error(s3):
    strategy = s3.S3Strategy()
    with pytest.raises(TypeError) as info:
        lot.handoff("s3://bkt/x", strategy=strategy, endpoint_url="http://127.0.0.1:9")
    assert "endpoint_url" in str(info.value)
    with pytest.raises(TypeError, match="max_attempts"):
        lot.upload("s3://bkt/x", "/tmp/x", strategy=strategy, max_attempts=2)


def test_explicit_strategy_is_used(s3):
    strategy = s3.S3Strategy(endpoint_url="http://127.0.0.1:9")
    h = lot.handoff("s3://bkt/x", strategy=strategy)
    assert h.strategy is strategy
    assert h.upload().strategy is strategy


def test_options_reach_the_strategy():
    h = lot.handoff("s3://bkt/x", endpoint_url="http://127.0.0.1:9", max_attempts=2)
    assert h.strategy.settings["endpoint_url"] == "http://127.0.0.1:9"
    assert h.strategy.settings["max_attempts"] == 2
    with pytest.raises(TypeError, match="did you mean 'endpoint_url'"):
        lot.handoff("s3://bkt/x", endpoint="http://127.0.0.1:9")


def test_strategy_for():
    strategy = lot.strategy_for("s3://bkt/x", max_concurrency=2)
    assert type(strategy).__name__ == "S3Strategy"
    assert strategy.settings["max_concurrency"] == 2
    with pytest.raises(ValueError, match="'ftp'"):
        lot.strategy_for("ftp://host/x")


def test_strategy_upload_download_refuse_relative_paths(s3):
    from covalent_lot._covalent import make_file

    strategy = s3.S3Strategy()
    remote = make_file("s3://bkt/x", remote=True, is_dir=False)
    local = make_file("rel/x", remote=False, is_dir=False)
    with pytest.raises(ValueError, match="'rel/x' must be absolute"):
        strategy.upload(local, remote)
    with pytest.raises(ValueError, match="'rel/x' must be absolute"):
        strategy.download(remote, local)


def test_cp_between_two_remote_uris_only(s3, tmp_path):
    from covalent_lot._covalent import make_file

    strategy = s3.S3Strategy()
    a = make_file("s3://bkt/a", remote=True, is_dir=False)
    b = make_file("s3://bkt/b", remote=True, is_dir=False)
    local = make_file(str(tmp_path / "x"), remote=False, is_dir=False)
    assert strategy.cp(a, b).action == "copy"
    with pytest.raises(ValueError, match="server side"):
        strategy.cp(local, b)


def test_register_routes_covalent_file_transfers(s3):
    from covalent._file_transfer import file_transfer as ft

    saved = dict(ft._uploaders), dict(ft._downloaders)
    try:
        lot.register()
        transfer = ft.FileTransfer("s3://bkt/x", "/tmp/lot-unit-x")
        assert isinstance(transfer.strategy, s3.S3Strategy)
        with pytest.raises(ValueError, match="'nope'"):
            lot.register("nope")
    finally:
        ft._uploaders.clear()
        ft._uploaders.update(saved[0])
        ft._downloaders.clear()
        ft._downloaders.update(saved[1])


@pytest.mark.parametrize("direction", ["get", "put"])
@pytest.mark.parametrize("uri, fragment", [("s3://Bad_Bucket/x", "'Bad_Bucket'"),
                                           ("gs://bkt/x", "'gs'")])
def test_direct_transfers_validate_the_uri_first(s3, tmp_path, direction, uri, fragment):
    # Like copy(), put()/get() must refuse what parse() refuses before building a client.
    (tmp_path / "x").write_bytes(b"x")
    # Local endpoint, one attempt, no credentials: nothing leaves the machine either way.
    strategy = s3.S3Strategy(endpoint_url="http://127.0.0.1:9", max_attempts=1)
    with pytest.raises(ValueError) as info:
        if direction == "get":
            strategy.get(uri, str(tmp_path / "y"))
        else:
            strategy.put(str(tmp_path / "x"), uri)
    assert fragment in str(info.value)


def test_direct_copy_validates_the_uri_first(s3):
    strategy = s3.S3Strategy(endpoint_url="http://127.0.0.1:9", max_attempts=1)
    with pytest.raises(ValueError, match="'Bad_Bucket'"):
        strategy.copy("s3://Bad_Bucket/x", "s3://bkt/y")
