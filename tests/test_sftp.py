"""The SFTP adapter without a server: options, URIs, the error table, no shell, no secrets."""

from __future__ import annotations

import re
import socket
import stat
from pathlib import Path
from types import SimpleNamespace

import paramiko
import pytest

from covalent_lot._errors import ErrorKind, translate
from covalent_lot._uri import StoreURI, parse_uri


@pytest.fixture(autouse=True)
def no_sftp_env(monkeypatch):
    for name in ("COVALENT_LOT_SFTP_KEY_FILENAME", "COVALENT_LOT_SFTP_KNOWN_HOSTS",
                 "COVALENT_LOT_SFTP_USERNAME", "COVALENT_LOT_SFTP_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def sftp():
    from covalent_lot.strategies import sftp

    return sftp


@pytest.fixture
def backend(sftp):
    backend = sftp.SFTPBackend(sftp.SFTPStrategy().settings)
    yield backend
    backend.close()


class FakeSFTP:
    """The requests of an SFTP client these tests need, on a server holding only ``dirs``."""

    def __init__(self, dirs):
        self.dirs = set(dirs)

    def stat(self, path):
        if path not in self.dirs:
            raise FileNotFoundError(2, "No such file")
        return SimpleNamespace(st_mode=stat.S_IFDIR | 0o755, st_size=0, st_mtime=0)

    def listdir_attr(self, path):
        self.stat(path)
        return []


@pytest.fixture
def serving(backend, monkeypatch):
    """``serving(*dirs)``: the backend's sessions (``connect()``) reach a server holding only ``dirs``."""

    def serve(*dirs):
        session = SimpleNamespace(primary=FakeSFTP(dirs or ("/",)), active=True, close=lambda: None)
        monkeypatch.setattr(backend, "connect", lambda: session)
        return backend

    return serve


def bound(backend, authority):
    """The backend after its first request, to ``authority`` (the server's root)."""
    assert list(backend.iter_objects(StoreURI("sftp", authority, ""))) == []
    return backend


# --- options -----------------------------------------------------------------------------------

def test_explicit_false_and_zero_like_values_are_kept(sftp):
    s = sftp.SFTPStrategy(allow_agent=False, port=2222, max_concurrency=1)
    assert s.settings["allow_agent"] is False and s.settings["port"] == 2222
    assert s.settings["max_concurrency"] == 1


@pytest.mark.parametrize("options, match", [
    ({"port": 0}, "port"),
    ({"max_concurrency": 0}, "max_concurrency"),
    ({"chunk_size": -1}, "chunk_size"),
    ({"request_size": "1KiB"}, "request_size"),
    ({"connect_timeout": 0}, "connect_timeout"),
    ({"allow_agent": "maybe"}, "allow_agent"),
])
def test_bad_options(sftp, options, match):
    with pytest.raises(ValueError, match=match):
        sftp.SFTPStrategy(**options)


def test_env_and_conf_precedence(sftp, monkeypatch, covalent_conf):
    covalent_conf({"sftp": {"port": 2200, "username": "conf"}})
    monkeypatch.setenv("COVALENT_LOT_SFTP_PORT", "2201")
    s = sftp.SFTPStrategy(username="arg")
    assert s.settings["port"] == 2201 and s.settings["username"] == "arg"


def test_size_options_take_units(sftp):
    s = sftp.SFTPStrategy(chunk_size="16MiB", request_size="128KiB")
    assert s.settings["chunk_size"] == 16 * 1024 * 1024
    assert s.settings["request_size"] == 128 * 1024


# --- URIs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("uri, user, host, port, path", [
    ("sftp://user@host:2222/abs/path", "user", "host", 2222, "/abs/path"),
    ("sftp://host/data/x.npy", None, "host", 22, "/data/x.npy"),
    ("sftp://alice@login.hpc.example.org/scratch/a b/c.bin", "alice", "login.hpc.example.org", 22,
     "/scratch/a b/c.bin"),
    ("sftp://bob@[::1]:2022/tmp/x", "bob", "::1", 2022, "/tmp/x"),
    ("sftp://10.0.0.5:22/x", None, "10.0.0.5", 22, "/x"),
])
def test_uri_to_user_host_port_path(sftp, uri, user, host, port, path):
    location = parse_uri(uri, schemes=("sftp",))
    assert sftp.split_authority(location.bucket) == (user, host, port)
    assert sftp.remote_path(location) == path


def test_default_port_comes_from_the_option(sftp):
    assert sftp.split_authority("h", default_port=2200) == (None, "h", 2200)
    assert sftp.split_authority("h:2201", default_port=2200) == (None, "h", 2201)


def test_an_authority_is_parsed_once(sftp):
    assert sftp.split_authority("u@h:2022") is sftp.split_authority("u@h:2022")


@pytest.mark.parametrize("authority", ["h:0", "h:99999", "h:port", "user@"])
def test_bad_authority(sftp, authority):
    with pytest.raises(ValueError):
        sftp.SFTPStrategy().parse(f"sftp://{authority}/x")


def test_folder_uri_and_root(sftp):
    location = sftp.SFTPStrategy().parse("sftp://h/data/run/")
    assert location.is_folder and sftp.remote_path(location) == "/data/run/"
    assert sftp.remote_path(StoreURI("sftp", "h", "")) == "/"


def test_endpoint_names_user_host_port(serving):
    backend = bound(serving(), "u@example.org:2022")
    assert backend.endpoint == "sftp://u@example.org:2022"


def test_one_backend_talks_to_one_server(serving):
    backend = bound(serving(), "a@h1")
    with pytest.raises(ValueError, match="one server"):
        backend.stat(StoreURI("sftp", "a@h2", "x"))


def test_sidecar_and_partial_names(sftp):
    assert sftp.sidecar_path("/d/x.bin") == "/d/x.bin.lot-sha256"
    assert sftp.sidecar_path("/d/x.bin", "crc32c") == "/d/x.bin.lot-crc32c"
    partial = sftp.partial_path("/d/x.bin")
    assert partial.startswith("/d/.x.bin.lot-partial-")


# --- the error table -----------------------------------------------------------------------------

def _refused():
    return paramiko.ssh_exception.NoValidConnectionsError({("127.0.0.1", 22): ConnectionRefusedError(111, "refused")})


def _host_key_changed():
    class FakeKey:
        def get_base64(self):
            return "AAAA"

        def get_name(self):
            return "ssh-ed25519"

        @property
        def fingerprint(self):
            return "SHA256:x"
    return paramiko.BadHostKeyException("h", FakeKey(), FakeKey())


@pytest.mark.parametrize("make, kind, builtin", [
    (lambda: paramiko.AuthenticationException("Authentication failed."), ErrorKind.DENIED, PermissionError),
    (lambda: paramiko.BadAuthenticationType("bad", ["password"]), ErrorKind.DENIED, PermissionError),
    (_host_key_changed, ErrorKind.DENIED, PermissionError),
    (lambda: paramiko.SSHException("Server '[h]:22' not found in known_hosts"), ErrorKind.DENIED,
     PermissionError),
    (lambda: paramiko.SSHException("No authentication methods available"), ErrorKind.DENIED, PermissionError),
    (_refused, ErrorKind.CONNECTION, ConnectionError),
    (lambda: socket.timeout("timed out"), ErrorKind.TIMEOUT, TimeoutError),
    (lambda: TimeoutError("timed out"), ErrorKind.TIMEOUT, TimeoutError),
    (lambda: paramiko.SSHException("Error reading SSH protocol banner"), ErrorKind.TIMEOUT, TimeoutError),
    (lambda: paramiko.SSHException("Server connection dropped: "), ErrorKind.CONNECTION, ConnectionError),
    (lambda: EOFError(), ErrorKind.CONNECTION, ConnectionError),
    (lambda: ConnectionResetError(104, "reset"), ErrorKind.CONNECTION, ConnectionError),
    (lambda: FileNotFoundError(2, "No such file"), ErrorKind.NOT_FOUND, FileNotFoundError),
    (lambda: PermissionError(13, "Permission denied"), ErrorKind.DENIED, PermissionError),
    (lambda: OSError("Failure"), ErrorKind.OTHER, OSError),
])
def test_classify_table(serving, make, kind, builtin):
    backend = bound(serving(), "u@h:2022")
    verdict = backend.classify(make())
    assert verdict is not None and verdict.kind is kind
    err = translate(verdict, action="read", target="sftp://u@h:2022/x", endpoint=backend.endpoint)
    assert isinstance(err, builtin)


def test_host_key_errors_say_how_to_trust(sftp, backend):
    err = sftp.HostKeyError("host key of [h]:2022 is unknown", "ssh-keyscan -p 2022 h >> ~/.ssh/known_hosts")
    verdict = backend.classify(err)
    assert verdict.kind is ErrorKind.DENIED and "ssh-keyscan -p 2022 h" in verdict.hint


def test_missing_directory_names_it(serving):
    backend = serving("/", "/data")
    location = StoreURI("sftp", "h", "data/no-such-bucket-lot/x.bin")
    verdict = backend.classify(backend.missing_container(location, FileNotFoundError(2, "No such file")))
    assert verdict.kind is ErrorKind.NOT_FOUND
    assert "'no-such-bucket-lot' does not exist" in verdict.detail


def test_a_missing_folder_in_an_existing_directory_lists_empty(serving):
    backend = serving("/", "/data")
    assert list(backend.iter_objects(StoreURI("sftp", "h", "data/run/"))) == []
    assert backend.missing_container(StoreURI("sftp", "h", "data/x.bin"), FileNotFoundError()) is None


# --- security: no shell, no auto-trust ------------------------------------------------------------

def test_host_keys_are_verified_by_default(sftp):
    assert sftp.SFTPStrategy().settings["insecure_skip_host_key_check"] is False


def test_no_autoadd_and_no_subprocess_in_the_modules(sftp):
    modules = sorted(Path(sftp.__file__).parent.glob("*sftp*.py"))
    assert len(modules) >= 4  # the backend, the shared part and both transports
    for module in modules:
        code = re.sub(r'""".*?"""', "", module.read_text(), flags=re.S)  # docstrings may mention what is avoided
        code = re.sub(r"#.*", "", code)
        # ssh itself may run (an argument list, no shell), never a command on the server.
        for banned in ("AutoAddPolicy", "WarningPolicy", "import subprocess", "subprocess_shell", "os.popen",
                       "exec_command", "invoke_shell", "os.system", "shell=True", "save_host_keys"):
            assert banned not in code, (module.name, banned)


def _openssh_settings(**over):
    from covalent_lot.strategies._sftp_wire import OPTIONS

    return {**{k: o.default for k, o in OPTIONS.items()}, **over}


def test_the_openssh_channel_checks_what_the_session_checks(monkeypatch):
    from covalent_lot.strategies._sftp_wire import Target, openssh_command

    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/ssh")
    cmd = openssh_command(_openssh_settings(allow_agent=False), Target("-oProxyCommand=x", "-h", 2222),
                          ["/etc/ssh/ssh_known_hosts", "/home/a/.ssh/known_hosts"], "/home/a/.ssh/id")
    options = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-o"]
    assert cmd[:3] == ["/usr/bin/ssh", "-F", "/dev/null"]  # no ~/.ssh/config
    assert "BatchMode=yes" in options and "StrictHostKeyChecking=yes" in options
    assert "UserKnownHostsFile=/etc/ssh/ssh_known_hosts /home/a/.ssh/known_hosts" in options
    assert "IdentityAgent=none" in options and ["-i", "/home/a/.ssh/id"] == cmd[cmd.index("-i"):cmd.index("-i") + 2]
    assert cmd[cmd.index("-l") + 1] == "-oProxyCommand=x"  # an argument of -l, not an option
    assert cmd[-4:] == ["-s", "--", "-h", "sftp"]  # the host after "--"
    assert cmd[cmd.index("-p") + 1] == "2222"
    assert any(o.startswith("Ciphers=aes128-gcm@openssh.com,") for o in options)


def test_the_openssh_channel_is_left_out_when_it_cannot_be_asked_safely(monkeypatch):
    from covalent_lot.strategies._sftp_wire import Target, openssh_command

    target = Target(None, "h", 22)
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/ssh")
    assert openssh_command(_openssh_settings(openssh=False), target, [], None) is None
    for path in ("/a b/key", "/a%d/key", '/a"/key'):  # ssh would split or expand it
        assert openssh_command(_openssh_settings(), target, [], path) is None
    insecure = openssh_command(_openssh_settings(insecure_skip_host_key_check=True), target, [], None)
    assert "StrictHostKeyChecking=no" in insecure and "UserKnownHostsFile=/dev/null" in insecure
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert openssh_command(_openssh_settings(), target, [], None) is None  # no ssh installed


def test_insecure_option_never_saves_keys():
    from covalent_lot.strategies._sftp_paramiko import InsecureAcceptPolicy

    policy = InsecureAcceptPolicy()
    assert policy.missing_host_key(None, "h", type("K", (), {"get_name": lambda s: "t",
                                                              "fingerprint": "f"})()) is None


