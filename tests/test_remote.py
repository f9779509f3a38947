"""S3, GCS and FUSE backends: configuration, commit choice, exclusive create,
bounded memory and clear errors, against the real servers and mount.

Specification: API.md ("Query parameters configure the backend and merge with
storage_options; the keys this package itself reads are taken out before the
filesystem sees them", the strategy in CheckpointInfo, guarantee 1's per-backend
commit, guarantee 4 bounded memory, guarantee 6 errors) and the remote-backends
issue (install hints, overwrite=False race, missing credentials, 403, missing
bucket).
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import uuid
from urllib.parse import quote

import pytest
import torch

import ckptstore
from helpers.backends import MotoServer

from test_bounded_memory import PRELUDE, STATE_MB


def small_state(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(256, 256, generator=g), "step": seed}


# ---------------------------------------------------------------- configuration

def test_query_and_storage_options_merge_and_own_keys_never_reach_s3fs(moto_server):
    bucket = moto_server.create_bucket("merge-test")
    # endpoint in the query, credentials in storage_options, ckptstore's own
    # keys in both: s3fs rejects unknown keywords, so a save that works proves
    # they were taken out.
    uri = f"s3://{bucket}/run/ckpt?endpoint_url={moto_server.endpoint}&part_size=1MiB&commit=marker"
    opts = {"key": moto_server.key, "secret": moto_server.secret, "concurrency": 3}
    state = {"a": torch.arange(3 * 2**20 // 8, dtype=torch.float64), "b": torch.ones(10)}
    info = ckptstore.save(state, uri, storage_options=opts)
    assert info.strategy == "marker"
    fs = moto_server.filesystem()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/run/ckpt"))
    data = [n for n in names if n.endswith(".bin")]
    assert len(data) == 4, f"3 MiB + a little in 1 MiB parts should be 4 data files: {names}"
    out = ckptstore.load(uri, storage_options=opts)
    assert torch.equal(out["a"], state["a"]) and torch.equal(out["b"], state["b"])


@pytest.mark.parametrize("value", ["0", "lots", "300"])
def test_bad_concurrency_is_a_clear_error(memory_store, value):
    with pytest.raises(ckptstore.StorageError, match="concurrency"):
        ckptstore.save({"x": 1}, memory_store.uri() + f"?concurrency={value}")


def test_bad_part_size_is_a_clear_error(memory_store):
    with pytest.raises(ckptstore.StorageError, match="part_size"):
        ckptstore.save({"x": 1}, memory_store.uri() + "?part_size=huge")


@pytest.mark.parametrize("backend,strategy", [("s3", "marker"), ("gcs", "marker"), ("fuse", "marker"),
                                              ("local", "rename"), ("memory", "marker")])
def test_commit_strategy_is_chosen_per_backend(request, backend, strategy):
    store = request.getfixturevalue(f"{backend}_store")
    info = ckptstore.save(small_state(), store.uri())
    assert info.strategy == strategy


@pytest.mark.parametrize("backend", ["s3", "gcs", "fuse"])
def test_forcing_rename_where_rename_is_not_atomic_is_refused(request, backend):
    store = request.getfixturevalue(f"{backend}_store")
    uri = store.uri()
    uri += ("&" if "?" in uri else "?") + "commit=rename"
    with pytest.raises(ckptstore.StorageError, match="rename"):
        ckptstore.save(small_state(), uri)
    assert not ckptstore.exists(store.uri())


@pytest.mark.parametrize("protocol,extra,module", [("s3", "s3", "s3fs"), ("gs", "gcs", "gcsfs")])
def test_missing_backend_package_names_the_extra_to_install(protocol, extra, module):
    code = f"""
import sys
sys.modules[{module!r}] = None      # as if the package were not installed
import ckptstore
try:
    ckptstore.save({{"x": 1}}, "{protocol}://bucket/ckpt")
except ckptstore.StorageError as e:
    print(e)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"pip install 'ckptstore[{extra}]'" in done.stdout, done.stdout


# ---------------------------------------------------------------- exclusive create

def test_a_gcs_exclusive_create_is_refused_by_a_server_that_enforces_it(fakegcs_store):
    """ifGenerationMatch=0 is sent and honoured: fake-gcs-server answers 412 and keeps the first object.

    (gcp-storage-emulator ignores the precondition, which is why the race
    below runs on fake-gcs-server.)"""
    from ckptstore.stores import open_store
    store = open_store(fakegcs_store.uri("excl"))
    assert store.create_exclusive("create.claim", b"first") is True
    assert store.create_exclusive("create.claim", b"second") is False
    assert fakegcs_store.read(fakegcs_store.path("excl") + "/create.claim") == b"first"


@pytest.mark.parametrize("backend", ["s3", "fakegcs", "local"])
def test_of_two_simultaneous_overwrite_false_saves_exactly_one_commits(request, backend):
    """S3 If-None-Match, GCS ifGenerationMatch=0 (on fake-gcs-server, which enforces it) and local
    O_EXCL are enforced: one writer wins, the other is told."""
    store = request.getfixturevalue(f"{backend}_store")
    for round_ in range(6):
        uri = store.uri(f"new-{round_}")
        barrier = threading.Barrier(2)
        results: list = [None, None]

        def writer(i):
            barrier.wait()
            try:
                results[i] = ckptstore.save(small_state(i), uri, overwrite=False)
            except BaseException as e:  # noqa: BLE001 - inspected below
                results[i] = e

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        ok = [r for r in results if isinstance(r, ckptstore.CheckpointInfo)]
        refused = [r for r in results if isinstance(r, ckptstore.CheckpointExistsError)]
        assert len(ok) == 1 and len(refused) == 1, f"round {round_}: {results}"
        winner = results.index(ok[0])
        assert ckptstore.load(uri)["step"] == winner
        # The loser left nothing behind; the claim is gone once committed.
        names = [p.rsplit("/", 1)[-1] for p in store.files() if f"/new-{round_}/" in p]
        assert not any(n.endswith(".claim") for n in names), names
        assert len({n[:25] for n in names}) == 1, names


def test_a_claim_left_by_a_dead_writer_is_taken_over_once_stale(s3_store):
    uri = store_uri = s3_store.uri("stale")
    s3_store.write(f"{s3_store.root}/stale/create.claim", b'{"generation": "x", "time": 0}')
    # A fresh claim blocks a second create-only writer...
    with pytest.raises(ckptstore.CheckpointExistsError, match="another writer"):
        ckptstore.save(small_state(), uri, overwrite=False)
    # ...one older than the stale limit does not.
    import ckptstore.writer as w
    old, w.CLAIM_STALE = w.CLAIM_STALE, 0.0
    try:
        ckptstore.save(small_state(5), store_uri, overwrite=False)
    finally:
        w.CLAIM_STALE = old
    assert ckptstore.load(uri)["step"] == 5


# ---------------------------------------------------------------- bounded memory

@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_object_store_save_and_load_hold_far_less_than_a_second_copy(request, backend):
    """Memory for transfers is part size x concurrency, not the state.

    A Lightning-style save (torch.save to BytesIO, then upload) holds 2-3x
    the state beyond it; here the bound asserted is a quarter of the state.
    """
    store = request.getfixturevalue(f"{backend}_store")
    uri = store.uri("big")
    save = subprocess.run([sys.executable, "-c", PRELUDE + f"""
state = make_state()
before = peak()
ckptstore.save(state, {uri!r})
print(json.dumps({{"extra": peak() - before}}))
"""], capture_output=True, text=True, timeout=300)
    assert save.returncode == 0, save.stderr
    load = subprocess.run([sys.executable, "-c", PRELUDE + f"""
before = peak()
state = ckptstore.load({uri!r})
assert all(bool((t == i).all()) for i, t in enumerate(state["layers"]))
print(json.dumps({{"extra": peak() - before}}))
"""], capture_output=True, text=True, timeout=300)
    assert load.returncode == 0, load.stderr
    state_bytes = STATE_MB * 2**20
    saved = json.loads(save.stdout.strip().splitlines()[-1])["extra"]
    loaded = json.loads(load.stdout.strip().splitlines()[-1])["extra"] - state_bytes
    assert saved < state_bytes / 4, f"save held {saved / 2**20:.0f} MiB beyond a {STATE_MB} MiB state"
    assert loaded < state_bytes / 4, f"load held {loaded / 2**20:.0f} MiB beyond the {STATE_MB} MiB it returned"


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_missing_bucket_is_named_on_save_and_load(request, backend):
    store = request.getfixturevalue(f"{backend}_store")
    scheme = "s3" if backend == "s3" else "gs"
    uri = f"{scheme}://no-such-bucket-{uuid.uuid4().hex[:8]}/ckpt{store.query}"
    with pytest.raises(ckptstore.StorageError, match="bucket does not exist") as e:
        ckptstore.save(small_state(), uri)
    assert "no-such-bucket" in str(e.value)
    with pytest.raises(ckptstore.CheckpointNotFoundError, match="bucket"):
        ckptstore.load(uri)


def test_missing_credentials_say_where_to_put_them(moto_server, tmp_path):
    bucket = moto_server.create_bucket("nocreds")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    code = f"""
import ckptstore
try:
    ckptstore.save({{"x": 1}}, "s3://{bucket}/ckpt?endpoint_url={moto_server.endpoint}")
except ckptstore.StorageError as e:
    print("StorageError:", e)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "StorageError:" in done.stdout and "no AWS credentials" in done.stdout, done.stdout
    assert f"s3://{bucket}/ckpt" in done.stdout


@pytest.fixture(scope="module")
def moto_with_auth(tmp_path_factory):
    """A moto server that checks signatures and IAM policies after its setup requests.

    Setup (7 requests, unauthenticated): a bucket, a user who may only read
    it, a user who may do everything, and their keys.

    The reader's listing permission is granted under both names moto has
    checked for ListObjectsV2: AWS's own, s3:ListBucket (moto <= 5.2.5), and
    the API operation's name, s3:ListObjectsV2 (moto 5.2.6 authorizes every
    S3 request by its operation name and refuses ListObjectsV2, plain boto3's
    too, to a policy with s3:ListBucket alone). No write is granted under
    either naming (s3:PutObject, s3:CreateMultipartUpload, ...), so the
    reader's save is refused by a real permission check on both.
    """
    import urllib.request

    import boto3

    server = MotoServer()
    server.start()
    try:
        # From now on only the next 7 requests go unchecked (moto's reset-auth API).
        urllib.request.urlopen(urllib.request.Request(
            f"{server.endpoint}/moto-api/reset-auth", data=b"7", method="POST",
            headers={"Content-Type": "text/plain"}), timeout=30).read()
        kw = dict(endpoint_url=server.endpoint, region_name="us-east-1",
                  aws_access_key_id="setup", aws_secret_access_key="setup")
        boto3.client("s3", **kw).create_bucket(Bucket="guarded")
        iam = boto3.client("iam", **kw)
        keys = {}
        read_only = ["s3:GetObject", "s3:ListBucket", "s3:ListObjectsV2"]
        for user, actions in (("reader", read_only), ("writer", ["s3:*"])):
            iam.create_user(UserName=user)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
            keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        yield server, keys
    finally:
        server.stop()


def _guarded_uri(server, key, secret, name="ckpt"):
    # Query values are URL-decoded: a secret holding '+' or '/' must be quoted.
    return f"s3://guarded/{name}?endpoint_url={server.endpoint}&key={key}&secret={quote(secret, safe='')}"


def test_access_denied_is_reported_as_a_permission_problem(moto_with_auth):
    server, keys = moto_with_auth
    ckptstore.save(small_state(1), _guarded_uri(server, *keys["writer"]))
    reader = _guarded_uri(server, *keys["reader"])
    with pytest.raises(ckptstore.StorageError, match="access denied") as e:
        ckptstore.save(small_state(2), reader)
    assert e.value.errno == errno.EACCES
    assert "s3://guarded/ckpt" in str(e.value)
    assert keys["reader"][1] not in str(e.value)
    # Reading is allowed, and the refused save changed nothing.
    assert ckptstore.load(reader)["step"] == 1


def test_refused_keys_are_reported_as_a_credentials_problem(moto_with_auth):
    server, _ = moto_with_auth
    secret = "wrong-SECRET-value-1234"
    with pytest.raises(ckptstore.StorageError, match="credentials were refused") as e:
        ckptstore.save(small_state(), _guarded_uri(server, "AKIANOSUCHKEY0000000", secret))
    assert secret not in str(e.value) and secret not in repr(e.value)


def test_local_listing_survives_files_vanishing_while_it_scans(tmp_path):
    """A listing races other writers' renames and removals; a vanished file is simply not listed.

    Another process's commit renames its .tmp, and a losing writer discards
    its files, between this listing's readdir and its stat of the entry:
    that must not make the directory look missing (CheckpointNotFoundError).
    """
    from ckptstore.stores import open_store

    store = open_store(str(tmp_path))
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            p = tmp_path / f"{i % 64:02d}.tmp"
            p.write_bytes(b"x")
            p.unlink()
            i += 1

    for i in range(64):
        (tmp_path / f"keep-{i}").write_bytes(b"k")
    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(3000):
            listing = store.list()
            assert all(f"keep-{i}" in listing for i in range(64))
    finally:
        stop.set()
        t.join()
