"""A second host for the integration tests: an sshd with its own /tmp, HOME, venvs and config.

Covalent's remote executors (covalent-ssh-plugin) run an electron on another
machine: nothing the dispatcher's side has - its /tmp, its HOME, its
covalent.conf, its credentials, its installed packages - is there. This module
makes such a machine on loopback, with nothing shared with the dispatcher's side
but the storage servers (and the operating system):

* an OpenSSH ``sshd`` on 127.0.0.1 (a free port), started with
  ``unshare -m --propagation private`` (mode ``"mount-namespace"``): inside that
  mount namespace a private tmpfs covers ``/tmp`` and the host's home directory
  is bind-mounted over root's ``/root``, so every ssh session (and every
  electron the SSH executor runs) sees its own empty ``/tmp`` and its own HOME.
  Where mount namespaces are refused, a fresh user (``useradd``) with its own
  HOME and TMPDIR is used instead (mode ``"separate-user"``); ``/tmp`` is then
  shared, so tests that rely on a private ``/tmp`` should check ``host.mode``.
* venvs of its own (built once, see :func:`build_venvs`) with covalent-lot
  installed from a wheel built from a snapshot of the checkout (not editable);
* its own ``~/.config/covalent/covalent.conf`` (``[lot.*]`` sections),
  ``~/.aws`` files, copies of key/known_hosts files, session environment
  (sshd ``SetEnv``) and staging dir, all written by :meth:`SecondHost.configure`
  from a storage kit's ``env`` dict.

The host's files live outside /tmp (the namespace hides the real /tmp), under
``/var/tmp/lot-host2-XXXX`` (venvs under ``/var/tmp/lot-host2-venvs-XXXX``), and
are removed by ``stop()``.

Typical use (see test_host2_smoke.py)::

    venvs = build_venvs(repo_root)                 # ~20 s, once per session
    host = SecondHost(venvs=venvs)
    for kit in kits.values():
        host.configure(kit.env)                    # before or after start
    host.start()
    host.install_ssh_config(covalent_server.home_dir)
    @ct.electron(executor=host.executor())         # or executor=host.executor("bare")
    ...
    host.run(["ls", "/tmp"]).stdout                # look inside the host
    host.stop()

Only the standard library and psutil (through _servers) are used; covalent and
covalent_ssh_plugin are imported by :meth:`SecondHost.executor` only.
"""

from __future__ import annotations

import atexit
import configparser
import importlib.metadata
import importlib.util
import json
import math
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional


from integration import _servers

__all__ = [
    "MODES",
    "VENV_FLAVOURS",
    "detect_mode",
    "build_venvs",
    "Venvs",
    "SecondHost",
]

MODES = ("mount-namespace", "separate-user")
VENV_FLAVOURS = ("full", "bare", "nosdk")

SSHD_BIN = _servers.SSHD_BIN
LOOPBACK = _servers.LOOPBACK
BASE_DIR = "/var/tmp"  # outside /tmp: the namespace covers /tmp with a tmpfs

# What each venv flavour gets on top of nothing. "@wheel" is covalent-lot from the
# snapshot of the checkout; the SDK packages of "nosdk" are removed after install
# (covalent itself depends on boto3, which it imports lazily).
_COVALENT = ["covalent==0.240.0", "fastapi<0.132"]
_BARE = _COVALENT + ["cloudpickle", "numpy"]
_FULL_EXTRA = ["pandas", "pyarrow"]
_SDK_DISTS = ["boto3", "botocore", "s3transfer", "google-cloud-storage", "azure-storage-blob",
              "azure-identity", "paramiko", "asyncssh"]

# Checkout entries not copied into the snapshot the wheel is built from.
_SNAPSHOT_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", ".tools", "node_modules", "build", "dist", "*.egg-info", "__pycache__",
    ".pytest_cache", ".mypy_cache", ".ruff_cache",
)


# Directories made here (venvs, host dirs) that are removed at interpreter exit
# should nobody call remove()/stop(): /var/tmp is not the session's temp dir.
_LEFTOVERS: set = set()


@atexit.register
def _remove_leftovers() -> None:
    # Registered after _servers' own hook, so it runs first: stop the hosts
    # (sessions, user) before their directories go.
    for server in _servers.live_servers():
        if isinstance(server, SecondHost):
            try:
                server.stop()
            except Exception:  # interpreter exiting: best effort
                pass
    for path in list(_LEFTOVERS):
        shutil.rmtree(path, ignore_errors=True)
    _LEFTOVERS.clear()


# ------------------------------------------------------------------------ helpers


def _run(args: list[str], what: str, timeout: float = 600.0, **kw) -> subprocess.CompletedProcess:
    """Run a local command; raise with its output when it fails."""
    try:
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what}: no answer within {timeout:.0f}s: {shlex.join(args)}") from None
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"{what} failed ({proc.returncode}): {shlex.join(args)}\n{out}")
    return proc


def _keygen(path: Path) -> str:
    """An ed25519 key pair without passphrase; return the public key line."""
    for p in (path, path.with_name(path.name + ".pub")):
        p.unlink(missing_ok=True)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lot-host2", "-f", str(path)],
         "ssh-keygen", timeout=30)
    return path.with_name(path.name + ".pub").read_text().strip()


def detect_mode() -> str:
    """``"mount-namespace"`` when ``unshare -m`` plus a tmpfs mount work here,
    else ``"separate-user"`` (which needs root for useradd)."""
    unshare = shutil.which("unshare")
    if unshare:
        try:
            probe = subprocess.run(
                [unshare, "-m", "--propagation", "private", "--", "sh", "-c",
                 "mount -t tmpfs -o size=1m tmpfs /tmp"],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=20,
            )
            if probe.returncode == 0:
                return "mount-namespace"
        except (OSError, subprocess.TimeoutExpired):
            pass
    if os.geteuid() != 0 or not shutil.which("useradd"):
        raise RuntimeError("no second host possible: `unshare -m` is refused and not root for useradd")
    return "separate-user"


def _world_reachable(path: Path) -> bool:
    """Whether any user can reach ``path`` (every parent has o+x)."""
    for parent in [path, *path.parents]:
        try:
            if not os.stat(parent).st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def _base_python(mode: str, python: Optional[str]) -> str:
    """The interpreter the venvs are made from: this one's base (same version as
    the dispatcher) unless another user could not run it (under /root)."""
    if python:
        return python
    base = getattr(sys, "_base_executable", None) or sys.executable
    if mode == "mount-namespace" or _world_reachable(Path(base).resolve().parent):
        return base
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (f"/usr/bin/{minor}", f"/usr/local/bin/{minor}"):
        if os.access(candidate, os.X_OK) and _world_reachable(Path(candidate).resolve().parent):
            return candidate
    raise RuntimeError(f"separate-user mode: {base} is not reachable by another user and no "
                       f"/usr/bin/{minor} exists")


def _constraints() -> list[str]:
    """``name==version`` of every distribution of the dispatcher's environment, so
    the host's venvs get the same versions (cloudpickle, numpy, SDKs...)."""
    lines = set()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if not name or re.sub(r"[-_.]+", "-", name).lower() in ("covalent-lot", "covalent-ssh-plugin"):
            continue
        lines.add(f"{name}=={dist.version}")
    return sorted(lines)


# --------------------------------------------------------------------------- venvs


class Venvs:
    """The host's venvs (``paths[flavour]``), built by :func:`build_venvs`.

    ``seconds`` holds the wall time of each build step and ``"total"``;
    ``base_prefix`` is the interpreter installation the venvs link to (made
    visible read-only inside the host's HOME when it lies under it).
    """

    def __init__(self, root: Path, owned: bool) -> None:
        self.root = root
        self.owned = owned  # made here (removed by remove()) or a given directory
        self.paths: dict[str, Path] = {}
        self.seconds: dict[str, float] = {}
        self.wheel: Optional[Path] = None
        self.base_prefix: Optional[Path] = None
        self.mode: Optional[str] = None

    def python(self, flavour: str = "full") -> str:
        try:
            return str(self.paths[flavour] / "bin" / "python")
        except KeyError:
            raise KeyError(f"no {flavour!r} venv built (have {sorted(self.paths)})") from None

    def remove(self) -> None:
        if self.owned:
            shutil.rmtree(self.root, ignore_errors=True)
            _LEFTOVERS.discard(self.root)
        else:
            for path in self.paths.values():
                shutil.rmtree(path, ignore_errors=True)
        self.paths.clear()

    def __repr__(self) -> str:
        return f"Venvs({self.root}, {sorted(self.paths)}, {self.seconds.get('total', 0):.1f}s)"


def _pip(target_python: str, args: list[str], what: str, compile_: bool) -> None:
    # This interpreter's pip installs into the target (pip >= 22.3 --python): the
    # venvs need no pip of their own, which saves ~3.5 s each.
    cmd = [sys.executable, "-m", "pip", "--python", target_python, "--disable-pip-version-check"]
    cmd += args[:1] + ["-q"] + ([] if compile_ else ["--no-compile"]) + args[1:]
    _run(cmd, what)


def _retarget_scripts(venv: Path, old: Path) -> None:
    """After ``cp -a old venv``: console scripts' shebangs and activate scripts
    name the old venv; point them at the copy (its python already uses its own
    site-packages: pyvenv.cfg is found next to bin/python)."""
    old_b, new_b = str(old).encode(), str(venv).encode()
    for script in (venv / "bin").iterdir():
        if script.is_symlink() or not script.is_file():
            continue
        data = script.read_bytes()
        if old_b in data[:4096] or script.name.startswith("activate"):
            script.write_bytes(data.replace(old_b, new_b))


def build_venvs(
    checkout: os.PathLike | str,
    flavours: Iterable[str] = VENV_FLAVOURS,
    *,
    root: Optional[os.PathLike | str] = None,
    mode: Optional[str] = None,
    python: Optional[str] = None,
    match_dispatcher: bool = True,
) -> Venvs:
    """Build the host's venvs from ``checkout`` (the repo root), non-editable.

    * ``"bare"``: covalent==0.240.0, fastapi<0.132, cloudpickle, numpy - no covalent-lot;
    * ``"full"``: bare + pandas, pyarrow, covalent-lot[all];
    * ``"nosdk"``: bare + covalent-lot (``--no-deps``), and no boto3/botocore/
      s3transfer (covalent's own dependency), google-cloud-storage, azure, paramiko
      nor asyncssh.

    covalent-lot comes from a wheel built from a snapshot of the checkout's
    working tree taken now (nothing is written into the checkout). "bare" is
    built first and copied for the others. With ``match_dispatcher`` every
    package gets the version installed in this interpreter's environment when it
    has one. Venvs for ``mode="separate-user"`` are byte-compiled at install
    (that user cannot write __pycache__ there) and use an interpreter another
    user can run.
    """
    t_all = time.monotonic()
    flavours = list(dict.fromkeys(flavours))
    unknown = [f for f in flavours if f not in VENV_FLAVOURS]
    if unknown:
        raise ValueError(f"unknown venv flavours {unknown}; known: {VENV_FLAVOURS}")
    mode = mode or detect_mode()
    checkout = Path(checkout).resolve()
    if not (checkout / "pyproject.toml").is_file():
        raise ValueError(f"{checkout} is not the covalent-lot checkout (no pyproject.toml)")
    owned = root is None
    root_path = Path(tempfile.mkdtemp(prefix="lot-host2-venvs-", dir=BASE_DIR)) if owned else Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    os.chmod(root_path, 0o755)  # mkdtemp makes it 0700; a separate user must read it
    venvs = Venvs(root_path.resolve(), owned)
    if owned:
        _LEFTOVERS.add(venvs.root)
    venvs.mode = mode
    compile_ = mode == "separate-user"
    base = _base_python(mode, python)
    try:
        pip_args: list[str] = []
        if match_dispatcher:
            constraints = venvs.root / "constraints.txt"
            constraints.write_text("\n".join(_constraints()) + "\n")
            pip_args = ["-c", str(constraints)]

        if any(f in ("full", "nosdk") for f in flavours):
            t0 = time.monotonic()
            src = venvs.root / "src"
            shutil.rmtree(src, ignore_errors=True)
            shutil.copytree(checkout, src, ignore=_SNAPSHOT_IGNORE, symlinks=True)
            wheels = venvs.root / "wheels"
            shutil.rmtree(wheels, ignore_errors=True)
            isolation = [] if importlib.util.find_spec("setuptools") else ["--use-pep517"]
            no_iso = ["--no-build-isolation"] if not isolation else []
            _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *no_iso, *isolation,
                  str(src), "-w", str(wheels)], "building the covalent-lot wheel")
            found = sorted(wheels.glob("covalent_lot-*.whl"))
            if not found:
                raise RuntimeError(f"no covalent_lot wheel in {wheels}")
            venvs.wheel = found[-1]
            shutil.rmtree(src, ignore_errors=True)
            venvs.seconds["wheel"] = time.monotonic() - t0

        t0 = time.monotonic()
        bare = venvs.root / "bare"
        shutil.rmtree(bare, ignore_errors=True)
        _run([base, "-m", "venv", "--without-pip", str(bare)], "python -m venv")
        _pip(str(bare / "bin" / "python"), ["install", *pip_args, *_BARE], "pip install (bare)", compile_)
        venvs.seconds["bare"] = time.monotonic() - t0
        venvs.base_prefix = Path(_run(
            [str(bare / "bin" / "python"), "-c", "import sys; print(sys.base_prefix)"], "python"
        ).stdout.strip()).resolve()

        wheel_req = f"covalent-lot[all] @ {venvs.wheel.as_uri()}" if venvs.wheel else None
        for flavour in [f for f in flavours if f != "bare"]:
            t0 = time.monotonic()
            venv = venvs.root / flavour
            shutil.rmtree(venv, ignore_errors=True)
            _run(["cp", "-a", str(bare), str(venv)], f"copying the bare venv to {flavour}")
            _retarget_scripts(venv, bare)
            py = str(venv / "bin" / "python")
            if flavour == "full":
                _pip(py, ["install", *pip_args, *_FULL_EXTRA, wheel_req], "pip install (full)", compile_)
            else:  # nosdk
                _pip(py, ["install", "--no-deps", str(venvs.wheel)], "pip install (nosdk)", compile_)
                _run([sys.executable, "-m", "pip", "--python", py, "uninstall", "-y", "-q", *_SDK_DISTS],
                     "pip uninstall (nosdk)")
            venvs.paths[flavour] = venv
            venvs.seconds[flavour] = time.monotonic() - t0
        if "bare" in flavours:
            venvs.paths["bare"] = bare
        else:
            shutil.rmtree(bare, ignore_errors=True)
    except BaseException:
        venvs.remove()
        raise
    venvs.seconds["total"] = time.monotonic() - t_all
    return venvs


# ---------------------------------------------------------------------------- TOML


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(str(value), ensure_ascii=False)


def _toml_dumps(data: Mapping[str, Any]) -> str:
    """Nested dicts of str/int/float/bool/lists as TOML (tables for dicts)."""
    out: list[str] = []

    def table(prefix: list[str], items: Mapping[str, Any]) -> None:
        scalars = [(k, v) for k, v in items.items() if not isinstance(v, Mapping)]
        tables = [(k, v) for k, v in items.items() if isinstance(v, Mapping)]
        if prefix and (scalars or not tables):
            out.append(f"[{'.'.join(_toml_key(p) for p in prefix)}]")
        for k, v in scalars:
            out.append(f"{_toml_key(k)} = {_toml_value(v)}")
        if scalars:
            out.append("")
        for k, v in tables:
            table(prefix + [k], v)

    table([], data)
    return "\n".join(out).rstrip("\n") + "\n"


# ------------------------------------------------------------------- the host


_AWS_CREDENTIAL_VARS = {
    "AWS_ACCESS_KEY_ID": "aws_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "AWS_SESSION_TOKEN": "aws_session_token",
}
_AWS_CONFIG_VARS = {"AWS_DEFAULT_REGION": "region", "AWS_REGION": "region"}
# Files the kits point at to keep the dispatcher's ~/.aws out of the way; the host
# has its own ~/.aws, so these are never forwarded (an existing file is merged in).
_AWS_FILE_VARS = {"AWS_SHARED_CREDENTIALS_FILE": "credentials", "AWS_CONFIG_FILE": "config"}
_LOT_SECTIONS = ("s3", "gcs", "azure", "sftp")
_LOT_PREFIX = "COVALENT_LOT_"


class SecondHost(_servers.ServerProcess):
    """Another machine on loopback: sshd in a mount namespace (or as another user).

    Attributes (after construction unless said):

    * ``mode``: ``"mount-namespace"`` or ``"separate-user"``;
    * ``workdir``: the host's directory on the shared disk (``/var/tmp/lot-host2-XXXX``):
      ``sshd_config``, ``host_key``, ``client_key`` (+ ``.pub``), ``authorized_keys``,
      ``ssh_config`` (the entry of :meth:`ssh_config_entry`), ``sshd.log``,
      ``home/`` (its HOME), ``tmp/`` (its /tmp in separate-user mode only);
    * ``user``: login name (``root``, or the created user);
    * ``home``: its HOME as the host sees it (``/root`` in a namespace);
      ``home_dir``: the same directory seen from the dispatcher (``workdir/home``);
    * ``tmp``: its temp dir as the host sees it (``/tmp``: a private tmpfs);
    * ``config_file``: its covalent.conf, seen from the dispatcher
      (``home_dir/.config/covalent/covalent.conf``);
    * ``staging_dir``, ``remote_cache``, ``remote_workdir``: host paths (under ``tmp``)
      of ``[lot] staging_dir`` and the SSH executor's cache and work dirs;
    * ``client_key``: private key (dispatcher side) that logs in;
    * ``alias``: the ssh Host alias the executor connects to;
    * ``port``: sshd's port (after start); ``session_env``: its SetEnv variables;
    * ``venvs``: the :class:`Venvs`; ``start_seconds``: sshd start wall time.
    """

    _name = "second host sshd"
    _clash_markers = ("Address already in use", "Cannot bind any address")
    _clash_error = "second host sshd could not bind a free port 3 times; log tail:\n"
    _poll_interval = 0.05

    def __init__(
        self,
        checkout: Optional[os.PathLike | str] = None,
        *,
        venvs: Optional[Venvs] = None,
        flavours: Iterable[str] = VENV_FLAVOURS,
        mode: str = "auto",
        workdir: Optional[os.PathLike | str] = None,
        alias: Optional[str] = None,
        tmpfs_size: str = "8g",
        start_timeout: float = 20.0,
    ) -> None:
        if venvs is None and checkout is None:
            raise ValueError("give venvs= (from build_venvs) or checkout= to build them")
        if mode == "auto":
            mode = venvs.mode if venvs is not None and venvs.mode else detect_mode()
        if mode not in MODES:
            raise ValueError(f"mode must be 'auto' or one of {MODES}, got {mode!r}")
        if venvs is not None and venvs.mode and venvs.mode != mode and mode == "separate-user":
            raise ValueError("venvs built for mount-namespace mode cannot serve a separate user")
        self._owns_workdir = workdir is None
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="lot-host2-", dir=BASE_DIR)
        super().__init__(workdir, "sshd.log", start_timeout)
        if self._owns_workdir:
            _LEFTOVERS.add(self.workdir)
        self.mode = mode
        self.checkout = Path(checkout).resolve() if checkout is not None else None
        self.flavours = tuple(flavours)
        self.venvs = venvs
        self._owns_venvs = venvs is None
        self.tmpfs_size = tmpfs_size
        suffix = self.workdir.name.rsplit("-", 1)[-1].lower()
        self.alias = alias or f"lot-host2-{suffix}"
        self.port: Optional[int] = None

        self.sshd_config = self.workdir / "sshd_config"
        self.host_key = self.workdir / "host_key"
        self.client_key = self.workdir / "client_key"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.ssh_config = self.workdir / "ssh_config"
        self.home_dir = self.workdir / "home"
        self.files_dir = self.home_dir / ".lot-host2"  # copies of key/known_hosts files

        if mode == "mount-namespace":
            self.user = "root"
            self.home = pwd.getpwuid(0).pw_dir  # /root, the bind-mount target
            self.tmp = "/tmp"
            self._tmp_dir: Optional[Path] = None
        else:
            self.user = f"lot-h2-{suffix}"[:32]
            self.home = str(self.home_dir)
            self._tmp_dir = self.workdir / "tmp"
            self.tmp = str(self._tmp_dir)
        self.staging_dir = f"{self.tmp}/lot-staging"
        self.remote_cache = f"{self.tmp}/covalent-remote-cache"
        self.remote_workdir = f"{self.tmp}/covalent-workdir"
        self.config_file = self.home_dir / ".config" / "covalent" / "covalent.conf"

        # State configure() accumulates: [lot...] tables, ~/.aws, session env.
        self._lot: dict[str, Any] = {"staging_dir": self.staging_dir}
        self._aws_credentials: dict[str, str] = {}
        self._aws_config: dict[str, str] = {}
        self._aws_base: dict[str, Path] = {}
        self.session_env: dict[str, str] = {}
        self._user_created = False
        self._sshd_env_written: Optional[dict] = None
        self._home_ready = False
        self._starting = False

    # -------------------------------------------------------------- configuration

    def configure(self, kit_env: Mapping[str, Optional[str]]) -> None:
        """Turn a kit's ``env`` into the host's own configuration.

        * ``COVALENT_LOT_<SECTION>_<OPTION>`` (section s3, gcs, azure, sftp) ->
          ``[lot.<section>] option`` in its covalent.conf, ``COVALENT_LOT_<OPTION>``
          -> ``[lot] option`` (values written as TOML strings, which covalent-lot
          parses); ``COVALENT_LOT_<SECTION>_STORE`` (not a conf key) and
          ``COVALENT_LOT_STAGING_DIR`` (the host has its own) are exceptions: the
          former goes to the session environment, the latter is ignored;
        * ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` ->
          ``~/.aws/credentials [default]``, ``AWS_DEFAULT_REGION``/``AWS_REGION`` ->
          ``~/.aws/config [default] region``; ``AWS_SHARED_CREDENTIALS_FILE``/
          ``AWS_CONFIG_FILE`` are not forwarded (an existing file is merged in);
        * anything else -> the ssh sessions' environment (sshd ``SetEnv``);
        * a value naming an existing regular file (key, known_hosts...) is copied
          into the host's HOME (``~/.lot-host2/``) and the copy's host path used;
        * ``None`` removes what an earlier call set for that variable.

        Works before or after start: files are rewritten at once; a changed
        session environment reloads sshd (SIGHUP: same port, /tmp kept), and
        applies to sessions opened afterwards.
        """
        for key, value in kit_env.items():
            self._configure_one(key, None if value is None else str(value))
        if self._home_ready:
            self._write_home_files()
        if self._proc is not None and self.session_env != self._sshd_env_written:
            self._reload_sshd()

    def add_store(self, section: str, name: str, options: Mapping[str, Any]) -> None:
        """``[lot.<section>.stores.<name>]`` in its covalent.conf (file paths localized)."""
        table = self._lot.setdefault(section, {}).setdefault("stores", {})
        table[name] = {k: self._localize(str(v), f"{section}_{name}_{k}") for k, v in options.items()}
        if self._home_ready:
            self._write_home_files()

    def _configure_one(self, key: str, value: Optional[str]) -> None:
        if key in _AWS_FILE_VARS:
            kind = _AWS_FILE_VARS[key]
            if value is not None and os.path.isfile(value):
                self._aws_base[kind] = Path(value)
            else:
                self._aws_base.pop(kind, None)
            return
        if key in _AWS_CREDENTIAL_VARS or key in _AWS_CONFIG_VARS:
            target = self._aws_credentials if key in _AWS_CREDENTIAL_VARS else self._aws_config
            option = _AWS_CREDENTIAL_VARS.get(key) or _AWS_CONFIG_VARS[key]
            if value is None:
                target.pop(option, None)
            else:
                target[option] = value
            return
        if key.startswith(_LOT_PREFIX) and key != _LOT_PREFIX + "STAGING_DIR":
            rest = key[len(_LOT_PREFIX):].lower()
            section, _, option = rest.partition("_")
            if section in _LOT_SECTIONS and option and option != "store":
                table = self._lot.setdefault(section, {})
                if value is None:
                    table.pop(option, None)
                else:
                    table[option] = self._localize(value, f"{section}_{option}")
                return
            if section not in _LOT_SECTIONS:  # a shared option: [lot]
                if value is None:
                    self._lot.pop(rest, None)
                else:
                    self._lot[rest] = self._localize(value, rest)
                return
        elif key == _LOT_PREFIX + "STAGING_DIR":
            return
        if value is None:
            self.session_env.pop(key, None)
        else:
            if '"' in value or "\n" in value or "\\" in value:
                raise ValueError(f"{key}: a value with quotes, backslashes or newlines cannot go "
                                 f"into sshd SetEnv: {value!r}")
            self.session_env[key] = self._localize(value, key.lower())

    def _localize(self, value: str, tag: str) -> str:
        """An existing file on the dispatcher's side becomes a copy in the host's HOME."""
        if not value or not os.path.isabs(value) or not os.path.isfile(value):
            return value
        self.files_dir.mkdir(parents=True, exist_ok=True)
        copy = self.files_dir / f"{tag}-{Path(value).name}"
        shutil.copyfile(value, copy)
        os.chmod(copy, 0o600)
        self._chown_to_user(copy)
        return self.host_path(copy)

    # ------------------------------------------------------------------ paths

    def host_path(self, local: os.PathLike | str) -> str:
        """Path inside the host of a file of its HOME given as a dispatcher-side path."""
        local = Path(local)
        try:
            rel = local.relative_to(self.home_dir)
        except ValueError:
            return str(local)
        return str(Path(self.home) / rel) if str(rel) != "." else self.home

    def path_on_dispatcher(self, host_path: str) -> Optional[Path]:
        """Where the dispatcher's side sees the host's ``host_path``: None for its
        private /tmp (mount-namespace mode), ``home_dir/...`` for its HOME, the
        same path elsewhere (the rest of the disk is shared)."""
        p = Path(host_path)
        if self.mode == "mount-namespace":
            if p == Path("/tmp") or Path("/tmp") in p.parents:
                return None
            if p == Path(self.home) or Path(self.home) in p.parents:
                return self.home_dir / p.relative_to(self.home)
        return p

    def python(self, venv: str = "full") -> str:
        if self.venvs is None:
            raise RuntimeError("venvs not built yet: start() (or build_venvs) first")
        return self.venvs.python(venv)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> "SecondHost":
        if self.venvs is None:
            if self.checkout is None:
                raise ValueError("no venvs and no checkout to build them from")
            self.venvs = build_venvs(self.checkout, self.flavours, root=self.workdir / "venvs",
                                     mode=self.mode)
        elif self.mode == "separate-user" and self.venvs.mode != "separate-user":
            raise ValueError("venvs built for mount-namespace mode cannot serve a separate user")
        self._starting = True  # a failed attempt's stop() must not remove the files
        try:
            super().start()
        except BaseException:
            self._starting = False
            self.stop()
            raise
        self._starting = False
        return self

    def _prepare(self) -> None:
        if not os.path.exists(SSHD_BIN):
            raise RuntimeError(f"{SSHD_BIN} not found: apt-get install -y openssh-server")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        os.chmod(self.workdir, 0o755 if self.mode == "separate-user" else 0o700)
        self.home_dir.mkdir(parents=True, exist_ok=True)
        if self._tmp_dir is not None:
            self._tmp_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self._tmp_dir, 0o700)
        if not self.host_key.exists():
            _keygen(self.host_key)
        if not self.client_key.exists():
            self.authorized_keys.write_text(_keygen(self.client_key) + "\n")
            os.chmod(self.authorized_keys, 0o644)
        if self.mode == "separate-user":
            self._create_user()
        self._write_home_files()
        self._home_ready = True

    def _command(self) -> list[str]:
        if self.port is None or not _servers._can_bind(self.port):
            self.port = _servers.free_port(avoid_offsets=())
        self._write_sshd_config()
        self.ssh_config.write_text(self.ssh_config_entry())
        sshd = [SSHD_BIN, "-D", "-e", "-f", str(self.sshd_config)]
        if self.mode == "separate-user":
            return sshd
        # Inside the new mount namespace: a private /tmp, and the host's home over
        # /root. The interpreter the venvs link to, when it lives under /root
        # (pyenv), is bind-mounted read-only at the same place inside that home.
        steps = [f"mount -t tmpfs -o size={self.tmpfs_size},mode=1777 tmpfs /tmp"]
        base = self.venvs.base_prefix if self.venvs else None
        if base is not None and Path(self.home) in base.parents:
            inside = self.home_dir / base.relative_to(self.home)
            inside.mkdir(parents=True, exist_ok=True)
            steps.append(f"mount --bind -o ro {shlex.quote(str(base))} {shlex.quote(str(inside))}")
        steps.append(f"mount --rbind {shlex.quote(str(self.home_dir))} {shlex.quote(self.home)}")
        steps.append("exec " + shlex.join(sshd))
        return ["unshare", "-m", "--propagation", "private", "--", "sh", "-ec", " && ".join(steps)]

    def _env(self) -> dict:
        env = dict(os.environ)
        env.pop("SSH_AUTH_SOCK", None)
        return env

    def _ready(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as s:
                s.settimeout(0.5)
                return s.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop sshd and every session (the namespace and its /tmp go with them),
        then remove the host's files (and its user, its venvs if it built them)."""
        if self._starting:  # ServerProcess cleaning up after one failed attempt
            self._stop_sshd()
            return
        try:
            self._stop_sshd()
        finally:
            if self._user_created:
                subprocess.run(["userdel", self.user], stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=30)
                self._user_created = False
            if self._owns_venvs and self.venvs is not None:
                self.venvs.remove()
                self.venvs = None
            if self._owns_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
                _LEFTOVERS.discard(self.workdir)
            self._home_ready = False

    def restart(self) -> float:
        """Stop sshd (all sessions; a namespace's /tmp is emptied, like a reboot)
        and start it again on the same port, files kept; return the seconds."""
        self._stop_sshd()
        t0 = time.monotonic()
        self._starting = True
        try:
            _servers.ServerProcess.start(self)
        finally:
            self._starting = False
        return time.monotonic() - t0

    def _stop_sshd(self) -> None:
        _servers.ServerProcess.stop(self)

    def _terminate(self) -> None:
        # sshd puts each connection in a session of its own: collect them first.
        pid = self._proc.pid
        try:
            import psutil

            sessions = psutil.Process(pid).children(recursive=True)
        except Exception:  # noqa: BLE001 - already gone
            sessions = []
        try:
            _servers._kill_group(pid, term_timeout=self.stop_timeout)
        finally:
            for child in sessions:
                try:
                    child.kill()
                except Exception:  # noqa: BLE001
                    pass

    def _reload_sshd(self) -> None:
        """New SetEnv lines: sshd re-executes itself on SIGHUP (same pid, same port,
        same namespace); wait until it listens again."""
        self._write_sshd_config()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        os.kill(self._proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"sshd died on reload; log tail:\n{_servers._tail(self.log_path)}")
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                relistening = b"Server listening on" in f.read()
            if relistening and self._ready():
                return
            time.sleep(0.05)
        raise RuntimeError(f"sshd not back after reload; log tail:\n{_servers._tail(self.log_path)}")

    # ------------------------------------------------------------ files it reads

    def _write_sshd_config(self) -> None:
        extra = [f"AllowUsers {self.user}", "PermitUserEnvironment no"]
        env = dict(self.session_env)
        if self.mode == "separate-user":
            env.setdefault("TMPDIR", self.tmp)
        if env:
            extra.append("SetEnv " + " ".join(f'"{k}={v}"' for k, v in env.items()))
        _servers.write_sshd_config(self.sshd_config, port=self.port, host_key=self.host_key,
                                   pid_file=self.workdir / "sshd.pid",
                                   authorized_keys=self.authorized_keys, extra=extra)
        self._sshd_env_written = dict(self.session_env)

    def _write_home_files(self) -> None:
        """covalent.conf ([lot...] replaced, covalent's own sections kept) and ~/.aws."""
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        conf: dict[str, Any] = {}
        if self.config_file.exists():
            with open(self.config_file, "rb") as f:
                conf = tomllib.load(f)
        conf["lot"] = {k: v for k, v in self._lot.items() if not (isinstance(v, dict) and not v)}
        self.config_file.write_text(_toml_dumps(conf))

        aws = self.home_dir / ".aws"
        for kind, values in (("credentials", self._aws_credentials), ("config", self._aws_config)):
            path = aws / kind
            if not values and kind not in self._aws_base:
                path.unlink(missing_ok=True)
                continue
            parser = configparser.ConfigParser(interpolation=None)
            if kind in self._aws_base:
                parser.read(self._aws_base[kind])
            if values:
                if not parser.has_section("default"):
                    parser["default"] = {}
                parser["default"].update(values)
            aws.mkdir(mode=0o700, exist_ok=True)
            with open(path, "w") as f:
                parser.write(f)
            os.chmod(path, 0o600)
        self._chown_to_user(self.home_dir, recursive=True)

    # ------------------------------------------------------------- separate user

    def _create_user(self) -> None:
        if self._user_created:
            return
        # '*' as password: not locked ('!'), so UsePAM no accepts key logins.
        _run(["useradd", "--home-dir", str(self.home_dir), "--no-create-home", "--user-group",
              "--shell", "/bin/sh", "--password", "*", self.user], "useradd", timeout=30)
        self._user_created = True
        self._chown_to_user(self.home_dir, recursive=True)
        self._chown_to_user(self._tmp_dir)

    def _chown_to_user(self, path: Optional[Path], recursive: bool = False) -> None:
        if self.mode != "separate-user" or not self._user_created or path is None:
            return
        entry = pwd.getpwnam(self.user)
        paths = [path]
        if recursive and path.is_dir():
            for root, dirs, files in os.walk(path):
                paths += [Path(root) / n for n in dirs + files]
        for p in paths:
            try:
                os.lchown(p, entry.pw_uid, entry.pw_gid)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------- dispatcher's side

    def ssh_config_entry(self, alias: Optional[str] = None) -> str:
        """An ``~/.ssh/config`` block: ``alias`` -> this host (asyncssh and OpenSSH)."""
        if self.port is None:
            raise RuntimeError("the host has no port before start()")
        return "\n".join([
            f"Host {alias or self.alias}",
            f"    HostName {LOOPBACK}",
            f"    Port {self.port}",
            f"    User {self.user}",
            f"    IdentityFile {self.client_key}",
            "    IdentitiesOnly yes",
            "    StrictHostKeyChecking no",
            "    UserKnownHostsFile /dev/null",
            "",
        ])

    def install_ssh_config(self, home_dir: os.PathLike | str, alias: Optional[str] = None) -> Path:
        """Put :meth:`ssh_config_entry` into ``<home_dir>/.ssh/config`` (700/600),
        replacing an earlier block for the same alias. asyncssh reads that file at
        every connect, so the Covalent server (HOME=home_dir) may already run."""
        alias = alias or self.alias
        ssh_dir = Path(home_dir) / ".ssh"
        ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(ssh_dir, 0o700)
        path = ssh_dir / "config"
        begin, end = f"# >>> lot-host2 {alias}\n", f"# <<< lot-host2 {alias}\n"
        text = path.read_text() if path.exists() else ""
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), "", text, flags=re.S)
        # A Host block runs to the next Host line: ours goes at the end, after a
        # blank line, and nothing must follow it unmarked.
        if text and not text.endswith("\n"):
            text += "\n"
        text += begin + self.ssh_config_entry(alias) + end
        path.write_text(text)
        os.chmod(path, 0o600)
        return path

    def executor(self, venv: str = "full", **overrides: Any):
        """A ``covalent_ssh_plugin.SSHExecutor`` for this host, python of ``venv``.

        The Covalent server must have :meth:`install_ssh_config` in its HOME
        (there is no port argument). ``create_unique_workdir``: an electron runs
        in ``<remote_workdir>/<dispatch_id>/node_<i>``. Connection failures are
        retried 3 times 1 s apart (not 5 x 5 s).
        """
        from covalent_ssh_plugin import SSHExecutor

        kwargs: dict[str, Any] = dict(
            username=self.user,
            hostname=self.alias,
            ssh_key_file=str(self.client_key),
            python_path=self.python(venv),
            remote_cache=self.remote_cache,
            remote_workdir=self.remote_workdir,
            create_unique_workdir=True,
            # The task runs synchronously over ssh; polling only happens when the
            # result file is not there yet at the end (then every poll_freq s).
            poll_freq=1,
            do_cleanup=True,
            retry_connect=True,
            max_connection_attempts=3,
            retry_wait_time=1,
        )
        kwargs.update(overrides)
        return SSHExecutor(**kwargs)

    def ssh_command(self) -> list[str]:
        """The OpenSSH client command line that logs into the host (append a command)."""
        if self.port is None:
            raise RuntimeError("the host is not started")
        return ["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                "-o", "ConnectTimeout=10", self.alias]

    def run(self, cmd: list[str] | str, *, timeout: float = 60.0, check: bool = False,
            input: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` on the host over ssh (a list is quoted for its shell, a
        string is given to its shell as is); stdout/stderr as text."""
        remote = cmd if isinstance(cmd, str) else shlex.join(cmd)
        args = self.ssh_command() + ["--", remote]
        proc = subprocess.run(args, input=input, capture_output=True, text=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"on the second host: {remote} exited {proc.returncode}\n"
                               f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return proc

    def run_python(self, code: str, venv: str = "full", *, timeout: float = 120.0,
                   check: bool = False) -> subprocess.CompletedProcess:
        """``<venv python> -c code`` on the host."""
        return self.run([self.python(venv), "-c", code], timeout=timeout, check=check)

    def read_config(self) -> dict:
        """Its covalent.conf, parsed (read from the dispatcher's side)."""
        with open(self.config_file, "rb") as f:
            return tomllib.load(f)

    def __repr__(self) -> str:
        return f"SecondHost({self.mode}, {self.user}@{LOOPBACK}:{self.port}, {self.workdir})"
