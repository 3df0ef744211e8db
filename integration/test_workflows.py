"""The seed scenario and friends, through a real `covalent start` server."""

from __future__ import annotations

import hashlib
import os
import sys
import uuid

import cloudpickle
import pytest

import covalent as ct
import covalent_lot
from covalent_lot._stream import sha256_file

from integration import _servers
from integration._kits import crc32c_of, sha256_bytes, stored_checksum

# Workers cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 1024 * 1024
TIMEOUT = 600


def file_sha256(path) -> str:
    return sha256_file(str(path))[0]


@pytest.fixture
def lot_env(covalent_server, kit):
    # The client resolves options when it builds transfers: the kit's
    # COVALENT_LOT_* variables are already in this process's environment.
    return covalent_server


def run(lattice, *args):
    dispatch_id = ct.dispatch(lattice)(*args)
    result = ct.get_result(dispatch_id, wait=True, intermediate_outputs=False)
    return dispatch_id, result


def node_stderr(result, node_id: int) -> str:
    try:
        return str(result.get_node_result(node_id).get("stderr") or "")
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return f"<no stderr: {exc}>"


def test_seed_scenario_256_mib(lot_env, kit, bucket):
    import numpy as np

    h = covalent_lot.handoff(kit.uri(bucket, "runs/{dispatch_id}/features.npy"))

    @ct.electron(files=[h.upload()])
    def produce(n: int, files=[]):
        array = np.random.default_rng(7).random(n)
        np.save(h.path, array)
        return {"sha256": file_sha256(h.path), "sum": float(array.sum()), "path": h.path}

    @ct.electron(files=[h.download()])
    def consume(produced, files=[]):
        return {"sha256": file_sha256(h.path), "sum": float(np.load(h.path).sum()), "files": files}

    # A consumer with a local path of its own really downloads (the one above,
    # on the producer's machine and path, finds the verified file already there).
    elsewhere = covalent_lot.download(
        kit.uri(bucket, "runs/{dispatch_id}/features.npy"),
        os.path.join(os.environ["COVALENT_LOT_STAGING_DIR"], "copies", "{dispatch_id}", "{node_id}", "f.npy"))

    @ct.electron(files=[elsewhere])
    def consume_elsewhere(produced, files=[]):
        return {"sha256": file_sha256(files[0][1])}

    @ct.lattice
    def seed(n: int):
        produced = produce(n)
        return {"produced": produced, "consumed": consume(produced), "copied": consume_elsewhere(produced)}

    dispatch_id, result = run(seed, 256 * MiB // 8)
    assert str(result.status) == "COMPLETED", (result.error, node_stderr(result, 0), node_stderr(result, 2))
    out = result.result
    assert out["consumed"]["sha256"] == out["produced"]["sha256"] == out["copied"]["sha256"]
    assert out["consumed"]["sum"] == out["produced"]["sum"]
    logs = "".join(node_stderr(result, i) for i in range(8))
    if _servers.xattrs_work(os.environ["COVALENT_LOT_STAGING_DIR"]):
        assert "1 already here" in logs, logs
    assert logs.count("1/1 crc32c verified") >= 1  # the real download
    key = f"runs/{dispatch_id}/features.npy"
    assert stored_checksum(kit, bucket, key) == crc32c_of(kit.get_bytes(bucket, key))
    ((remote, local),) = out["consumed"]["files"]
    assert remote == kit.uri(bucket, key) and dispatch_id in local


def test_folder_handoff(lot_env, kit, bucket):
    h = covalent_lot.handoff(kit.uri(bucket, "runs/{dispatch_id}/shards/"))

    @ct.electron(files=[h.upload()])
    def produce(files=[]):
        os.makedirs(os.path.join(h.path, "nested", "deeper"), exist_ok=True)
        expected = {}
        for rel in ("a.bin", "nested/b.bin", "nested/deeper/c.bin", "nested/empty"):
            data = os.urandom(1000) if not rel.endswith("empty") else b""
            with open(os.path.join(h.path, rel), "wb") as f:
                f.write(data)
            expected[rel] = hashlib.sha256(data).hexdigest()
        return expected

    @ct.electron(files=[h.download()])
    def consume(expected, files=[]):
        got = {}
        for rel in expected:
            with open(os.path.join(h.path, rel), "rb") as f:
                got[rel] = hashlib.sha256(f.read()).hexdigest()
        return got == expected

    @ct.lattice
    def flow():
        return consume(produce())

    _, result = run(flow)
    assert str(result.status) == "COMPLETED", node_stderr(result, 1)
    assert result.result is True


def test_producer_that_raises_uploads_nothing(lot_env, kit, bucket):
    h = covalent_lot.handoff(kit.uri(bucket, "runs/{dispatch_id}/never.npy"))

    @ct.electron(files=[h.upload()])
    def produce(files=[]):
        with open(h.path, "wb") as f:
            f.write(b"half-baked")
        raise RuntimeError("producer failed on purpose")

    @ct.lattice
    def flow():
        return produce()

    dispatch_id, result = run(flow)
    assert str(result.status) == "FAILED"
    assert kit.list_keys(bucket, f"runs/{dispatch_id}/") == []


def test_tampered_object_fails_consumer_and_leaves_no_file(lot_env, kit, bucket, tmp_path):
    key = f"tamper/{uuid.uuid4().hex}.bin"
    h = covalent_lot.handoff(kit.uri(bucket, key), local_path=str(tmp_path / "prod" / "x.bin"))
    consumer_path = tmp_path / "cons" / "x.bin"
    d = covalent_lot.download(kit.uri(bucket, key), str(consumer_path))

    @ct.electron(files=[h.upload()])
    def produce(files=[]):
        with open(h.path, "wb") as f:
            f.write(os.urandom(2 * MiB))
        return True

    @ct.electron(files=[d])
    def consume(files=[]):
        return os.path.getsize(files[0][1])

    @ct.lattice
    def producer_only():
        return produce()

    @ct.lattice
    def consumer_only():
        return consume()

    _, result = run(producer_only)
    assert str(result.status) == "COMPLETED", node_stderr(result, 0)
    kit.put_bytes(bucket, key, os.urandom(2 * MiB), kit.get_metadata(bucket, key))

    _, result = run(consumer_only)
    assert str(result.status) == "FAILED"
    assert "checksum mismatch" in node_stderr(result, 0)
    assert not consumer_path.exists()
    assert not consumer_path.parent.exists() or os.listdir(consumer_path.parent) == []


def test_three_concurrent_dispatches_do_not_collide(lot_env, kit, bucket):
    h = covalent_lot.handoff(kit.uri(bucket, "runs/{dispatch_id}/blob.bin"))

    @ct.electron(files=[h.upload()])
    def produce(files=[]):
        data = os.urandom(8 * MiB)
        with open(h.path, "wb") as f:
            f.write(data)
        return hashlib.sha256(data).hexdigest()

    @ct.electron(files=[h.download()])
    def consume(expected, files=[]):
        return {"expected": expected, "got": file_sha256(h.path), "local": h.path}

    @ct.lattice
    def flow():
        return consume(produce())

    ids = [ct.dispatch(flow)() for _ in range(3)]
    results = [ct.get_result(i, wait=True, intermediate_outputs=False) for i in ids]
    for dispatch_id, result in zip(ids, results):
        assert str(result.status) == "COMPLETED", node_stderr(result, 1)
        assert result.result["got"] == result.result["expected"]
        assert dispatch_id in result.result["local"]
        stored = kit.get_bytes(bucket, f"runs/{dispatch_id}/blob.bin")
        assert sha256_bytes(stored) == result.result["expected"]
        assert stored_checksum(kit, bucket, f"runs/{dispatch_id}/blob.bin") == crc32c_of(stored)
    assert len({r.result["expected"] for r in results}) == 3


def test_local_executor_resolves_dispatch_keys(lot_env, kit, bucket):
    """Covalent's `local` executor sets the execution context too."""
    h = covalent_lot.handoff(kit.uri(bucket, "runs/{dispatch_id}/{node_id}-out.bin"))

    @ct.electron(executor="local", files=[h.upload()])
    def produce(files=[]):
        with open(h.path, "wb") as f:
            f.write(b"local executor")
        return files[0][1]

    @ct.lattice
    def flow():
        return produce()

    dispatch_id, result = run(flow)
    assert str(result.status) == "COMPLETED", node_stderr(result, 0)
    assert result.result == kit.uri(bucket, f"runs/{dispatch_id}/0-out.bin")
    assert kit.get_bytes(bucket, f"runs/{dispatch_id}/0-out.bin") == b"local executor"


def test_registered_scheme_builds_strategy_from_covalent_conf(covalent_server, kit, bucket, tmp_path, monkeypatch):
    """Covalent's own FileTransfer("<scheme>://...") guesses our strategy and
    builds it with no arguments, from covalent.conf alone."""
    from covalent._file_transfer import file_transfer
    from covalent._shared_files import config

    scheme = kit.scheme
    builtin = (file_transfer._uploaders.get(scheme), file_transfer._downloaders.get(scheme))
    # Move the kit's COVALENT_LOT_<NAME>_* options from the environment into covalent.conf.
    prefix = f"COVALENT_LOT_{kit.name.upper()}_"
    conf = {k[len(prefix):].lower(): v for k, v in kit.env.items() if k.startswith(prefix) and v is not None}
    for key in conf:
        monkeypatch.delenv(prefix + key.upper(), raising=False)
    config.update_config({"lot": {kit.name: conf}})
    try:
        covalent_lot.register(scheme)
        local = str(tmp_path / "registered" / "out.bin")
        transfer = ct.fs.TransferToRemote(kit.uri(bucket, "registered/out.bin"), local)
        assert type(transfer.strategy) is type(kit.strategy())
        for key in conf:
            assert transfer.strategy.settings.sources[key] == f"covalent.conf [lot.{kit.name}]"

        @ct.electron(files=[transfer])
        def produce(files=[]):
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(local, "wb") as f:
                f.write(b"guessed strategy")
            return True

        @ct.lattice
        def flow():
            return produce()

        _, result = run(flow)
        assert str(result.status) == "COMPLETED", node_stderr(result, 0)
        assert stored_checksum(kit, bucket, "registered/out.bin") == crc32c_of(b"guessed strategy")
    finally:
        for table, original in zip((file_transfer._uploaders, file_transfer._downloaders), builtin):
            if original is None:
                table.pop(scheme, None)
            else:
                table[scheme] = original
        config.get_config("lot").pop(kit.name, None)
        config._config_manager.write_config()
