"""Malformed options and credentials are named errors (guarantee 6).

Every wrong type, missing field, misspelt name, bad URL or unknown protocol,
and every bad ``part_size``/``concurrency``/``commit`` value, on S3 (moto),
GCS (gcp-storage-emulator), memory:// and local disk, raises a
``StorageError`` (a ``CheckpointError``) whose message names the option:
never a raw exception of s3fs, gcsfs, botocore, aiohttp or requests, and
never a secret in the message, its repr or its traceback. The options around
the bad one are the working ones of a real server, so the bad one is the
only thing wrong.
"""

from __future__ import annotations

import traceback
import uuid

import pytest

import ckptstore
from conftest import BUCKET

SECRET = "SECRET-c6f1d"


S3_CASES = {
    "key-not-a-string": ({"key": 5}, "key="),
    "secret-not-a-string": ({"secret": 5}, "secret="),
    "token-not-a-string": ({"token": 7}, "token="),
    "endpoint-not-a-string": ({"endpoint_url": 5}, "endpoint_url="),
    "endpoint-not-a-url": ({"endpoint_url": "not a url"}, "endpoint_url="),
    "endpoint-wrong-scheme": ({"endpoint_url": "ftp://127.0.0.1:1"}, "endpoint_url="),
    "endpoint-no-host": ({"endpoint_url": "http://"}, "endpoint_url="),
    "misspelt-option": ({"endpoint_ur": "http://x"}, "endpoint_ur"),
    "anon-not-a-flag": ({"anon": "yes"}, "anon="),
    "client-kwargs-not-a-dict": ({"client_kwargs": "x"}, "client_kwargs="),
    "client-region-not-a-string": ({"client_kwargs": {"region_name": 5}}, "region_name"),
    "config-kwargs-not-a-dict": ({"config_kwargs": 5}, "config_kwargs="),
    "config-unknown-field": ({"config_kwargs": {"nope": 1}}, "config_kwargs="),
    "config-retries-not-a-dict": ({"config_kwargs": {"retries": "x"}}, "retries"),
    "additional-kwargs-not-a-dict": ({"s3_additional_kwargs": 5}, "s3_additional_kwargs="),
    "session-not-a-session": ({"session": 5}, "session="),
    "block-size-not-a-number": ({"default_block_size": "x"}, "default_block_size="),
}

GCS_CASES = {
    "token-a-number": ({"token": 5}, "token="),
    "token-service-account-without-key": ({"token": {"type": "service_account", "client_email": "a@b",
                                                     "private_key_id": SECRET}}, "private_key"),
    "token-dict-of-nothing-usable": ({"token": {"private_key": SECRET}}, "refresh_token"),
    "project-not-a-string": ({"project": 5}, "project="),
    "endpoint-not-a-url": ({"endpoint_url": "not a url"}, "endpoint_url="),
    "endpoint-not-a-string": ({"endpoint_url": 5}, "endpoint_url="),
    "session-kwargs-not-a-dict": ({"session_kwargs": 5}, "session_kwargs="),
    "session-timeout-not-a-client-timeout": ({"session_kwargs": {"timeout": 3}}, "timeout"),
    "access-unknown": ({"access": "x"}, "access="),
    "consistency-unknown": ({"consistency": "x"}, "consistency="),
    "requests-timeout-not-a-number": ({"requests_timeout": "x"}, "requests_timeout="),
    "misspelt-option": ({"projct": "x"}, "projct"),
}

OWN_CASES = {
    "part-size-not-a-size": ("part_size=abc", "part_size"),
    "part-size-too-small": ("part_size=1000", "part_size"),
    "concurrency-zero": ("concurrency=0", "concurrency"),
    "concurrency-not-a-number": ("concurrency=many", "concurrency"),
    "commit-unknown": ("commit=yes", "commit="),
}


def _check(fn, names: str, secrets=(SECRET,)):
    with pytest.raises(ckptstore.StorageError) as excinfo:
        fn()
    err = excinfo.value
    assert isinstance(err, ckptstore.CheckpointError)
    assert names in str(err), f"the message does not name {names!r}: {err}"
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    for s in secrets:
        assert s not in str(err) and s not in repr(err) and s not in text, f"{s} leaks: {text}"
    return err


def _both(uri, options, names, secrets=(SECRET,)):
    _check(lambda: ckptstore.save({"w": 1}, uri, storage_options=options), names, secrets)
    _check(lambda: ckptstore.load(uri, storage_options=options), names, secrets)


@pytest.mark.parametrize("case", sorted(S3_CASES))
def test_a_malformed_s3_option_is_a_storage_error_naming_it(moto_server, case):
    bad, names = S3_CASES[case]
    options = {"endpoint_url": moto_server.endpoint, "key": "AKIAOPTIONS", "secret": SECRET, **bad}
    _both(f"s3://{BUCKET}/{uuid.uuid4().hex}/ckpt", options, names)


@pytest.mark.parametrize("case", sorted(GCS_CASES))
def test_a_malformed_gcs_option_is_a_storage_error_naming_it(gcs_emulator, case):
    bad, names = GCS_CASES[case]
    options = {"endpoint_url": gcs_emulator.endpoint, "token": "anon", "project": "test", **bad}
    _both(f"gs://{BUCKET}/{uuid.uuid4().hex}/ckpt", options, names)


def test_a_gcs_token_that_is_no_file_is_named_and_never_shown(gcs_emulator):
    # gcsfs takes such a string for a raw access token and asks Google about
    # it; whatever that answers (no network here), the token is never shown.
    # (gcsfs before 2026.2 takes such a token unchecked, and the emulator accepts any: then the
    # load finds no checkpoint; either way the error is ours and the token never shows.)
    token = f"/no/such/dir/{SECRET}.json"
    options = {"endpoint_url": gcs_emulator.endpoint, "token": token, "project": "test"}
    with pytest.raises(ckptstore.CheckpointError) as excinfo:
        ckptstore.load(f"gs://{BUCKET}/{uuid.uuid4().hex}", storage_options=options)
    err = excinfo.value
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    assert SECRET not in text and token not in text and token not in repr(err)
    if isinstance(err, ckptstore.StorageError):
        assert "token=" in str(err) and "raw OAuth access token" in str(err)
    else:
        assert isinstance(err, ckptstore.CheckpointNotFoundError)


@pytest.mark.parametrize("case", sorted(OWN_CASES))
@pytest.mark.parametrize("kind", ["local", "memory", "s3", "gcs"])
def test_a_bad_ckptstore_option_is_a_storage_error_on_every_backend(request, tmp_path, kind, case):
    query, names = OWN_CASES[case]
    if kind == "local":
        uri, options = f"{tmp_path}/ckpt", {}
    elif kind == "memory":
        uri, options = f"memory://opts-{uuid.uuid4().hex}/ckpt", {}
    elif kind == "s3":
        server = request.getfixturevalue("moto_server")
        uri, options = f"s3://{BUCKET}/{uuid.uuid4().hex}", {"endpoint_url": server.endpoint, "key": "AKIA",
                                                              "secret": SECRET}
    else:
        server = request.getfixturevalue("gcs_emulator")
        uri, options = f"gs://{BUCKET}/{uuid.uuid4().hex}", {"endpoint_url": server.endpoint, "token": "anon"}
    key, _, value = query.partition("=")
    _both(f"{uri}?{query}", options, names)                 # in the URL
    _both(uri, {**options, key: value}, names)              # as a storage option


@pytest.mark.parametrize("options, names", [
    ({"foo": 1}, "'foo'"),
    ({"use_listings_cache": True}, "use_listings_cache"),
])
def test_local_paths_refuse_storage_options_by_name(tmp_path, options, names):
    _both(str(tmp_path / "ckpt"), options, names)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("options, names", [
    ({"foo": 1}, "'foo'"),
    ({"use_listings_cache": "x"}, "use_listings_cache"),   # unchecked type, but a known name: fsspec's own
])
def test_memory_refuses_unknown_storage_options(options, names):
    uri = f"memory://opts-{uuid.uuid4().hex}/ckpt"
    if names == "use_listings_cache":
        # A name fsspec itself takes is accepted, whatever fsspec makes of it.
        ckptstore.save({"w": 1}, uri, storage_options=options)
        assert ckptstore.load(uri, storage_options=options) == {"w": 1}
        return
    _both(uri, options, names)


@pytest.mark.parametrize("options", [5, "endpoint_url=x", [("key", "v")]])
def test_storage_options_that_are_not_a_dict_are_named(options):
    _both("memory://opts/ckpt", options, "storage_options must be a dict")


@pytest.mark.parametrize("uri, names", [
    ("nosuch-proto://b/x", "unknown protocol"),
    ("s3://", "bad checkpoint URL"),
    ("gs:///x", "bad checkpoint URL"),
    ("", "bad checkpoint URL"),
])
def test_bad_urls_and_unknown_protocols_are_named(uri, names):
    _both(uri, None, names)


def test_a_malformed_endpoint_in_the_environment_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://[::1")
    _both(f"s3://{BUCKET}/x", {"key": "AKIA", "secret": SECRET}, "endpoint URL is malformed")
