"""Fixtures for the integration tests: real storage servers and a private Covalent server.

Each backend has a kit (``_kits.py``, ``_kit_<name>.py``) that starts its server
as a process on 127.0.0.1; the ``kit`` fixture runs a test once per backend.

Importing covalent writes (or reads) its config file at import time, and paths in
that file are taken from COVALENT_* variables only when it is first written. So
this module's first job, before anything can import covalent, is to point the test
process at a private config under a session temp dir and at the port the private
server will use. The server started later by ``covalent_server`` gets the same
variables, so client and server share one config file.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import pytest  # does not import covalent

from integration import _kits, _servers

# ---- covalent's own settings, process-wide, set before covalent can be imported --
#
# covalent reads COVALENT_* once per process, when it is imported, and test
# modules here import it while they are collected: these cannot wait for a
# fixture. They only say where covalent keeps its (temporary) state. Everything
# else the harness sets (staging dir, credentials, COVALENT_LOT_* options) is in
# os.environ only while an integration module runs: see ``_harness_env``.

SESSION_DIR = Path(tempfile.mkdtemp(prefix="lot-it-"))
COVALENT_DIR = SESSION_DIR / "covalent"
COVALENT_PORT = _servers.free_port(avoid_offsets=())
# Handoff files (the default staging dir) go below the session dir, removed at the
# end, not into <tempdir>/covalent-lot where every run would leave its arrays.
STAGING_DIR = SESSION_DIR / "staging"

if "covalent" in sys.modules:
    # Too late for this process: it keeps the config it loaded (likely in ~).
    # covalent_server still redirects the dispatcher address in memory.
    warnings.warn(
        "covalent was imported before integration/conftest.py set its private config"
    )
for _var in [v for v in os.environ if _servers.is_covalent_core_var(v)]:
    # Stray settings from the outer shell (another port, dask disabled, ...) would
    # make the client disagree with the private server. COVALENT_LOT_* stay.
    del os.environ[_var]
os.environ.update(_servers.covalent_client_env(COVALENT_DIR, COVALENT_PORT))

BACKENDS = _kits.selected_backends()
_NEEDED: set[str] = set()  # backends the selected tests use (after -k/-m deselection)
_STARTED: dict = {}  # name -> kit, while the session's ``kits`` are up


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "kit" in callspec.params:
            _NEEDED.add(callspec.params["kit"])


@pytest.fixture(scope="session")
def lot_session_dir() -> Path:
    """The session's private temp dir (covalent config, server data, logs)."""
    return SESSION_DIR


@pytest.fixture(scope="session")
def kits(lot_session_dir):
    """The servers of the backends the selected tests use, started once (so
    `pytest -k gcs` starts only fake-gcs-server). Their env is not set here:
    ``_harness_env`` sets it for each integration module."""
    try:
        for name in [b for b in BACKENDS if b in _NEEDED]:
            kit = _kits.kit_class(name)()
            kit.start(lot_session_dir / name)
            _STARTED[name] = kit
        yield _STARTED
    finally:
        while _STARTED:
            _STARTED.popitem()[1].stop()


def kits_env(kits: dict) -> dict:
    """Every started kit's credentials and options, as environment variables."""
    env: dict = {}
    for kit in kits.values():
        env.update(kit.env)
    return env


def harness_env(kits: dict) -> dict:
    """What this process's environment holds while an integration test runs: the
    session's staging dir, then every started kit's credentials and options."""
    return {"COVALENT_LOT_STAGING_DIR": str(STAGING_DIR), **kits_env(kits)}


@pytest.fixture(scope="module", autouse=True)
def _harness_env():
    """The harness's variables in os.environ for one integration module, then
    the environment as it was: a unit test sharing the session never sees them.
    Module scope, so that module-scoped fixtures (which build strategies with
    no arguments) find them too; a module using ``kits`` has them started by
    now, since pytest sets session fixtures up first."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in harness_env(_STARTED).items():
            if value is None:
                patch.delenv(key, raising=False)
            else:
                patch.setenv(key, str(value))
        yield


@pytest.fixture(scope="session", params=BACKENDS)
def kit(request, kits):
    """One backend's kit; tests using it run once per backend."""
    return kits[request.param]


@pytest.fixture
def bucket(kit):
    """A fresh, empty bucket/container; removed with its contents afterwards."""
    name = kit.new_bucket()
    yield name
    try:
        kit.delete_bucket(name)
    except Exception as exc:  # cleanup must not turn a passing test into an error
        warnings.warn(f"could not delete {kit.scheme}://{name}: {exc!r}")


@pytest.fixture(scope="session")
def covalent_server(kits, lot_session_dir):
    """A started private Covalent server (2 dask workers) sharing this process's config.

    Its environment carries every backend's credentials (by reference) and
    endpoint, so electrons running on its workers reach the local servers.
    """
    server = _servers.CovalentServer(COVALENT_DIR, env_extra=harness_env(kits), port=COVALENT_PORT)
    server.start()
    try:
        _sync_client_config(server)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def host2(kits, covalent_server):
    """A second host: sshd in its own mount namespace (private /tmp), with its own
    HOME, venvs (covalent-lot installed from this checkout, not editable),
    covalent.conf ``[lot.*]``, credentials files and staging dir, configured from
    the started storage kits; reached through covalent-ssh-plugin via a Host entry
    in the Covalent server's ~/.ssh/config. See _host2.py."""
    from integration import _host2

    if not os.path.exists(_host2.SSHD_BIN) or os.geteuid() != 0:
        if os.environ.get("CI"):
            raise RuntimeError("the second host needs root and openssh-server (.ci/run installs it)")
        pytest.skip("the second host needs root and openssh-server (/usr/sbin/sshd)")
    mode = os.environ.get("LOT_HOST2_MODE") or _host2.detect_mode()
    host = _host2.SecondHost(Path(__file__).resolve().parent.parent, mode=mode)
    try:
        for kit in kits.values():
            host.configure(kit.env)
        host.start()
        host.install_ssh_config(covalent_server.home_dir)
        seconds = host.venvs.seconds
        # In the test output's summary: which kind of second host this run had.
        report(f"second host: mode {host.mode} ({host!r}); venvs built in "
               f"{seconds['total']:.1f}s, sshd up in {host.start_seconds:.2f}s")
        yield host
    finally:
        host.stop()


@pytest.fixture(scope="session")
def dask_cluster(kits, lot_session_dir):
    """A real Dask cluster: ``dask scheduler`` + two ``dask worker`` processes, each
    worker with its own HOME and staging dir, the storage kits' environment in
    theirs. See _dask_cluster.py."""
    from integration import _dask_cluster

    # The kits' variables but not this session's staging dir: each worker is a
    # machine of its own, with its own staging dir.
    cluster = _dask_cluster.DaskCluster(lot_session_dir / "dask-cluster", workers=2,
                                        base_env=kits_env(kits))
    cluster.start()
    report(f"dask cluster: scheduler + 2 workers up in {cluster.start_seconds:.1f}s")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def legacy_server(kits, lot_session_dir):
    """A second private Covalent server started with COVALENT_USE_OLD_DASK=1: its
    DaskExecutor takes the legacy path (wrapper_fn, no ct.get_context()). Reached
    with dispatcher_addr=legacy_server.url; no dask cluster of its own."""
    from integration import _dask_cluster

    server = _dask_cluster.legacy_server(lot_session_dir / "legacy-covalent", env_extra=harness_env(kits))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _sync_client_config(server) -> None:
    """Make an already-imported covalent in this process talk to ``server``.

    The server may have been started on another port than COVALENT_PORT (when that
    one was taken) and records the real one, with its dask cluster's address, in
    the shared config file; the client reads that file only at import, so reload.
    """
    if "covalent" not in sys.modules:
        return  # a later import reads the up-to-date file
    from covalent._shared_files import config as ct_config

    manager = ct_config._config_manager
    if Path(manager.config_file).resolve() == server.config_file.resolve():
        ct_config.reload_config()
        return
    # covalent was imported before this conftest set the environment (e.g. by a
    # conftest higher up): its config lives elsewhere. Redirect it in memory only,
    # never writing to that (possibly real, in ~) file.
    warnings.warn(
        f"covalent was imported before {__file__} set COVALENT_* (config at "
        f"{manager.config_file}); only the dispatcher address is redirected"
    )
    manager.set("dispatcher.address", _servers.LOOPBACK)
    manager.set("dispatcher.port", server.port)


_REPORT: list[str] = []


def report(line: str) -> None:
    """A line for the end of the test output (facts a run should show, not assert)."""
    _REPORT.append(line)


@pytest.fixture(scope="session")
def lot_report():
    return report


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("covalent-lot integration report")
        for line in _REPORT:
            terminalreporter.write_line(line)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    # trylast: after an interrupt (Ctrl-C, or SIGTERM, which _servers turns into
    # KeyboardInterrupt) pytest tears the session fixtures down in its own
    # sessionfinish hook; the servers must be stopped before their dirs go.
    # The temp dir is kept when asked for, to look at logs after a failure.
    if os.environ.get("LOT_IT_KEEP_TMP"):
        print(f"\nintegration temp dir kept: {SESSION_DIR}")
        return
    shutil.rmtree(SESSION_DIR, ignore_errors=True)
