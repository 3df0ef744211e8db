"""A single-node Slurm cluster for the integration tests: munged, slurmctld, slurmd.

covalent-slurm-plugin's ``SlurmExecutor`` logs into a cluster's login node over
SSH, copies a cloudpickled task there, ``sbatch``es a job script and polls
``scontrol show job`` until the job is done. This module makes such a cluster on
loopback out of Debian's ``slurm-wlm`` and ``munge`` packages, with every file
of its own (nothing under /etc/slurm, /etc/munge, /run/munge or /var/log is
used):

* ``munged`` with a fresh key (``mungekey``) and its socket in the cluster's
  dir; slurm.conf names that socket (``AuthInfo=socket=...``);
* ``slurmctld`` and ``slurmd`` in the foreground (``-D``) on two free ports of
  127.0.0.1, one node named after this machine (``NodeName=$(hostname)
  NodeAddr=127.0.0.1``), one partition ``debug``; no cgroups, no accounting;
* each daemon is a process this module owns (its own process group), bounded by
  timeouts; ``stop()`` cancels the jobs left, stops the daemons, removes the files.

Given a :class:`SecondHost` (``host=``) in mount-namespace mode, the three daemons
run inside the host's mount namespace (``nsenter --mount=/proc/<sshd>/ns/mnt``),
and the cluster's config dir is bind-mounted over ``/etc/slurm`` there: the host
is a login node and the compute node at once. ``sbatch`` in an SSH session needs
no setting, and jobs see the host's private ``/tmp`` and HOME. In separate-user
mode the daemons run beside the dispatcher (the disk is shared anyway), jobs run
as the host's user, and the sessions get ``SLURM_CONF`` (sshd ``SetEnv``).

Typical use (see test_slurm.py)::

    cluster = SlurmCluster(host=host2).start()     # ~1-2 s
    executor = cluster.executor()                  # a SlurmExecutor for host2
    cluster.run(["squeue"]).stdout                 # client commands, dispatcher side
    cluster.stop()

Only the standard library and psutil (through _servers) are used;
covalent_slurm_plugin is imported by :meth:`SlurmCluster.executor` only.
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional


from integration import _servers

__all__ = ["REQUIRED_PROGRAMS", "missing_programs", "SlurmCluster"]

LOOPBACK = _servers.LOOPBACK
BASE_DIR = "/var/tmp"  # outside /tmp: a second host's namespace covers /tmp with a tmpfs
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])

# What `apt-get install slurm-wlm munge` provides and this module runs.
REQUIRED_PROGRAMS = ("munged", "mungekey", "munge", "slurmctld", "slurmd", "slurmstepd",
                     "sbatch", "scontrol", "sinfo", "squeue", "scancel")
INSTALL_HINT = "apt-get install -y --no-install-recommends slurm-wlm munge"


def missing_programs() -> list[str]:
    """The programs of :data:`REQUIRED_PROGRAMS` not found on PATH (+ sbin dirs)."""
    return [p for p in REQUIRED_PROGRAMS if not shutil.which(p, path=SBIN_PATH)]


def _which(name: str) -> str:
    found = shutil.which(name, path=SBIN_PATH)
    if not found:
        raise RuntimeError(f"{name} not found: {INSTALL_HINT}")
    return found


_LEFTOVERS: set = set()


@atexit.register
def _stop_leftovers() -> None:
    for cluster in list(_LEFTOVERS):
        try:
            cluster.stop()
        except Exception:  # interpreter exiting: best effort
            pass


class _Daemon(_servers.ServerProcess):
    """One of the cluster's daemons (foreground, own process group, own log)."""

    _clash_markers = ()  # the cluster retries with fresh ports as a whole
    _poll_interval = 0.1
    stop_timeout = 15.0

    def __init__(self, cluster: "SlurmCluster", name: str, args: Callable[[], list[str]],
                 ready: Callable[[], bool]) -> None:
        super().__init__(cluster.workdir, f"{name}.log", cluster.start_timeout)
        self._name = name
        self._cluster = cluster
        self._args = args
        self._ready_check = ready

    def _command(self) -> list[str]:
        return self._cluster._prefix() + self._args()

    def _env(self) -> dict:
        return self._cluster._daemon_env()

    def _ready(self) -> bool:
        return self._ready_check()


class SlurmCluster:
    """A one-node Slurm cluster on loopback (see the module docstring).

    Attributes: ``workdir`` (``/var/tmp/lot-slurm-XXXX``: ``etc/slurm.conf``,
    ``munge/`` key, ``run/`` munge socket and pid files, ``state/``, ``spool/``,
    ``<daemon>.log``), ``conf_path``, ``munge_socket``, ``nodename``,
    ``partition``, ``ctld_port``, ``slurmd_port``, ``host`` (or None),
    ``in_namespace`` (daemons inside the host's mount namespace),
    ``start_seconds`` (wall time of the last start).
    """

    def __init__(
        self,
        workdir: Optional[os.PathLike | str] = None,
        *,
        host: Any = None,
        cpus: int = 2,
        partition: str = "debug",
        start_timeout: float = 30.0,
    ) -> None:
        self._owns_workdir = workdir is None
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="lot-slurm-", dir=BASE_DIR)
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.in_namespace = host is not None and host.mode == "mount-namespace"
        self.cpus = cpus
        self.partition = partition
        self.start_timeout = start_timeout
        self.nodename = socket.gethostname().split(".")[0]
        self.etc_dir = self.workdir / "etc"
        self.conf_path = self.etc_dir / "slurm.conf"
        self.munge_dir = self.workdir / "munge"
        self.run_dir = self.workdir / "run"
        self.munge_socket = self.run_dir / "munge.socket"
        self.state_dir = self.workdir / "state"
        self.spool_dir = self.workdir / "spool"
        self.cache_dir = self.workdir / "executor-cache"  # SlurmExecutor's, dispatcher side
        self.ctld_port: Optional[int] = None
        self.slurmd_port: Optional[int] = None
        self.start_seconds: Optional[float] = None
        self._daemons: list[_Daemon] = []
        self._mounted = False
        self._host_env_set = False
        self._bashrcs: dict[str, str] = {}

    # ------------------------------------------------------------------ files

    def _prepare_dirs(self) -> None:
        # munged insists: the socket's dir and every parent reachable by all
        # (o+x, not writable by others unless sticky), the key 0600 and its dir private.
        os.chmod(self.workdir, 0o755)
        for path, mode in ((self.etc_dir, 0o755), (self.munge_dir, 0o700), (self.run_dir, 0o755),
                           (self.state_dir, 0o700), (self.spool_dir, 0o755), (self.cache_dir, 0o700)):
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, mode)
        key = self.munge_dir / "munge.key"
        if not key.exists():
            self._run_local([_which("mungekey"), "--create", "--bits=1024", f"--keyfile={key}"], "mungekey")

    def _write_conf(self) -> None:
        lines = [
            "ClusterName=lot",
            f"SlurmctldHost={self.nodename}({LOOPBACK})",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={self.state_dir}",
            f"SlurmdSpoolDir={self.spool_dir}",
            f"SlurmctldPidFile={self.run_dir / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.run_dir / 'slurmd.pid'}",
            # No log files: -D copies the logs to stderr, which is <daemon>.log.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/builtin",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=5",
            "Waittime=0",
            "MinJobAge=600",  # finished jobs stay visible to `scontrol show job` (the plugin's poll)
            f"NodeName={self.nodename} NodeAddr={LOOPBACK} CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")
        os.chmod(self.conf_path, 0o644)

    # --------------------------------------------------------------- commands

    def env(self) -> dict:
        """Environment for Slurm client commands run on the dispatcher's side."""
        return {**os.environ, "SLURM_CONF": str(self.conf_path)}

    def _daemon_env(self) -> dict:
        env = self.env()
        env.pop("SSH_AUTH_SOCK", None)
        return env

    def _prefix(self) -> list[str]:
        if not self.in_namespace:
            return []
        pid = self.host.pid
        if pid is None:
            raise RuntimeError("the second host is not running: start it before the cluster")
        return [_which("nsenter"), f"--mount=/proc/{pid}/ns/mnt", "--"]

    def _run_local(self, args: list[str], what: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout, env=self.env())
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{what}: no answer within {timeout:.0f}s: {shlex.join(args)}") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed ({proc.returncode}): {shlex.join(args)}\n"
                               f"{(proc.stdout + proc.stderr)[-3000:]}")
        return proc

    def run(self, args: list[str], *, timeout: float = 30.0, check: bool = False) -> subprocess.CompletedProcess:
        """A Slurm client command (``sinfo``, ``squeue``...) on the dispatcher's side."""
        args = [_which(args[0]), *args[1:]]
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, env=self.env())
        if check and proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
        return proc

    def node_state(self) -> str:
        try:
            proc = self.run(["sinfo", "-h", "-n", self.nodename, "-o", "%T"], timeout=5)
        except subprocess.TimeoutExpired:
            return ""
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def job_ids(self) -> list[str]:
        proc = self.run(["squeue", "-h", "-o", "%i"], timeout=10)
        return proc.stdout.split() if proc.returncode == 0 else []

    # ---------------------------------------------------------------- readiness

    def _munge_ready(self) -> bool:
        if not self.munge_socket.exists():
            return False
        try:
            proc = subprocess.run([_which("munge"), "-n", "-S", str(self.munge_socket)],
                                  stdin=subprocess.DEVNULL, capture_output=True, timeout=5)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0

    def _port_ready(self, port: int) -> bool:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return True
        except OSError:
            return False

    def _node_ready(self) -> bool:
        return self.node_state() == "idle"

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> "SlurmCluster":
        """Start munged, slurmctld and slurmd (three tries with fresh ports)."""
        if self._daemons:
            raise RuntimeError("SlurmCluster already started")
        missing = missing_programs()
        if missing:
            raise RuntimeError(f"not installed: {', '.join(missing)} ({INSTALL_HINT})")
        _LEFTOVERS.add(self)
        t0 = time.monotonic()
        self._prepare_dirs()
        last = None
        for _attempt in range(3):
            self.ctld_port = _servers.free_port(avoid_offsets=())
            self.slurmd_port = _servers.free_port(avoid_offsets=())
            self._write_conf()
            try:
                self._start_daemons()
            except RuntimeError as exc:
                self._stop_daemons()
                if "Address already in use" not in str(exc):
                    raise
                last = exc
                continue
            break
        else:
            raise RuntimeError(f"Slurm could not bind free ports 3 times: {last}")
        self._expose_to_host()
        self.start_seconds = time.monotonic() - t0
        return self

    def _start_daemons(self) -> None:
        run = self.run_dir
        munged = _Daemon(self, "munged", lambda: [
            _which("munged"), "--foreground", f"--key-file={self.munge_dir / 'munge.key'}",
            f"--socket={self.munge_socket}", f"--pid-file={run / 'munged.pid'}",
            f"--log-file={self.munge_dir / 'munged-file.log'}", f"--seed-file={self.munge_dir / 'munged.seed'}",
        ], self._munge_ready)
        ctld = _Daemon(self, "slurmctld", lambda: [
            _which("slurmctld"), "-D", "-i", "-f", str(self.conf_path),
        ], lambda: self._port_ready(self.ctld_port))
        slurmd = _Daemon(self, "slurmd", lambda: [
            _which("slurmd"), "-D", "-N", self.nodename, "-f", str(self.conf_path),
        ], self._node_ready)
        for daemon in (munged, ctld, slurmd):
            daemon.start()  # raises with its log tail when it dies or is not ready in time
            self._daemons.append(daemon)

    def _expose_to_host(self) -> None:
        """Make ``sbatch`` in the host's sessions find the cluster."""
        if self.host is None:
            return
        if self.in_namespace:
            # /etc/slurm of the host's namespace only (propagation is private there).
            os.makedirs("/etc/slurm", exist_ok=True)
            self._run_local(self._prefix() + ["mount", "--bind", str(self.etc_dir), "/etc/slurm"],
                            "bind-mounting slurm.conf in the second host")
            self._mounted = True
        else:
            self.host.configure({"SLURM_CONF": str(self.conf_path)})
            self._host_env_set = True

    def cancel_jobs(self, timeout: float = 20.0) -> None:
        """``scancel`` every job; wait (bounded) until the queue is empty."""
        ids = self.job_ids()
        if not ids:
            return
        self.run(["scancel", *ids], timeout=10)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(
                state in self.run(["squeue", "-h", "-o", "%T"], timeout=10).stdout
                for state in ("RUNNING", "PENDING", "COMPLETING", "CONFIGURING")):
            time.sleep(0.2)

    def _step_daemons(self) -> list:
        """slurmstepd processes of this cluster (they leave slurmd's process group
        and session: slurmd double-forks them), the ones with a socket in this
        cluster's spool dir, and their descendants (the jobs' processes)."""
        import psutil

        found = []
        spool = str(self.spool_dir) + os.sep
        for proc in psutil.process_iter(["name"]):
            if proc.info["name"] != "slurmstepd":
                continue
            try:
                if any(str(c.laddr).startswith(spool) for c in proc.net_connections(kind="unix")):
                    found += [proc, *proc.children(recursive=True)]
            except psutil.Error:
                continue
        return found

    def _stop_daemons(self) -> None:
        import psutil

        errors = []
        for daemon in reversed(self._daemons):  # slurmd, slurmctld, munged
            if daemon._name == "slurmd":
                steps = self._step_daemons()
            try:
                daemon.stop()
            except Exception as exc:  # noqa: BLE001 - stop the others anyway
                errors.append(exc)
            if daemon._name == "slurmd":
                for step in steps + self._step_daemons():
                    try:
                        step.kill()
                    except psutil.Error:
                        pass
        self._daemons.clear()
        if errors:
            raise errors[0]

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons, undo the host settings, remove the files."""
        try:
            if self._daemons:
                try:
                    self.cancel_jobs()
                except Exception:  # noqa: BLE001 - the daemons go anyway
                    pass
            self._stop_daemons()
        finally:
            if self._mounted and self.host is not None and self.host.pid is not None:
                subprocess.run(self._prefix() + ["umount", "/etc/slurm"], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=30)
            self._mounted = False
            if self._host_env_set and self.host is not None:
                try:
                    self.host.configure({"SLURM_CONF": None})
                except Exception:  # noqa: BLE001 - the host may be gone already
                    pass
                self._host_env_set = False
            for path in list(self._bashrcs.values()):
                Path(path).unlink(missing_ok=True)
            self._bashrcs.clear()
            if self._owns_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            _LEFTOVERS.discard(self)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------ covalent-slurm-plugin

    def bashrc(self, venv: str = "full") -> str:
        """A file in the host's HOME for the job script's ``source <bashrc_path>``:
        a no-op ``conda`` (the script always runs ``conda activate``) and the
        host's ``venv`` first on PATH (the script runs plain ``python``).
        Returns its path as the host sees it."""
        host = self.host
        if host is None:
            raise RuntimeError("bashrc() needs the cluster's host")
        local = host.home_dir / ".lot-slurm" / f"bashrc-{venv}"
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(
            "# written by integration/_slurm.py for covalent-slurm-plugin's job script\n"
            "conda() { return 0; }\n"
            f"export PATH={shlex.quote(str(Path(host.python(venv)).parent))}:\"$PATH\"\n"
        )
        if host.mode == "separate-user":
            host._chown_to_user(local.parent)
            host._chown_to_user(local)
        self._bashrcs[venv] = str(local)
        return host.host_path(local)

    def executor(self, venv: str = "full", **overrides: Any):
        """A ``covalent_slurm_plugin.SlurmExecutor`` submitting to this cluster
        through the host's sshd (Host alias in the Covalent server's ~/.ssh/config,
        see SecondHost.install_ssh_config), jobs running the host's ``venv``.

        ``create_unique_workdir``: a job runs in ``<remote_workdir>/<dispatch_id>/
        node_<i>``; ``poll_freq=5`` is the plugin's minimum; versions are checked
        (the host's venvs match the dispatcher's python, covalent and cloudpickle).
        """
        from covalent_slurm_plugin import SlurmExecutor

        host = self.host
        kwargs: dict[str, Any] = dict(
            username=host.user,
            address=host.alias,
            ssh_key_file=str(host.client_key),
            remote_workdir=f"{host.tmp}/covalent-slurm",
            create_unique_workdir=True,
            options={"partition": self.partition, "time": "00:10:00"},
            bashrc_path=self.bashrc(venv),
            slurm_path="/usr/bin",
            poll_freq=5,
            cleanup=True,
            cache_dir=str(self.cache_dir),
            ignore_versions=False,
        )
        kwargs.update(overrides)
        return SlurmExecutor(**kwargs)

    def __repr__(self) -> str:
        where = "in the second host's namespace" if self.in_namespace else "beside the dispatcher"
        return (f"SlurmCluster({self.nodename}, ctld {LOOPBACK}:{self.ctld_port}, "
                f"slurmd :{self.slurmd_port}, {where}, {self.workdir})")
