"""Smoke tests for the external Dask cluster harness (``_dask_cluster.py``).

Electrons sent with ``DaskExecutor(scheduler_address=cluster.address)`` run on
the workers of a :class:`DaskCluster` (each worker its own "machine": HOME,
covalent config, COVALENT_LOT_STAGING_DIR), through the session server
(managed path: ``get_context()`` set) and through a second, legacy server
(``COVALENT_USE_OLD_DASK=1``: context empty, ``workdir`` honoured).
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

import covalent as ct

from integration import _dask_cluster as _dc

# Workers cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 180.0
TIMINGS: dict[str, float] = {}


def _timed(name: str, seconds: float) -> None:
    TIMINGS[name] = round(seconds, 2)


@pytest.fixture(scope="module", autouse=True)
def _report_timings(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not TIMINGS:
        return
    with capture.global_and_fixture_disabled():  # what capsys.disabled() does
        reporter.write_line("")
        reporter.write_line("dask smoke timings (s): " + ", ".join(f"{k}={v}" for k, v in TIMINGS.items()))


@pytest.fixture(scope="module")
def smoke_dir(lot_session_dir) -> Path:
    path = lot_session_dir / "dask-smoke"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def cluster(dask_cluster):
    """The session's cluster (conftest.py), started once for every test file."""
    _timed("cluster2_start", dask_cluster.start_seconds)
    return dask_cluster


@pytest.fixture(scope="module")
def legacy(legacy_server):
    _timed("legacy_server_start", legacy_server.start_seconds)
    return legacy_server


# --------------------------------------------------------------------- electrons


def probe(tag: str, after=None) -> dict:
    """Where and how the electron ran (``after`` only orders electrons)."""
    from covalent.executor.utils.context import get_context

    ctx = get_context()
    return {
        "tag": tag,
        "pid": os.getpid(),
        "staging": os.environ.get("COVALENT_LOT_STAGING_DIR"),
        "home": os.environ.get("HOME"),
        "dispatch_id": ctx.dispatch_id,
        "task_id": ctx.task_id,
        "cwd": os.getcwd(),
    }


def two_probes(executor_a, executor_b=None, chained: bool = False):
    """A lattice running ``probe`` twice: independent, or b after a.

    The lattice's executor is ``executor_a`` too: the node covalent adds to
    collect the returned list (``:electron_list:``) would otherwise get the
    client's default executor ("dask" without an address), which fails on a
    server without a cluster of its own."""
    first = ct.electron(probe, executor=executor_a)
    second = ct.electron(probe, executor=executor_b or executor_a)

    @ct.lattice(executor=executor_a)
    def workflow():
        a = first("a")
        b = second("b", after=a if chained else None)
        return [a, b]

    return workflow


def run(lattice, dispatcher_addr=None, label=None):
    t0 = time.monotonic()
    result = _dc.dispatch_and_wait(lattice, dispatcher_addr=dispatcher_addr, timeout=TIMEOUT)
    if label:
        _timed(label, time.monotonic() - t0)
    assert str(result.status) == "COMPLETED", (result.status, result.error)
    return result


def electron_nodes(result) -> dict[int, str]:
    """node id -> name of the electrons named ``probe`` in the result's graph."""
    tg = result.lattice.transport_graph
    return {n: tg.get_node_value(n, "name") for n in tg._graph.nodes if tg.get_node_value(n, "name") == "probe"}


def assert_on_cluster(cluster, outputs) -> list[str]:
    """Every output came from one of the cluster's workers; their names."""
    names = []
    for out in outputs:
        worker = cluster.worker_of_pid(out["pid"])
        assert worker is not None, f"{out['tag']} ran in pid {out['pid']}, not a worker of {cluster.address}"
        assert out["staging"] == worker.staging_dir
        assert out["home"] == str(worker.workdir / "home")
        names.append(worker.name)
    return names


# -------------------------------------------------------------------------- tests


def test_cluster_workers_are_separate_machines(cluster):
    assert set(cluster.registered()) == {"w0", "w1"}
    assert cluster.address.startswith("tcp://127.0.0.1:")
    pids = [w.pid for w in cluster.workers]
    assert len(set(pids)) == 2
    assert len(set(cluster.staging_dirs)) == 2
    for worker in cluster.workers:
        assert worker.staging_dir.startswith(str(worker.workdir))
        assert worker.env["COVALENT_CONFIG_DIR"].startswith(str(worker.workdir))


def test_managed_path_runs_on_external_cluster(covalent_server, cluster):
    _timed("session_server_start", covalent_server.start_seconds or 0.0)
    executor = ct.executor.DaskExecutor(scheduler_address=cluster.address)
    result = run(two_probes(executor), label="dispatch_managed")
    outputs = result.result
    names = assert_on_cluster(cluster, outputs)
    nodes = electron_nodes(result)
    for out, name in zip(outputs, names):
        # Managed path: run_task_group_alt sets the context, and leaves the cwd alone
        # (the worker process's own: its workdir here).
        assert out["dispatch_id"] == result.dispatch_id
        assert out["task_id"] in nodes
        assert out["cwd"] == str(cluster.workers[int(name[1:])].workdir)
    assert outputs[0]["task_id"] != outputs[1]["task_id"]
    # Deserializing the task imported covalent there: its config went to the
    # worker's own dir, not to the session's.
    for name in set(names):
        assert (cluster.workers[int(name[1:])].workdir / "covalent" / "config" / "covalent.conf").is_file()
    print(f"managed: two independent electrons ran on {names}")


def test_legacy_server_keeps_its_own_config(covalent_server, legacy):
    import tomllib

    assert legacy.config_file != covalent_server.config_file
    assert legacy.port != covalent_server.port
    with open(covalent_server.config_file, "rb") as f:
        assert tomllib.load(f)["dispatcher"]["port"] == covalent_server.port
    with open(legacy.config_file, "rb") as f:
        assert tomllib.load(f)["dispatcher"]["port"] == legacy.port


def test_legacy_path_runs_on_external_cluster(legacy, cluster):
    executor = ct.executor.DaskExecutor(scheduler_address=cluster.address)
    result = run(two_probes(executor), dispatcher_addr=legacy.url, label="dispatch_legacy")
    outputs = result.result
    names = assert_on_cluster(cluster, outputs)
    for out in outputs:
        assert out["dispatch_id"] is None and out["task_id"] is None
    print(f"legacy: two independent electrons ran on {names}")


def test_legacy_path_unique_workdir(legacy, cluster, smoke_dir):
    workdir = smoke_dir / "legacy-workdir"
    executor = ct.executor.DaskExecutor(
        scheduler_address=cluster.address, create_unique_workdir=True, workdir=str(workdir)
    )
    result = run(two_probes(executor, chained=True), dispatcher_addr=legacy.url)
    nodes = electron_nodes(result)
    for out in result.result:
        match = re.fullmatch(re.escape(f"{workdir}/{result.dispatch_id}/node_") + r"(\d+)", out["cwd"])
        assert match, out["cwd"]
        assert int(match.group(1)) in nodes
    assert_on_cluster(cluster, result.result)


def test_managed_path_ignores_workdir(covalent_server, cluster, smoke_dir):
    workdir = smoke_dir / "managed-workdir"
    executor = ct.executor.DaskExecutor(
        scheduler_address=cluster.address, create_unique_workdir=True, workdir=str(workdir)
    )
    result = run(two_probes(executor))
    names = assert_on_cluster(cluster, result.result)
    for out, name in zip(result.result, names):
        assert out["cwd"] == str(cluster.workers[int(name[1:])].workdir)
    assert not workdir.exists()


def test_one_cluster_per_machine_pins_electrons(covalent_server, legacy, smoke_dir):
    """Two single-worker clusters: the producer on A and the consumer on B, always."""
    t0 = time.monotonic()
    a = _dc.DaskCluster(smoke_dir / "machine-a", workers=1)
    b = _dc.DaskCluster(smoke_dir / "machine-b", workers=1)
    try:
        a.start()
        _timed("cluster1_start", a.start_seconds)
        b.start()
        _timed("two_cluster1_start", time.monotonic() - t0)
        ex_a = ct.executor.DaskExecutor(scheduler_address=a.address)
        ex_b = ct.executor.DaskExecutor(scheduler_address=b.address)
        for addr in (None, legacy.url):
            result = run(two_probes(ex_a, ex_b, chained=True), dispatcher_addr=addr)
            out_a, out_b = result.result
            assert a.worker_of_pid(out_a["pid"]) is a.workers[0]
            assert b.worker_of_pid(out_b["pid"]) is b.workers[0]
            assert out_a["staging"] != out_b["staging"]
    finally:
        a.stop()
        b.stop()


def test_placement_on_shared_cluster_is_the_schedulers_choice(covalent_server, cluster):
    """Not an assertion about placement: records where dask puts electrons when
    nothing pins them (chained and independent), for the report."""
    executor = ct.executor.DaskExecutor(scheduler_address=cluster.address)
    seen = {"chained": [], "independent": []}
    for _ in range(3):
        for kind, chained in (("chained", True), ("independent", False)):
            result = run(two_probes(executor, chained=chained))
            seen[kind].append("".join(n[1:] for n in assert_on_cluster(cluster, result.result)))
    print(f"placement on w0/w1 over 3 runs: {seen}")
