"""An external Dask cluster on loopback, and a second ("legacy") Covalent server.

``DaskCluster`` runs ``dask scheduler`` and N ``dask worker`` processes of this
venv, each a :class:`_servers.ServerProcess` (own process group, log file,
bounded start, atexit stop). Every worker is "its own machine" as far as
covalent-lot can tell: own HOME, TMPDIR, covalent config/cache dirs and
``COVALENT_LOT_STAGING_DIR``, and its own working directory.

Electrons reach it with ``DaskExecutor(scheduler_address=cluster.address)``.
What differs between Covalent's two execution paths (checked with covalent
0.240.0, distributed 2026.8.0):

* managed path (the session server; ``DaskExecutor.send``): the task runs
  ``run_task_group_alt`` on a worker, inside ``set_context(dispatch_id,
  task_id)``, in the worker process's own cwd (``workdir`` and
  ``create_unique_workdir`` are ignored). It reads its inputs from and writes
  its outputs to the executor's ``cache_dir`` (a client-side default under the
  session's XDG_CACHE_HOME), so workers and server must share that filesystem;
  workers never call the server.
* legacy path (a server started with ``COVALENT_USE_OLD_DASK=1``, see
  :func:`legacy_server`; ``DaskExecutor.run``): the task is ``io_wrapper`` around
  ``wrapper_fn``; the context is empty (``dispatch_id`` None) and the cwd is
  ``workdir``, or ``<workdir>/<dispatch_id>/node_<i>`` with
  ``create_unique_workdir=True``.

DaskExecutor passes no ``workers=`` to ``Client.submit``, so which worker of a
cluster runs a task is the scheduler's choice. Tests that need a task on a
given "machine" use one single-worker cluster per machine.

Importing this module does not import covalent (see ``_servers``).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from integration import _servers

LOOPBACK = _servers.LOOPBACK

__all__ = ["DaskScheduler", "DaskWorker", "DaskCluster", "legacy_server", "dispatch_and_wait", "wait_for"]

# Variables that would point a private process at someone else's state.
_XDG_DROP = ("XDG_CONFIG_DIR", "XDG_CONFIG_HOME", "XDG_DATA_HOME")


def _overlay(env: dict, extra: Optional[Mapping[str, Optional[str]]]) -> dict:
    """``env`` updated with ``extra`` (a value of None removes the variable)."""
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def _private_env(root: Path) -> dict:
    """This process's environment minus covalent's own settings, with HOME and
    TMPDIR under ``root`` (dask reads ~/.config/dask, boto3 ~/.aws, ...)."""
    env = {k: v for k, v in os.environ.items() if not _servers.is_covalent_core_var(k)}
    for var in _XDG_DROP:
        env.pop(var, None)
    env["HOME"] = str(root / "home")
    env["TMPDIR"] = str(root / "tmp")
    return env


def _get_json(url: str, timeout: float = 2.0) -> Optional[Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.load(resp)
    except (urllib.error.URLError, OSError, ValueError):
        return None


# ------------------------------------------------------------------- scheduler


class DaskScheduler(_servers.ServerProcess):
    """``dask scheduler`` on 127.0.0.1; its HTTP routes (no bokeh needed) answer
    ``/health`` and ``/json/identity.json`` (the workers it knows)."""

    _name = "dask scheduler"
    # distributed says "[Errno 98] Address already in use".
    _clash_markers = ("Address already in use", "address already in use")
    _clash_error = "dask scheduler could not bind its ports 3 times; log tail:\n"

    def __init__(self, workdir: os.PathLike | str, start_timeout: float = 60.0) -> None:
        super().__init__(workdir, "scheduler.log", start_timeout)
        self.port: Optional[int] = None
        self.http_port: Optional[int] = None
        self.scheduler_file = self.workdir / "scheduler.json"

    @property
    def address(self) -> str:
        return f"tcp://{LOOPBACK}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def identity(self) -> Optional[dict]:
        """The scheduler's ``identity()`` (workers keyed by address), or None."""
        return _get_json(self.http_url + "/json/identity.json")

    def worker_names(self) -> dict[str, str]:
        """name -> address of the workers registered now (empty if no answer)."""
        ident = self.identity() or {}
        return {str(w.get("name")): addr for addr, w in (ident.get("workers") or {}).items()}

    # -- hooks

    def _prepare(self) -> None:
        for sub in (self.workdir, self.workdir / "home", self.workdir / "tmp"):
            sub.mkdir(parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        self.port = _servers.free_port(avoid_offsets=())
        self.http_port = _servers.free_port(avoid_offsets=())
        self.scheduler_file.unlink(missing_ok=True)
        return [
            _servers._bin("dask"), "scheduler",
            "--host", LOOPBACK,
            "--port", str(self.port),
            # The HTTP server carries the JSON routes used for readiness; without
            # bokeh no dashboard pages are served. A busy port makes distributed
            # move it silently: the real one is read back from the scheduler file.
            "--dashboard-address", f"{LOOPBACK}:{self.http_port}",
            "--scheduler-file", str(self.scheduler_file),
        ]

    def _env(self) -> dict:
        return _private_env(self.workdir)

    def _ready(self) -> bool:
        try:
            info = json.loads(self.scheduler_file.read_text())
        except (OSError, ValueError):
            return False
        self.http_port = int((info.get("services") or {}).get("dashboard", self.http_port))
        return _servers._http_status(self.http_url + "/health") == 200


# ---------------------------------------------------------------------- worker


class DaskWorker(_servers.ServerProcess):
    """One ``dask worker`` process (``--nworkers 1 --nthreads 1``), ready once the
    scheduler lists it by name. Without a nanny (the default) ``pid`` is the
    process that runs the tasks, i.e. what ``os.getpid()`` returns in an electron."""

    _name = "dask worker"
    _poll_interval = 0.2

    def __init__(
        self,
        workdir: os.PathLike | str,
        name: str,
        scheduler: DaskScheduler,
        env: Mapping[str, str],
        nanny: bool = False,
        start_timeout: float = 60.0,
    ) -> None:
        super().__init__(workdir, "worker.log", start_timeout)
        self.name = name
        self.scheduler = scheduler
        self.env = dict(env)
        self.nanny = nanny
        self.worker_address: Optional[str] = None

    @property
    def staging_dir(self) -> Optional[str]:
        return self.env.get("COVALENT_LOT_STAGING_DIR")

    @property
    def local_directory(self) -> Path:
        return self.workdir / "dask"

    def _prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.local_directory.mkdir(exist_ok=True)

    def _command(self) -> list[str]:
        self.worker_address = None
        return [
            _servers._bin("dask"), "worker", self.scheduler.address,
            "--host", LOOPBACK,
            "--nthreads", "1",
            "--nworkers", "1",
            "--nanny" if self.nanny else "--no-nanny",
            "--no-dashboard",
            "--name", self.name,
            "--local-directory", str(self.local_directory),
            # An orphan (scheduler gone, e.g. the test process was SIGKILLed)
            # exits by itself instead of waiting forever.
            "--death-timeout", "60",
        ]

    def _env(self) -> dict:
        return self.env

    def _ready(self) -> bool:
        self.worker_address = self.scheduler.worker_names().get(self.name)
        return self.worker_address is not None

    def task_pids(self) -> set[int]:
        """Pids that may run this worker's tasks (the worker process, plus the
        nanny's child when there is a nanny)."""
        import psutil

        if self.pid is None:
            return set()
        try:
            proc = psutil.Process(self.pid)
            return {self.pid} | {p.pid for p in proc.children(recursive=True)}
        except psutil.Error:
            return set()


# --------------------------------------------------------------------- cluster


class DaskCluster:
    """A scheduler and ``workers`` single-threaded workers on 127.0.0.1.

    Worker ``i`` is named ``w<i>`` and lives in ``<workdir>/w<i>``: HOME, TMPDIR,
    covalent's config/cache dirs (``covalent/``), XDG_CACHE_HOME, its dask
    local directory, its cwd, and ``COVALENT_LOT_STAGING_DIR=<dir>/staging``.
    Its environment is, in order: this process's environment without COVALENT_*
    core variables; those private dirs; ``base_env`` (e.g. a storage kit's
    credentials); ``worker_env[i]``. A value of None in either removes the
    variable. ``covalent_port`` (default: none) is written into each worker's
    covalent.conf as the dispatcher port, for electrons that talk to a server.

    ``start()`` returns once the scheduler lists every worker (bounded by
    ``start_timeout``); ``stop()`` ends every process group. Also a context manager.
    """

    def __init__(
        self,
        workdir: os.PathLike | str,
        workers: int = 2,
        worker_env: Optional[Sequence[Optional[Mapping[str, Optional[str]]]]] = None,
        base_env: Optional[Mapping[str, Optional[str]]] = None,
        covalent_port: Optional[int] = None,
        nanny: bool = False,
        start_timeout: float = 90.0,
    ) -> None:
        if workers < 1:
            raise ValueError("a cluster needs at least one worker")
        worker_env = list(worker_env or [])
        if len(worker_env) > workers:
            raise ValueError(f"{len(worker_env)} worker_env entries for {workers} workers")
        worker_env += [None] * (workers - len(worker_env))
        self.workdir = Path(workdir).resolve()
        self.start_timeout = start_timeout
        self.scheduler = DaskScheduler(self.workdir / "scheduler", start_timeout=start_timeout)
        self.workers: list[DaskWorker] = []
        for i in range(workers):
            wdir = self.workdir / f"w{i}"
            env = self._worker_env(wdir, covalent_port)
            _overlay(env, base_env)
            _overlay(env, worker_env[i])
            self.workers.append(
                DaskWorker(wdir, f"w{i}", self.scheduler, env, nanny=nanny, start_timeout=start_timeout)
            )
        self.start_seconds: Optional[float] = None

    @staticmethod
    def _worker_env(wdir: Path, covalent_port: Optional[int]) -> dict:
        env = _private_env(wdir)
        cov = _servers.covalent_client_env(wdir / "covalent", covalent_port or 0)
        if covalent_port is None:
            del cov["COVALENT_SVC_PORT"]
        env.update(cov)
        env["COVALENT_LOT_STAGING_DIR"] = str(wdir / "staging")
        return env

    # -- facts

    @property
    def address(self) -> str:
        return self.scheduler.address

    @property
    def names(self) -> list[str]:
        return [w.name for w in self.workers]

    @property
    def staging_dirs(self) -> list[str]:
        return [w.staging_dir for w in self.workers]

    def worker_of_pid(self, pid: int) -> Optional[DaskWorker]:
        """The worker whose process (tree) has ``pid``, or None (not ours)."""
        for worker in self.workers:
            if pid in worker.task_pids():
                return worker
        return None

    def registered(self) -> dict[str, str]:
        """name -> address of the workers the scheduler lists now."""
        return self.scheduler.worker_names()

    # -- lifecycle

    def start(self) -> "DaskCluster":
        t0 = time.monotonic()
        try:
            self.scheduler.start()
            for worker in self.workers:
                for sub in ("home", "tmp", "staging"):
                    (worker.workdir / sub).mkdir(parents=True, exist_ok=True)
                for var in ("COVALENT_CONFIG_DIR", "COVALENT_CACHE_DIR", "XDG_CACHE_HOME"):
                    if var in worker.env:
                        Path(worker.env[var]).mkdir(parents=True, exist_ok=True)
            # Workers start side by side (each start() is a bounded wait).
            with ThreadPoolExecutor(max_workers=len(self.workers)) as pool:
                for future in [pool.submit(w.start) for w in self.workers]:
                    future.result()
            deadline = time.monotonic() + self.start_timeout
            while set(self.registered()) != set(self.names):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"scheduler lists {sorted(self.registered())}, expected {self.names}"
                    )
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        errors = []
        for proc in [*self.workers, self.scheduler]:
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> "DaskCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------- a second Covalent server


def legacy_server(
    workdir: os.PathLike | str,
    env_extra: Optional[Mapping[str, Optional[str]]] = None,
    own_cluster: bool = False,
    **kwargs: Any,
):
    """A (not yet started) private Covalent server whose DaskExecutor takes the
    legacy path (``COVALENT_USE_OLD_DASK=1``: ``SUPPORTS_MANAGED_EXECUTION`` is
    False in that process, so ``ct.get_context()`` is empty in electrons).

    It has its own config/db/cache under ``workdir`` (its own
    COVALENT_CONFIG_DIR), so it never rewrites the session server's config
    file; the client reaches it only with ``dispatcher_addr=server.url``.
    Without ``own_cluster`` it starts no dask cluster of its own
    (``COVALENT_DISABLE_DASK=1``): electrons must name an executor (e.g. a
    DaskExecutor with an explicit ``scheduler_address``) or run on its local one.
    """
    env = {"COVALENT_USE_OLD_DASK": "1"}
    if not own_cluster:
        env["COVALENT_DISABLE_DASK"] = "1"
    env.update(env_extra or {})
    kwargs.setdefault("workers", 1)
    return _servers.CovalentServer(workdir, env_extra=env, **kwargs)


def dispatch_and_wait(
    lattice,
    *args: Any,
    dispatcher_addr: Optional[str] = None,
    timeout: float = 300.0,
    poll: float = 0.5,
    **kwargs: Any,
):
    """Dispatch ``lattice(*args, **kwargs)`` to ``dispatcher_addr`` (default: the
    client's configured server) and return its Result once terminal, without
    intermediate outputs. ``ct.get_result(wait=True)`` polls forever: this
    waits at most ``timeout`` seconds, then cancels the dispatch and raises
    TimeoutError. Whatever the status, the Result is returned (check
    ``result.status``)."""
    import covalent as ct

    dispatch_id = ct.dispatch(lattice, dispatcher_addr=dispatcher_addr)(*args, **kwargs)
    return wait_for(dispatch_id, dispatcher_addr=dispatcher_addr, timeout=timeout, poll=poll)


def wait_for(dispatch_id: str, *, dispatcher_addr: Optional[str] = None, timeout: float = 300.0,
             poll: float = 0.5):
    """The Result of ``dispatch_id`` once terminal (see :func:`dispatch_and_wait`)."""
    import covalent as ct
    from covalent._shared_files.util_classes import RESULT_STATUS

    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = ct.get_result(dispatch_id, status_only=True, dispatcher_addr=dispatcher_addr)["status"]
        if RESULT_STATUS.is_terminal(status):
            return ct.get_result(
                dispatch_id, wait=False, dispatcher_addr=dispatcher_addr, intermediate_outputs=False
            )
        time.sleep(poll)
    try:
        ct.cancel(dispatch_id, dispatcher_addr=dispatcher_addr)
    except Exception:  # noqa: BLE001 - the timeout is the error worth reporting
        pass
    raise TimeoutError(f"dispatch {dispatch_id} still {status} after {timeout:.0f}s")
