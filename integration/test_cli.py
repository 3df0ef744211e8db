"""The ``covalent-lot`` console script against the real servers, once per backend.

The installed script runs as a subprocess with this process's environment
(the kits' endpoints and credentials, set by the conftest), exactly as a user
would run it from a shell. Each command and its output is printed, so
``pytest -s`` shows a real session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from covalent_lot._stream import sha256_file
from integration._kits import crc32c_of, is_sidecar

MiB = 1024 * 1024
SCRIPT = Path(sys.executable).with_name("covalent-lot")
DEAD = "http://127.0.0.1:1"  # nothing listens on port 1: connections are refused at once


def cli(*args: str, env: dict[str, str | None] | None = None, timeout: float = 120):
    """Run the script; (exit code, stdout, stderr). ``env`` entries override (None unsets)."""
    environ = os.environ.copy()
    for name, value in (env or {}).items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=environ,
                          timeout=timeout)
    print(f"$ covalent-lot {' '.join(args)}\n{done.stdout}{done.stderr}[exit {done.returncode}]\n")
    return done.returncode, done.stdout, done.stderr


def unreachable(kit, bucket: str) -> tuple[str, dict[str, str | None]]:
    """A store URI and environment under which the kit's server cannot be reached."""
    if kit.name == "sftp":
        uri = kit.uri(bucket, "p/")
        return uri.replace(kit.authority, kit.authority.rsplit(":", 1)[0] + ":1", 1), {}
    variable = {"s3": "COVALENT_LOT_S3_ENDPOINT_URL", "gcs": "COVALENT_LOT_GCS_ENDPOINT",
                "azure": "COVALENT_LOT_AZURE_ACCOUNT_URL"}[kit.name]
    env: dict[str, str | None] = {variable: DEAD}
    if kit.name == "azure":  # the connection string names the endpoint too
        env["AZURE_STORAGE_CONNECTION_STRING"] = None
        env["AZURE_STORAGE_KEY"] = "a2V5"
        env["COVALENT_LOT_AZURE_ACCOUNT_NAME"] = "devstoreaccount1"
    return kit.uri(bucket, "p/"), env


def test_doctor(kit, bucket):
    code, out, err = cli("doctor", kit.uri(bucket, "checks/"))
    assert (code, err) == (0, "")
    assert f"{kit.uri(bucket, 'checks/')}: ok, wrote, read back and removed" in out
    assert out.splitlines()[-1] == "all good"
    assert kit.list_keys(bucket) == []  # the probe is gone

    uri, env = unreachable(kit, bucket)
    code, out, err = cli("doctor", uri, env=env)
    assert code == 1
    assert err.startswith(f"PROBLEM {kit.name}: ")



def write_random(path: Path, size: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return sha256_file(str(path))[0]


def test_cp_ls_rm(kit, bucket, tmp_path):
    big = write_random(tmp_path / "up" / "big.bin", 9 * MiB + 7)  # above the progress bar's 8 MiB
    small = write_random(tmp_path / "up" / "sub" / "small.bin", 1000)
    code, out, _ = cli("cp", "--json", str(tmp_path / "up"), kit.uri(bucket, "in/"))
    assert code == 0 and json.loads(out)["files"] == 2 and json.loads(out)["verified"] == 2

    code, out, _ = cli("ls", "-l", kit.uri(bucket, "in/"))  # -l: the stored checksum of each object
    assert code == 0
    assert [line.split()[-2:] for line in out.splitlines()[1:-1]] == [
        [crc32c_of(tmp_path / "up" / "big.bin"), kit.uri(bucket, "in/big.bin")],
        [crc32c_of(tmp_path / "up" / "sub" / "small.bin"), kit.uri(bucket, "in/sub/small.bin")]]
    assert out.splitlines()[-1] == "2 object(s), 9.0 MiB"

    code, out, _ = cli("cp", kit.uri(bucket, "in/"), kit.uri(bucket, "copy/"))  # server side
    assert code == 0 and out.startswith(f"copy {kit.uri(bucket, 'in/')} -> ")
    code, out, _ = cli("cp", kit.uri(bucket, "copy/"), str(tmp_path / "down"))
    assert code == 0 and "2/2 crc32c verified" in out
    assert sha256_file(str(tmp_path / "down" / "big.bin"))[0] == big
    assert sha256_file(str(tmp_path / "down" / "sub" / "small.bin"))[0] == small

    code, _, err = cli("rm", kit.uri(bucket, "copy/"))
    assert code == 2 and "--recursive" in err
    assert cli("rm", "-q", kit.uri(bucket, "in/big.bin")) == (0, "", "")
    code, out, _ = cli("rm", "-r", kit.uri(bucket, "copy/"))
    assert code == 0 and out.startswith(f"removed 2 object(s), 9.0 MiB from {kit.uri(bucket, 'copy/')}")
    assert [k for k in kit.list_keys(bucket) if not is_sidecar(k)] == ["in/sub/small.bin"]


def test_gc(kit, bucket):
    for key in ("runs/d-111/a.npy", "runs/d-111/sub/b.npy", "runs/d-222/a.npy", "keep/d-111/a.npy"):
        kit.put_bytes(bucket, key, b"0123456789")
    prefix = kit.uri(bucket, "runs/")
    code, out, _ = cli("gc", "--dry-run", "--dispatch", "d-111", prefix)
    assert code == 0
    assert out.splitlines()[-1] == f"gc {prefix}: would remove 2 of 3 object(s), 20 B (dry run: nothing removed)"
    assert len(kit.list_keys(bucket)) == 4

    code, out, _ = cli("gc", "--dispatch", "d-111", prefix)
    assert code == 0 and "removed 2 of 3 object(s)" in out
    assert sorted(kit.list_keys(bucket)) == ["keep/d-111/a.npy", "runs/d-222/a.npy"]

    code, out, _ = cli("gc", "--json", "--older-than", "0s", prefix)
    assert code == 0 and [o["uri"] for o in json.loads(out)["objects"]] == [kit.uri(bucket, "runs/d-222/a.npy")]
    assert kit.list_keys(bucket) == ["keep/d-111/a.npy"]


@pytest.fixture(autouse=True)
def _script_installed():
    if not SCRIPT.exists():
        pytest.fail(f"{SCRIPT} is missing: run `make install` (pip install -e .)")


def test_gc_removes_what_a_real_dispatch_left(covalent_server, kit, bucket):
    """Two dispatches of a lattice store per-dispatch intermediates; gc by one id
    removes exactly that dispatch's objects and keeps the other's."""
    import covalent as ct

    import covalent_lot as lot

    features = lot.handoff(kit.uri(bucket, "runs/{dispatch_id}/features.bin"))
    shards = lot.handoff(kit.uri(bucket, "runs/{dispatch_id}/shards/"))

    @ct.electron(files=[features.upload(), shards.upload()])
    def produce(files=[]):
        features.save(os.urandom(3 * MiB))
        for i in range(2):
            with open(os.path.join(shards.path, f"part-{i}.bin"), "wb") as f:
                f.write(os.urandom(MiB))

    @ct.lattice
    def pipeline():
        return produce()

    ids = [ct.dispatch(pipeline)() for _ in range(2)]
    for dispatch_id in ids:
        assert str(ct.get_result(dispatch_id, wait=True).status) == "COMPLETED"
    assert len(kit.list_keys(bucket, "runs/")) >= 6  # 3 objects per dispatch (SFTP: + sidecars)

    code, out, _ = cli("gc", "--dispatch", ids[0], kit.uri(bucket, "runs/"))
    assert code == 0 and "removed 3 of 6 object(s), 5.0 MiB" in out
    left = kit.list_keys(bucket, "runs/")
    assert left and all(key.startswith(f"runs/{ids[1]}/") for key in left)
