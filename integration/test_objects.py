"""h.save/h.load and removal after use, through a real `covalent start` server.

One lattice per backend and scenario keeps this quick: every supported type
travels in one producer and one consumer; the removal scenario has a single
delete-after consumer, a fan-out with ``cleanup``, and a failing consumer.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import cloudpickle
import pytest

import covalent as ct
import covalent_lot
from covalent_lot._handoff import cleanup

# Workers cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

HAS_PANDAS = importlib.util.find_spec("pandas") is not None
FRAME_SUFFIX = ".parquet" if importlib.util.find_spec("pyarrow") is not None else ".pkl"


def sample(name: str):
    """The object stored under ``name`` (built again in the consumer to compare)."""
    if name.startswith("array"):
        import numpy as np

        return np.random.default_rng(3).random((64, 32))
    if name == "frame":
        import pandas as pd

        return pd.DataFrame({"n": range(100), "s": [f"row {i} é" for i in range(100)]})
    return {
        "bytes": bytes(range(256)) * 40,
        "text": "héllo\r\nwörld\n" * 100,
        "json": '{"a": [1, 2, 3]}',
        "dict": {"a": [1, 2.5, None], "b": ("t", b"\x00")},
    }[name]


SUFFIXES = {"array": ".npy", "array-mmap": ".npy", "bytes": ".bin", "text": ".txt",
            "json": ".json", "dict": ".pkl", **({"frame": FRAME_SUFFIX} if HAS_PANDAS else {})}


def same(a, b) -> bool:
    if type(a).__module__.startswith("numpy"):
        import numpy as np

        return np.array_equal(a, b)
    if type(a).__name__ == "DataFrame":
        return a.equals(b)
    return a == b and type(a) is type(b)


@pytest.fixture
def lot_env(covalent_server, kit):
    return covalent_server


def run(lattice):
    dispatch_id = ct.dispatch(lattice)()
    return dispatch_id, ct.get_result(dispatch_id, wait=True, intermediate_outputs=True)


def nodes(result) -> list[dict]:
    return [result.get_node_result(n) for n in result.lattice.transport_graph._graph.nodes]


def stderr_of(result) -> str:
    return "\n".join(f"[{n['node_name']}] {n['stderr'] or ''} {n['error'] or ''}" for n in nodes(result))


def test_save_and_load_every_type(lot_env, kit, bucket):
    staging = os.environ["COVALENT_LOT_STAGING_DIR"]
    uris = {name: kit.uri(bucket, f"objects/{{dispatch_id}}/{name}{suffix}") for name, suffix in SUFFIXES.items()}
    produced = {name: covalent_lot.handoff(uri) for name, uri in uris.items()}
    # The consumer's own local paths: the bytes really come through the store.
    consumed = {name: covalent_lot.handoff(uri, os.path.join(staging, "consumer", "{dispatch_id}", name))
                for name, uri in uris.items()}

    @ct.electron(files=[h.upload() for h in produced.values()])
    def produce(files=[]):
        return {name: h.save(sample(name)) for name, h in produced.items()}

    @ct.electron(files=[h.download() for h in consumed.values()])
    def consume(paths, files=[]):
        loaded = {name: h.load(mmap=name.endswith("mmap")) for name, h in consumed.items()}
        return {name: (type(obj).__name__, same(sample(name), obj)) for name, obj in loaded.items()}

    @ct.lattice
    def flow():
        return consume(produce())

    dispatch_id, result = run(flow)
    assert str(result.status) == "COMPLETED", (result.error, stderr_of(result))
    expected_types = {"array": "ndarray", "array-mmap": "memmap", "bytes": "bytes", "text": "str",
                      "json": "str", "dict": "dict", "frame": "DataFrame"}
    assert result.result == {name: (expected_types[name], True) for name in SUFFIXES}
    stored = kit.list_keys(bucket, f"objects/{dispatch_id}/")
    assert {f"{name}{suffix}" for name, suffix in SUFFIXES.items()} <= {k.rsplit("/", 1)[-1] for k in stored}


def test_removal_after_use(lot_env, kit, bucket):
    names = ("once", "fan", "kept")
    hs = {name: covalent_lot.handoff(kit.uri(bucket, f"rm/{{dispatch_id}}/{name}.bin")) for name in names}

    @ct.electron(files=[h.upload() for h in hs.values()])
    def produce(files=[]):
        for name, h in hs.items():
            h.save(name.encode() * 1000)
        return True

    @ct.electron(files=[hs["once"].download(delete_after=True)])
    def consume_once(produced, files=[]):
        ((uri, local),) = files
        # Still stored while the consumer runs: removal comes after it.
        hs["once"].strategy.get(uri, local + ".again")
        os.unlink(local + ".again")
        return hs["once"].load()

    @ct.electron(files=[hs["fan"].download()])
    def consume_fan(produced, i, files=[]):
        return hs["fan"].load() == b"fan" * 1000

    @ct.electron(files=[hs["kept"].download(delete_after=True)])
    def consume_and_fail(produced, files=[]):
        assert hs["kept"].load() == b"kept" * 1000
        raise RuntimeError("consumer failed on purpose")

    @ct.lattice
    def flow():
        produced = produce()
        once = consume_once(produced)
        fans = [consume_fan(produced, i) for i in range(3)]
        tidy = cleanup(hs["fan"], after=fans)
        # Last, so that its failure cannot keep the others from running.
        ct.wait(consume_and_fail(produced), [once, tidy])
        return once

    dispatch_id, result = run(flow)
    assert str(result.status) == "FAILED", stderr_of(result)
    logs = stderr_of(result)
    assert "consumer failed on purpose" in logs and "could not remove" not in logs
    outputs = {}
    for node in nodes(result):
        if node["output"] is not None:  # None: the failed node
            outputs.setdefault(node["node_name"], []).append(node["output"].get_deserialized())
    assert outputs["consume_once"] == [b"once" * 1000]
    assert outputs["consume_fan"] == [True] * 3
    (removed,) = outputs["lot_cleanup"]
    assert removed[0]["objects"] == 1 and removed[0]["local"] is True

    keys = kit.list_keys(bucket, f"rm/{dispatch_id}/")
    for name in ("once", "fan"):  # with an SFTP sidecar, if any
        assert not [k for k in keys if k.startswith(f"rm/{dispatch_id}/{name}.bin")], keys
    assert f"rm/{dispatch_id}/kept.bin" in keys  # a failed consumer removes nothing
    # The default local paths, as the electrons resolved them (this machine's staging dir).
    staging = os.environ["COVALENT_LOT_STAGING_DIR"]
    local = {name: h.local_path.replace("{staging}", staging).replace("{run}", dispatch_id)
             for name, h in hs.items()}
    assert not os.path.exists(local["once"]) and not os.path.exists(local["fan"])
    assert os.path.isfile(local["kept"])
