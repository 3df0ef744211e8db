"""What the SFTP backend and both of its transports share.

The backend (``sftp.py``) speaks SFTP through a *session* that a transport
module makes: ``_sftp_paramiko.connect`` or ``_sftp_asyncssh.connect``, both
with the same arguments. A session offers ``primary`` (a blocking SFTP client
shaped like paramiko's: stat, listdir_attr, open, mkdir, remove, rename,
posix_rename), ``transfer``, ``remote_copy``, ``relay``, ``active`` and
``close``, raising built-in exceptions for SFTP statuses. This module holds
what both transports need: request sizes, the cipher preference, the parsed
authority and the host-key messages. It imports neither transport.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from typing import Any, Mapping, NamedTuple

from covalent_lot._config import Option

KiB = 1024
MiB = 1024 * KiB
# OpenSSH's sftp-server refuses messages over 256 KiB.
MAX_REQUEST = 255 * KiB
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
SYSTEM_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
TRANSPORTS = ("auto", "paramiko", "asyncssh")

# The options of [lot.sftp]: most of them are read by the transports.
OPTIONS: dict[str, Option] = {
    "username": Option("str", None, "login name (default: the user in the URI, else the local user)"),
    "port": Option("int", 22, "SSH port when the URI names none", 1, maximum=65535),
    "key_filename": Option("str", None, "path of a private key on the executor (by reference; never its content)"),
    "allow_agent": Option("bool", True, "also try the keys of a running ssh-agent"),
    "known_hosts": Option("str", None, "known_hosts file to verify host keys against (default "
                          "~/.ssh/known_hosts; the system's /etc/ssh/ssh_known_hosts is always read)"),
    "insecure_skip_host_key_check": Option(
        "bool", False, "DANGEROUS: accept any host key (no man-in-the-middle protection); keys are never saved"),
    "connect_timeout": Option("float", 10.0, "seconds to open the TCP connection", 0.001),
    "banner_timeout": Option("float", 15.0, "seconds to wait for the SSH banner", 0.001),
    "auth_timeout": Option("float", 15.0, "seconds to wait for authentication", 0.001),
    "io_timeout": Option("float", 60.0, "seconds to wait for any SFTP reply", 0.001),
    "max_concurrency": Option("int", 4, "SFTP channels (each with its own requests) per file", 1),
    "chunk_size": Option("size", 8 * MiB, "unit of work a channel takes at a time; files up to this size "
                         "use one channel", 64 * KiB),
    "request_size": Option("size", 255 * KiB, "bytes per SFTP read/write request (max 255 KiB)", 4 * KiB),
    "max_requests": Option("int", 32, "requests in flight per channel", 1),
    "transport": Option("str", "auto", "SSH library: paramiko, asyncssh (faster; extra sftp-fast) or auto "
                        "(asyncssh when installed)", choices=TRANSPORTS),
    "openssh": Option("bool", True, "with asyncssh, move files' bytes through the OpenSSH client (ssh -s sftp, "
                      "when installed): its ciphers run in a process of their own. Same host key and key "
                      "checks; if it cannot log in non-interactively, asyncssh's own channel is used"),
}


def chosen_transport(choice: str) -> str:
    """The SSH library the ``transport`` option ``choice`` means here: "asyncssh" or "paramiko"."""
    if choice == "paramiko":
        return choice
    try:
        import asyncssh  # noqa: F401
    except ImportError as exc:
        if choice == "asyncssh":
            raise ImportError(
                "[lot.sftp] transport = asyncssh needs the asyncssh module: pip install covalent-lot[sftp-fast]"
            ) from exc
        return "paramiko"
    return "asyncssh"


class Target(NamedTuple):
    """Where a session goes: the login name (None: the SSH library's default), host and port."""

    user: str | None
    host: str
    port: int

    @property
    def label(self) -> str:
        """The host as known_hosts names it."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


@functools.lru_cache(maxsize=256)
def split_authority(authority: str, default_port: int = 22) -> Target:
    """``[user@]host[:port]`` (or ``[v6addr]:port``) -> (user, host, port); parsed once per authority."""
    user, sep, hostport = authority.rpartition("@")
    user = user if sep else None
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif hostport.count(":") == 1:
        host, _, port_text = hostport.partition(":")
    else:
        host, port_text = hostport, ""
    if not host:
        raise ValueError(f"no host in SFTP authority {authority!r}; expected sftp://[user@]host[:port]/path")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"invalid port {port_text!r} in SFTP authority {authority!r}; "
                             "use a port number 1-65535")
        port = int(port_text)
    else:
        port = default_port
    return Target(user or None, host, port)


def shape(settings: Mapping[str, Any]) -> tuple[int, int]:
    """(bytes per request, requests in flight per channel) of a transfer."""
    return min(settings["request_size"], MAX_REQUEST), settings["max_requests"]


class Session:
    """What a session learned about its server; a fresh session asks again."""

    def __init__(self, settings: Mapping[str, Any]):
        self.settings = settings
        self.known_dirs: set[str] = set()
        # Extensions assumed offered until the server refuses one: posix-rename@openssh.com,
        # copy-data (OpenSSH >= 9.0).
        self.offers = {"posix-rename": True, "copy-data": True}


class HostKeyError(Exception):
    """The server's host key is unknown or differs from the one in known_hosts."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.hint = hint


def credentials(settings: Mapping[str, Any]) -> tuple[list[str], str | None]:
    """(known_hosts files to verify against, private key path), on the machine that connects."""
    known_files: list[str] = []
    if not settings["insecure_skip_host_key_check"]:
        if os.path.exists(SYSTEM_KNOWN_HOSTS):
            known_files.append(SYSTEM_KNOWN_HOSTS)
        known = settings["known_hosts"]
        path = os.path.expanduser(known if known is not None else "~/.ssh/known_hosts")
        if os.path.exists(path):
            known_files.append(path)
        elif known is not None:
            raise HostKeyError(f"known_hosts file {known!r} does not exist on the executor",
                               "point [lot.sftp] key known_hosts at an existing file")
    # A path on the machine that connects; only the path travels.
    key_filename = settings["key_filename"]
    if key_filename is not None:
        key_filename = os.path.expanduser(key_filename)
        if not os.path.exists(key_filename):
            import paramiko

            raise paramiko.AuthenticationException("key_filename does not exist on the executor")
    return known_files, key_filename


def host_key_error(target: Target, known_files: list[str], *, presented: str = "",
                   changed: bool = False) -> HostKeyError:
    """Unknown or CHANGED: decided by whether known_hosts names the host at all."""
    import paramiko

    label, host, port = target.label, target.host, target.port
    listed = changed
    for path in known_files:
        try:
            listed = listed or paramiko.HostKeys(path).lookup(label) is not None
        except (OSError, paramiko.SSHException):
            pass
    if listed:
        return HostKeyError(
            f"host key of {label} CHANGED: it is not the one in known_hosts{presented}",
            "if the server was legitimately re-keyed, remove the old line "
            f"(ssh-keygen -R '{label}') and add the new one "
            f"(ssh-keyscan -p {port} {host} >> ~/.ssh/known_hosts), after checking its fingerprint",
        )
    return HostKeyError(
        f"host key of {label} is unknown (not in known_hosts)",
        f"trust it once, after checking its fingerprint: ssh-keyscan -p {port} {host} "
        ">> ~/.ssh/known_hosts (or set [lot.sftp] known_hosts to a file holding it)",
    )


def openssh_command(settings: Mapping[str, Any], target: Target, known_files: list[str],
                    key_filename: str | None) -> list[str] | None:
    """The ``ssh -s ... sftp`` command that opens a data channel to ``target`` with
    the checks of the SSH library's session (its known_hosts files, key, agent
    choice, ciphers; no ~/.ssh/config, never a prompt), or None when the option
    is off, no ``ssh`` is installed, or a path cannot be passed to it."""
    if not settings.get("openssh", True):
        return None
    ssh = shutil.which("ssh")
    paths = list(known_files) + ([key_filename] if key_filename else [])
    if ssh is None or any(not p or any(c.isspace() or c in "\"'%\\" for c in p) for p in paths):
        return None
    if settings["insecure_skip_host_key_check"]:
        checks = ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null"]
    else:  # known_files already holds the system's file when it exists
        checks = ["StrictHostKeyChecking=yes", "UserKnownHostsFile=" + (" ".join(known_files) or "/dev/null")]
    options = [
        "BatchMode=yes",  # no password or passphrase prompt: fail, and the library's channel is used
        f"ConnectTimeout={max(1, math.ceil(settings['connect_timeout']))}",
        "GlobalKnownHostsFile=/dev/null", *checks, "UpdateHostKeys=no", "LogLevel=ERROR",
        "Ciphers=" + ",".join(dict.fromkeys(PREFERRED_CIPHERS + (
            "chacha20-poly1305@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr"))),
        "ClearAllForwardings=yes", "ForwardAgent=no", "ForwardX11=no",
    ]
    if not settings["allow_agent"]:
        options.append("IdentityAgent=none")
    command = [ssh, "-F", "/dev/null", "-T", "-p", str(target.port)]
    for option in options:
        command += ["-o", option]
    if key_filename:
        command += ["-i", key_filename]
    if target.user is not None:
        command += ["-l", target.user]
    return command + ["-s", "--", target.host, "sftp"]
