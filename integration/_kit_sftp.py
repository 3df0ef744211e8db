"""SFTP kit: a private OpenSSH ``sshd`` on loopback, and plain paramiko helpers.

The server runs with its own config, host key and authorized key below the
kit's workdir (recipe in SERVERS.md), as root with key login only. "Buckets"
are fresh directories below ``<workdir>/root``; a URI is
``sftp://root@127.0.0.1:PORT/<workdir>/root/<bucket>/<key>``, so the contract
suite's missing bucket is a missing top directory.

The strategy checks the host key against ``<workdir>/known_hosts`` (written
here as ``[127.0.0.1]:PORT ssh-ed25519 ...``) and logs in with
``<workdir>/client_key``; ``wrong_key`` is a key sshd does not authorize.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any, Optional

from integration import _servers
from integration._kits import StoreKit

SSHD_BIN = _servers.SSHD_BIN
USER = "root"
SIDECARS = (".lot-crc32c", ".lot-sha256")  # covalent-lot's checksum files beside each object


def keygen(path: Path, kind: str = "ed25519") -> str:
    """Make a key pair (no passphrase); return the public key line."""
    for p in (path, path.with_name(path.name + ".pub")):
        if p.exists():
            p.unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "lot-it", "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL, capture_output=True)
    return path.with_name(path.name + ".pub").read_text().strip()


class SSHD(_servers.ServerProcess):
    """A private ``sshd -D -e -f CONF`` on 127.0.0.1, in its own process group."""

    _name = "sshd"
    _clash_markers = ("Address already in use", "Cannot bind any address")
    _clash_error = "sshd could not bind a free port 3 times; log tail:\n"
    _poll_interval = 0.05

    def __init__(self, workdir: os.PathLike | str, start_timeout: float = 20.0) -> None:
        super().__init__(workdir, "sshd.log", start_timeout)
        self.port: Optional[int] = None
        self.config = self.workdir / "sshd_config"
        self.host_key = self.workdir / "host_key"
        self.client_key = self.workdir / "client_key"
        self.authorized_keys = self.workdir / "authorized_keys"

    def _prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not os.path.exists(SSHD_BIN):
            raise RuntimeError(f"{SSHD_BIN} not found: apt-get install -y openssh-server")
        if not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
            os.chmod("/run/sshd", 0o755)
        if not self.host_key.exists():
            keygen(self.host_key)
        if not self.client_key.exists():
            self.authorized_keys.write_text(keygen(self.client_key) + "\n")

    def _env(self) -> dict:
        env = dict(os.environ)
        env.pop("SSH_AUTH_SOCK", None)
        return env

    @property
    def host_public_key(self) -> str:
        """'ssh-ed25519 AAAA...' of the server."""
        return " ".join(self.host_key.with_name("host_key.pub").read_text().split()[:2])

    def _write_config(self) -> None:
        _servers.write_sshd_config(self.config, port=self.port, host_key=self.host_key,
                                   pid_file=self.workdir / "sshd.pid",
                                   authorized_keys=self.authorized_keys)

    def _command(self) -> list[str]:
        self.port = _servers.free_port(avoid_offsets=())
        self._write_config()
        return [SSHD_BIN, "-D", "-e", "-f", str(self.config)]

    def _ready(self) -> bool:
        try:
            with socket.create_connection((_servers.LOOPBACK, self.port), timeout=0.5) as s:
                s.settimeout(0.5)
                return s.recv(4).startswith(b"SSH-")
        except OSError:
            return False


class SFTPKit(StoreKit):
    name = "sftp"
    scheme = "sftp"
    enforces_credentials = True
    listing_page_size = 100  # no pages over SFTP; keeps the listing test quick

    def start(self, workdir: Path) -> None:
        self._workdir = Path(workdir).resolve()
        self.server = SSHD(self._workdir / "sshd").start()
        self.root = self._workdir / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        self.known_hosts = self._workdir / "known_hosts"
        self.known_hosts.write_text(self.host_line() + "\n")
        self.wrong_key = self._workdir / "wrong_key"
        keygen(self.wrong_key)
        self._ssh = None
        self._sftp = None

    def host_line(self) -> str:
        return f"[{_servers.LOOPBACK}]:{self.server.port} {self.server.host_public_key}"

    @property
    def sftp(self):
        import paramiko

        if self._sftp is None or not self._ssh.get_transport().is_active():
            ssh = paramiko.SSHClient()
            ssh.load_host_keys(str(self.known_hosts))
            ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
            ssh.connect(_servers.LOOPBACK, port=self.server.port, username=USER,
                        key_filename=str(self.server.client_key), allow_agent=False,
                        look_for_keys=False, timeout=10)
            self._ssh, self._sftp = ssh, ssh.open_sftp()
        return self._sftp

    def stop(self) -> None:
        if getattr(self, "_ssh", None) is not None:
            self._ssh.close()
        self.server.stop()

    @property
    def authority(self) -> str:
        return f"{USER}@{_servers.LOOPBACK}:{self.server.port}"

    @property
    def endpoint(self) -> str:
        return f"sftp://{self.authority}"

    @property
    def env(self) -> dict[str, str | None]:
        return {
            "COVALENT_LOT_SFTP_KEY_FILENAME": str(self.server.client_key),
            "COVALENT_LOT_SFTP_KNOWN_HOSTS": str(self.known_hosts),
            "COVALENT_LOT_SFTP_USERNAME": USER,
            "COVALENT_LOT_SFTP_ALLOW_AGENT": "false",
            "COVALENT_LOT_SFTP_INSECURE_SKIP_HOST_KEY_CHECK": None,
            "COVALENT_LOT_SFTP_PORT": None,
            "SSH_AUTH_SOCK": None,
        }

    def strategy(self, **options: Any):
        from covalent_lot.strategies.sftp import SFTPStrategy

        # The key comes from the environment (env), as credentials do for the
        # other kits, so that wrong_credentials() can replace it.
        return SFTPStrategy(**{"known_hosts": str(self.known_hosts), "username": USER, **options})

    def path(self, bucket: str, key: str = "") -> str:
        return posixpath.join(str(self.root), bucket, key)

    def uri(self, bucket: str, key: str) -> str:
        return f"sftp://{self.authority}{self.root}/{bucket}/{key}"

    def new_bucket(self) -> str:
        name = self.unique()
        (self.root / name).mkdir()
        return name

    def delete_bucket(self, bucket: str) -> None:
        shutil.rmtree(self.root / bucket, ignore_errors=True)

    # --- plain paramiko, no covalent-lot ----------------------------------------------
    def _makedirs(self, directory: str) -> None:
        try:
            self.sftp.stat(directory)
        except FileNotFoundError:
            self._makedirs(posixpath.dirname(directory))
            self.sftp.mkdir(directory)

    def put_bytes(self, bucket, key, data, metadata=None):
        path = self.path(bucket, key)
        self._makedirs(posixpath.dirname(path))
        with self.sftp.open(path, "wb") as f:
            f.write(data)
        for name, value in (metadata or {}).items():
            if name.startswith("lot-"):  # lot-crc32c, lot-sha256: a sidecar file
                with self.sftp.open(f"{path}.{name}", "wb") as f:
                    f.write((value + "\n").encode())

    def get_bytes(self, bucket, key):
        with self.sftp.open(self.path(bucket, key), "rb") as f:
            f.prefetch()
            return f.read()

    def get_metadata(self, bucket, key):
        path = self.path(bucket, key)
        self.sftp.stat(path)  # FileNotFoundError if the object is missing
        found = {}
        for suffix in SIDECARS:
            try:
                with self.sftp.open(path + suffix, "rb") as f:
                    found[suffix[1:]] = f.read().decode().strip()
            except FileNotFoundError:
                pass
        return found

    def list_keys(self, bucket, prefix=""):
        keys = []
        base = self.path(bucket)

        def walk(directory: str, rel: str) -> None:
            for entry in self.sftp.listdir_attr(directory):
                path = posixpath.join(directory, entry.filename)
                if stat.S_ISDIR(entry.st_mode):
                    walk(path, rel + entry.filename + "/")
                else:
                    keys.append(rel + entry.filename)

        walk(base, "")
        return sorted(k for k in keys if k.startswith(prefix))

    def wrong_credentials(self):
        return {
            "COVALENT_LOT_SFTP_KEY_FILENAME": str(self.wrong_key),
            "COVALENT_LOT_SFTP_ALLOW_AGENT": "false",
        }

    def unfinished_uploads(self, bucket: str) -> list[str]:
        """Partial files of interrupted uploads: plain files beside their target."""
        return [f"partial file {key}" for key in self.list_keys(bucket) if ".lot-partial-" in key]
