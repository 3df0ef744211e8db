"""Handoffs across hosts, through Covalent's remote executor path.

The dispatcher's side is this machine: the session's `covalent start` and its
local executor. The other side is a second host (``host2``, see _host2.py): an
sshd in its own mount namespace with a private /tmp, its own HOME, venv
(covalent-lot installed from this checkout, not editable), covalent.conf and
credentials, reached through the real covalent-ssh-plugin ``SSHExecutor``.
Nothing is shared between the two sides but the storage servers. Covalent runs
the plugin on its legacy path (``wrapper_fn``: no ``ct.get_context()``), so
every ``{dispatch_id}`` here is found from the plugin's script name.

Every scenario runs once per backend. Objects are small (a few MiB): the
256 MiB timings are in bench/remote.py.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

import covalent as ct
import covalent_lot as lot

# The server and the second host cannot import this test module: ship its
# functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

from integration import _dask_cluster as _dask
from integration import _remote, _servers

MiB = 1024 * 1024
TIMEOUT = _remote.TIMEOUT
wait, run, explain, completed = _remote.wait, _remote.run, _remote.explain, _remote.completed
digest, blob, where, on_host2, stored = (
    _remote.digest, _remote.blob, _remote.where, _remote.on_host2, _remote.stored)


@pytest.fixture
def ssh(host2, kit):
    return host2.executor()


def test_seed_scenario_both_ways(kit, bucket, host2, ssh):
    """Producer on the dispatcher's machine, consumer on the second host; and the
    reverse, in the same dispatch. Each consumer downloads and verifies."""
    import numpy as np

    there = lot.handoff(kit.uri(bucket, "runs/{dispatch_id}/there.npy"))
    back = lot.handoff(kit.uri(bucket, "runs/{dispatch_id}/back.npy"))

    def produce(h, seed):
        array = np.random.default_rng(seed).random(MiB // 8 * 6)  # 6 MiB
        np.save(h.path, array)
        return {**where(), "sha256": digest(h.path), "sum": float(array.sum()), "path": h.path}

    def consume(h, produced):
        array = np.load(h.path)
        return {**where(), "sha256": digest(h.path), "sum": float(array.sum()), "path": h.path}

    produce_here = ct.electron(lambda files=[]: produce(there, 1), files=[there.upload()])
    consume_there = ct.electron(lambda p, files=[]: consume(there, p), executor=ssh, files=[there.download()])
    produce_there = ct.electron(lambda files=[]: produce(back, 2), executor=ssh, files=[back.upload()])
    consume_here = ct.electron(lambda p, files=[]: consume(back, p), files=[back.download()])

    @ct.lattice
    def seed():
        a, b = produce_here(), produce_there()
        return {"a": a, "a2": consume_there(a), "b": b, "b2": consume_here(b)}

    dispatch_id, result = run(seed)
    out = completed(result)
    for produced, consumed in ((out["a"], out["a2"]), (out["b"], out["b2"])):
        assert consumed["sha256"] == produced["sha256"] and consumed["sum"] == produced["sum"]
    assert on_host2(host2, out["a2"]) and on_host2(host2, out["b"])
    assert not on_host2(host2, out["a"]) and not on_host2(host2, out["b2"])
    # Each side's local copy is in its own staging dir, under the dispatch id.
    assert out["a2"]["path"].startswith(f"{host2.staging_dir}/{dispatch_id}/")
    assert out["b2"]["path"].startswith(os.path.join(os.environ["COVALENT_LOT_STAGING_DIR"], dispatch_id))
    assert host2.run(["test", "-f", out["a2"]["path"]]).returncode == 0
    if host2.mode == "mount-namespace":  # the host's /tmp is its own
        assert not os.path.exists(out["a2"]["path"]) and not os.path.exists(out["b"]["path"])
    assert stored(kit, bucket, "runs/") == [f"runs/{dispatch_id}/back.npy", f"runs/{dispatch_id}/there.npy"]


def test_fan_out_to_two_hosts(kit, bucket, host2, ssh):
    """One producer, consumers on its own machine (reuses the verified local file)
    and on the second host (downloads); both verified."""
    h = lot.handoff(kit.uri(bucket, "fan/{dispatch_id}/data.bin"))

    @ct.electron(files=[h.upload()])
    def produce(files=[]):
        with open(h.path, "wb") as f:
            f.write(blob(3, 5 * MiB))
        return {**where(), "sha256": digest(h.path), "inode": os.stat(h.path).st_ino}

    @ct.electron(files=[h.download()])
    def consume_here(produced, files=[]):
        return {**where(), "sha256": digest(h.path), "inode": os.stat(h.path).st_ino}

    @ct.electron(executor=ssh, files=[h.download()])
    def consume_there(produced, files=[]):
        return {**where(), "sha256": digest(h.path), "inode": os.stat(h.path).st_ino, "path": h.path}

    @ct.lattice
    def fan_out():
        produced = produce()
        return {"p": produced, "here": consume_here(produced), "there": consume_there(produced)}

    _, result = run(fan_out)
    out = completed(result)
    expected = hashlib.sha256(blob(3, 5 * MiB)).hexdigest()
    assert out["p"]["sha256"] == out["here"]["sha256"] == out["there"]["sha256"] == expected
    assert on_host2(host2, out["there"]) and not on_host2(host2, out["here"])
    if _servers.xattrs_work(os.environ["COVALENT_LOT_STAGING_DIR"]):
        # No download on the producer's machine: the same file, not a new one renamed in.
        assert out["here"]["inode"] == out["p"]["inode"]
    assert out["there"]["path"].startswith(host2.staging_dir + "/")


def test_concurrent_dispatches_on_the_ssh_executor(kit, bucket, host2, ssh):
    """Three dispatches at once, producer and consumer on the second host: three
    keys, each consumer reads its own dispatch's bytes."""
    h = lot.handoff(kit.uri(bucket, "many/{dispatch_id}/blob.bin"))

    @ct.electron(executor=ssh, files=[h.upload()])
    def produce(seed, files=[]):
        with open(h.path, "wb") as f:
            f.write(blob(seed, 2 * MiB + seed))
        return digest(h.path)

    @ct.electron(executor=ssh, files=[h.download()])
    def consume(produced, files=[]):
        return {"sha256": digest(h.path), "path": h.path}

    @ct.lattice
    def pipeline(seed):
        return consume(produce(seed))

    ids = {seed: ct.dispatch(pipeline)(seed) for seed in (11, 12, 13)}
    outs = {seed: completed(wait(dispatch_id)) for seed, dispatch_id in ids.items()}
    for seed, out in outs.items():
        assert out["sha256"] == hashlib.sha256(blob(seed, 2 * MiB + seed)).hexdigest()
        assert f"/{ids[seed]}/" in out["path"]
    assert stored(kit, bucket, "many/") == sorted(f"many/{i}/blob.bin" for i in ids.values())


def test_folder_handoff_across_hosts(kit, bucket, host2, ssh):
    h = lot.handoff(kit.uri(bucket, "runs/{dispatch_id}/shards/"))
    names = ["a.bin", "b.bin", "nested/c.bin", "nested/deeper/d.bin"]

    @ct.electron(executor=ssh, files=[h.upload()])
    def produce(files=[]):
        out = {}
        for i, name in enumerate(names):
            path = os.path.join(h.path, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(blob(20 + i, MiB + i))
            out[name] = digest(path)
        return out

    @ct.electron(files=[h.download()])
    def consume(produced, files=[]):
        found = {}
        for root, _, files_here in os.walk(h.path):
            for name in files_here:
                path = os.path.join(root, name)
                found[os.path.relpath(path, h.path)] = digest(path)
        return found

    @ct.lattice
    def pipeline():
        produced = produce()
        return {"p": produced, "c": consume(produced)}

    dispatch_id, result = run(pipeline)
    out = completed(result)
    assert out["p"] == out["c"] and sorted(out["c"]) == sorted(names)
    assert stored(kit, bucket, "runs/") == sorted(f"runs/{dispatch_id}/shards/{n}" for n in names)


def test_save_load_and_delete_after_across_hosts(kit, bucket, host2, ssh):
    """h.save on the dispatcher's machine, h.load (memory-mapped) on the second
    host with delete_after: afterwards the object and the host's copy are gone."""
    import numpy as np

    h = lot.handoff(kit.uri(bucket, "objects/{dispatch_id}/matrix.npy"))

    @ct.electron(files=[h.upload()])
    def produce(files=[]):
        h.save(np.arange(MiB, dtype=np.float64).reshape(1024, -1))
        return float(np.load(h.path).sum())

    @ct.electron(executor=ssh, files=[h.download(delete_after=True)])
    def consume(expected, files=[]):
        matrix = h.load(mmap=True)
        return {"sum": float(matrix.sum()), "mmap": isinstance(matrix, np.memmap), "path": h.path,
                **where()}

    @ct.lattice
    def pipeline():
        return consume(produce())

    dispatch_id, result = run(pipeline)
    out = completed(result)
    assert out["sum"] == float(np.arange(MiB, dtype=np.float64).sum()) and out["mmap"]
    assert on_host2(host2, out)
    assert stored(kit, bucket, "objects/") == []  # removed after the consumer returned
    assert host2.run(["test", "-e", out["path"]]).returncode == 1  # and the host's copy


def test_gc_removes_one_dispatch_made_on_the_second_host(kit, bucket, host2, ssh):
    features = lot.handoff(kit.uri(bucket, "gc/{dispatch_id}/features.bin"))
    shards = lot.handoff(kit.uri(bucket, "gc/{dispatch_id}/shards/"))

    @ct.electron(executor=ssh, files=[features.upload(), shards.upload()])
    def produce(files=[]):
        features.save(os.urandom(2 * MiB))
        for i in range(2):
            with open(os.path.join(shards.path, f"part-{i}.bin"), "wb") as f:
                f.write(os.urandom(MiB))
        return where()

    @ct.lattice
    def pipeline():
        return produce()

    ids = [ct.dispatch(pipeline)() for _ in range(2)]
    for dispatch_id in ids:
        assert on_host2(host2, completed(wait(dispatch_id)))
    assert len(stored(kit, bucket, "gc/")) == 6

    cli = Path(sys.executable).with_name("covalent-lot")
    done = subprocess.run([str(cli), "gc", "--dispatch", ids[0], kit.uri(bucket, "gc/")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "removed 3 of 6 object(s), 4.0 MiB" in done.stdout, done.stdout
    assert stored(kit, bucket, "gc/") == sorted(
        f"gc/{ids[1]}/{name}" for name in ("features.bin", "shards/part-0.bin", "shards/part-1.bin"))


# --- the executor's own view ------------------------------------------------------------

# An option per backend whose value decides whether a transfer can work at all.
DECISIVE = {"s3": "endpoint_url", "gcs": "endpoint", "azure": "account_url", "sftp": "known_hosts"}


@pytest.fixture
def store_on_both_sides(kit, host2, tmp_path):
    """A named store ``lot-exec`` in both covalent.confs: the dispatcher's copy has a
    dead value for the backend's decisive option, the second host's the real one."""
    import copy

    from covalent._shared_files import config

    section, option = kit.name, DECISIVE[kit.name]
    real = kit.env[f"COVALENT_LOT_{section.upper()}_{option.upper()}"] if option != "known_hosts" \
        else kit.env["COVALENT_LOT_SFTP_KNOWN_HOSTS"]
    dead = {"known_hosts": str(tmp_path / "no-known-hosts")}.get(option, "http://127.0.0.1:9/dead")
    if option == "known_hosts":
        Path(dead).write_text("")
    manager = config._config_manager
    before = copy.deepcopy(manager.config_data.get("lot"))
    lot_conf = copy.deepcopy(before) or {}
    lot_conf.setdefault(section, {}).setdefault("stores", {})["lot-exec"] = {option: dead}
    manager.config_data["lot"] = lot_conf
    manager.write_config()
    host2.add_store(section, "lot-exec", {option: real})
    # The variable would beat any store's value, on either side.
    variable = f"COVALENT_LOT_{section.upper()}_{option.upper()}"
    saved = os.environ.pop(variable, None)
    try:
        yield option, dead
    finally:
        if saved is not None:
            os.environ[variable] = saved
        if before is None:
            manager.config_data.pop("lot", None)
        else:
            manager.config_data["lot"] = before
        manager.write_config()


def test_store_and_credentials_resolve_on_the_executor(kit, bucket, host2, ssh, store_on_both_sides):
    option, dead = store_on_both_sides
    h = lot.handoff(kit.uri(bucket, "view/{dispatch_id}/x.bin"), store="lot-exec")
    assert h.strategy.settings[option] == dead  # what the dispatcher's side sees

    @ct.electron(executor=ssh, files=[h.upload()])
    def produce(files=[]):
        with open(h.path, "wb") as f:
            f.write(b"resolved on the executor")
        settings = lot.strategy_for(h.uri, store="lot-exec").settings
        secrets = [v for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if v in os.environ]
        return {**where(), "source": settings.sources[option], "value": settings[option],
                "secret_env": secrets}

    @ct.electron(executor=ssh, files=[h.download()])
    def consume(produced, files=[]):
        return open(h.path, "rb").read()

    @ct.lattice
    def pipeline():
        produced = produce()
        return {"p": produced, "c": consume(produced)}

    for hook in (*h.upload().cp(), *h.download().cp()):
        assert dead.encode() not in cloudpickle.dumps(hook)  # the dispatcher's value stays home
    dispatch_id, result = run(pipeline)
    out = completed(result)
    assert out["c"] == b"resolved on the executor"
    assert out["p"]["source"] == f"covalent.conf [lot.{kit.name}.stores.lot-exec]"
    assert out["p"]["value"] != dead and on_host2(host2, out["p"])
    assert out["p"]["secret_env"] == []  # S3 keys come from the host's ~/.aws, not the environment
    assert stored(kit, bucket, "view/") == [f"view/{dispatch_id}/x.bin"]


EXTRAS = {"s3": ("s3", "boto3"), "gcs": ("gcs", "google.cloud.storage"),
          "azure": ("azure", "azure.storage.blob"), "sftp": ("sftp", "paramiko")}


@pytest.mark.parametrize("venv", ["bare", "nosdk"])
def test_host_without_covalent_lot_or_the_sdk_says_what_to_install(kit, bucket, host2, venv):
    h = lot.handoff(kit.uri(bucket, "missing/{dispatch_id}/x.bin"))
    kit.put_bytes(bucket, "missing/fixed.bin", b"x")

    @ct.electron(executor=host2.executor(venv=venv), files=[h.upload()])
    def produce(files=[]):
        with open(h.path, "wb") as f:
            f.write(b"never uploaded")

    @ct.lattice
    def pipeline():
        return produce()

    _, result = run(pipeline)
    assert str(result.status) == "FAILED"
    error = str(result.get_node_result(0)["error"])
    extra, sdk = EXTRAS[kit.name]
    if venv == "bare":
        assert error.startswith("covalent-lot is not installed in the Python that runs this electron ("
                                f"{host2.python('bare')} on "), error
        assert f"pip install covalent-lot[{extra}] there" in error
    else:
        assert error.startswith(f"the {extra} backend of covalent-lot needs the {sdk} module: "
                                f"pip install covalent-lot[{extra}] in the Python that runs it ("
                                f"{host2.python('nosdk')} on "), error
    assert "\n" not in error.strip()
    assert stored(kit, bucket, "missing/") == ["missing/fixed.bin"]


def test_covalent_filetransfer_with_a_folder_file_and_a_strategy(kit, bucket, host2, ssh):
    """Covalent's own FileTransfer and File(uri, is_dir=True), no trailing slash,
    with a covalent-lot strategy passed as strategy= (no lot.register())."""
    strategy = lot.strategy_for(kit.uri(bucket, "plain/"))  # as Covalent builds one: no arguments
    for i in range(2):
        kit.put_bytes(bucket, f"plain/dir/part-{i}.bin", blob(40 + i, 1000))
    remote = ct.fs.File(kit.uri(bucket, "plain/dir"), is_dir=True)
    local = ct.fs.File(f"{host2.staging_dir}/plain-dir", is_dir=True)
    transfer = ct.fs.FileTransfer(remote, local, strategy=strategy)

    @ct.electron(executor=ssh, files=[transfer])
    def consume(files=[]):
        ((_, folder),) = files
        return {name: digest(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}

    @ct.lattice
    def pipeline():
        return consume()

    _, result = run(pipeline)
    out = completed(result)
    assert out == {f"part-{i}.bin": hashlib.sha256(blob(40 + i, 1000)).hexdigest() for i in range(2)}


# --- a real Dask cluster, on Covalent's managed and legacy paths --------------------------

def seed_lattice(h, executor):
    import numpy as np

    @ct.electron(executor=executor, files=[h.upload()])
    def produce(files=[]):
        array = np.random.default_rng(5).random(MiB // 8 * 4)
        np.save(h.path, array)
        return {"sha256": digest(h.path), "staging": os.environ["COVALENT_LOT_STAGING_DIR"], "path": h.path}

    @ct.electron(executor=executor, files=[h.download()])
    def consume(produced, files=[]):
        return {"sha256": digest(h.path), "staging": os.environ["COVALENT_LOT_STAGING_DIR"], "path": h.path}

    @ct.lattice(executor=executor)
    def seed():
        produced = produce()
        # Two consumers at once: with one thread per worker, the scheduler tends
        # to put them on different workers (one reuses, one downloads).
        return {"p": produced, "c": consume(produced), "c2": consume(produced)}

    return seed


def check_seed(out, dispatch_id, cluster) -> str:
    """Both consumers verified, each in its worker's own staging dir; where they ran."""
    for side in ("p", "c", "c2"):
        assert out[side]["sha256"] == out["p"]["sha256"]
        assert out[side]["staging"] in cluster.staging_dirs
        assert out[side]["path"].startswith(os.path.join(out[side]["staging"], dispatch_id) + os.sep)
    reused = sum(out[c]["staging"] == out["p"]["staging"] for c in ("c", "c2"))
    return f"{reused} consumer(s) on the producer's worker (local copy), {2 - reused} on the other (downloaded)"


def test_dask_cluster_managed_path(kit, bucket, covalent_server, dask_cluster, lot_report):
    from covalent.executor import DaskExecutor

    h = lot.handoff(kit.uri(bucket, "dask/{dispatch_id}/x.npy"))
    dispatch_id, result = run(seed_lattice(h, DaskExecutor(scheduler_address=dask_cluster.address)))
    out = completed(result)
    lot_report(f"dask managed {kit.name}: {check_seed(out, dispatch_id, dask_cluster)}")


def test_dask_cluster_legacy_path(kit, bucket, legacy_server, dask_cluster, lot_report):
    """COVALENT_USE_OLD_DASK=1: the dispatch id comes from the per-task work dir."""
    from covalent.executor import DaskExecutor

    workdir = str(dask_cluster.workers[0].workdir.parent / "legacy-workdir")
    unique = DaskExecutor(scheduler_address=dask_cluster.address, workdir=workdir, create_unique_workdir=True)
    h = lot.handoff(kit.uri(bucket, "legacy/{dispatch_id}/x.npy"))
    dispatch_id = ct.dispatch(seed_lattice(h, unique), dispatcher_addr=legacy_server.url)()
    out = completed(_dask.wait_for(dispatch_id, dispatcher_addr=legacy_server.url, timeout=TIMEOUT))
    placement = check_seed(out, dispatch_id, dask_cluster)
    assert stored(kit, bucket, "legacy/") == [f"legacy/{dispatch_id}/x.npy"]

    # Without a per-task work dir nothing tells the dispatch: the producer fails
    # before it runs, naming the option, and nothing is stored.
    plain = DaskExecutor(scheduler_address=dask_cluster.address)
    dispatch_id = ct.dispatch(seed_lattice(h, plain), dispatcher_addr=legacy_server.url)()
    result = _dask.wait_for(dispatch_id, dispatcher_addr=legacy_server.url, timeout=TIMEOUT)
    assert str(result.status) == "FAILED"
    text = explain(result)
    assert "create_unique_workdir=True" in text, text
    assert stored(kit, bucket, "legacy/") != [] and all(
        not key.startswith(f"legacy/{dispatch_id}") for key in stored(kit, bucket, "legacy/"))

    # A URI without placeholders needs no dispatch id (nor does the default local path).
    fixed = lot.handoff(kit.uri(bucket, f"fixed/{time.time_ns()}/x.npy"))
    dispatch_id = ct.dispatch(seed_lattice(fixed, plain), dispatcher_addr=legacy_server.url)()
    out = completed(_dask.wait_for(dispatch_id, dispatcher_addr=legacy_server.url, timeout=TIMEOUT))
    assert out["p"]["sha256"] == out["c"]["sha256"]
    lot_report(f"dask legacy {kit.name}: {placement}; ok with create_unique_workdir=True; "
               f"without it {{dispatch_id}} fails before the producer runs")
