"""Handoffs through covalent-slurm-plugin: a job on a real (one-node) Slurm cluster.

The dispatcher's side is this machine: the session's `covalent start` and its
local executor. The other side is the second host (``host2``, see _host2.py),
which is a Slurm login and compute node at once: munged, slurmctld and slurmd
run inside its mount namespace (see _slurm.py), so the plugin's ``sbatch`` over
SSH needs no setting there and the job sees the host's private /tmp, HOME,
covalent.conf and venv. Covalent runs the plugin on its legacy path
(``wrapper_fn``: no ``ct.get_context()``), so ``{dispatch_id}`` is found from
the plugin's script name (``script-<dispatch_id>-<node_id>.py``).

Needs ``apt-get install -y --no-install-recommends slurm-wlm munge`` and
``pip install covalent-slurm-plugin==0.18.0``: without them the module is
skipped, unless CI is set (then it fails). Each Slurm electron costs at least
the plugin's poll period (5 s, its minimum).

Run alone: LOT_BACKENDS=s3 .venv/bin/python -m pytest integration/test_slurm.py -q -p no:cacheprovider
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

import cloudpickle
import pytest

import covalent as ct
import covalent_lot as lot

# The server and the second host cannot import this test module: ship its
# functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

from integration import _remote, _slurm

MiB = 1024 * 1024

MISSING = _slurm.missing_programs()
if importlib.util.find_spec("covalent_slurm_plugin") is None:
    MISSING.append("covalent_slurm_plugin (pip install covalent-slurm-plugin==0.18.0)")
if MISSING and not os.environ.get("CI"):
    pytest.skip(f"Slurm not tested: {', '.join(MISSING)} not installed ({_slurm.INSTALL_HINT}; "
                f".ci/run shows how)", allow_module_level=True)

wait, completed, node_seconds = _remote.wait, _remote.completed, _remote.node_seconds
digest, where, on_host2, stored = _remote.digest, _remote.where, _remote.on_host2, _remote.stored


@pytest.fixture(scope="module")
def slurm(host2, lot_session_dir, lot_report):
    """munged + slurmctld + slurmd inside the second host's mount namespace."""
    if MISSING:  # only with CI set: a missing piece fails there
        raise RuntimeError(f"Slurm tests need {', '.join(MISSING)} ({_slurm.INSTALL_HINT})")
    from covalent._shared_files import config as ct_config

    # Covalent rebuilds the executor in this process (get_result) as SlurmExecutor()
    # + attributes, and that constructor creates the configured cache_dir, which
    # defaults to the real ~/.config/...: point it into the session dir.
    before = ct_config.get_config("executors.slurm.cache_dir")
    ct_config.set_config("executors.slurm.cache_dir", str(lot_session_dir / "slurm-cache"))
    cluster = _slurm.SlurmCluster(host=host2)
    try:
        cluster.start()
        lot_report(f"slurm: {cluster!r}; daemons up in {cluster.start_seconds:.2f}s")
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            ct_config.set_config("executors.slurm.cache_dir", before)


@pytest.fixture
def slurm_executor(slurm):
    return slurm.executor()


def test_seed_scenario_on_slurm(kit, bucket, host2, slurm, slurm_executor, lot_report):
    """Producer on the dispatcher's machine (local executor), consumer in a Slurm
    job on the second host: it downloads, verifies, and finds the dispatch id."""
    import numpy as np

    t0 = time.monotonic()
    h = lot.handoff(kit.uri(bucket, "slurm/{dispatch_id}/x.npy"))

    @ct.electron(files=[h.upload()])
    def produce(files=[]):
        array = np.random.default_rng(7).random(MiB // 8 * 6)  # 6 MiB
        np.save(h.path, array)
        return {**where(), "sha256": digest(h.path), "sum": float(array.sum()), "path": h.path}

    @ct.electron(executor=slurm_executor, files=[h.download()])
    def consume(produced, files=[]):
        from covalent_lot._covalent import run_identity

        array = np.load(h.path)
        return {**where(), "sha256": digest(h.path), "sum": float(array.sum()), "path": h.path,
                "identity": run_identity(), "argv0": os.path.basename(sys.argv[0]),
                "job_id": os.environ.get("SLURM_JOB_ID"), "job_name": os.environ.get("SLURM_JOB_NAME")}

    @ct.lattice
    def seed():
        produced = produce()
        return {"p": produced, "c": consume(produced)}

    dispatch_id = ct.dispatch(seed)()
    result = wait(dispatch_id)
    out = completed(result)
    produced, consumed = out["p"], out["c"]

    assert consumed["sha256"] == produced["sha256"] and consumed["sum"] == produced["sum"]
    assert on_host2(host2, consumed) and not on_host2(host2, produced)

    # The dispatch id, found in the job from the plugin's script name.
    ids, how = consumed["identity"]
    node_id = ids["node_id"]
    assert ids["dispatch_id"] == dispatch_id and how == "covalent-slurm-plugin script", consumed
    assert consumed["argv0"] == f"script-{dispatch_id}-{node_id}.py"
    assert consumed["job_name"] == f"covalent-{node_id}-{dispatch_id}"
    assert consumed["cwd"] == f"{host2.tmp}/covalent-slurm/{dispatch_id}/node_{node_id}"
    if host2.mode == "mount-namespace":  # the job ran in the host's private /tmp
        assert host2.path_on_dispatcher(consumed["cwd"]) is None

    # Each side's local copy in its own staging dir, under the dispatch id.
    assert consumed["path"].startswith(f"{host2.staging_dir}/{dispatch_id}/"), consumed["path"]
    assert not produced["path"].startswith(host2.staging_dir + "/")
    assert stored(kit, bucket, "slurm/") == [f"slurm/{dispatch_id}/x.npy"]

    # Slurm ran it: the job is known to the controller, finished, on this node.
    job = slurm.run(["scontrol", "show", "job", consumed["job_id"]], check=True).stdout
    assert "JobState=COMPLETED" in job and f"NodeList={slurm.nodename}" in job, job
    assert slurm.job_ids() == []

    run_time = next(f for f in job.split() if f.startswith("RunTime=")).split("=", 1)[1]
    on_slurm = node_seconds(result, "consume")
    lot_report(f"slurm {kit.name}: consumer electron {on_slurm:.1f}s on Slurm (job RunTime {run_time}, "
               f"poll_freq 5 s), "
               f"producer {node_seconds(result, 'produce'):.1f}s local, "
               f"test {time.monotonic() - t0:.1f}s; dispatch id from {how}")
