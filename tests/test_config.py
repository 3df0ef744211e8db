"""Options: one precedence rule, validated once, with messages that name the source."""

from __future__ import annotations

import pytest

from covalent_lot._config import COMMON_OPTIONS, Option, Settings, parse_size, resolve

MiB = 1024 * 1024

# Backend options shaped like the S3 ones, without importing covalent at module level.
SPECS = {
    "endpoint_url": Option("str", None, "endpoint"),
    "multipart_chunksize": Option("size", 16 * MiB, "part size", 5 * MiB),
    "max_concurrency": Option("int", 8, "parallel parts", 1),
    "addressing_style": Option("str", "auto", "style", choices=("auto", "path", "virtual")),
}


def run(explicit=None, environ=None, conf=None, section="s3", specs=SPECS) -> Settings:
    return resolve(section, specs, explicit or {}, environ=environ or {}, conf=conf or {})


# --- precedence --------------------------------------------------------------------------

ALL_LEVELS = {
    "argument": 2,
    "environment COVALENT_LOT_S3_MAX_ATTEMPTS": "3",
    "environment COVALENT_LOT_MAX_ATTEMPTS": "4",
    "covalent.conf [lot.s3]": 5,
    "covalent.conf [lot]": 6,
}


@pytest.mark.parametrize("drop", range(len(ALL_LEVELS) + 1))
def test_common_option_precedence(drop):
    """Remove the top ``drop`` levels; the next one down wins."""
    levels = dict(list(ALL_LEVELS.items())[drop:])
    explicit = {"max_attempts": levels["argument"]} if "argument" in levels else {}
    environ = {
        name.split()[1]: value for name, value in levels.items() if name.startswith("environment")
    }
    conf: dict = {}
    if "covalent.conf [lot]" in levels:
        conf["max_attempts"] = levels["covalent.conf [lot]"]
    if "covalent.conf [lot.s3]" in levels:
        conf["s3"] = {"max_attempts": levels["covalent.conf [lot.s3]"]}
    settings = run(explicit, environ, conf)
    if levels:
        origin, raw = next(iter(levels.items()))
        assert settings["max_attempts"] == int(raw)
        assert settings.sources["max_attempts"] == origin
    else:
        assert settings["max_attempts"] == COMMON_OPTIONS["max_attempts"].default == 5
        assert settings.sources["max_attempts"] == "default"


def test_backend_option_precedence():
    conf = {"s3": {"endpoint_url": "http://conf:1"}}
    env = {"COVALENT_LOT_S3_ENDPOINT_URL": "http://env:2"}
    s = run({"endpoint_url": "http://arg:3"}, env, conf)
    assert (s["endpoint_url"], s.sources["endpoint_url"]) == ("http://arg:3", "argument")
    s = run({}, env, conf)
    assert s["endpoint_url"] == "http://env:2"
    assert s.sources["endpoint_url"] == "environment COVALENT_LOT_S3_ENDPOINT_URL"
    s = run({}, {}, conf)
    assert (s["endpoint_url"], s.sources["endpoint_url"]) == ("http://conf:1", "covalent.conf [lot.s3]")
    s = run()
    assert (s["endpoint_url"], s.sources["endpoint_url"]) == (None, "default")


def test_unprefixed_env_is_only_for_common_options():
    s = run(environ={"COVALENT_LOT_ENDPOINT_URL": "http://ignored:1", "COVALENT_LOT_VERIFY": "false"})
    assert s["endpoint_url"] is None and s.sources["endpoint_url"] == "default"
    assert s["verify"] is False and s.sources["verify"] == "environment COVALENT_LOT_VERIFY"


def test_other_sections_env_is_ignored():
    s = run(environ={"COVALENT_LOT_GCS_MAX_ATTEMPTS": "9"})
    assert s["max_attempts"] == 5


def test_empty_env_value_falls_through():
    s = run(environ={"COVALENT_LOT_S3_MAX_ATTEMPTS": "", "COVALENT_LOT_MAX_ATTEMPTS": "7"})
    assert s["max_attempts"] == 7
    assert s.sources["max_attempts"] == "environment COVALENT_LOT_MAX_ATTEMPTS"


@pytest.mark.parametrize(
    "name, falsy, lower",
    [
        ("verify", False, {"COVALENT_LOT_VERIFY": "true"}),
        ("base_delay", 0, {"COVALENT_LOT_BASE_DELAY": "3"}),
        ("max_delay", 0.0, {"COVALENT_LOT_S3_MAX_DELAY": "9"}),
        ("endpoint_url", "", {"COVALENT_LOT_S3_ENDPOINT_URL": "http://env:1"}),
    ],
)
def test_explicit_falsy_argument_is_kept(name, falsy, lower):
    s = run({name: falsy}, lower, {name: "x"} if name in COMMON_OPTIONS else {})
    assert s[name] == falsy and s.sources[name] == "argument"


def test_falsy_conf_values_are_kept():
    s = run(conf={"verify": True, "base_delay": 2, "s3": {"verify": False, "base_delay": 0}})
    assert s["verify"] is False and s.sources["verify"] == "covalent.conf [lot.s3]"
    assert s["base_delay"] == 0 and s.sources["base_delay"] == "covalent.conf [lot.s3]"
    s = run(conf={"verify": False})
    assert s["verify"] is False and s.sources["verify"] == "covalent.conf [lot]"


def test_explicit_none_means_not_given():
    s = run({"max_attempts": None}, {"COVALENT_LOT_MAX_ATTEMPTS": "3"})
    assert s["max_attempts"] == 3


def test_settings_mapping_and_sources_cover_every_option():
    s = run({"max_concurrency": 4})
    assert set(s) == set(COMMON_OPTIONS) | set(SPECS) == set(s.sources)
    assert len(s) == len(s.as_dict())
    assert s.as_dict()["max_concurrency"] == 4
    assert s.section == "s3"
    assert "max_concurrency" in repr(s)


# --- unknown names -------------------------------------------------------------------------

def test_unknown_key_in_lot_table_suggests():
    with pytest.raises(ValueError) as info:
        run(conf={"max_attempt": 3})
    assert type(info.value) is ValueError
    message = str(info.value)
    assert "'max_attempt'" in message and "[lot]" in message
    assert "did you mean 'max_attempts'" in message


def test_backend_option_in_lot_table_is_unknown():
    with pytest.raises(ValueError, match=r"unknown key 'endpoint_url' in \[lot\]"):
        run(conf={"endpoint_url": "http://x:1"})


def test_unknown_key_in_section_table_suggests():
    with pytest.raises(ValueError) as info:
        run(conf={"s3": {"endpoint": "http://x:1"}})
    message = str(info.value)
    assert "'endpoint'" in message and "[lot.s3]" in message
    assert "did you mean 'endpoint_url'" in message


def test_unknown_section_in_lot_table_suggests():
    with pytest.raises(ValueError, match=r"unknown key 's4' in \[lot\]"):
        run(conf={"s4": {"endpoint_url": "http://x:1"}})
    with pytest.raises(ValueError, match=r"'s33' in \[lot\].*did you mean 's3'"):
        run(conf={"s33": {"endpoint_url": "http://x:1"}})


def test_known_section_that_is_not_a_table():
    with pytest.raises(ValueError, match=r"\[lot.s3\] must be a table"):
        run(conf={"s3": "http://x:1"})


def test_lot_that_is_not_a_table():
    with pytest.raises(ValueError, match=r"\[lot\] must be a table"):
        resolve("s3", SPECS, {}, environ={}, conf="nope")  # type: ignore[arg-type]


def test_unknown_argument_is_a_type_error_with_suggestion():
    with pytest.raises(TypeError) as info:
        resolve("s3", SPECS, {"endpoint": "http://x:1"}, environ={}, conf={}, owner="S3Strategy()")
    message = str(info.value)
    assert "S3Strategy()" in message and "'endpoint'" in message
    assert "did you mean 'endpoint_url'" in message


# --- values ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "raw, expected",
    [
        (16777216, 16 * MiB),
        ("16777216", 16 * MiB),
        ("16MiB", 16 * MiB),
        ("16mib", 16 * MiB),
        ("16 MiB", 16 * MiB),
        ("1.5GiB", 1536 * MiB),
        ("8 MB", 8_000_000),
        ("8M", 8_000_000),
        ("512KiB", 512 * 1024),
        ("2 kb", 2000),
        ("1TiB", 1024**4),
        ("100B", 100),
        (32.0, 32),
    ],
)
def test_parse_size(raw, expected):
    assert parse_size(raw) == expected


@pytest.mark.parametrize("raw", ["", "MiB", "16 XB", "1.2.3MiB", "-5MiB", "sixteen", 1.5, None, [1]])
def test_parse_size_rejects(raw):
    with pytest.raises(ValueError) as info:
        parse_size(raw)
    assert repr(raw) in str(info.value)


def test_parse_size_refuses_bools():
    with pytest.raises(TypeError):
        parse_size(True)


@pytest.mark.parametrize(
    "value",
    [-1, 0, 1024, "1MiB", "5242879", "-16MiB", 4 * MiB],
)
def test_negative_or_too_small_chunk_size(value):
    with pytest.raises(ValueError) as info:
        run({"multipart_chunksize": value})
    message = str(info.value)
    assert "multipart_chunksize" in message and repr(value) in message
    assert "5,242,880 bytes" in message or "not a size" in message


def test_minimum_chunk_size_accepted():
    assert run({"multipart_chunksize": "5MiB"})["multipart_chunksize"] == 5 * MiB


@pytest.mark.parametrize(
    "var, value, fragment",
    [
        ("COVALENT_LOT_VERIFY", "maybe", "not a boolean"),
        ("COVALENT_LOT_S3_VERIFY", "2", "not a boolean"),
        ("COVALENT_LOT_MAX_ATTEMPTS", "three", "not an integer"),
        ("COVALENT_LOT_S3_MAX_ATTEMPTS", "2.5", "not an integer"),
        ("COVALENT_LOT_S3_MAX_CONCURRENCY", "eight", "not an integer"),
        ("COVALENT_LOT_S3_MAX_CONCURRENCY", "0", ">= 1"),
        ("COVALENT_LOT_MAX_ATTEMPTS", "0", ">= 1"),
        ("COVALENT_LOT_BASE_DELAY", "soon", "not a number"),
        ("COVALENT_LOT_MAX_DELAY", "-1", ">= 0"),
        ("COVALENT_LOT_S3_MULTIPART_CHUNKSIZE", "16 XB", "not a size"),
        ("COVALENT_LOT_S3_MULTIPART_CHUNKSIZE", "1MiB", "5,242,880"),
        ("COVALENT_LOT_S3_ADDRESSING_STYLE", "sideways", "auto, path, virtual"),
    ],
)
def test_bad_env_values_name_the_variable(var, value, fragment):
    with pytest.raises(ValueError) as info:
        run(environ={var: value})
    assert type(info.value) is ValueError
    message = str(info.value)
    assert f"environment {var}" in message
    assert repr(value) in message
    assert fragment in message


@pytest.mark.parametrize("raw, expected", [
    ("1", True), ("true", True), ("Yes", True), (" ON ", True),
    ("0", False), ("FALSE", False), ("no", False), ("off", False),
])
def test_bool_strings(raw, expected):
    assert run(environ={"COVALENT_LOT_VERIFY": raw})["verify"] is expected


def test_bad_conf_value_names_the_table():
    with pytest.raises(ValueError, match=r"max_concurrency from covalent.conf \[lot.s3\].*'many'"):
        run(conf={"s3": {"max_concurrency": "many"}})
    with pytest.raises(ValueError, match=r"verify from covalent.conf \[lot\]"):
        run(conf={"verify": "perhaps"})


def test_bad_argument_value_names_the_argument():
    with pytest.raises(ValueError, match=r"max_concurrency from argument"):
        run({"max_concurrency": True})
    with pytest.raises(ValueError, match=r"addressing_style from argument.*'PATH'"):
        run({"addressing_style": "PATH"})


@pytest.mark.parametrize("var", ["COVALENT_LOT_BASE_DELAY", "COVALENT_LOT_MAX_DELAY"])
def test_nan_delay_is_refused(var):
    # NaN passes every ``<`` check, so a minimum alone does not stop it; it would
    # reach the retry loop (and, for timeouts, the socket layer on the executor).
    with pytest.raises(ValueError, match=var):
        run(environ={var: "nan"})


# --- through the real covalent.conf ------------------------------------------------------------

def test_strategy_reads_lot_tables_from_covalent_conf(covalent_conf, s3, monkeypatch):
    covalent_conf({
        "max_attempts": 7,
        "verify": False,
        "s3": {"endpoint_url": "http://127.0.0.1:9000", "multipart_chunksize": "32MiB",
               "max_attempts": 3},
    })
    settings = s3.S3Strategy().settings
    assert settings["max_attempts"] == 3
    assert settings.sources["max_attempts"] == "covalent.conf [lot.s3]"
    assert settings["verify"] is False and settings.sources["verify"] == "covalent.conf [lot]"
    assert settings["endpoint_url"] == "http://127.0.0.1:9000"
    assert settings["multipart_chunksize"] == 32 * MiB
    assert settings["max_concurrency"] == 8 and settings.sources["max_concurrency"] == "default"

    monkeypatch.setenv("COVALENT_LOT_S3_ENDPOINT_URL", "http://127.0.0.1:9001")
    monkeypatch.setenv("COVALENT_LOT_MAX_ATTEMPTS", "4")
    settings = s3.S3Strategy().settings
    assert settings["endpoint_url"] == "http://127.0.0.1:9001"
    assert settings["max_attempts"] == 4
    assert settings.sources["max_attempts"] == "environment COVALENT_LOT_MAX_ATTEMPTS"

    settings = s3.S3Strategy(endpoint_url="http://127.0.0.1:9002", max_attempts=1).settings
    assert settings["endpoint_url"] == "http://127.0.0.1:9002"
    assert settings["max_attempts"] == 1 and settings.sources["max_attempts"] == "argument"


def test_conf_is_read_when_the_strategy_is_built(covalent_conf, s3):
    covalent_conf({"s3": {"profile": "first"}})
    first = s3.S3Strategy()
    covalent_conf({"s3": {"profile": "second"}})
    assert first.settings["profile"] == "first"
    assert s3.S3Strategy().settings["profile"] == "second"


def test_toml_written_by_hand_then_reloaded(covalent_conf, s3):
    from covalent._shared_files import config as ct_config

    covalent_conf({})  # start from a file without [lot]
    path = ct_config._config_manager.config_file
    with open(path, "a", encoding="utf-8") as f:
        f.write('\n[lot]\nbase_delay = 0.25\n\n[lot.s3]\nregion_name = "eu-west-1"\n'
                'multipart_threshold = "64 MiB"\nsse = "AES256"\n')
    ct_config.reload_config()
    settings = s3.S3Strategy().settings
    assert settings["base_delay"] == 0.25
    assert settings["region_name"] == "eu-west-1"
    assert settings["multipart_threshold"] == 64 * MiB
    assert settings["sse"] == "AES256"
    assert "region_name='eu-west-1'" in repr(s3.S3Strategy())


def test_unknown_key_in_covalent_conf_fails_strategy_construction(covalent_conf, s3):
    covalent_conf({"s3": {"enpoint_url": "http://127.0.0.1:9000"}})
    with pytest.raises(ValueError, match=r"'enpoint_url' in \[lot.s3\].*did you mean 'endpoint_url'"):
        s3.S3Strategy()
    covalent_conf({"max_attempt": 2})
    with pytest.raises(ValueError, match=r"'max_attempt' in \[lot\].*did you mean 'max_attempts'"):
        s3.S3Strategy()


def test_unknown_strategy_argument(s3):
    with pytest.raises(TypeError, match=r"S3Strategy\(\) got an unexpected option 'endpoint'.*'endpoint_url'"):
        s3.S3Strategy(endpoint="http://127.0.0.1:9000")


def test_no_lot_table_means_defaults(covalent_conf, s3):
    covalent_conf({})
    settings = s3.S3Strategy().settings
    assert set(settings.sources.values()) == {"default"}
