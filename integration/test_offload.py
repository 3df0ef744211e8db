"""``@lot.offload`` and ``lot.Ref`` through a real `covalent start` server, once per backend.

Producers return values; above ``min_size`` they are stored below the kit's
bucket and replaced by a ``lot.Ref``, which Covalent passes by value; decorated
consumers receive the values again. Electrons run on the session server's Dask
workers (this machine, the session's staging dir), and in the last scenario on
the second host (``host2``, its own staging dir and covalent.conf).

Values are small (1-4 MiB) and several checks share one dispatch: 40-55 s of
tests per backend here, about 4 minutes for the file with all four backends, the
server's start and the second host's setup (shared with test_remote.py).

Run: LOT_BACKENDS=s3 python -m pytest integration/test_offload.py -q
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

# The server's workers and the second host cannot import this test module: ship
# its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

from integration import _remote, _servers

MiB = 1024 * 1024
TIMEOUT = 300.0  # one dispatch, start to finish
N = 3 * MiB // 8  # float64 elements of a 3 MiB array
SCRIPT = Path(sys.executable).with_name("covalent-lot")
SIDECARS = _remote.SIDECARS
_WANTED = [b for b in os.environ.get("LOT_BACKENDS", "").split(",") if b]


# --- helpers (some run in electrons: numpy is imported inside) ----------------------------

def array(seed: int, n: int = N):
    """Random float64 values that depend on ``seed`` only (do not compress)."""
    import numpy as np

    return np.random.default_rng(seed).random(n)


def array_producer(prefix: str, **offload_options):
    """A ``produce(seed)`` electron returning ``array(seed)``, offloaded below
    ``prefix`` from 1 MiB up with ``offload_options``."""

    @ct.electron
    @lot.offload(to=prefix, min_size="1MiB", **offload_options)
    def produce(seed):
        return array(seed)

    return produce


def ramp(n: int = N):
    """Small integers: compress well."""
    import numpy as np

    return np.arange(n, dtype=np.int64) % 251


def frame(seed: int, rows: int = 150_000):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    return pd.DataFrame({"x": rng.random(rows), "n": rng.integers(0, 2**40, rows),
                         "s": [f"row {i} é" for i in range(rows)]})


def array_sha(a) -> str:
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.fixture
def lot_env(covalent_server, kit):
    # The kit's COVALENT_LOT_* variables and credentials are in this process's
    # environment (conftest) and in the server's, where the electrons run.
    return covalent_server


def wait(dispatch_id: str):
    """The dispatch's Result once terminal (bounded), with every node's output."""
    from covalent._shared_files.util_classes import RESULT_STATUS

    deadline = time.monotonic() + TIMEOUT
    status = None
    while time.monotonic() < deadline:
        status = ct.get_result(dispatch_id, status_only=True)["status"]
        if RESULT_STATUS.is_terminal(status):
            return ct.get_result(dispatch_id, wait=False, intermediate_outputs=True)
        time.sleep(0.25)
    ct.cancel(dispatch_id)
    raise TimeoutError(f"dispatch {dispatch_id} still {status} after {TIMEOUT:.0f}s")


def run(lattice, *args):
    dispatch_id = ct.dispatch(lattice)(*args)
    return dispatch_id, wait(dispatch_id)


def nodes(result) -> list[dict]:
    """Every node's record (``node_id`` added), in node order."""
    found = []
    for node_id in sorted(result.lattice.transport_graph._graph.nodes):
        info = dict(result.get_node_result(node_id))
        info["node_id"] = node_id
        found.append(info)
    return found


def named(result, name: str) -> list[dict]:
    return [n for n in nodes(result) if n["node_name"] == name]


def output(node: dict):
    return None if node["output"] is None else node["output"].get_deserialized()


def explain(result) -> str:
    lines = [f"{result.status}: {result.error}"]
    for n in nodes(result):
        if n.get("error") or n.get("stderr"):
            lines.append(f"[{n['node_id']} {n['node_name']}] {n.get('error') or ''} {n.get('stderr') or ''}")
    return "\n".join(lines)


def completed(result):
    assert str(result.status) == "COMPLETED", explain(result)
    return result.result


def raised(node: dict) -> str:
    """The last line of a failed node's traceback: ``<exception type>: <message>``
    (the Dask executor leaves ``error`` empty and puts the traceback in stderr)."""
    text = str(node.get("error") or node.get("stderr") or "").strip()
    return text.splitlines()[-1] if text else ""


def stderr_of(result, name: str) -> str:
    return "\n".join(str(n.get("stderr") or "") for n in named(result, name))


def key_of(ref, bucket: str) -> str:
    """The key of ``ref`` in ``bucket`` (every kit's URI ends in ``<bucket>/<key>``)."""
    return ref.uri.split(f"{bucket}/", 1)[1]


def stored(kit, bucket: str, prefix: str = "") -> list[str]:
    return _remote.stored(kit, bucket, prefix)


def cached(staging: str, ref) -> str:
    """Where ``ref``'s verified local copy lives in the staging dir ``staging``."""
    from covalent_lot._offload import _SUFFIX

    return os.path.join(staging, "objects", ref.raw_sha256[:2], ref.raw_sha256 + _SUFFIX[ref.codec])


def remove_object(kit, bucket: str, key: str) -> None:
    """Delete one object with the plain SDK (no covalent-lot)."""
    if kit.name == "s3":
        kit.client.delete_object(Bucket=bucket, Key=key)
    elif kit.name == "gcs":
        kit.client.bucket(bucket).blob(key).delete()
    elif kit.name == "azure":
        kit.client.get_blob_client(bucket, key).delete_blob()
    elif kit.name == "sftp":
        kit.sftp.remove(kit.path(bucket, key))
        for suffix in SIDECARS:
            try:
                kit.sftp.remove(kit.path(bucket, key) + suffix)
            except FileNotFoundError:
                pass
    else:  # pragma: no cover - a new kit
        raise NotImplementedError(kit.name)


def modified(kit, bucket: str, key: str):
    """The object's last-modified time, as the server reports it (plain SDK)."""
    if kit.name == "s3":
        return kit.client.head_object(Bucket=bucket, Key=key)["LastModified"]
    if kit.name == "gcs":
        blob = kit.client.bucket(bucket).get_blob(key)
        return (blob.updated, blob.generation)
    if kit.name == "azure":
        props = kit.client.get_blob_client(bucket, key).get_blob_properties()
        return (props.last_modified, props.etag)
    if kit.name == "sftp":
        attrs = kit.sftp.stat(kit.path(bucket, key))
        return (attrs.st_mtime, attrs.st_size)
    raise NotImplementedError(kit.name)  # pragma: no cover


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed ``covalent-lot`` script with this process's environment (the
    kits'), ``env`` on top."""
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    print(f"$ covalent-lot {' '.join(args)}\n{done.stdout}{done.stderr}[exit {done.returncode}]")
    return done


@pytest.fixture
def fresh_staging(tmp_path, monkeypatch):
    """An empty staging dir for this (client) process: ``ref.load()`` here must download."""
    folder = tmp_path / "client-staging"
    monkeypatch.setenv("COVALENT_LOT_STAGING_DIR", str(folder))
    return folder


# --- 1. the seed scenario ---------------------------------------------------------------

def test_seed_scenario(lot_env, kit, bucket, fresh_staging):
    """Producer returns a 3 MiB array: stored, a Ref; the consumer gets the array
    (on the producer's machine from the verified local copy, no download); the
    client loads the Ref too (downloaded and verified)."""
    import numpy as np

    prefix = kit.uri(bucket, "off/")

    @ct.electron
    @lot.offload(to=prefix, min_size="1MiB")
    def produce(seed):
        return array(seed)

    @ct.electron
    @lot.offload
    def consume(a, extra):
        return {"sum": float(a.sum()) + extra, "sha": array_sha(a), "type": type(a).__name__}

    @ct.lattice
    def seed_flow(seed):
        produced = produce(seed)
        return {"ref": produced, "consumed": consume(produced, 1.0)}

    dispatch_id, result = run(seed_flow, 7)
    out = completed(result)
    expected = array(7)
    assert out["consumed"] == {"sum": float(expected.sum()) + 1.0, "sha": array_sha(expected),
                               "type": "ndarray"}

    (producer,) = named(result, "produce")
    ref = output(producer)
    assert isinstance(ref, lot.Ref) and out["ref"] == ref
    assert ref.uri == f"{prefix}{dispatch_id}/{producer['node_id']}/produce-{ref.raw_sha256[:16]}.npy"
    assert (ref.dispatch_id, ref.node_id) == (dispatch_id, str(producer["node_id"]))
    assert (ref.codec, ref.compression) == ("numpy", None)  # random floats: "auto" does not compress
    assert ref.size == ref.raw_size == expected.nbytes + 128  # .npy header
    assert stored(kit, bucket, "off/") == [key_of(ref, bucket)]
    assert kit.get_metadata(bucket, key_of(ref, bucket))["lot-sha256"] == ref.sha256
    # Same machine as the producer: the consumer read the verified local copy.
    assert "download " not in stderr_of(result, "consume"), stderr_of(result, "consume")
    assert "stored" in stderr_of(result, "produce")

    loaded = ref.load()
    assert type(loaded) is np.ndarray and np.array_equal(loaded, expected)
    assert os.path.isfile(cached(str(fresh_staging), ref))  # it really came through the store
    mapped = ref.load(mmap=True)
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, expected)
    assert repr(ref).startswith(f"lot.Ref({ref.uri!r}, numpy, ")

    # Called outside any dispatch (here, in the client): a run-<random>/ key, the
    # same encoded bytes.
    outside = lot.offload(to=prefix, min_size="1MiB")(array)(7)
    assert outside.dispatch_id is None and outside.raw_sha256 == ref.raw_sha256
    assert outside.uri.startswith(f"{prefix}run-")
    assert outside.uri.endswith(f"/array-{ref.raw_sha256[:16]}.npy")


# --- 2. fan-out and fan-in --------------------------------------------------------------

def test_fan_out_and_fan_in(lot_env, kit, bucket):
    prefix = kit.uri(bucket, "off/")

    @ct.electron
    @lot.offload(to=prefix, min_size="1MiB", compress=False)
    def produce(seed):
        return array(seed, MiB // 8 * 2)

    @ct.electron
    @lot.offload
    def consume(a, i):
        return {"i": i, "sha": array_sha(a)}

    @ct.electron
    @lot.offload
    def fan_in(listed, keyed):
        return {"list": [array_sha(a) for a in listed],
                "dict": {k: array_sha(v) for k, v in keyed.items()},
                "types": sorted({type(a).__name__ for a in [*listed, *keyed.values()]})}

    @ct.lattice
    def fan_flow():
        refs = [produce(seed) for seed in (1, 2, 3)]
        fans = [consume(refs[0], i) for i in range(3)]
        return {"refs": refs, "fans": fans, "in": fan_in(refs, {"x": refs[1], "y": refs[2]})}

    dispatch_id, result = run(fan_flow)
    out = completed(result)
    sha = {seed: array_sha(array(seed, MiB // 8 * 2)) for seed in (1, 2, 3)}
    assert out["fans"] == [{"i": i, "sha": sha[1]} for i in range(3)]
    assert out["in"] == {"list": [sha[1], sha[2], sha[3]], "dict": {"x": sha[2], "y": sha[3]},
                         "types": ["ndarray"]}
    refs = out["refs"]
    assert all(isinstance(r, lot.Ref) and r.dispatch_id == dispatch_id for r in refs)
    assert len({r.uri for r in refs}) == 3
    assert stored(kit, bucket, "off/") == sorted(key_of(r, bucket) for r in refs)
    assert all(k.startswith(f"off/{dispatch_id}/") for k in stored(kit, bucket, "off/"))


# --- 3. nested structures, codecs, mmap, small values ------------------------------------

def test_nested_codecs_mmap_and_small_values(lot_env, kit, bucket, fresh_staging):
    import numpy as np

    prefix = kit.uri(bucket, "off/")
    produce = array_producer(prefix, compress=False)

    @ct.electron
    @lot.offload(to=prefix, min_size="1MiB", compress=False)
    def produce_frame(seed):
        return frame(seed)

    @ct.electron
    @lot.offload(to=prefix, min_size="1MiB")
    def produce_small():
        return {"array": np.arange(10), "text": "small"}

    @ct.electron
    @lot.offload
    def nested(value):
        a, b = value["a"], value["b"]
        return {"a": type(a).__name__, "b0": type(b[0]).__name__, "b1": type(b[1]).__name__,
                "b10": type(b[1][0]).__name__, "b11": b[1][1],
                "same": array_sha(a) == array_sha(b[0]) == array_sha(b[1][0]), "sha": array_sha(a)}

    @ct.electron
    @lot.offload(mmap=True)
    def mapped(a, df):
        return {"memmap": isinstance(a, np.memmap), "writeable": bool(a.flags.writeable),
                "sha": array_sha(a), "frame": type(df).__name__, "equal": bool(df.equals(frame(5)))}

    @ct.electron
    def undecorated(ref):  # gets the Ref itself, and can load it
        return {"type": type(ref).__name__, "uri": ref.uri, "sha": array_sha(ref.load())}

    @ct.lattice
    def nested_flow():
        ref, df, small = produce(4), produce_frame(5), produce_small()
        return {"ref": ref, "frame": df, "small": small,
                "nested": nested({"a": ref, "b": [ref, (ref, 1)]}),
                "mapped": mapped(ref, df), "undecorated": undecorated(ref)}

    dispatch_id, result = run(nested_flow)
    out = completed(result)
    sha = array_sha(array(4))
    assert out["nested"] == {"a": "ndarray", "b0": "ndarray", "b1": out["nested"]["b1"], "b10": "ndarray",
                             "b11": 1, "same": True, "sha": sha}
    assert out["nested"]["b1"] in ("tuple", "list")  # Covalent may hand a tuple over as a list
    assert out["mapped"] == {"memmap": True, "writeable": False, "sha": sha, "frame": "DataFrame",
                             "equal": True}
    ref, df_ref = out["ref"], out["frame"]
    assert out["undecorated"] == {"type": "Ref", "uri": ref.uri, "sha": sha}
    # The DataFrame went as parquet.
    assert isinstance(df_ref, lot.Ref) and (df_ref.codec, df_ref.compression) == ("parquet", None)
    assert df_ref.uri.endswith(".parquet") and f"/{dispatch_id}/" in df_ref.uri
    assert df_ref.load().equals(frame(5))  # from the store (fresh staging dir)
    # Below min_size: by value, no Ref and nothing stored.
    small = out["small"]
    assert not isinstance(small, lot.Ref) and small["text"] == "small"
    assert np.array_equal(small["array"], np.arange(10))
    assert stored(kit, bucket, "off/") == sorted([key_of(ref, bucket), key_of(df_ref, bucket)])


@pytest.mark.skipif(bool(_WANTED) and "s3" not in _WANTED, reason="LOT_BACKENDS excludes s3")
@pytest.mark.parametrize("kit", ["s3"], indirect=True)  # decided before any store is used
def test_text_above_min_size_in_bytes_is_offloaded(lot_env, kit, bucket):
    """A str of 700,000 four-byte characters: 2,800,000 bytes in UTF-8 (what is stored
    and what Covalent would pickle), 2.8 MB in memory, above min_size=2MiB by every
    measure of bytes; only len() says 700,000."""
    text = "\N{CRAB}" * 700_000

    @ct.electron
    @lot.offload(to=kit.uri(bucket, "off/"), min_size="2MiB", compress=False)
    def produce_text():
        return text

    @ct.lattice
    def text_flow():
        return produce_text()

    _, result = run(text_flow)
    ref = completed(result)
    if not isinstance(ref, lot.Ref):
        pytest.fail(f"returned by value: a str of {len(ref):,} characters, {len(ref.encode()):,} UTF-8 bytes")
    assert (ref.codec, ref.raw_size) == ("text", len(text.encode("utf-8")))
    assert ref.load() == text


# --- 4 and 7. concurrent dispatches, gc of one ------------------------------------------

def flow_for(prefix: str):
    @ct.electron
    @lot.offload(to=prefix, min_size="1MiB", compress=False)
    def produce(seed):
        return array(seed, MiB // 8 * 2 + seed)

    @ct.electron
    @lot.offload
    def consume(a, seed):
        return {"seed": seed, "sha": array_sha(a), "size": int(a.size)}

    @ct.lattice
    def pipeline(seed):
        produced = produce(seed)
        return {"ref": produced, "consumed": consume(produced, seed)}

    return pipeline


def test_three_concurrent_dispatches_then_gc_of_one(lot_env, kit, bucket, fresh_staging):
    """Three dispatches of one workflow at once: three keys, each consumer reads its
    own dispatch's bytes. Then ``covalent-lot gc PREFIX --dispatch ID`` removes
    exactly that dispatch's object; the others still load."""
    prefix = kit.uri(bucket, "off/")
    pipeline = flow_for(prefix)
    ids = {seed: ct.dispatch(pipeline)(seed) for seed in (11, 12, 13)}
    outs = {seed: completed(wait(dispatch_id)) for seed, dispatch_id in ids.items()}
    for seed, out in outs.items():
        expected = array(seed, MiB // 8 * 2 + seed)
        assert out["consumed"] == {"seed": seed, "sha": array_sha(expected), "size": expected.size}
        assert out["ref"].dispatch_id == ids[seed]
        assert key_of(out["ref"], bucket).startswith(f"off/{ids[seed]}/")
    keys = {seed: key_of(out["ref"], bucket) for seed, out in outs.items()}
    assert len(set(keys.values())) == 3
    assert stored(kit, bucket, "off/") == sorted(keys.values())

    done = cli("gc", prefix, "--dispatch", ids[11])
    assert done.returncode == 0, done.stderr
    assert "removed 1 of 3 object(s)" in done.stdout, done.stdout
    assert stored(kit, bucket, "off/") == sorted([keys[12], keys[13]])
    assert not kit.list_keys(bucket, f"off/{ids[11]}/")  # SFTP: its checksum sidecar too
    for seed in (12, 13):  # downloaded (fresh staging dir here) and verified
        assert array_sha(outs[seed]["ref"].load()) == array_sha(array(seed, MiB // 8 * 2 + seed))


# --- 5. dedup and compression -----------------------------------------------------------

def test_dedup_stores_identical_bytes_once(lot_env, kit, bucket):
    prefix = kit.uri(bucket, "off/")
    produce = array_producer(prefix, dedup=True)

    @ct.electron
    @lot.offload
    def consume(a):
        return array_sha(a)

    @ct.lattice
    def dedup_flow(seed):
        produced = produce(seed)
        return {"ref": produced, "sha": consume(produced)}

    first_id, first = run(dedup_flow, 21)
    out1 = completed(first)
    ref = out1["ref"]
    key = f"off/sha256/{ref.raw_sha256}.npy"
    assert ref.uri == f"{prefix}sha256/{ref.raw_sha256}.npy" and ref.dispatch_id == first_id
    assert stored(kit, bucket, "off/") == [key]
    before = modified(kit, bucket, key)
    assert "already holds these bytes" not in stderr_of(first, "produce")
    time.sleep(1.1)  # a new upload would show a later modification time (1 s resolution)

    second_id, second = run(dedup_flow, 21)
    out2 = completed(second)
    assert out1["sha"] == out2["sha"] == array_sha(array(21))
    assert out2["ref"].uri == ref.uri and out2["ref"].sha256 == ref.sha256
    assert out2["ref"].dispatch_id == second_id  # who stored it last: the Ref says
    assert "already holds these bytes" in stderr_of(second, "produce"), explain(second)
    assert "not uploaded again" in stderr_of(second, "produce")
    assert stored(kit, bucket, "off/") == [key]
    assert modified(kit, bucket, key) == before
    # gc by dispatch leaves shared, content-addressed objects alone.
    done = cli("gc", "--dispatch", first_id, prefix)
    assert done.returncode == 0, done.stderr
    assert stored(kit, bucket, "off/") == [key]


def test_compression(lot_env, kit, bucket, fresh_staging):
    import numpy as np

    prefix = kit.uri(bucket, "off/")

    def producer(compress):
        def produce(kind):
            return ramp() if kind == "ramp" else array(31)

        produce.__name__ = f"produce_{compress}".lower()
        return ct.electron(lot.offload(to=prefix, min_size="1MiB", compress=compress)(produce))

    forced, auto, off = producer(True), producer("auto"), producer(False)

    @ct.electron
    @lot.offload
    def consume(values):
        return {k: array_sha(v) for k, v in values.items()}

    @ct.lattice
    def packed_flow():
        refs = {"forced_ramp": forced("ramp"), "forced_random": forced("random"),
                "auto_ramp": auto("ramp"), "auto_random": auto("random"), "off_ramp": off("ramp")}
        return {"refs": refs, "consumed": consume(refs)}

    dispatch_id, result = run(packed_flow)
    out = completed(result)
    expected = {"ramp": ramp(), "random": array(31)}
    for name, ref in out["refs"].items():
        value = expected[name.split("_")[1]]
        assert out["consumed"][name] == array_sha(value), name
        assert isinstance(ref, lot.Ref) and ref.raw_size == value.nbytes + 128, name
        assert np.array_equal(ref.load(), value), name  # downloaded, decompressed, verified
    refs = out["refs"]
    for name in ("forced_ramp", "forced_random", "auto_ramp"):
        assert refs[name].compression == "zstd", name
        assert refs[name].uri.endswith(".npy.zst")
    for name in ("auto_random", "off_ramp"):
        assert refs[name].compression is None and refs[name].uri.endswith(".npy"), name
        assert refs[name].size == refs[name].raw_size and refs[name].sha256 == refs[name].raw_sha256
    ramp_ref = refs["forced_ramp"]
    assert ramp_ref.size < ramp_ref.raw_size // 4 and ramp_ref.sha256 != ramp_ref.raw_sha256
    # What is stored is the compressed stream, with its own checksum.
    data = kit.get_bytes(bucket, key_of(ramp_ref, bucket))
    assert len(data) == ramp_ref.size and hashlib.sha256(data).hexdigest() == ramp_ref.sha256
    assert kit.get_metadata(bucket, key_of(ramp_ref, bucket))["lot-sha256"] == ramp_ref.sha256
    assert refs["auto_ramp"].raw_sha256 == refs["off_ramp"].raw_sha256 == ramp_ref.raw_sha256
    assert "zstd" in stderr_of(result, "produce_true")


# --- 6. the bounded local cache ---------------------------------------------------------

def test_cache_limit_evicts_unheld_copies_while_a_consumer_holds_its_input(lot_env, kit, bucket, tmp_path):
    """A private staging dir with cache_limit 10 MiB (options that travel with the
    workflow, so producers and consumers use them on the executor). A consumer holds
    its memory-mapped 4 MiB input while it offloads three more 4 MiB values: each
    offload trims the cache; the held input stays, older unheld copies go."""
    import numpy as np

    staging = tmp_path / "cache"
    if not _servers.xattrs_work(staging):
        pytest.skip(f"no user xattrs on {staging}: nothing is a verified copy, nothing is evicted")
    prefix = kit.uri(bucket, "off/")
    options = {"staging_dir": str(staging), "cache_limit": "10MiB", "compress": False}
    size = 4 * MiB // 8

    @ct.electron
    @lot.offload(to=prefix, min_size="1MiB", **options)
    def produce(seed):
        return array(seed, size)

    def pressure_value(seed):
        return array(seed, size)

    pressure = lot.offload(to=prefix, min_size="1MiB", **options)(pressure_value)  # called in the consumer

    def objects_now() -> list[str]:
        root = os.path.join(str(staging), "objects")
        return sorted(name for _dir, _subs, names in os.walk(root) for name in names)

    @ct.electron
    @lot.offload(mmap=True)
    def consume_under_pressure(held, older):
        # ``older`` only orders this after the other producer; it is a plain URI string.
        snapshots = [objects_now()]
        refs = []
        for seed in (103, 104, 105):
            refs.append(pressure(seed))
            snapshots.append(objects_now())
        return {"memmap": isinstance(held, np.memmap), "file": held.filename,
                "exists": os.path.exists(held.filename), "sha": array_sha(held),
                "snapshots": snapshots, "pressure": refs}

    @ct.electron
    def uri_of(ref):
        return ref.uri

    @ct.lattice
    def cache_flow():
        older = produce(101)
        held = produce(102)
        return {"older": older, "held": held, "consumed": consume_under_pressure(held, uri_of(older))}

    dispatch_id, result = run(cache_flow)
    out = completed(result)
    c = out["consumed"]
    labelled = [("older", out["older"]), ("held", out["held"])]
    labelled += [(f"p{i}", ref) for i, ref in enumerate(c["pressure"], 1)]
    label = {ref.raw_sha256 + ".npy": name for name, ref in labelled}
    seen = [sorted(label.get(f, f) for f in snapshot) for snapshot in c["snapshots"]]
    assert seen == [
        ["held", "older"],  # 8 MiB: under the limit
        ["held", "p1"],  # 12 MiB: the least recently used (older) evicted
        ["held", "p2"],  # held is now the least recently used but held: p1 goes
        ["held", "p3"],
    ], (seen, stderr_of(result, "consume_under_pressure"))
    assert c["memmap"] and c["exists"] and c["sha"] == array_sha(array(102, size))
    assert c["file"] == cached(str(staging), out["held"])
    log = stderr_of(result, "consume_under_pressure")
    assert log.count("1 held") >= 2, log  # the trims that skipped the held input
    # Every value is still in the store: eviction only drops local copies.
    assert len(stored(kit, bucket, f"off/{dispatch_id}/")) == 5

    # Nobody holds anything now: gc --local empties the cache.
    done = cli("gc", "--local", env={"COVALENT_LOT_STAGING_DIR": str(staging)})
    assert done.returncode == 0, done.stderr
    assert f"gc --local {staging}: removed 2 verified copies (8.0 MiB)" in done.stdout, done.stdout
    assert objects_now() == []


# --- 8. bad input through the server ----------------------------------------------------

def test_removed_overwritten_and_unencodable(lot_env, kit, bucket, tmp_path):
    """A consumer of a removed object fails naming the URI and the dispatch that
    stored it; of an overwritten one, with a checksum mismatch; a producer of a
    value that cannot be pickled, with a TypeError."""
    staging = tmp_path / "staging"  # private: its local copies are dropped below
    prefix = kit.uri(bucket, "off/")

    @ct.electron
    @lot.offload(to=prefix, min_size="1MiB", staging_dir=str(staging))
    def produce(seed):
        return array(seed, MiB // 8 * 2)

    @ct.lattice
    def produce_two():
        return [produce(51), produce(52)]

    producer_id, result = run(produce_two)
    removed, overwritten = completed(result)
    assert removed.dispatch_id == overwritten.dispatch_id == producer_id
    remove_object(kit, bucket, key_of(removed, bucket))
    other = os.urandom(overwritten.size)
    kit.put_bytes(bucket, key_of(overwritten, bucket), other,
                  {"lot-sha256": hashlib.sha256(other).hexdigest()})
    for ref in (removed, overwritten):  # on this machine the verified copies would be used
        os.unlink(cached(str(staging), ref))

    @ct.electron
    @lot.offload
    def consume(a):
        return float(a.sum())

    @ct.lattice
    def consume_one(ref):
        return consume(ref)

    @ct.electron
    @lot.offload(to=prefix, min_size=0)
    def unencodable():
        import threading

        return {"lock": threading.Lock()}

    @ct.lattice
    def produce_lock():
        return unencodable()

    ids = {"removed": ct.dispatch(consume_one)(removed), "overwritten": ct.dispatch(consume_one)(overwritten),
           "lock": ct.dispatch(produce_lock)()}
    results = {case: wait(dispatch_id) for case, dispatch_id in ids.items()}
    errors = {}
    for case, res in results.items():
        assert str(res.status) == "FAILED", (case, explain(res))
        (node,) = named(res, "unencodable" if case == "lock" else "consume")
        errors[case] = raised(node)

    # The exception the electron raised (the last line of its traceback).
    text = errors["removed"]
    assert text.startswith("FileNotFoundError: "), text
    assert f"{removed.uri} is gone" in text and f"dispatch {producer_id}" in text, text
    assert "run the producer again" in text
    text = errors["overwritten"]
    assert text.startswith("covalent_lot._errors.ChecksumMismatchError: "), text
    assert overwritten.uri in text and f"dispatch {producer_id}" in text and "overwritten" in text, text
    assert not os.path.exists(cached(str(staging), overwritten))  # nothing loaded
    text = errors["lock"]
    assert text.startswith("TypeError: the return value of unencodable (dict) cannot be offloaded"), text
    assert not stored(kit, bucket, f"off/{ids['lock']}/")


# --- 9. across hosts --------------------------------------------------------------------

def test_across_hosts(kit, bucket, host2, lot_session_dir, fresh_staging):
    """Producer on the second host (SSHExecutor, its own staging dir and
    covalent.conf), consumer on this machine's executor, and the reverse, in one
    dispatch: each value is downloaded and verified on the other side."""
    import numpy as np

    ssh = host2.executor()
    prefix = kit.uri(bucket, "off/")
    # Local copies are content-addressed: values of their own, so that no copy left
    # by this test for another backend stands in for the download.
    there_seed, here_seed = (int(hashlib.sha256(f"{bucket}/{side}".encode()).hexdigest()[:8], 16)
                             for side in ("there", "here"))

    def produce(seed):
        return array(seed)

    def consume(a):
        return {**_remote.where(), "sha": array_sha(a), "memmap": isinstance(a, np.memmap),
                "file": getattr(a, "filename", None)}

    produce_there = ct.electron(lot.offload(to=prefix, min_size="1MiB")(produce), executor=ssh)
    produce_here = ct.electron(lot.offload(to=prefix, min_size="1MiB")(produce))
    consume_here = ct.electron(lot.offload(mmap=True)(consume), executor="local")
    consume_there = ct.electron(lot.offload(mmap=True)(consume), executor=ssh)

    @ct.lattice
    def two_hosts():
        there, here = produce_there(there_seed), produce_here(here_seed)
        return {"there": there, "here": here, "there_here": consume_here(there),
                "here_there": consume_there(here)}

    dispatch_id, result = run(two_hosts)
    out = completed(result)
    assert out["there_here"]["sha"] == array_sha(array(there_seed))
    assert out["here_there"]["sha"] == array_sha(array(here_seed))
    assert _remote.on_host2(host2, out["here_there"]) and not _remote.on_host2(host2, out["there_here"])
    assert out["there_here"]["memmap"] and out["here_there"]["memmap"]
    # The local executor's consumer downloaded its input and verified it (the SSH
    # plugin does not bring the remote stderr back).
    logs = [str(n["stderr"]) for n in named(result, "consume") if n["stderr"]]
    assert len(logs) == 1 and f"download {out['there'].uri} -> " in logs[0], logs
    assert "1/1 sha256 verified" in logs[0], logs
    # Each consumer's copy is in its own machine's staging dir.
    local_staging = str(lot_session_dir / "staging")  # the server's (conftest sets it)
    assert out["there_here"]["file"] == cached(local_staging, out["there"])
    assert out["here_there"]["file"] == cached(host2.staging_dir, out["here"])
    # The second host's copy is recorded as verified against the Ref's checksum
    # (where its file system takes user xattrs, in which the record is kept).
    here, copy = out["here"], out["here_there"]["file"]
    check = host2.run_python(
        "import os, sys\n"
        "from covalent_lot._stream import holds_verified\n"
        f"probe = {copy!r} + '.xattr-probe'\n"
        "open(probe, 'wb').close()\n"
        "try:\n"
        "    os.setxattr(probe, 'user.probe', b'1')\n"
        "except OSError:\n"
        "    sys.exit(print('no xattrs'))\n"
        "finally:\n"
        "    os.unlink(probe)\n"
        f"print(holds_verified({copy!r}, {here.raw_sha256!r}, {here.raw_size}))\n", check=True)
    assert check.stdout.strip() in ("True", "no xattrs"), check
    for ref in (out["there"], out["here"]):
        assert ref.dispatch_id == dispatch_id and key_of(ref, bucket).startswith(f"off/{dispatch_id}/")
    assert stored(kit, bucket, "off/") == sorted(key_of(r, bucket) for r in (out["there"], out["here"]))
    # The client loads the one made on the second host as well.
    assert np.array_equal(out["there"].load(), array(there_seed))


