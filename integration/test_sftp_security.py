"""SFTP-only checks against the real sshd: host keys, keys, hostile path names.

Run: LOT_BACKENDS=sftp python -m pytest integration/test_sftp_security.py -q
"""

from __future__ import annotations

import os

import pytest

_wanted = [b for b in os.environ.get("LOT_BACKENDS", "").split(",") if b]
pytestmark = [
    pytest.mark.skipif(bool(_wanted) and "sftp" not in _wanted, reason="LOT_BACKENDS excludes sftp"),
    pytest.mark.parametrize("kit", ["sftp"], indirect=True),
]


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "s.bin"
    path.write_bytes(os.urandom(300_000))
    return path


def test_unknown_host_key_is_refused(kit, bucket, source, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    strategy = kit.strategy(known_hosts=str(empty), max_attempts=1)
    port = kit.server.port
    with pytest.raises(PermissionError, match="unknown") as info:
        strategy.put(str(source), kit.uri(bucket, "x.bin"))
    assert f"ssh-keyscan -p {port} 127.0.0.1" in str(info.value)
    assert kit.list_keys(bucket) == []


def test_changed_host_key_is_refused(kit, bucket, source, tmp_path):
    import sys

    other = tmp_path / "other_host_key"
    sys.modules[kit.__class__.__module__].keygen(other)
    public = " ".join(other.with_name("other_host_key.pub").read_text().split()[:2])
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{kit.server.port} {public}\n")
    strategy = kit.strategy(known_hosts=str(known), max_attempts=1)
    with pytest.raises(PermissionError, match="CHANGED") as info:
        strategy.get(kit.uri(bucket, "x.bin"), str(tmp_path / "x.bin"))
    assert "ssh-keygen -R" in str(info.value)
    assert not (tmp_path / "x.bin").exists()


def test_insecure_opt_out_connects_without_known_hosts(kit, bucket, source, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    strategy = kit.strategy(known_hosts=str(empty), insecure_skip_host_key_check=True)
    strategy.put(str(source), kit.uri(bucket, "ok.bin"))
    assert empty.read_text() == ""  # an accepted key is never saved


def test_wrong_key_is_refused(kit, bucket, source, tmp_path, monkeypatch):
    monkeypatch.setenv("COVALENT_LOT_SFTP_KEY_FILENAME", str(kit.wrong_key))
    strategy = kit.strategy(max_attempts=1, allow_agent=False)
    with pytest.raises(PermissionError, match="authentication failed"):
        strategy.put(str(source), kit.uri(bucket, "x.bin"))
    assert kit.list_keys(bucket) == []


def test_missing_key_file_is_refused(kit, bucket, source, tmp_path, monkeypatch):
    monkeypatch.setenv("COVALENT_LOT_SFTP_KEY_FILENAME", str(tmp_path / "no-such-key"))
    strategy = kit.strategy(max_attempts=1, allow_agent=False)
    with pytest.raises(PermissionError):
        strategy.put(str(source), kit.uri(bucket, "x.bin"))


def test_connection_refused(kit, source, tmp_path):
    from integration import _servers as servers

    port = servers.free_port(avoid_offsets=())
    strategy = kit.strategy(max_attempts=1)
    with pytest.raises(ConnectionError):
        strategy.put(str(source), f"sftp://root@127.0.0.1:{port}/tmp/x.bin")


HOSTILE = [
    "dir with spaces/file name.bin",
    "quotes/it's \"quoted\".bin",
    "semi/a;touch PWNED;b.bin",
    "subst/$(touch PWNED)`touch PWNED`.bin",
    "mixed/ '; rm -rf PWNED; echo '.bin",
]


@pytest.mark.parametrize("key", HOSTILE)
def test_hostile_names_transfer_without_shell_effect(kit, bucket, source, tmp_path, key):
    strategy = kit.strategy()
    uri = kit.uri(bucket, key)
    up = strategy.put(str(source), uri)
    assert up.verified == 1
    assert kit.get_bytes(bucket, key) == source.read_bytes()
    target = tmp_path / "back.bin"
    down = strategy.get(uri, str(target))
    assert down.verified == 1 and target.read_bytes() == source.read_bytes()
    # Nothing ran: no PWNED anywhere in the bucket, the server's dirs or here.
    for root in (kit.root, kit.server.workdir, tmp_path, os.getcwd()):
        for _, _, names in os.walk(root):
            assert "PWNED" not in names
    folder = strategy.get(kit.uri(bucket, key.split("/")[0] + "/"), str(tmp_path / "folder"))
    assert folder.files == 1


def test_listing_hides_sidecars_and_partials(kit, bucket, source, tmp_path):
    strategy = kit.strategy()
    strategy.put(str(source), kit.uri(bucket, "d/a.bin"))
    kit.put_bytes(bucket, "d/.b.bin.lot-partial-0123456789ab", b"left by a killed upload")
    keys = kit.list_keys(bucket)
    assert "d/a.bin.lot-crc32c" in keys  # the sidecar is a plain file for other tools
    stats = strategy.get(kit.uri(bucket, "d/"), str(tmp_path / "d"))
    assert stats.files == 1 and os.listdir(tmp_path / "d") == ["a.bin"]


def test_no_transport_or_thread_left_behind(kit, bucket, tmp_path):
    import threading
    import time

    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(20 * 1024 * 1024))  # several chunks: all channels used
    before = {t.ident for t in threading.enumerate()}
    strategy = kit.strategy()
    strategy.put(str(source), kit.uri(bucket, "t/big.bin"))
    strategy.get(kit.uri(bucket, "t/"), str(tmp_path / "t"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
        if not left:
            break
        time.sleep(0.05)
    assert not left, [t.name for t in left]


def _ssh_on_path(tmp_path, monkeypatch, body: str):
    wrapper = tmp_path / "bin" / "ssh"
    wrapper.parent.mkdir()
    wrapper.write_text("#!/bin/sh\n" + body)
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")


def _asyncssh_transport(strategy) -> bool:
    from covalent_lot.strategies._sftp_wire import chosen_transport

    return chosen_transport(strategy.settings["transport"]) == "asyncssh"


def test_files_bytes_go_through_openssh_with_the_same_checks(kit, bucket, source, tmp_path, monkeypatch):
    import shutil

    calls = tmp_path / "calls"
    real = shutil.which("ssh")
    _ssh_on_path(tmp_path, monkeypatch, f'echo "$@" >> {calls}\nexec {real} "$@"\n')
    strategy = kit.strategy()
    strategy.put(str(source), kit.uri(bucket, "via-ssh.bin"))
    strategy.get(kit.uri(bucket, "via-ssh.bin"), str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()
    if _asyncssh_transport(strategy):
        lines = calls.read_text().splitlines()
        assert len(lines) == 2, lines  # one data channel per transfer (session)
        assert all("StrictHostKeyChecking=yes" in line and line.endswith("-s -- 127.0.0.1 sftp")
                   for line in lines), lines


def test_without_a_working_openssh_the_library_channel_moves_the_bytes(kit, bucket, source, tmp_path,
                                                                      monkeypatch, caplog):
    import logging

    _ssh_on_path(tmp_path, monkeypatch, "echo 'Permission denied (publickey).' >&2\nexit 255\n")
    strategy = kit.strategy()
    with caplog.at_level(logging.INFO, logger="covalent_lot"):
        strategy.put(str(source), kit.uri(bucket, "no-ssh.bin"))
        strategy.get(kit.uri(bucket, "no-ssh.bin"), str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()
    if _asyncssh_transport(strategy):
        assert "no OpenSSH data channel" in caplog.text and "Permission denied" in caplog.text
