"""Real servers on loopback for the integration tests: SeaweedFS (S3) and Covalent.

Only the standard library and psutil are used, so the harness can be imported
before anything else (in particular before ``covalent``, whose import writes its
config file).

Rules this module keeps:

* every server binds 127.0.0.1 on ports picked here, never a fixed default, so
  several test sessions can share a machine;
* every server runs in its own session / process group, so stopping it can take
  the whole tree (uvicorn, dask nannies and workers, ...) down with one signal;
* every wait has a deadline, and whatever is still alive at interpreter exit is
  stopped by an ``atexit`` hook.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Mapping, Optional

import psutil

__all__ = [
    "free_port",
    "dir_bytes",
    "covalent_client_env",
    "is_covalent_core_var",
    "ServerProcess",
    "SeaweedS3",
    "CovalentServer",
]

LOOPBACK = "127.0.0.1"

# Servers still running; the atexit hook stops them if a test run forgets to.
_LIVE: set = set()

# Ports already handed out by this process. A port is only "reserved" once the
# server binds it, so without this two calls in a row could return the same one.
_HANDED_OUT: set[int] = set()


# --------------------------------------------------------------------------- ports


def _ephemeral_low() -> int:
    """Lowest port the kernel hands to outgoing connections (default 32768)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _can_bind(port: int) -> bool:
    # No SO_REUSEADDR: a port in TIME_WAIT or held by a 0.0.0.0/[::] listener
    # then counts as busy, which is what we want.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def apply_env(env: Mapping[str, Optional[str]]) -> dict:
    """Set (None: unset) variables in os.environ; return what to restore."""
    saved = {key: os.environ.get(key) for key in env}
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = str(value)
    return saved


def free_port(avoid_offsets: Iterable[int] = (10000,)) -> int:
    """Return a free 127.0.0.1 TCP port ``p`` with ``p + offset`` free too.

    SeaweedFS opens each main port + 10000 for gRPC, hence the default offset.
    Candidates are drawn at random (so parallel sessions rarely race for the
    same port) below the kernel's ephemeral range when possible, because a port
    in that range can be taken at any moment by an outgoing connection.
    Result ports (and their offsets) are always < 65536 and the port < 55000.
    """
    offsets = tuple(avoid_offsets)
    top = max(offsets, default=0)
    low = 10000
    high = min(55000, _ephemeral_low() - top)
    if high - low < 1000:  # odd kernel setting: accept the ephemeral range
        high = min(55000, 65535 - top)
    for _ in range(500):
        port = random.randrange(low, high)
        wanted = [port] + [port + off for off in offsets]
        if any(p in _HANDED_OUT for p in wanted):
            continue
        if all(_can_bind(p) for p in wanted):
            _HANDED_OUT.update(wanted)
            return port
    raise RuntimeError(f"no free port pair found in [{low}, {high}) after 500 tries")


# ------------------------------------------------------------------- process trees


def _group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_members(pgid):
            return True
        time.sleep(0.1)
    return not _group_members(pgid)


def _kill_group(pgid: int, term_timeout: float = 15.0, kill_timeout: float = 5.0) -> None:
    """SIGTERM a process group, then SIGKILL whatever is left; bounded."""
    for sig, timeout in ((signal.SIGTERM, term_timeout), (signal.SIGKILL, kill_timeout)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            # The id was reused by someone else's group: nothing of ours is left.
            return
        if _wait_group_gone(pgid, timeout):
            return
    left = _group_members(pgid)
    if left:
        raise RuntimeError(f"processes of group {pgid} survived SIGKILL: {[p.pid for p in left]}")


def _reap(proc: Optional[subprocess.Popen], timeout: float = 5.0) -> None:
    """Collect our direct child's exit status so it does not linger as a zombie."""
    if proc is None:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: Path, nbytes: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"


def _http_status(url: str, timeout: float = 1.0) -> Optional[int]:
    """HTTP status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:  # an error status still means "answering"
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


SSHD_BIN = "/usr/sbin/sshd"


def write_sshd_config(path: Path, *, port: int, host_key: Path, pid_file: Path,
                      authorized_keys: Path, extra: Iterable[str] = ()) -> None:
    """An sshd_config for a private sshd on loopback (keys only, internal sftp),
    checked with ``sshd -t``."""
    lines = [
        f"Port {port}",
        f"ListenAddress {LOOPBACK}",
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        f"AuthorizedKeysFile {authorized_keys}",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "UsePAM no",
        "StrictModes no",  # keys under /tmp
        "Subsystem sftp internal-sftp",
        *extra,
    ]
    Path(path).write_text("\n".join(lines) + "\n")
    check = subprocess.run([SSHD_BIN, "-t", "-f", str(path)], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=30)
    if check.returncode != 0:
        raise RuntimeError(f"sshd -t -f {path} failed: {check.stderr}")


def xattrs_work(directory: os.PathLike | str) -> bool:
    """Whether files in ``directory`` take user xattrs (covalent-lot's same-host
    shortcut records verified files in one)."""
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".xattr-probe-") as probe:
        try:
            os.setxattr(probe.fileno(), "user.probe", b"1")
        except OSError:
            return False
    return True


def dir_bytes(path: os.PathLike | str) -> int:
    """Total size of the regular files under ``path`` (0 if it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _bin(name: str) -> str:
    """A console script of this venv first (the one pytest runs in), then PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name!r} not found next to {sys.executable} nor on PATH")
    return found


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _convert_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt once a server has been started.

    By default SIGTERM (e.g. from `timeout` or a CI runner) ends Python without
    running atexit hooks or pytest's fixture teardown, leaving the servers
    behind. KeyboardInterrupt unwinds instead: pytest then tears the session
    fixtures down, and a plain script reaches the atexit hook. Only a default
    handler in the main thread is replaced, so a caller's own handler wins.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def live_servers() -> list:
    """The servers started and not stopped yet (what the atexit hook will stop)."""
    return list(_LIVE)


@atexit.register
def _stop_leftovers() -> None:
    for server in live_servers():
        try:
            server.stop()
        except Exception:  # interpreter is exiting: best effort only
            pass


# -------------------------------------------------------------- one server process


class _PortClash(Exception):
    """The server could not bind a port picked for it: retry with fresh ones."""


def _spawn(args: list[str], cwd: Path, env: Mapping[str, str], log) -> subprocess.Popen:
    """Run ``args`` with stdout and stderr into ``log``, in a session of its own so
    that stopping it can signal the whole process group."""
    return subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


class ServerProcess:
    """The lifecycle of one long-running server process on loopback.

    ``start()`` runs :meth:`_command` in its own process group with its output
    appended to ``log_path``, waits (bounded) until :meth:`_ready`, and retries
    with fresh ports when the server reports one of ``_clash_markers``;
    ``stop()`` takes the whole group down. A started server is in ``_LIVE``, so
    the atexit hook stops it should nobody else.

    ``crash()`` and ``restart()`` take it down as a power loss would and bring
    it back on the same command line (same ports, same data).

    Subclasses set the class attributes below and implement :meth:`_command`,
    :meth:`_env` and :meth:`_ready`; :meth:`_prepare`, :meth:`_terminate`,
    :meth:`_after_exit`, :meth:`_spawn_failed` and :meth:`_log_tail` are
    optional hooks.
    """

    _name = "server"  # in error messages
    _clash_markers: tuple[str, ...] = ("address already in use",)  # in its log
    _clash_error = "server could not bind its ports 3 times; log tail:\n"
    _poll_interval = 0.1  # seconds between readiness checks
    stop_timeout = 15.0  # SIGTERM grace before SIGKILL

    def __init__(self, workdir: os.PathLike | str, log_name: str, start_timeout: float) -> None:
        self.workdir = Path(workdir).resolve()
        self.start_timeout = start_timeout
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / log_name
        self._proc: Optional[subprocess.Popen] = None
        self._log = None
        self.start_seconds: Optional[float] = None
        # The command line of the last start: restart() runs it again rather than
        # _command(), which picks fresh ports (and for SeaweedFS wipes the data dir).
        self.argv: list[str] = []

    # -- hooks

    def _prepare(self) -> None:
        """Once per start(), before the first attempt (directories, checks)."""

    def _command(self) -> list[str]:
        """Pick fresh ports (and reset per-attempt state); the command line."""
        raise NotImplementedError

    def _env(self) -> dict:
        raise NotImplementedError

    def _ready(self) -> bool:
        """Whether the running server serves yet."""
        raise NotImplementedError

    def _spawn_failed(self, exc: OSError) -> None:
        """The command could not be run; raise something clearer to replace ``exc``."""

    def _terminate(self) -> None:
        """Take the running server down, bounded (stop() then reaps and forgets it)."""
        _kill_group(self._proc.pid, term_timeout=self.stop_timeout)

    def _after_exit(self) -> None:
        """Cleanup once the process group is gone (stop() calls it every time)."""

    def _log_tail(self) -> str:
        """What error messages show of the server's output."""
        return _tail(self.log_path)

    # -- public surface

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    def start(self):
        if self._proc is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        self._prepare()
        t0 = time.monotonic()
        # A port can be taken between free_port() and the server's bind; the
        # server then exits saying so, and a few fresh ports are tried.
        for _attempt in range(3):
            try:
                self._start_once()
            except _PortClash:
                continue
            self.start_seconds = time.monotonic() - t0
            return self
        raise RuntimeError(self._clash_error + self._log_tail())

    def stop(self) -> None:
        # Forget the process only once it is gone, so that the atexit hook can
        # still try again if this is interrupted half-way.
        proc = self._proc
        if proc is not None:
            try:
                self._terminate()
            finally:
                _reap(proc)
        self._forget()

    def crash(self, timeout: float = 10.0) -> None:
        """SIGKILL the server's process group and every descendant that left it
        (sshd forks each connection into a session of its own), as a power loss
        would: nothing is flushed or closed cleanly, clients see their
        connections reset."""
        proc = self._proc
        if proc is None:
            return
        try:
            victims = [psutil.Process(proc.pid)]
            victims += victims[0].children(recursive=True)
        except psutil.Error:
            victims = []
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for victim in victims:
            try:
                victim.kill()
            except psutil.Error:
                pass
        _reap(proc, timeout)
        _gone, alive = psutil.wait_procs(victims, timeout=timeout)
        if alive:
            raise RuntimeError(f"{self._name} processes survived SIGKILL: {[p.pid for p in alive]}")
        self._forget()

    def restart(self, argv: Optional[list[str]] = None) -> float:
        """Run ``argv`` (default: the last start's command line) again, in the same
        directory and environment, after a crash() or stop(); return the seconds
        until it serves. A client holding the old address finds the same server
        with whatever data it had made durable."""
        if self._proc is not None:
            raise RuntimeError(f"{self._name} is still running: crash() or stop() it first")
        t0 = time.monotonic()
        try:
            self._launch(list(argv or self.argv))
        except _PortClash:
            raise RuntimeError(f"{self._name} could not bind its old ports again; log tail:\n"
                               + self._log_tail()) from None
        return time.monotonic() - t0

    def _forget(self) -> None:
        """Once the process is gone: close its log, clean up, stop tracking it."""
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self._after_exit()
        _LIVE.discard(self)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals

    def _start_once(self) -> None:
        self._launch(self._command())

    def _launch(self, args: list[str]) -> None:
        """Run ``args`` and wait until it serves; stopped again if it does not."""
        self.argv = args
        self._log = open(self.log_path, "ab")
        try:
            self._proc = _spawn(args, self.workdir, self._env(), self._log)
        except OSError as exc:
            self._log.close()
            self._log = None
            self._spawn_failed(exc)
            raise
        _LIVE.add(self)
        _convert_sigterm()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            rc = self._proc.poll()
            if rc is not None:
                log = _tail(self.log_path)
                if any(marker in log for marker in self._clash_markers):
                    raise _PortClash()
                raise RuntimeError(f"{self._name} exited with {rc} while starting; log tail:\n"
                                   + self._log_tail())
            if self._ready():
                return
            time.sleep(self._poll_interval)
        raise RuntimeError(
            f"{self._name} not ready after {self.start_timeout:.1f}s; log tail:\n{self._log_tail()}"
        )


# ------------------------------------------------------------------------ SeaweedFS

# Environment variables SeaweedFS reads that would change its behaviour behind our
# back: AWS_* keys switch on authentication, S3_* pre-create buckets, WEED_* override
# its TOML configuration.
_SEAWEED_ENV_PREFIXES = ("AWS_", "S3_", "WEED_")


class SeaweedS3(ServerProcess):
    """A private ``weed mini`` (master, volume, filer, S3) on loopback.

    With ``access_key``/``secret_key`` the S3 gateway *enforces* them (SeaweedFS
    turns on auth when AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are set at start);
    without them it accepts any credentials.

    Bucket names it accepts follow the AWS rules: 3-63 characters of lowercase
    letters, digits, '-' and '.', starting and ending with a letter or digit, no
    '..', not an IP address, no 'xn--' prefix nor '-s3alias' suffix.
    """

    _name = "weed mini"
    # weed checks its ports up front ("Port allocation failed"), a bind racing
    # with another process says "address already in use".
    _clash_markers = ("Port allocation failed", "address already in use")
    _clash_error = "weed could not bind its ports 3 times; log tail:\n"

    def __init__(
        self,
        workdir: os.PathLike | str,
        access_key: Optional[str] = None,
        secret_key: Optional[str] = None,
        start_timeout: float = 60.0,
    ) -> None:
        if (access_key is None) != (secret_key is None):
            raise ValueError("give both access_key and secret_key, or neither")
        super().__init__(workdir, "weed.log", start_timeout)
        self.access_key = access_key
        self.secret_key = secret_key
        self.ports: dict[str, int] = {}

    @property
    def s3_port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    # -- hooks

    def _prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SEAWEED_ENV_PREFIXES)}
        # weed looks for *.toml in ., ~/.seaweedfs and /etc/seaweedfs: keep ~ private.
        env["HOME"] = str(self.workdir / "home")
        env["TMPDIR"] = str(self.workdir / "tmp")
        if self.access_key is not None:
            env["AWS_ACCESS_KEY_ID"] = self.access_key
            env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        return env

    def _socket_path(self, name: str) -> Optional[str]:
        # Unix socket paths are limited to 107 bytes; fall back to weed's default
        # (/tmp/seaweedfs-<name>-<port>.sock, unique per port) when too long.
        path = str(self.workdir / f"{name}.sock")
        return path if len(path.encode()) < 100 else None

    def _command(self) -> list[str]:
        self.ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
        if self.data_dir.exists():
            # mini.options in the data dir would pin the previous attempt's ports.
            shutil.rmtree(self.data_dir)
        for sub in (self.data_dir, self.workdir / "home", self.workdir / "tmp"):
            sub.mkdir(parents=True, exist_ok=True)
        args = [
            _bin("weed"),
            "-logtostderr",  # glog would otherwise write weed.* files into /tmp
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-master.port={self.ports['master']}",
            f"-volume.port={self.ports['volume']}",
            f"-filer.port={self.ports['filer']}",
            f"-s3.port={self.ports['s3']}",
            f"-admin.port={self.ports['admin']}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
        ]
        for name in ("filer", "s3"):
            sock = self._socket_path(name)
            if sock:
                args.append(f"-{name}.localSocket={sock}")
        return args

    def _ready(self) -> bool:
        """S3 answers and a volume server has joined the master.

        S3's /healthz answers before the volume server registers; a PUT in that
        window fails, so also wait for the master to report free volume slots.
        """
        master = f"http://{LOOPBACK}:{self.ports['master']}/dir/status"
        return _http_status(self.endpoint + "/healthz") is not None and self._volume_joined(master)

    @staticmethod
    def _volume_joined(master_status_url: str) -> bool:
        try:
            with urllib.request.urlopen(master_status_url, timeout=1.0) as resp:
                topo = json.load(resp).get("Topology") or {}
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return bool(topo.get("Free")) or bool(topo.get("DataCenters"))

    def _after_exit(self) -> None:
        # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says, and a
        # killed (not terminated) weed leaves them behind: remove ours only.
        for name, port in self.ports.items():
            for path in (
                f"/tmp/seaweedfs-{name}-{port}.sock",
                f"/tmp/seaweedfs-{name}-grpc-{port + 10000}.sock",
            ):
                try:
                    os.unlink(path)
                except OSError:
                    pass


# ------------------------------------------------------------------------- Covalent

def is_covalent_core_var(name: str) -> bool:
    """True for covalent's own COVALENT_* variables (paths, port, dask switches...).

    Inherited ones would change where covalent keeps state or how it runs, so the
    harness drops them; COVALENT_LOT_* are covalent-lot's options and are kept.
    """
    return name.startswith("COVALENT_") and not name.startswith("COVALENT_LOT_")


def covalent_client_env(workdir: os.PathLike | str, port: int) -> dict:
    """Environment a client process needs to use the private server in ``workdir``.

    covalent computes every path from these variables when its config file is
    first written (``import covalent`` already writes it); afterwards the file
    wins. XDG_CACHE_HOME is in the list because the executor plugins' defaults
    (the dask executor's cache_dir/workdir, where every task writes pickles and
    stdout/stderr) come from it and are seeded by whichever process imports
    covalent first, usually the client.
    """
    w = Path(workdir).resolve()
    return {
        "COVALENT_CONFIG_DIR": str(w / "config"),
        "COVALENT_DATA_DIR": str(w / "data"),
        "COVALENT_CACHE_DIR": str(w / "cache"),
        "COVALENT_LOGDIR": str(w / "logs"),
        "COVALENT_DATABASE": str(w / "db" / "dispatcher.sqlite"),
        "COVALENT_EXECUTOR_DIR": str(w / "executor_plugins"),
        "COVALENT_DISPATCH_CACHE_DIR": str(w / "dispatches"),
        "COVALENT_RESULTS_DIR": str(w / "results"),
        "COVALENT_HEARTBEAT_FILE": str(w / "cache" / "heartbeat"),
        "COVALENT_SVC_PORT": str(port),
        # "localhost" would be the default; the server binds whatever this says.
        "COVALENT_DISPATCHER_ADDR": LOOPBACK,
        "XDG_CACHE_HOME": str(w / "xdg-cache"),
    }


class CovalentServer(ServerProcess):
    """A private ``covalent start`` (uvicorn + local dask cluster) on loopback.

    ``covalent start`` returns once the server it launched answers; the server
    stays in the CLI's process group, so the group is what stop() and crash()
    take down. ``pgid`` is that group.

    ``env`` holds what a client needs (see :func:`covalent_client_env`);
    ``server_env`` is the full environment of the server, which its dask worker
    processes - where electrons run - inherit, so ``env_extra`` (AWS keys, ...)
    reaches the electrons. A value of None in ``env_extra`` removes the variable.

    Where things are written:

    * ``data_dir``: server-side workflow data, ``<dispatch_id>/node_<i>/...``;
    * ``executor_cache_dir``: the dask executor's per-task pickles and
      stdout/stderr files (never cleaned up by covalent);
    * ``results_dir``: client-side downloads of ``ct.get_result`` (the
      manifest's assets, even with ``intermediate_outputs=False``);
    * ``dispatch_cache_dir``: client-side staging of dispatched manifests;
    * ``tmp_dir``: the server's TMPDIR (a sqlite dispatcher cache lives there).
    """

    _name = "covalent"
    _clash_error = "covalent kept moving off its port 3 times\n"

    def __init__(
        self,
        workdir: os.PathLike | str,
        env_extra: Optional[Mapping[str, Optional[str]]] = None,
        port: Optional[int] = None,
        workers: int = 2,
        start_timeout: float = 120.0,
        stop_timeout: float = 60.0,
    ) -> None:
        super().__init__(workdir, "covalent-cli.log", start_timeout)
        self.env_extra = dict(env_extra or {})
        self.port = port if port is not None else free_port(avoid_offsets=())
        self.workers = workers
        self.stop_timeout = stop_timeout  # for `covalent stop`, before the group is killed
        self._port_moved = False
        self.config_file = self.workdir / "config" / "covalent.conf"
        self.results_dir = self.workdir / "results"
        self.dispatch_cache_dir = self.workdir / "dispatches"
        self.executor_cache_dir = self.workdir / "xdg-cache" / "covalent"
        self.tmp_dir = self.workdir / "tmp"
        self.home_dir = self.workdir / "home"
        self.server_log_path = self.workdir / "logs" / "covalent_ui.log"

    # -- paths

    @property
    def env(self) -> dict:
        return covalent_client_env(self.workdir, self.port)

    @property
    def pgid(self) -> Optional[int]:
        """Process group of the running server (its dask scheduler and workers too)."""
        return self.pid

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def server_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not is_covalent_core_var(k)}
        # A private HOME keeps dask, boto3 (~/.aws) and anything else an electron
        # imports away from the real home; XDG_* would otherwise win over HOME.
        for var in ("XDG_CONFIG_DIR", "XDG_CONFIG_HOME", "XDG_DATA_HOME"):
            env.pop(var, None)
        env["HOME"] = str(self.home_dir)
        env["TMPDIR"] = str(self.tmp_dir)
        env.update(self.env)
        for key, value in self.env_extra.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return env

    # -- hooks

    def _prepare(self) -> None:
        # covalent writes its pid file into the cache dir without creating it
        # (FileNotFoundError after the server was already launched), so every
        # directory must exist first.
        env = self.env
        for var in (
            "COVALENT_CONFIG_DIR",
            "COVALENT_DATA_DIR",
            "COVALENT_CACHE_DIR",
            "COVALENT_LOGDIR",
            "COVALENT_EXECUTOR_DIR",
            "COVALENT_DISPATCH_CACHE_DIR",
            "COVALENT_RESULTS_DIR",
            "XDG_CACHE_HOME",
        ):
            Path(env[var]).mkdir(parents=True, exist_ok=True)
        Path(env["COVALENT_DATABASE"]).parent.mkdir(parents=True, exist_ok=True)
        for d in (self.home_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        if self._port_moved or not _can_bind(self.port):
            self.port = free_port(avoid_offsets=())
        self._port_moved = False
        return [_bin("covalent"), "start", "-p", str(self.port), "-n", str(self.workers)]

    def _env(self) -> dict:
        return self.server_env

    def _ready(self) -> bool:
        return _http_status(self.url + "/", timeout=5.0) is not None

    def _wait_ready(self) -> None:
        # `covalent start` polls the server until it answers (or gives up) and
        # returns; the server itself stays in the CLI's process group.
        requested = self.port
        try:
            rc = self._proc.wait(timeout=self.start_timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"`covalent start` did not return within {self.start_timeout:.1f}s\n{self._log_tail()}"
            ) from None
        # The CLI exits 0 even when it printed a traceback, so judge by the
        # server itself: the port it actually got and an HTTP answer there.
        self.port = self._port_from_config()
        if rc != 0 or not self._ready():
            raise RuntimeError(f"`covalent start` exited {rc} and {self.url} does not answer\n"
                               + self._log_tail())
        if self.port != requested:
            # `covalent start` silently moved to the next free port (ours was
            # taken meanwhile) but the server builds its asset-upload URLs from
            # the port it read at import, the one requested: dispatches would
            # then upload to whoever holds that port and hang. Start afresh.
            self._port_moved = True
            raise _PortClash()

    def _terminate(self) -> None:
        try:
            # `covalent stop` waits on uvicorn without a limit: bound it, in its
            # own group so a hang can be killed without touching ours.
            proc = subprocess.Popen(
                [_bin("covalent"), "stop"],
                cwd=self.workdir if self.workdir.is_dir() else None,
                env=self.server_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, term_timeout=2.0)
                _reap(proc)
        finally:
            # Whatever `covalent stop` left of the server's group (dask workers...).
            _kill_group(self._proc.pid)

    def _after_exit(self) -> None:
        # A stale pid file would make the next `covalent start` believe a
        # server is running should the pid be reused.
        (self.workdir / "cache" / "ui.pid").unlink(missing_ok=True)

    def _log_tail(self) -> str:
        return (
            f"--- {self.log_path} ---\n{_tail(self.log_path)}\n"
            f"--- {self.server_log_path} ---\n{_tail(self.server_log_path)}"
        )

    # -- internals

    def _port_from_config(self) -> int:
        try:
            with open(self.config_file, "rb") as f:
                return int(tomllib.load(f)["dispatcher"]["port"])
        except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError):
            return self.port


# ------------------------------------------------------------ crash and restart


class Outage:
    """Crash a started :class:`ServerProcess` and bring it back as it was.

    The command line is taken when the outage is set up, so ``revive()`` runs
    the very same one (same ports, same data dir, same environment) after a
    ``crash()`` or a clean stop alike. See :meth:`ServerProcess.crash` and
    :meth:`ServerProcess.restart`.
    """

    def __init__(self, server: ServerProcess) -> None:
        if server.pid is None:
            raise RuntimeError(f"{type(server).__name__} is not running: nothing to crash")
        self.server = server
        self.argv = list(server.argv)

    def crash(self, timeout: float = 10.0) -> None:
        self.server.crash(timeout)

    def revive(self) -> float:
        """Run the same command again; return the seconds until it serves."""
        return self.server.restart(self.argv)
