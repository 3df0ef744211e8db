"""h.save/h.load codecs and removal after use (delete_after, cleanup), without a server."""

from __future__ import annotations

import logging
import os
import pickle
import sys

import pytest

import covalent_lot as lot
from covalent_lot import _objects
from covalent_lot._errors import ErrorKind

from .lot_fakes import STORES, FakeServiceError, MemoryBackend, in_memory, run_python
from .test_handoff import tag

np = pytest.importorskip("numpy")


@pytest.fixture
def context():
    """Covalent's electron context, as set on the executor while a task runs."""
    from covalent.executor.utils.context import set_context

    return set_context


def _pandas():
    return pytest.importorskip("pandas")


def _frame():
    return _pandas().DataFrame({"a": [1, 2, 3], "b": ["x", "y", "é"]})


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this on purpose")


def same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if type(a).__name__ == "DataFrame":
        return a.equals(b)
    if isinstance(a, (bytearray, memoryview)):
        return b == bytes(a) and type(b) is bytes
    return a == b and type(a) is type(b)


ROUND_TRIPS = {
    "npy-float": (lambda: np.arange(12.0).reshape(3, 4), "x.npy"),
    "npy-upper-suffix": (lambda: np.array([1, 2], dtype=np.int8), "X.NPY"),
    "npy-structured": (lambda: np.zeros(3, dtype=[("a", "i4"), ("b", "f8")]), "s.npy"),
    "parquet": (lambda: _frame(), "t.parquet"),
    "pq": (lambda: _frame(), "t.pq"),
    "frame-pickle": (lambda: _frame(), "t.pkl"),
    "bytes-bin": (lambda: b"\x00\xffraw", "b.bin"),
    "bytes-no-suffix": (lambda: b"no suffix", "blob"),
    "bytes-other-suffix": (lambda: b"PK\x03\x04", "a.zip"),
    "bytearray": (lambda: bytearray(b"mutable"), "b.dat"),
    "memoryview": (lambda: memoryview(b"view"), "b.raw"),
    "empty-bytes": (lambda: b"", "e.bin"),
    "text": (lambda: "héllo\r\nwörld\n", "t.txt"),
    "json-text": (lambda: '{"a": [1, 2]}', "t.json"),
    "csv-text": (lambda: "a,b\n1,2\n", "t.csv"),
    "dict-pkl": (lambda: {"a": [1, 2], "b": (3, None)}, "d.pkl"),
    "object-pickle": (lambda: Point(1, 2), "p.pickle"),
    "pkl-upper-suffix": (lambda: {"w": 1.5}, "w.PKL"),
}


@pytest.mark.parametrize("make, name", ROUND_TRIPS.values(), ids=ROUND_TRIPS)
def test_round_trip(tmp_path, make, name):
    if name.endswith((".parquet", ".pq")):
        pytest.importorskip("pyarrow")
    obj = make()
    path = str(tmp_path / "deep" / "er" / name)  # save makes the folders
    _objects.save(obj, path)
    assert same(obj, _objects.load(path))
    assert os.listdir(os.path.dirname(path)) == [name]  # no temporary file left


def test_mmap_maps_the_npy_file_read_only(tmp_path):
    path = str(tmp_path / "m.npy")
    array = np.arange(1000, dtype=np.float32)
    _objects.save(array, path)
    mapped = _objects.load(path, mmap=True)
    assert isinstance(mapped, np.memmap) and mapped.filename == path
    assert np.array_equal(mapped, array)
    with pytest.raises(ValueError):
        mapped[0] = 1.0


@pytest.mark.parametrize("name", ["x.txt", "x.pkl", "x.bin"])
def test_mmap_is_for_npy_only(tmp_path, name):
    with pytest.raises(ValueError, match=r"mmap=True memory-maps \.npy files"):
        _objects.load(str(tmp_path / name), mmap=True)


MISMATCHES = {
    "array-into-txt": (lambda: np.zeros(2), "x.txt", "numpy.ndarray", ".npy"),
    "str-into-npy": (lambda: "text", "x.npy", "str", ".txt"),
    "dict-into-bin": (lambda: {"a": 1}, "x.bin", "dict", ".pkl"),
    "bytes-into-json": (lambda: b"{}", "x.json", "bytes", ".bin"),
    "array-no-suffix": (lambda: np.zeros(2), "x", "numpy.ndarray", ".npy"),
    "frame-into-npy": (lambda: _frame(), "x.npy", "pandas.DataFrame", None),
    "list-into-parquet": (lambda: [1, 2], "x.parquet", "list", ".pkl"),
}


@pytest.mark.parametrize("make, name, type_name, fix", MISMATCHES.values(), ids=MISMATCHES)
def test_type_and_suffix_mismatch_is_a_type_error(tmp_path, make, name, type_name, fix):
    obj = make()
    path = str(tmp_path / name)
    with pytest.raises(TypeError) as info:
        _objects.save(obj, path)
    message = str(info.value)
    suffix = os.path.splitext(name)[1] or "a name without a suffix"
    fix = fix or _objects.suffix_for(obj)
    assert f"a {type_name} to {path!r}" in message and f"{suffix} holds" in message
    assert f"end the handoff's URI with {fix}" in message
    assert os.listdir(tmp_path) == []


def test_object_arrays_are_refused_by_npy(tmp_path):
    with pytest.raises(ValueError, match="allow_pickle"):
        _objects.save(np.array([{"a": 1}], dtype=object), str(tmp_path / "o.npy"))
    assert os.listdir(tmp_path) == []


def test_parquet_without_pyarrow_names_the_install(tmp_path, monkeypatch):
    pd = _pandas()
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # importing it raises ImportError
    path = str(tmp_path / "t.parquet")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        _objects.save(pd.DataFrame({"a": [1]}), path)
    assert os.listdir(tmp_path) == []
    with open(path, "wb") as f:
        f.write(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        _objects.load(path)
    assert _objects.suffix_for(pd.DataFrame()) == ".pkl"  # the fallback for DataFrames


def test_suffix_for_each_type():
    assert [_objects.suffix_for(o) for o in (np.zeros(1), b"", bytearray(), memoryview(b""), "", {}, 1.5, None)] == [
        ".npy", ".bin", ".bin", ".bin", ".txt", ".pkl", ".pkl", ".pkl"]


@pytest.mark.parametrize("failing", ["pickle", "interrupt"])
def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, failing):
    path = str(tmp_path / "x.pkl")
    _objects.save({"old": True}, path)
    if failing == "pickle":
        obj, error = {"new": Unpicklable()}, RuntimeError
    else:  # interrupted half-way through writing
        def interrupted(obj, f, **_options):
            f.write(b"half")
            raise KeyboardInterrupt

        monkeypatch.setattr(pickle, "dump", interrupted)
        obj, error = {"new": True}, KeyboardInterrupt
    with pytest.raises(error):
        _objects.save(obj, path)
    assert os.listdir(tmp_path) == ["x.pkl"]
    assert _objects.load(path) == {"old": True}


def test_load_of_a_missing_file_says_what_to_declare(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"files=\[h.download\(\)\]"):
        _objects.load(str(tmp_path / "absent.npy"))


def test_importing_covalent_lot_imports_no_numpy_or_pandas():
    result = run_python("""
        import sys
        import covalent_lot, covalent_lot._objects
        print(sorted(m for m in ("numpy", "pandas", "pyarrow") if m in sys.modules))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- on Handoff -----------------------------------------------------------------------------

URI = "s3://bkt/runs/{dispatch_id}/x.npy"


def test_handoff_save_and_load_at_the_resolved_path(context, tmp_path):
    h = lot.handoff(URI, staging_dir=str(tmp_path))
    with context("d-1", 0):
        path = h.save(np.arange(5))
        assert path == h.path == os.path.join(str(tmp_path), "d-1", tag(URI), "x.npy")
    with context("d-1", 1):
        assert np.array_equal(h.load(), np.arange(5))
        assert isinstance(h.load(mmap=True), np.memmap)


@pytest.mark.parametrize("action", ["save", "load"])
def test_folder_handoff_refuses_save_and_load(tmp_path, action):
    h = lot.handoff("s3://bkt/shards/", str(tmp_path / "shards") + "/")
    with pytest.raises(ValueError, match=f"h.{action}\\(\\) is for a single object"):
        h.save(b"x") if action == "save" else h.load()


# --- removal after use -------------------------------------------------------------------------


@pytest.fixture
def store(request):
    """A fresh in-memory store for this test."""
    STORES.pop(request.node.nodeid, None)
    return request.node.nodeid


def memory(call, store):
    """Point a TransferCall (or a Discard's) at ``store``."""
    return in_memory(call, store)


def removal(h, store):
    """What runs after a delete-after consumer of ``h`` returned, pointed at ``store``."""
    _before, after = h.download(delete_after=True).cp()
    return memory(after, store)


class DenyingBackend(MemoryBackend):
    def delete(self, location):
        raise FakeServiceError(ErrorKind.DENIED, "no delete permission")


def __getattr__(name):
    if name == "DenyingStrategy":  # made on first use: importing it imports covalent
        from tests import lot_fakes

        strategy = type(name, (lot_fakes.MemoryS3Strategy,), {"backend_path": f"{__name__}:DenyingBackend"})
        globals()[name] = strategy
        return strategy
    raise AttributeError(name)


def produce(h, context, store, data=b"features", node=0):
    pre, call = h.upload().cp()
    memory(call, store)
    with context("d-5", node):
        pre()
        h.save(data)
        call()


def test_delete_after_downloads_before_and_removes_after(context, tmp_path, store):
    uri = "s3://bkt/runs/{dispatch_id}/x.bin"
    h = lot.handoff(uri, staging_dir=str(tmp_path))
    consumer = lot.handoff(uri, str(tmp_path / "consumer" / "{dispatch_id}" / "x.bin"))
    produce(h, context, store)

    transfer = consumer.download(delete_after=True)
    assert transfer.order.name == "AFTER"  # Covalent runs the removal after the electron
    before, after = transfer.cp()
    memory(before.download, store)
    memory(after, store)
    with context("d-5", 1):
        assert before() == ("s3://bkt/runs/d-5/x.bin", consumer.path)  # the `files` argument
        assert consumer.load() == b"features"
        assert ("bkt", "runs/d-5/x.bin") in STORES[store]  # still there while the electron runs
        removed = after()
    assert removed == {"uri": "s3://bkt/runs/d-5/x.bin", "objects": 1,
                       "local_path": str(tmp_path / "consumer" / "d-5" / "x.bin"), "local": True}
    assert STORES[store] == {}
    assert not os.path.exists(removed["local_path"])
    assert os.path.isdir(tmp_path / "consumer" / "d-5")  # a path of the caller's: only the file goes


def test_discard_tidies_the_default_staging_layout(context, tmp_path, store):
    h = lot.handoff("s3://bkt/runs/{dispatch_id}/x.bin", staging_dir=str(tmp_path))
    other = lot.handoff("s3://bkt/runs/{dispatch_id}/y.bin", staging_dir=str(tmp_path))
    discard_h, discard_other = removal(h, store), removal(other, store)
    produce(h, context, store)
    produce(other, context, store)
    with context("d-5", 3):
        discard_h()
        assert os.listdir(tmp_path / "d-5") == [tag(other.uri)]  # the other handoff's folder stays
        discard_other()
    assert os.listdir(tmp_path) == [] and STORES[store] == {}


def test_discard_of_a_folder_handoff(context, tmp_path, store):
    h = lot.handoff("s3://bkt/runs/{dispatch_id}/shards/", staging_dir=str(tmp_path))
    discard = removal(h, store)
    backend = MemoryBackend({"fake_store": store})
    for key in ("runs/d-5/shards/a", "runs/d-5/shards/n/b", "runs/d-5/other"):
        backend.add("bkt", key, b"1")
    with context("d-5", 3):
        os.makedirs(os.path.join(h.path, "n"))
        open(os.path.join(h.path, "n", "b"), "wb").close()
        assert discard()["objects"] == 2
    assert backend.keys() == ["runs/d-5/other"] and os.listdir(tmp_path) == []


def test_discard_never_fails_the_electron(context, tmp_path, store, caplog):
    h = lot.handoff("s3://bkt/runs/{dispatch_id}/x.bin", staging_dir=str(tmp_path))
    gone = removal(h, store)
    denied = removal(h, store)
    denied.delete.strategy = f"{__name__}:DenyingStrategy"
    MemoryBackend({"fake_store": store}).add("bkt", "runs/d-5/x.bin", b"1")
    caplog.set_level(logging.INFO, logger="covalent_lot")
    with context("d-5", 3):
        assert denied()["objects"] == 0
        assert ("bkt", "runs/d-5/x.bin") in STORES[store]
        assert "could not remove s3://bkt/runs/d-5/x.bin after use" in caplog.text
        assert "PermissionError" in caplog.text or "denied" in caplog.text.lower()
        STORES[store].clear()
        assert gone()["objects"] == 0  # already removed: fine
    assert "already gone" in caplog.text


def test_delete_after_hooks_are_picklable():
    import cloudpickle

    before, after = lot.handoff("s3://bkt/runs/{dispatch_id}/x.bin").download(delete_after=True).cp()
    for hook in (before, after):
        assert type(pickle.loads(cloudpickle.dumps(hook))) is type(hook)
    assert "remove s3://bkt/runs/{dispatch_id}/x.bin" in repr(after)


def test_electron_runs_the_removal_after_the_function():
    import covalent as ct

    h = lot.handoff("s3://bkt/runs/{dispatch_id}/x.bin")

    @ct.electron(files=[h.download(delete_after=True)])
    def consume(files=[]):
        return files

    from covalent._workflow.depscall import DepsCall

    def kinds(when):  # as the executor rebuilds them (covalent.executor.utils.wrappers._gather_deps)
        hooks = consume.electron_object.metadata["hooks"][when]
        return [type(DepsCall().from_dict(d).apply()[0].get_deserialized()).__name__ for d in hooks]

    assert kinds("call_before") == ["_Then"] and kinds("call_after") == ["Discard"]


def test_cleanup_waits_for_every_consumer():
    import covalent as ct

    from covalent_lot._handoff import cleanup

    h = lot.handoff("s3://bkt/runs/{dispatch_id}/x.bin")

    @ct.electron
    def consume(i):
        return i

    @ct.lattice
    def flow():
        results = [consume(i) for i in range(3)]
        cleanup(h, after=results)
        return results

    flow.build_graph()
    graph = flow.transport_graph
    (node,) = [n for n in graph._graph.nodes if graph.get_node_value(n, "name") == "lot_cleanup"]
    parents = {graph.get_node_value(p, "name") for p in graph._graph.predecessors(node)}
    assert parents == {"consume"} and len(list(graph._graph.predecessors(node))) == 3
    with pytest.raises(TypeError, match="at least one handoff"):
        cleanup()


def test_the_uri_suffix_decides_not_the_local_path(tmp_path):
    h = lot.handoff("s3://bkt/a/x.npy", str(tmp_path / "scratch"))
    h.save(np.ones(3))
    assert np.array_equal(h.load(), np.ones(3))
    with pytest.raises(TypeError, match=r"cannot save a str to 's3://bkt/a/x.npy': \.npy holds"):
        h.save("text")
    with pytest.raises(ValueError, match="'s3://bkt/a/x.npy'|x.txt"):
        lot.handoff("s3://bkt/a/x.txt", str(tmp_path / "t.npy")).load(mmap=True)


def test_discard_of_a_folder_handoff_with_a_path_without_slash(context, tmp_path, store):
    h = lot.handoff("s3://bkt/shards/", str(tmp_path / "shards"))
    os.makedirs(tmp_path / "shards" / "n")
    MemoryBackend({"fake_store": store}).add("bkt", "shards/a", b"1")
    assert removal(h, store)() == {"uri": "s3://bkt/shards/", "objects": 1,
                                             "local_path": str(tmp_path / "shards") + "/", "local": True}
    assert os.listdir(tmp_path) == []
