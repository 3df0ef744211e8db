"""Storage URIs: what parses, what is refused, and what the value type offers."""

from __future__ import annotations

import pathlib

import pytest

from covalent_lot import StoreURI, parse_uri
from covalent_lot._uri import check_template, has_placeholders, render


@pytest.mark.parametrize(
    "uri, bucket, key, folder, name",
    [
        ("s3://bkt/key", "bkt", "key", False, "key"),
        ("s3://bkt/runs/2024/data.npy", "bkt", "runs/2024/data.npy", False, "data.npy"),
        ("s3://bkt/prefix/", "bkt", "prefix/", True, "prefix"),
        ("s3://bkt/a/b/c/", "bkt", "a/b/c/", True, "c"),
        ("s3://bkt/", "bkt", "", True, ""),
        ("s3://bkt/with space/naïve ü €.npy", "bkt", "with space/naïve ü €.npy", False,
         "naïve ü €.npy"),
        ("s3://bkt/日本/データ.bin", "bkt", "日本/データ.bin", False, "データ.bin"),
        ("s3://bkt/runs/{dispatch_id}/{node_id}/x.npy", "bkt",
         "runs/{dispatch_id}/{node_id}/x.npy", False, "x.npy"),
        ("s3://bkt/runs/{dispatch_id}/", "bkt", "runs/{dispatch_id}/", True, "{dispatch_id}"),
        ("s3://bkt/a%20b", "bkt", "a%20b", False, "a%20b"),  # taken literally, not decoded
        ("s3://bkt/.hidden/..dots/x.", "bkt", ".hidden/..dots/x.", False, "x."),
    ],
)
def test_good_uris_parse_into_their_parts(uri, bucket, key, folder, name):
    location = parse_uri(uri)
    assert location == StoreURI("s3", bucket, key)
    assert location.is_folder is folder
    assert location.name == name
    assert str(location) == uri
    assert parse_uri(str(location)) == location


def test_scheme_is_lowercased():
    assert parse_uri("S3://bkt/key") == StoreURI("s3", "bkt", "key")


@pytest.mark.parametrize(
    "uri, fragment",
    [
        ("bkt/key", "scheme://bucket/key"),
        ("s3:/bkt/key", "scheme://bucket/key"),
        ("", "scheme://bucket/key"),
        ("://bkt/key", "scheme://bucket/key"),
        ("s3:///key", "no bucket"),
        ("s3://", "no bucket"),
        ("s3://bkt", "s3://bkt/"),
        ("s3://bkt//key", "'/'"),
        ("s3://bkt/a//b", "//"),
        ("s3://bkt/a//", "//"),
        ("s3://bkt/a///b/", "//"),
        ("s3://bkt/./a", "'.'"),
        ("s3://bkt/a/./b", "'.'"),
        ("s3://bkt/a/.", "'.'"),
        ("s3://bkt/./", "'.'"),
        ("s3://bkt/..", "'..'"),
        ("s3://bkt/a/../b", "'..'"),
        ("s3://bkt/a/../", "'..'"),
        ("s3://bkt/a?versionId=3", "'?'"),
        ("s3://bkt/a#frag", "'#'"),
        ("s3://bkt?x/a", "'?'"),
        ("s3://bkt/a\nb", "control"),
        ("s3://bkt/a\x00b", "control"),
        ("s3://bkt/a\tb", "control"),
        ("s3://bkt/a\x7fb", "control"),
        ("s3://bk\rt/a", "control"),
        ("s3://{dispatch_id}/a", "bucket"),
        ("s3://bkt-{node_id}/a", "bucket"),
    ],
)
def test_bad_uris_are_value_errors_naming_the_uri(uri, fragment):
    with pytest.raises(ValueError) as info:
        parse_uri(uri)
    assert type(info.value) is ValueError
    message = str(info.value)
    assert repr(uri) in message
    assert fragment in message


@pytest.mark.parametrize(
    "uri, fragment",
    [
        ("s3://bkt/runs/{foo}/x", "{foo}"),
        ("s3://bkt/runs/{}/x", "{}"),
        ("s3://bkt/runs/{DISPATCH_ID}/x", "{DISPATCH_ID}"),
        ("s3://bkt/runs/{dispatch_id/x", "unbalanced"),
        ("s3://bkt/runs/dispatch_id}/x", "unbalanced"),
        ("s3://bkt/runs/{{dispatch_id}}/x", "unbalanced"),
    ],
)
def test_bad_placeholders_name_the_key(uri, fragment):
    key = uri.split("/", 3)[3]
    with pytest.raises(ValueError) as info:
        parse_uri(uri)
    assert type(info.value) is ValueError
    assert repr(key) in str(info.value)
    assert fragment in str(info.value)


@pytest.mark.parametrize("value", [None, b"s3://bkt/key", 42, pathlib.PurePosixPath("/tmp/x")])
def test_non_str_is_a_type_error(value):
    with pytest.raises(TypeError) as info:
        parse_uri(value)
    assert type(value).__name__ in str(info.value)


def test_scheme_restriction():
    assert parse_uri("s3://bkt/k", schemes=("s3",)).scheme == "s3"
    assert parse_uri("S3://bkt/k", schemes=("s3",)).scheme == "s3"
    with pytest.raises(ValueError) as info:
        parse_uri("gs://bkt/k", schemes=("s3",))
    assert "'gs'" in str(info.value) and "s3" in str(info.value)
    assert "'gs://bkt/k'" in str(info.value)
    # Without a restriction any well-formed scheme parses.
    assert parse_uri("gs://bkt/k").scheme == "gs"


def test_child_of_a_folder():
    folder = parse_uri("s3://bkt/prefix/")
    assert folder.child("a/b.npy") == StoreURI("s3", "bkt", "prefix/a/b.npy")
    assert folder.child("sub/") .is_folder
    assert parse_uri("s3://bkt/").child("x") == StoreURI("s3", "bkt", "x")


def test_child_of_an_object_is_refused():
    with pytest.raises(ValueError) as info:
        parse_uri("s3://bkt/file.npy").child("x")
    assert "s3://bkt/file.npy" in str(info.value)


def test_as_folder():
    assert parse_uri("s3://bkt/a").as_folder() == StoreURI("s3", "bkt", "a/")
    folder = parse_uri("s3://bkt/a/")
    assert folder.as_folder() is folder


def test_render_fills_placeholders_in_the_key_only():
    location = parse_uri("s3://bkt/runs/{dispatch_id}/{node_id}/x-{node_id}.npy")
    rendered = location.render({"dispatch_id": "d-42", "node_id": "7"})
    assert rendered == StoreURI("s3", "bkt", "runs/d-42/7/x-7.npy")
    assert location.key == "runs/{dispatch_id}/{node_id}/x-{node_id}.npy"  # frozen, unchanged
    assert parse_uri("s3://bkt/plain").render({}) == StoreURI("s3", "bkt", "plain")


def test_template_helpers():
    assert has_placeholders("/tmp/{dispatch_id}/x")
    assert not has_placeholders("/tmp/x")
    assert render("/{node_id}/{dispatch_id}", {"dispatch_id": "d", "node_id": 3}) == "/3/d"
    check_template("/tmp/{dispatch_id}/{node_id}", "local path")
    with pytest.raises(ValueError, match=r"local path '/tmp/\{bad\}' has an unknown placeholder"):
        check_template("/tmp/{bad}", "local path")


def test_store_uri_is_hashable_and_frozen():
    location = parse_uri("s3://bkt/k")
    assert {location: 1}[StoreURI("s3", "bkt", "k")] == 1
    with pytest.raises(AttributeError):
        location.key = "other"  # type: ignore[misc]
