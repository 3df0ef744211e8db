"""Two S3 endpoints at once, each a named store in covalent.conf.

The recipe these tests follow, for e.g. an in-house MinIO plus AWS: put each
endpoint's options in a store and, since S3 credentials are never options,
give each store its own AWS *profile*; boto3 reads that profile's keys from the
shared credentials file on the executor, when the transfer runs::

    # covalent.conf
    [lot.s3]
    region_name = "us-east-1"
    [lot.s3.stores.minio]
    endpoint_url = "http://minio.internal:9000"
    addressing_style = "path"
    profile = "minio"
    [lot.s3.stores.aws]
    profile = "prod"

    # ~/.aws/credentials (or the file AWS_SHARED_CREDENTIALS_FILE names)
    [minio]
    aws_access_key_id = ...
    aws_secret_access_key = ...
    [prod]
    aws_access_key_id = ...
    aws_secret_access_key = ...

then ``S3Strategy(store="minio")``, ``lot.strategy_for(uri, store="aws")``,
``lot.handoff(uri, store="minio")``, or ``COVALENT_LOT_S3_STORE=minio`` for the
default. Environment variables for an option (``COVALENT_LOT_S3_ENDPOINT_URL``)
beat every store's value, so leave them unset where stores are used.

Here the two endpoints are the session's SeaweedFS and a second one started by
this module, each enforcing its own keys.

Run: LOT_BACKENDS=s3 python -m pytest integration/test_stores.py -q
"""

from __future__ import annotations

import copy
import os
import tomllib

import pytest

import covalent_lot as lot
from covalent_lot._stream import sha256_file

_wanted = [b for b in os.environ.get("LOT_BACKENDS", "").split(",") if b]
pytestmark = [
    pytest.mark.skipif(bool(_wanted) and "s3" not in _wanted, reason="LOT_BACKENDS excludes s3"),
    pytest.mark.parametrize("kit", ["s3"], indirect=True),
]

from integration import _kits
from integration._kits import crc32c_of, sha256_bytes, stored_checksum
MiB = 1024 * 1024


class SecondS3Kit(_kits.S3Kit):
    """The S3 kit's server and plain-boto3 helpers, once more, with other keys."""

    access_key = "lotsecondaccess"
    secret_key = "lotsecondsecret9876543210"


CONF = """
[lot.s3]
region_name = "{region}"
addressing_style = "path"

[lot.s3.stores.a]
endpoint_url = "{a.endpoint}"
profile = "store-a"

[lot.s3.stores.b]
endpoint_url = "{b.endpoint}"
profile = "store-b"
multipart_threshold = "5MiB"
multipart_chunksize = "5MiB"
"""

CREDENTIALS = """
[store-a]
aws_access_key_id = {a.access_key}
aws_secret_access_key = {a.secret_key}

[store-b]
aws_access_key_id = {b.access_key}
aws_secret_access_key = {b.secret_key}
"""


@pytest.fixture(scope="module")
def second(lot_session_dir):
    """A second ``weed mini`` beside the session's; stopped after this module."""
    kit = SecondS3Kit()
    kit.start(lot_session_dir / "s3-second")
    yield kit
    kit.stop()


@pytest.fixture
def second_bucket(second):
    name = second.new_bucket()
    yield name
    second.delete_bucket(name)


@pytest.fixture
def stores(kit, second, tmp_path, monkeypatch):
    """covalent.conf with store ``a`` (the session's server) and ``b`` (the second),
    set in Covalent's config in memory and in the session's private file; each
    store's keys only in its profile of a credentials file under ``tmp_path``."""
    from covalent._shared_files import config

    credentials = tmp_path / "aws-credentials"
    credentials.write_text(CREDENTIALS.format(a=kit, b=second))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    # No key in the environment (only the profiles can reach a server), and no
    # option variable of the kit's, which would beat the stores' values.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "COVALENT_LOT_S3_ENDPOINT_URL",
                 "COVALENT_LOT_S3_REGION_NAME", "COVALENT_LOT_S3_STORE"):
        monkeypatch.delenv(name, raising=False)

    manager = config._config_manager
    before = copy.deepcopy(manager.config_data.get("lot"))
    manager.config_data["lot"] = tomllib.loads(CONF.format(region=kit.region, a=kit, b=second))["lot"]
    manager.write_config()
    yield
    if before is None:
        manager.config_data.pop("lot", None)
    else:
        manager.config_data["lot"] = before
    manager.write_config()


def test_copy_from_one_endpoint_to_the_other(kit, bucket, second, second_bucket, stores, tmp_path):
    """store a -> local -> store b, with strategies built from store names only."""
    data = os.urandom(11 * MiB + 7)  # one PUT on a; three 5 MiB parts on b (its options)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    uri_a, uri_b = f"s3://{bucket}/in/x.bin", f"s3://{second_bucket}/out/x.bin"

    a = lot.strategy_for(uri_a, store="a")
    a.put(str(source), uri_a)
    local = tmp_path / "via" / "x.bin"
    assert a.get(uri_a, str(local)).verified == 1
    b = lot.strategy_for(uri_b, store="b")
    assert b.put(str(local), uri_b).verified == 1

    digest = sha256_file(str(source))[0]
    for server, name, key in ((kit, bucket, "in/x.bin"), (second, second_bucket, "out/x.bin")):
        assert server.list_keys(name) == [key]
        assert server.get_bytes(name, key) == data
        assert stored_checksum(server, name, key) == crc32c_of(data) and sha256_bytes(data) == digest
    # Each server has only its own bucket.
    assert second_bucket not in {entry["Name"] for entry in kit.client.list_buckets()["Buckets"]}
    assert bucket not in {entry["Name"] for entry in second.client.list_buckets()["Buckets"]}
    etag = second.client.head_object(Bucket=second_bucket, Key="out/x.bin")["ETag"]
    assert etag.strip('"').endswith("-3"), etag  # store b's multipart options were used


def test_each_store_reaches_only_its_own_endpoint(kit, bucket, second_bucket, stores, tmp_path):
    source = tmp_path / "s.bin"
    source.write_bytes(b"x" * 1000)
    # The other store's profile is denied by this endpoint: the keys came from the profile.
    with pytest.raises(PermissionError):
        lot.strategy_for("s3://", store="a", profile="store-b", max_attempts=1).put(
            str(source), f"s3://{bucket}/denied.bin")
    # Store a does not see store b's bucket.
    with pytest.raises(FileNotFoundError):
        lot.strategy_for("s3://", store="a", max_attempts=1).get(
            f"s3://{second_bucket}/nothing.bin", str(tmp_path / "nothing.bin"))
    assert kit.list_keys(bucket) == []


def test_default_store_from_the_environment(kit, second, second_bucket, stores, tmp_path, monkeypatch):
    from covalent_lot.strategies.s3 import S3Strategy

    monkeypatch.setenv("COVALENT_LOT_S3_STORE", "b")
    source = tmp_path / "d.bin"
    source.write_bytes(b"default store")
    strategy = S3Strategy()  # no arguments, as Covalent builds it
    assert strategy.settings.store == "b"
    strategy.put(str(source), f"s3://{second_bucket}/d.bin")
    assert second.get_bytes(second_bucket, "d.bin") == b"default store"
    handoff = lot.handoff(f"s3://{second_bucket}/h.bin", store="a")  # the argument wins
    assert handoff.strategy.settings["endpoint_url"] == kit.endpoint
