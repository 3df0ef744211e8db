"""Helpers of the remote-executor scenarios (test_remote.py, test_slurm.py).

Electrons call some of these (``digest``, ``where``, ``blob``) on a second host
that cannot import this module, so cloudpickle carries it by value.
"""

from __future__ import annotations

import hashlib
import os
import sys

import cloudpickle

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 300.0  # one dispatch, start to finish
# SFTP keeps the checksum beside each file (as integration._kits.SIDECARS; this module
# is pickled by value into electrons, so it imports nothing of the test package).
SIDECARS = (".lot-crc32c", ".lot-sha256")


def is_sidecar(key: str) -> bool:
    return key.endswith(SIDECARS)


def wait(dispatch_id: str, dispatcher_addr: str | None = None):
    """The dispatch's Result once terminal (bounded)."""
    from integration import _dask_cluster  # here, not at the top: electrons never need it

    return _dask_cluster.wait_for(
        dispatch_id, dispatcher_addr=dispatcher_addr, timeout=TIMEOUT)


def run(lattice, *args):
    import covalent as ct

    dispatch_id = ct.dispatch(lattice)(*args)
    return dispatch_id, wait(dispatch_id)


def explain(result) -> str:
    """The dispatch's error and every failed node's error and stderr, for messages."""
    lines = [f"{result.status}: {result.error}"]
    for node in range(12):
        try:
            info = result.get_node_result(node)
        except Exception:  # noqa: BLE001 - past the last node
            break
        if info.get("error") or str(info.get("status")) == "FAILED":
            lines.append(f"node {node} {info.get('node_name')}: {info.get('error')} {info.get('stderr') or ''}")
    return "\n".join(lines)


def completed(result):
    assert str(result.status) == "COMPLETED", explain(result)
    return result.result


def node_seconds(result, name: str) -> float:
    """Start to end of the node called ``name``, as the server recorded it."""
    for node in range(12):
        info = result.get_node_result(node)
        if info["node_name"] == name:
            return (info["end_time"] - info["start_time"]).total_seconds()
    raise KeyError(name)


def digest(path: str) -> str:
    from covalent_lot._stream import sha256_file

    return sha256_file(path)[0]


def blob(seed: int, size: int) -> bytes:
    """``size`` bytes that depend on ``seed`` only."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


def where() -> dict:
    """What an electron reports of the machine it runs on."""
    return {"prefix": sys.prefix, "home": os.path.expanduser("~"), "pid": os.getpid(), "cwd": os.getcwd()}


def on_host2(host2, report: dict) -> bool:
    return report["prefix"].startswith(str(host2.workdir)) and report["home"] == host2.home


def stored(kit, bucket: str, prefix: str = "") -> list[str]:
    """The keys below ``prefix`` (SFTP's checksum sidecars left out)."""
    return sorted(k for k in kit.list_keys(bucket, prefix) if not is_sidecar(k))
