"""Named stores: ``[lot.<backend>.stores.<name>]`` chosen with ``store=`` or COVALENT_LOT_<BACKEND>_STORE.

A store is a named set of options for one backend, so one process can use two
endpoints at once. These tests pin the precedence (argument > environment >
store > [lot.<backend>] > [lot] > default), the messages of every mistake, and
that strategies for different stores stay independent.
"""

from __future__ import annotations

import pytest

from covalent_lot._config import BACKEND_SECTIONS, COMMON_OPTIONS, Option, resolve

SPECS = {
    "endpoint_url": Option("str", None, "endpoint"),
    "addressing_style": Option("str", "auto", "style", choices=("auto", "path", "virtual")),
}

STORES = {
    "minio": {"endpoint_url": "http://minio.internal:9000", "addressing_style": "path"},
    "aws": {"max_attempts": 9},
}


def run(explicit=None, environ=None, conf=None, section="s3"):
    return resolve(section, SPECS, explicit or {}, environ=environ or {}, conf=conf or {})


def with_stores(section_table=None, stores=STORES, **lot) -> dict:
    """A ``[lot]`` table whose ``[lot.s3]`` holds ``section_table`` and ``stores``."""
    return {**lot, "s3": {**(section_table or {}), "stores": stores}}


# --- precedence --------------------------------------------------------------------------

# Highest first; each level gives max_attempts a different value.
LEVELS = {
    "argument": 2,
    "environment COVALENT_LOT_S3_MAX_ATTEMPTS": "3",
    "environment COVALENT_LOT_MAX_ATTEMPTS": "4",
    "covalent.conf [lot.s3.stores.minio]": 5,
    "covalent.conf [lot.s3]": 6,
    "covalent.conf [lot]": 7,
    "default": COMMON_OPTIONS["max_attempts"].default,
}


@pytest.mark.parametrize("drop", range(len(LEVELS)), ids=list(LEVELS))
def test_precedence_with_a_store(drop):
    """Remove the levels above the named one; it wins, and sources say so."""
    levels = dict(list(LEVELS.items())[drop:])
    explicit = {"store": "minio"}
    if "argument" in levels:
        explicit["max_attempts"] = levels["argument"]
    environ = {k.split()[1]: v for k, v in levels.items() if k.startswith("environment")}
    store = dict(STORES["minio"])
    section, lot = {}, {}
    if "covalent.conf [lot.s3.stores.minio]" in levels:
        store["max_attempts"] = levels["covalent.conf [lot.s3.stores.minio]"]
    if "covalent.conf [lot.s3]" in levels:
        section["max_attempts"] = levels["covalent.conf [lot.s3]"]
    if "covalent.conf [lot]" in levels:
        lot["max_attempts"] = levels["covalent.conf [lot]"]
    settings = run(explicit, environ, with_stores(section, {**STORES, "minio": store}, **lot))
    origin, value = next(iter(levels.items()))
    assert (settings["max_attempts"], settings.sources["max_attempts"]) == (int(value), origin)
    assert settings.store == "minio"


def test_backend_option_from_store_beats_section_but_not_environment():
    conf = with_stores({"endpoint_url": "http://section:1", "addressing_style": "virtual"})
    s = run({"store": "minio"}, conf=conf)
    assert s["endpoint_url"] == "http://minio.internal:9000"
    assert s.sources["endpoint_url"] == "covalent.conf [lot.s3.stores.minio]"
    assert (s["addressing_style"], s.sources["addressing_style"]) == (
        "path", "covalent.conf [lot.s3.stores.minio]")
    env = {"COVALENT_LOT_S3_ENDPOINT_URL": "http://env:2"}
    s = run({"store": "minio"}, env, conf)
    assert (s["endpoint_url"], s.sources["endpoint_url"]) == (
        "http://env:2", "environment COVALENT_LOT_S3_ENDPOINT_URL")
    s = run({"store": "aws"}, conf=conf)  # a store without the option: the section's value
    assert (s["endpoint_url"], s.sources["endpoint_url"]) == ("http://section:1", "covalent.conf [lot.s3]")


def test_without_a_store_the_stores_are_ignored():
    s = run(conf=with_stores({"addressing_style": "virtual"}))
    assert s.store is None
    assert s["endpoint_url"] is None and s.sources["endpoint_url"] == "default"
    assert s.sources["addressing_style"] == "covalent.conf [lot.s3]"
    assert "store" not in s and set(s) == set(COMMON_OPTIONS) | set(SPECS)


@pytest.mark.parametrize(
    "explicit, environ, expected",
    [
        ({}, {"COVALENT_LOT_S3_STORE": "minio"}, "minio"),  # the default store
        ({"store": "aws"}, {"COVALENT_LOT_S3_STORE": "minio"}, "aws"),  # the argument wins
        ({"store": None}, {"COVALENT_LOT_S3_STORE": "minio"}, "minio"),  # None: not given
        ({}, {"COVALENT_LOT_S3_STORE": ""}, None),  # empty: not set
        ({}, {"COVALENT_LOT_GCS_STORE": "minio", "COVALENT_LOT_STORE": "minio"}, None),
    ],
    ids=["env-default", "argument-wins", "none-argument", "empty-env", "other-variables"],
)
def test_which_store(explicit, environ, expected):
    s = run(explicit, environ, with_stores())
    assert s.store == expected
    assert (s.sources["endpoint_url"] == "covalent.conf [lot.s3.stores.minio]") == (expected == "minio")


# --- mistakes: each message names the value and the fix ------------------------------------

@pytest.mark.parametrize(
    "explicit, environ, conf, parts",
    [
        ({"store": "minoi"}, {}, with_stores(),
         ["unknown store 'minoi'", "the store= argument", "aws, minio", "did you mean 'minio'",
          "[lot.s3.stores.minoi]"]),
        ({}, {"COVALENT_LOT_S3_STORE": "gcp"}, with_stores(),
         ["unknown store 'gcp'", "environment COVALENT_LOT_S3_STORE", "aws, minio",
          "[lot.s3.stores.gcp]"]),
        ({"store": "minio"}, {}, {}, ["unknown store 'minio'", "no store is defined for s3",
                                      "[lot.s3.stores.minio]"]),
        # a store of another backend is not a store of this one
        ({"store": "minio"}, {}, {"gcs": {"stores": {"minio": {}}}},
         ["unknown store 'minio'", "no store is defined for s3"]),
    ],
    ids=["argument-typo", "env-unknown", "none-defined", "other-backend"],
)
def test_unknown_store(explicit, environ, conf, parts):
    with pytest.raises(ValueError) as err:
        run(explicit, environ, conf)
    for part in parts:
        assert part in str(err.value)


@pytest.mark.parametrize(
    "conf, parts",
    [
        (with_stores(stores={"minio": {"endpoint": "http://x"}}),
         ["unknown key 'endpoint'", "[lot.s3.stores.minio]", "did you mean 'endpoint_url'"]),
        (with_stores(stores={"minio": {"max_atempts": 3}}),
         ["unknown key 'max_atempts'", "[lot.s3.stores.minio]", "did you mean 'max_attempts'"]),
        (with_stores(stores={"minio": {"zzz": 1}}),
         ["unknown key 'zzz'", "known names: addressing_style, base_delay"]),
        (with_stores(stores="minio"), ["[lot.s3.stores] must hold one table per store", "'minio'"]),
        (with_stores(stores={"minio": "http://x"}),
         ["[lot.s3.stores] must hold one table per store", "[lot.s3.stores.<name>]",
          "minio = 'http://x'"]),
        ({"s3": {"store": "minio"}}, ["'store' is not a key of [lot.s3]", 'store="<name>"',
                                      "COVALENT_LOT_S3_STORE=<name>"]),
        ({"s3": {"storse": {}}}, ["unknown key 'storse' in [lot.s3]", "did you mean 'stores'"]),
        ({"stores": {"minio": {}}}, ["[lot.s3.stores.<name>]", "not [lot.stores]"]),
    ],
    ids=["backend-key", "common-key", "far-key", "not-tables", "store-not-table",
         "store-in-section", "stores-typo", "stores-in-lot"],
)
def test_bad_tables(conf, parts):
    """Checked whether or not a store is chosen: a typo shows on the first build."""
    with pytest.raises(ValueError) as err:
        run(conf=conf)
    for part in parts:
        assert part in str(err.value)


def test_store_values_are_validated_like_section_values():
    conf = with_stores(stores={"minio": {"max_attempts": 0, "addressing_style": "sideways"}})
    with pytest.raises(ValueError, match=r"max_attempts from covalent.conf \[lot.s3.stores.minio\] "
                                         r"must be >= 1, got 0"):
        run({"store": "minio", "addressing_style": "path"}, conf=conf)
    with pytest.raises(ValueError, match=r"addressing_style from covalent.conf \[lot.s3.stores.minio\] "
                                         r"must be one of auto, path, virtual, got 'sideways'"):
        run({"store": "minio", "max_attempts": 2}, conf=conf)


@pytest.mark.parametrize(
    "explicit, error, message",
    [
        ({"stor": "minio"}, TypeError, "unexpected option 'stor'; did you mean 'store'?"),
        ({"store": 3}, TypeError, "store (from the store= argument) must be a store name (str), got 3"),
    ],
)
def test_bad_store_argument(explicit, error, message):
    with pytest.raises(error) as err:
        run(explicit, conf=with_stores())
    assert message in str(err.value)


# --- every backend, through the strategies and factories ----------------------------------

SCHEMES = {"s3": "s3", "gcs": "gs", "azure": "az", "sftp": "sftp"}


def test_every_section_has_a_scheme():
    assert set(SCHEMES) == set(BACKEND_SECTIONS)


@pytest.mark.parametrize("section", BACKEND_SECTIONS)
def test_every_backend_takes_a_store(section, covalent_conf, monkeypatch):
    """Through strategy_for, the shared resolve() and the covalent.conf reader."""
    from covalent_lot._strategy import strategy_for

    covalent_conf({section: {"max_attempts": 2, "stores": {"a": {"max_attempts": 3}, "b": {}}}})
    uri = f"{SCHEMES[section]}://bucket/key"
    chosen = strategy_for(uri, store="a").settings
    assert (chosen.store, chosen["max_attempts"]) == ("a", 3)
    assert chosen.sources["max_attempts"] == f"covalent.conf [lot.{section}.stores.a]"
    assert strategy_for(uri, store="b").settings["max_attempts"] == 2
    assert strategy_for(uri).settings["max_attempts"] == 2
    monkeypatch.setenv(f"COVALENT_LOT_{section.upper()}_STORE", "a")
    assert strategy_for(uri).settings["max_attempts"] == 3  # the default store
    with pytest.raises(ValueError, match=rf"unknown store 'c'.*\[lot.{section}.stores.c\]"):
        strategy_for(uri, store="c")


def test_factories_pass_the_store(covalent_conf):
    import covalent_lot as lot

    covalent_conf(with_stores())
    uri = "s3://bucket/key"
    for made in (lot.handoff(uri, store="minio"), lot.upload(uri, "/tmp/x", store="minio"),
                 lot.download(uri, "/tmp/x", store="minio")):
        settings = made.strategy.settings
        assert settings.store == "minio" and settings["endpoint_url"] == "http://minio.internal:9000"
    with pytest.raises(TypeError, match="not both"):
        lot.handoff(uri, strategy=lot.strategy_for(uri), store="minio")


def test_strategies_of_different_stores_are_independent(covalent_conf, s3):
    """Built in one process, each keeps its own values, also through a pickle."""
    import cloudpickle

    covalent_conf(with_stores({"region_name": "us-east-1"}, stores={
        "a": {"endpoint_url": "http://a:1", "profile": "pa"},
        "b": {"endpoint_url": "http://b:2", "profile": "pb", "max_concurrency": 2},
    }))
    a, b, plain = s3.S3Strategy(store="a"), s3.S3Strategy(store="b"), s3.S3Strategy()
    a_before = a.settings.as_dict()
    assert (a.settings["endpoint_url"], a.settings["profile"]) == ("http://a:1", "pa")
    assert (b.settings["endpoint_url"], b.settings["profile"]) == ("http://b:2", "pb")
    assert a.settings["max_concurrency"] == 8 and b.settings["max_concurrency"] == 2
    assert plain.settings["endpoint_url"] is None and plain.settings.store is None
    assert {a.settings["region_name"], b.settings["region_name"]} == {"us-east-1"}
    assert a.settings.as_dict() == a_before  # building b changed nothing in a
    for strategy in (a, b):
        copy = cloudpickle.loads(cloudpickle.dumps(strategy))
        assert copy.settings.as_dict() == strategy.settings.as_dict()
        assert copy.settings.store == strategy.settings.store
        call = strategy._call("download", "s3://bucket/key", "/tmp/key")
        # The store's name travels; the executor resolves it in its own covalent.conf.
        assert cloudpickle.loads(cloudpickle.dumps(call)).options == {"store": strategy.settings.store}
        assert cloudpickle.loads(cloudpickle.dumps(call)).settings().as_dict() == strategy.settings.as_dict()
