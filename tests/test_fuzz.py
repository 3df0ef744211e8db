"""Property tests (hypothesis): URI parsing and key-to-path mapping never go astray.

- ``parse_uri`` on any text raises only ``ValueError`` (``TypeError`` for non-str),
  never anything else, and what it accepts prints back to the same URI;
- ``local_path_for_key`` either returns a path inside the destination root
  (after resolving symlinks) or raises ``ValueError``;
- ``StoreURI.child`` of a folder is a URI that parses back to itself.

Examples are derandomized and nothing is stored (``database=None``), so runs are
reproducible and leave no ``.hypothesis`` folder in the repository.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from covalent_lot._engine import local_path_for_key
from covalent_lot._uri import StoreURI, parse_uri

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# Pieces that matter to the parser and the path mapping, mixed with arbitrary text.
TRICKY = st.sampled_from([
    "/", "//", ".", "..", "%2e", "%2e%2e", "%2f", "\\", "..\\", "\x00", "\n", "\x7f", "?", "#",
    "{", "}", "{dispatch_id}", "{node_id}", "{x}", ":", "@", "~", " ", "é", "日本", "\udcff",
])
TEXT = st.lists(st.one_of(TRICKY, st.text(max_size=6)), max_size=12).map("".join)
SCHEMES = st.sampled_from(["s3", "gs", "az", "sftp", "S3", "x+y.z"])
URIS = st.one_of(TEXT, st.builds(lambda s, rest: f"{s}://{rest}", SCHEMES, TEXT))

# A key segment that parse_uri accepts: no '/', control characters, '?', '#', braces.
SEGMENT = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/?#{}"),
    min_size=1, max_size=8,
).filter(lambda s: s not in (".", ".."))
KEYS = st.lists(SEGMENT, max_size=5).map("/".join)
BUCKETS = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/?#{}"),
    min_size=1, max_size=10,
)


@FUZZ
@given(URIS)
@example("s3://bkt/a/%2e%2e/b")
@example("s3://bkt/a\\..\\b")
@example("s3://bkt/\x00")
def test_parse_raises_only_value_error(uri):
    try:
        location = parse_uri(uri)
    except ValueError as exc:
        assert repr(uri) in str(exc) or "{" in uri or "}" in uri
        return
    # Whatever is accepted is safe to print and parse again.
    assert parse_uri(str(location)) == location
    assert not any(part in (".", "..") for part in location.key.split("/")[:-1])


@FUZZ
@given(st.one_of(st.binary(), st.integers(), st.none(), st.lists(st.text(), max_size=2)))
def test_parse_of_non_text_is_a_type_error(value):
    try:
        parse_uri(value)
    except TypeError as exc:
        assert type(value).__name__ in str(exc)
    else:  # pragma: no cover - a failure
        raise AssertionError(f"parse_uri accepted {value!r}")


@FUZZ
@given(SCHEMES, BUCKETS, KEYS, st.booleans())
def test_valid_uris_round_trip(scheme, bucket, key, folder):
    uri = f"{scheme}://{bucket}/{key}{'/' if folder and key else ''}"
    location = parse_uri(uri)
    assert location == StoreURI(scheme.lower(), bucket, location.key)
    assert str(parse_uri(str(location))) == str(location)
    assert location.is_folder == (folder or not key)


@FUZZ
@given(BUCKETS, KEYS, KEYS)
def test_child_of_a_folder_parses_back(bucket, prefix, relative):
    folder = parse_uri(f"s3://{bucket}/{prefix}/" if prefix else f"s3://{bucket}/")
    if not relative:
        return
    child = folder.child(relative)
    assert parse_uri(str(child)) == child
    assert child.key.startswith(folder.key)
    assert child.key[len(folder.key):] == relative


@FUZZ
@given(TEXT)
@example("../x")
@example("a/../../x")
@example("%2e%2e/x")
@example("link/x")
@example("a\\..\\x")
def test_key_maps_inside_the_root_or_is_refused(tmp_path_factory, relative):
    root = _root_with_symlink(tmp_path_factory)
    try:
        path = local_path_for_key(root, relative, f"s3://bkt/p/{relative}")
    except ValueError:
        return
    real_root = os.path.realpath(root)
    assert os.path.commonpath([real_root, os.path.realpath(path)]) == real_root
    assert os.path.realpath(path) != real_root


_ROOTS: dict[int, str] = {}


def _root_with_symlink(factory) -> str:
    """A destination root holding ``link`` -> a folder outside it (made once per session)."""
    key = id(factory)
    if key not in _ROOTS:
        base = factory.mktemp("fuzz")
        (base / "outside").mkdir()
        (base / "root").mkdir()
        (base / "root" / "link").symlink_to(base / "outside", target_is_directory=True)
        _ROOTS[key] = str(base / "root")
    return _ROOTS[key]
