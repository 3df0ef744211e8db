"""``@lot.offload`` and ``lot.Ref`` against the in-memory store (no network).

The decorated functions are called directly, as Covalent's executor calls an
electron's function; the integration suite runs them through a real server.
"""

from __future__ import annotations

import collections
import os
import pickle
import sys
import threading

import pytest

np = pytest.importorskip("numpy")

PREFIX = "s3://bkt/lot/"


@pytest.fixture
def staging(tmp_path, monkeypatch):
    root = tmp_path / "staging"
    monkeypatch.setenv("COVALENT_LOT_STAGING_DIR", str(root))
    return root


@pytest.fixture
def store(staging, request):
    from tests.lot_fakes import STORES, MemoryBackend

    name = f"offload-{request.node.name}"
    STORES.pop(name, None)
    backend = MemoryBackend({"fake_store": name})
    backend.name = name
    return backend


@pytest.fixture
def strategy(store):
    from tests.lot_fakes import MemoryS3Strategy

    return MemoryS3Strategy(fake_store=store.name, base_delay=0, max_delay=0)


@pytest.fixture
def offload(strategy):
    import covalent_lot as lot

    def make(**kwargs):
        kwargs.setdefault("min_size", "64KiB")
        return lot.offload(to=PREFIX, strategy=strategy, **kwargs)

    return make


def big(n=100_000, seed=0):
    return np.random.default_rng(seed).random(n)  # 800 kB of random float64


def stored_big(offload, **kwargs):
    """What a producer electron that returns ``big()`` hands its consumers: a Ref."""
    @offload(**kwargs)
    def produce():
        return big()

    return produce()


def smooth(n=200_000):
    return (np.arange(n) % 100).astype(np.int64)  # compresses ~10x


# --- storing and loading ---------------------------------------------------------------
def test_a_small_value_stays_by_value(offload, store):
    @offload()
    def produce(value):
        return value

    for value in (3, b"x" * 100, np.zeros(10), "text", {"a": [1, 2]}):
        out = produce(value)
        assert out is value
    assert store.objects == {}


def test_a_large_array_becomes_a_ref_and_a_consumer_gets_the_array(offload, store, staging):
    import covalent_lot as lot

    array = big()

    @offload()
    def produce():
        return array

    @lot.offload
    def consume(a):
        return a

    ref = produce()
    assert isinstance(ref, lot.Ref)
    assert ref.codec == "numpy" and ref.compression is None
    assert ref.uri.startswith(PREFIX + "run-") and ref.uri.endswith(".npy")  # no dispatch here
    assert ref.dispatch_id is None and ref.size == ref.raw_size == os.path.getsize(
        staging / "objects" / ref.raw_sha256[:2] / (ref.raw_sha256 + ".npy"))
    assert [k for k in store.keys()] == [ref.uri[len("s3://bkt/"):]]
    assert np.array_equal(consume(ref), array)
    assert np.array_equal(ref.load(), array)


def test_keys_carry_the_dispatch_and_node(offload, store):
    from covalent.executor.utils.context import set_context

    @offload()
    def features():
        return big()

    with set_context("d-1", 7):  # as Covalent's executor sets it while the task runs
        ref = features()
    assert ref.uri.startswith(f"{PREFIX}d-1/7/features-{ref.raw_sha256[:16]}")
    assert (ref.dispatch_id, ref.node_id) == ("d-1", "7")


def test_refs_nested_in_lists_tuples_dicts_arrive_loaded(offload):
    import covalent_lot as lot

    @offload()
    def produce(seed):
        return big(seed=seed)

    pair = collections.namedtuple("pair", "left right")
    refs = [produce(seed) for seed in range(3)]
    seen = {}

    @lot.offload
    def consume(items, mapping, *, both):
        seen.update(items=items, mapping=mapping, both=both)
        return "ok"

    assert consume([refs[0], (refs[1], 5)], {"a": refs[2], "b": {"c": [refs[0]]}},
                   both=pair(refs[1], "x")) == "ok"
    assert np.array_equal(seen["items"][0], big(seed=0))
    assert isinstance(seen["items"][1], tuple) and seen["items"][1][1] == 5
    assert np.array_equal(seen["mapping"]["b"]["c"][0], big(seed=0))
    assert type(seen["both"]) is pair and np.array_equal(seen["both"].left, big(seed=1))


def test_an_undecorated_consumer_gets_the_ref(offload):
    import covalent_lot as lot

    def consume(a):
        return a

    assert isinstance(consume(stored_big(offload)), lot.Ref)


@pytest.mark.parametrize("value, codec, suffix", [
    (b"\x00" * 200_000, "bytes", ".bin"),
    ("é" * 100_000, "text", ".txt"),
    ({"weights": list(range(30_000)), "fn": lambda x: x + 1}, "pickle", ".pkl"),
    (np.array([object()] * 10), None, None),  # object arrays: not .npy (pickle), small here
])
def test_codecs(offload, value, codec, suffix):
    import covalent_lot as lot

    @offload(compress=False)
    def produce():
        return value

    ref = produce()
    if codec is None:
        assert ref is value
        return
    assert isinstance(ref, lot.Ref) and ref.codec == codec and ref.uri.endswith(suffix)
    loaded = ref.load()
    if codec == "pickle":
        assert loaded["weights"] == value["weights"] and loaded["fn"](1) == 2  # cloudpickle
    else:
        assert loaded == bytes(value) if codec == "bytes" else loaded == value


def test_a_dataframe_round_trips_as_parquet(offload):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    frame = pd.DataFrame({"x": np.arange(50_000), "y": np.random.default_rng(1).random(50_000)})

    @offload()
    def produce():
        return frame

    ref = produce()
    assert ref.codec == "parquet" and ".parquet" in ref.uri
    pd.testing.assert_frame_equal(ref.load(), frame)


def test_mmap_gives_a_read_only_memmap(offload):
    import covalent_lot as lot

    @lot.offload(mmap=True)
    def consume(a):
        assert isinstance(a, np.memmap) and not a.flags.writeable
        return float(a.sum())

    assert consume(stored_big(offload)) == pytest.approx(big().sum())


# --- the same-host shortcut, the local cache ---------------------------------------------
def test_a_verified_local_copy_is_used_without_a_download(offload, store, staging):
    ref = stored_big(offload)
    store.objects.clear()  # the store is gone: only the local copy can serve
    assert np.array_equal(ref.load(), big())


def test_without_a_local_copy_it_is_downloaded_and_verified(offload, store, staging):
    import shutil

    ref = stored_big(offload)
    shutil.rmtree(staging)
    assert np.array_equal(ref.load(), big())
    from covalent_lot._stream import holds_verified
    from tests.lot_fakes import xattrs_work

    local = staging / "objects" / ref.raw_sha256[:2] / (ref.raw_sha256 + ".npy")
    assert holds_verified(str(local), ref.raw_sha256, ref.raw_size) or not xattrs_work(staging)


def test_a_consumer_holds_its_inputs_while_it_runs(offload, staging):
    import covalent_lot as lot
    from covalent_lot import _cache
    from tests.lot_fakes import xattrs_work

    ref = stored_big(offload)
    local = staging / "objects" / ref.raw_sha256[:2] / (ref.raw_sha256 + ".npy")

    @lot.offload(mmap=True)
    def consume(a):
        report = _cache.trim(str(staging), 0)  # pressure: evict everything that can go
        assert report.held_skipped == 1 and local.exists()
        return float(a.sum())

    if not xattrs_work(staging):
        pytest.skip("no xattrs here: nothing is a verified copy, nothing is evicted")
    assert consume(ref) == pytest.approx(big().sum())
    assert _cache.trim(str(staging), 0).evicted == 1 and not local.exists()  # released


# --- dedup and compression -----------------------------------------------------------------
def test_dedup_uploads_bytes_once(offload, store, caplog):
    import logging

    first = stored_big(offload, dedup=True)
    version = store.objects[("bkt", first.uri[len("s3://bkt/"):])].version
    assert first.uri == f"{PREFIX}sha256/{first.raw_sha256}.npy"
    with caplog.at_level(logging.INFO, logger="covalent_lot"):
        second = stored_big(offload, dedup=True)
    assert second == first
    assert store.objects[("bkt", first.uri[len("s3://bkt/"):])].version == version  # not rewritten
    assert "not uploaded again" in caplog.text


def test_compression_always_auto_and_never(offload):
    pytest.importorskip("zstandard")

    @offload(compress=True)
    def packed():
        return smooth()

    @offload(compress="auto")
    def auto_smooth():
        return smooth()

    @offload(compress="auto")
    def auto_random():
        return big(200_000)

    @offload(compress=False)
    def never():
        return smooth()

    ref = packed()
    assert ref.compression == "zstd" and ref.uri.endswith(".npy.zst") and ref.size < ref.raw_size / 5
    assert np.array_equal(ref.load(), smooth())
    assert auto_smooth().compression == "zstd"
    assert auto_random().compression is None  # random floats shrink ~6%: not worth a pass
    assert never().compression is None


@pytest.fixture
def compressed_remote(offload, staging):
    """A compressed value that this machine has no copy of."""
    import shutil

    pytest.importorskip("zstandard")

    @offload(compress=True)
    def produce():
        return smooth()

    ref = produce()
    shutil.rmtree(staging)
    return ref


def test_a_compressed_value_is_downloaded_decompressed_and_verified(compressed_remote, staging):
    assert np.array_equal(compressed_remote.load(), smooth())
    leftovers = [n for _d, _s, names in os.walk(staging) for n in names if n.endswith(".zst")]
    assert leftovers == []  # only the decoded copy is cached


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, words", [
    ({"min_size": "4 MBs"}, ValueError, "offload(min_size='4 MBs'): not a size"),
    ({"min_size": -1}, ValueError, "must be >= 0"),
    ({"compress": "yes"}, ValueError, "must be 'auto', True or False"),
    ({"dedup": "no"}, TypeError, "offload(dedup='no') must be True or False"),
    ({"to": 42}, TypeError, "folder URI such as"),
    ({"to": "s3://bkt/{dispatch_id}/"}, ValueError, "no placeholders"),
    ({"to": "ftp://host/x/"}, ValueError, "no covalent-lot strategy for scheme 'ftp'"),
    ({"to": "s3://bkt/x/", "no_such_option": 1}, TypeError, "unexpected option 'no_such_option'"),
])
def test_bad_decorator_arguments_fail_when_decorating(kwargs, error, words):
    import covalent_lot as lot

    with pytest.raises(error) as info:
        lot.offload(lambda: None, **kwargs)
    assert words in str(info.value)


def test_an_unencodable_value_is_a_type_error_naming_the_function(offload):
    @offload()
    def produce():
        return [threading.Lock()] * 10

    with pytest.raises(TypeError, match=r"the return value of produce \(list\) cannot be offloaded"):
        produce()


def test_a_removed_object_names_the_uri_and_the_dispatch(offload, store, staging, monkeypatch):
    import shutil

    from covalent.executor.utils.context import set_context

    with set_context("d-9", 2):
        ref = stored_big(offload)
    store.objects.clear()
    shutil.rmtree(staging)
    with pytest.raises(FileNotFoundError) as info:
        ref.load()
    assert ref.uri in str(info.value) and "dispatch d-9 (node 2)" in str(info.value)


def test_an_overwritten_object_loads_nothing(offload, store, staging):
    import shutil

    import covalent_lot as lot

    ref = stored_big(offload)
    store.add("bkt", ref.uri[len("s3://bkt/"):], b"other bytes")
    shutil.rmtree(staging)
    with pytest.raises(lot.ChecksumMismatchError, match="overwritten. Nothing was loaded"):
        ref.load()
    assert not any(names for _d, _s, names in os.walk(staging))


def test_no_store_anywhere_names_offload_to(staging, monkeypatch):
    import covalent_lot as lot

    monkeypatch.delenv("COVALENT_LOT_OFFLOAD_TO", raising=False)

    @lot.offload(min_size=0)
    def produce():
        return b"x"

    with pytest.raises(ValueError, match=r"give @lot.offload\(to='s3://bucket/prefix/'\), or set "
                                         r"offload_to in \[lot\]"):
        produce()


def test_offload_to_comes_from_the_machine_that_runs_it(store, monkeypatch):
    import covalent_lot as lot
    from covalent_lot._strategy import STRATEGIES

    # Decorated with no store: the machine that runs it names one (served from memory here).
    @lot.offload(min_size=0, compress=False)
    def produce():
        return big()

    monkeypatch.setitem(STRATEGIES, "s3", "tests.lot_fakes:MemoryS3Strategy")
    monkeypatch.setenv("COVALENT_LOT_S3_FAKE_STORE", store.name)
    monkeypatch.setenv("COVALENT_LOT_OFFLOAD_TO", "s3://values/lot")
    ref = produce()
    assert ref.uri.startswith("s3://values/lot/")
    assert (ref.strategy, ref.options) == (STRATEGIES["s3"], {})


def test_compression_without_zstandard_names_the_extra(offload, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)

    @offload(compress=True)
    def produce():
        return smooth()

    with pytest.raises(ImportError, match=r"pip install covalent-lot\[zstd\]"):
        produce()

    @offload(compress="auto")
    def quietly():
        return smooth()

    assert quietly().compression is None  # auto without zstandard: stored as is


# --- what travels -------------------------------------------------------------------------------
def test_a_ref_pickles_small_as_plain_values_with_no_secret(offload, monkeypatch):
    import cloudpickle

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")

    ref = stored_big(offload)
    blob = cloudpickle.dumps(ref)
    assert len(blob) < 4096 and b"s3cr3t" not in blob
    assert pickle.loads(blob) == ref
    assert b"covalent_lot._offload" in blob and b"rebuild" in blob


def test_the_decorated_function_travels_by_value_and_names_what_to_install(tmp_path):
    import cloudpickle

    import covalent_lot as lot
    from tests.lot_fakes import run_python

    @lot.offload(to="s3://bkt/lot/")
    def produce():
        return 1

    path = tmp_path / "fn.pkl"
    path.write_bytes(cloudpickle.dumps(produce))
    result = run_python(f"""
        import sys, cloudpickle
        sys.modules["covalent_lot"] = None
        fn = cloudpickle.load(open({str(path)!r}, "rb"))
        try:
            fn()
        except Exception as exc:
            print(type(exc).__name__ + ":", exc)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ModuleNotFoundError: covalent-lot is not installed in the Python")
    assert "pip install covalent-lot[s3] there" in result.stdout


def test_loading_where_the_sdk_is_missing_names_the_extra():
    from tests.lot_fakes import import_error_without

    out = import_error_without("boto3", """from covalent_lot._offload import Ref
            Ref("s3://bkt/lot/x.npy", "0" * 64, 1, "0" * 64, 1, "numpy", None, None, None,
                "covalent_lot.strategies.s3:S3Strategy", {}, "s3").load()""")
    assert "pip install covalent-lot[s3] in the Python that runs it" in out


def test_offload_above_the_electron_says_where_it_goes():
    import covalent as ct

    import covalent_lot as lot

    @ct.electron
    def produce():
        return 1

    with pytest.raises(TypeError, match="@lot.offload goes under @ct.electron"):
        lot.offload(produce)


def test_a_value_larger_than_the_cache_limit_still_loads(offload, staging, monkeypatch):
    import shutil

    ref = stored_big(offload)
    shutil.rmtree(staging)
    monkeypatch.setenv("COVALENT_LOT_CACHE_LIMIT", "1KiB")
    assert np.array_equal(ref.load(), big())


def test_concurrent_loads_of_one_compressed_value(compressed_remote):
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda _: compressed_remote.load(), range(4)))
    assert all(np.array_equal(a, smooth()) for a in loaded)


@pytest.mark.parametrize("text, small", [
    ("\N{CRAB}" * 20_000, False),  # 20,000 characters, 80,000 bytes of UTF-8: above 64 KiB
    ("a" * 20_000, True),
    ("é" * 40_000, False),  # 80,000 bytes
])
def test_text_is_measured_in_utf8_bytes(offload, text, small):
    @offload()
    def produce():
        return text

    assert (produce() is text) == small
