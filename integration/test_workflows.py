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

# Workers cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 1024 * 1024
TIMEOUT = 600


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture
def lot_env(covalent_server, s3_server, monkeypatch):
    # The client resolves options (covalent.conf/env) when it builds transfers.
    monkeypatch.setenv("COVALENT_LOT_S3_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("COVALENT_LOT_S3_REGION_NAME", "us-east-1")
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


def test_seed_scenario_256_mib(lot_env, bucket, s3_client):
    import numpy as np

    h = covalent_lot.handoff(f"s3://{bucket}/runs/{{dispatch_id}}/features.npy")

    @ct.electron(files=[h.upload()])
    def produce(n: int, files=[]):
        array = np.random.default_rng(7).random(n)
        np.save(h.path, array)
        return {"sha256": file_sha256(h.path), "sum": float(array.sum()), "path": h.path}

    @ct.electron(files=[h.download()])
    def consume(produced, files=[]):
        return {"sha256": file_sha256(h.path), "sum": float(np.load(h.path).sum()), "files": files}

    @ct.lattice
    def seed(n: int):
        produced = produce(n)
        return {"produced": produced, "consumed": consume(produced)}

    dispatch_id, result = run(seed, 256 * MiB // 8)
    assert str(result.status) == "COMPLETED", (result.error, node_stderr(result, 0), node_stderr(result, 2))
    out = result.result
    assert out["consumed"]["sha256"] == out["produced"]["sha256"]
    assert out["consumed"]["sum"] == out["produced"]["sum"]
    key = f"runs/{dispatch_id}/features.npy"
    head = s3_client.head_object(Bucket=bucket, Key=key)
    assert head["Metadata"]["lot-sha256"] == out["produced"]["sha256"]
    assert head["ContentLength"] > 256 * MiB
    ((remote, local),) = out["consumed"]["files"]
    assert remote == f"s3://{bucket}/{key}" and dispatch_id in local


def test_folder_handoff(lot_env, bucket):
    h = covalent_lot.handoff(f"s3://{bucket}/runs/{{dispatch_id}}/shards/")

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


def test_producer_that_raises_uploads_nothing(lot_env, bucket, s3_client):
    h = covalent_lot.handoff(f"s3://{bucket}/runs/{{dispatch_id}}/never.npy")

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
    assert s3_client.list_objects_v2(Bucket=bucket, Prefix=f"runs/{dispatch_id}/").get("KeyCount", 0) == 0


def test_tampered_object_fails_consumer_and_leaves_no_file(lot_env, bucket, s3_client, tmp_path):
    key = f"tamper/{uuid.uuid4().hex}.bin"
    h = covalent_lot.handoff(f"s3://{bucket}/{key}", local_path=str(tmp_path / "prod" / "x.bin"))
    consumer_path = tmp_path / "cons" / "x.bin"
    d = covalent_lot.download(f"s3://{bucket}/{key}", str(consumer_path))

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
    head = s3_client.head_object(Bucket=bucket, Key=key)
    s3_client.put_object(Bucket=bucket, Key=key, Body=os.urandom(2 * MiB), Metadata=head["Metadata"])

    _, result = run(consumer_only)
    assert str(result.status) == "FAILED"
    assert "checksum mismatch" in node_stderr(result, 0)
    assert not consumer_path.exists()
    assert not consumer_path.parent.exists() or os.listdir(consumer_path.parent) == []


def test_three_concurrent_dispatches_do_not_collide(lot_env, bucket, s3_client):
    h = covalent_lot.handoff(f"s3://{bucket}/runs/{{dispatch_id}}/blob.bin")

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
        head = s3_client.head_object(Bucket=bucket, Key=f"runs/{dispatch_id}/blob.bin")
        assert head["Metadata"]["lot-sha256"] == result.result["expected"]
    assert len({r.result["expected"] for r in results}) == 3


def test_local_executor_resolves_dispatch_keys(lot_env, bucket, s3_client):
    """Covalent's `local` executor sets the execution context too."""
    h = covalent_lot.handoff(f"s3://{bucket}/runs/{{dispatch_id}}/{{node_id}}-out.bin")

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
    assert result.result == f"s3://{bucket}/runs/{dispatch_id}/0-out.bin"
    body = s3_client.get_object(Bucket=bucket, Key=f"runs/{dispatch_id}/0-out.bin")["Body"].read()
    assert body == b"local executor"


def test_registered_scheme_builds_strategy_from_covalent_conf(covalent_server, s3_server, bucket, s3_client, tmp_path):
    """Covalent's own FileTransfer("s3://...") guesses our strategy and builds it
    with no arguments, from covalent.conf alone."""
    from covalent._file_transfer import file_transfer
    from covalent._shared_files import config

    from covalent_lot.strategies.s3 import S3Strategy

    builtin = (file_transfer._uploaders["s3"], file_transfer._downloaders["s3"])
    config.update_config({"lot": {"s3": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"}}})
    try:
        covalent_lot.register("s3")
        local = str(tmp_path / "registered" / "out.bin")
        transfer = ct.fs.TransferToRemote(f"s3://{bucket}/registered/out.bin", local)
        assert isinstance(transfer.strategy, S3Strategy)
        assert transfer.strategy.settings.sources["endpoint_url"] == "covalent.conf [lot.s3]"

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
        head = s3_client.head_object(Bucket=bucket, Key="registered/out.bin")
        assert head["Metadata"]["lot-sha256"] == hashlib.sha256(b"guessed strategy").hexdigest()
    finally:
        file_transfer._uploaders["s3"], file_transfer._downloaders["s3"] = builtin
        config.get_config("lot").pop("s3", None)
        config._config_manager.write_config()
