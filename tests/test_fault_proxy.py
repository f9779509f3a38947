"""Network faults between ckptstore and S3: resets, SlowDown, 500s, silence.

A real S3 protocol server (moto in server mode) sits behind FaultProxy
(helpers/faultproxy.py), which resets connections mid-request and answers
503 SlowDown / 500 InternalError itself, per request, from a fixed seed.

Specification: API.md guarantee 1 (a save that dies of a network failure
leaves the previous checkpoint loadable and nothing partial committed) and
guarantee 6 (unreachable endpoints raise a clear error naming the URI, with
secrets redacted), plus what every S3 client owes its users: transient
faults are retried, and a dead or silent endpoint fails in bounded time.
"""
from __future__ import annotations

import threading
import time
import uuid

import pytest
import torch

import ckptstore
from helpers.backends import free_port as _free_port
from helpers.faultproxy import FaultProxy

boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")
import botocore.config  # noqa: E402
import botocore.exceptions  # noqa: E402

BUCKET = "faults"
SECRET = "s3cr3t-VALUE-xyz"         # distinctive, so a leak is unmistakable
FAULT_SECRET = "s3cr3t-FAULTS-abc"  # moto does not check signatures: any secret works
UNREACHABLE_LIMIT_S = 30.0


# -- moto server --------------------------------------------------------------
# The shared session fixture `moto_server` (conftest.py, helpers/backends.py):
# .endpoint, .key, .secret, .create_bucket(name), .options().

@pytest.fixture(scope="module")
def s3server(moto_server):
    moto_server.create_bucket(BUCKET)
    return moto_server


def _port_of(endpoint: str) -> int:
    return int(endpoint.rstrip("/").rsplit(":", 1)[1])


def _boto(endpoint: str, server, **config):
    cfg = botocore.config.Config(retries={"total_max_attempts": 1, "mode": "standard"}, **config)
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=server.key,
                        aws_secret_access_key=server.secret, region_name="us-east-1", config=cfg)


# -- (a) the proxy itself ------------------------------------------------------

def test_proxy_forwards_large_bodies_unchanged(s3server):
    data = torch.randint(0, 256, (20 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    data = data.numpy().tobytes()
    with FaultProxy("127.0.0.1", _port_of(s3server.endpoint), seed=0) as proxy:
        client = _boto(proxy.endpoint, s3server)
        client.put_object(Bucket=BUCKET, Key="proxy/big", Body=data)
        got = client.get_object(Bucket=BUCKET, Key="proxy/big")["Body"].read()
        assert got == data
        assert proxy.injected() == 0
        assert proxy.stats["forwarded"] == proxy.stats["requests"] >= 2


def test_proxy_drop_resets_the_request_before_it_completes(s3server):
    direct = _boto(s3server.endpoint, s3server)
    with FaultProxy("127.0.0.1", _port_of(s3server.endpoint), seed=0, drop_rate=1.0,
                    drop_after=(1 << 20, 2 << 20)) as proxy:
        client = _boto(proxy.endpoint, s3server)
        with pytest.raises((botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)):
            client.put_object(Bucket=BUCKET, Key="proxy/dropped", Body=bytes(4 << 20))
        assert proxy.stats["drop"] >= 1
    # The server never saw a complete request, so nothing was stored.
    with pytest.raises(botocore.exceptions.ClientError) as e:
        direct.head_object(Bucket=BUCKET, Key="proxy/dropped")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


@pytest.mark.parametrize("kind, status, code", [("slowdown", 503, "SlowDown"), ("error500", 500, "InternalError")])
def test_proxy_answers_errors_itself(s3server, kind, status, code):
    direct = _boto(s3server.endpoint, s3server)
    with FaultProxy("127.0.0.1", _port_of(s3server.endpoint), seed=0, **{f"{kind}_rate": 1.0}) as proxy:
        client = _boto(proxy.endpoint, s3server)
        for call in (lambda: client.put_object(Bucket=BUCKET, Key=f"proxy/{kind}", Body=bytes(3 << 20)),
                     lambda: client.list_objects_v2(Bucket=BUCKET)):
            with pytest.raises(botocore.exceptions.ClientError) as e:
                call()
            assert e.value.response["Error"]["Code"] == code
            assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
        with pytest.raises(botocore.exceptions.ClientError) as e:  # HEAD: status only, no body
            client.head_object(Bucket=BUCKET, Key="proxy/anything")
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
        assert proxy.stats[kind] == 3
        # Rates change at runtime: the next request goes through.
        proxy.faults_off()
        client.put_object(Bucket=BUCKET, Key=f"proxy/{kind}", Body=b"ok")
        assert proxy.stats["forwarded"] == 1
    assert direct.get_object(Bucket=BUCKET, Key=f"proxy/{kind}")["Body"].read() == b"ok"


def test_proxy_blackhole_never_answers(s3server):
    with FaultProxy("127.0.0.1", _port_of(s3server.endpoint), seed=0, blackhole_rate=1.0) as proxy:
        client = _boto(proxy.endpoint, s3server, read_timeout=1, connect_timeout=1)
        t0 = time.monotonic()
        with pytest.raises(botocore.exceptions.ReadTimeoutError):
            client.list_objects_v2(Bucket=BUCKET)
        assert time.monotonic() - t0 < 10
        assert proxy.stats["blackhole"] == 1


def test_proxy_finds_request_boundaries_on_keepalive_connections():
    """Chunked and Content-Length bodies on one connection: each request gets its own decision."""
    import socket

    received = bytearray()
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def target():  # records what reaches it; answers each complete request with 200
        conn, _ = listener.accept()
        conn.settimeout(10)
        while not done.is_set():
            try:
                data = conn.recv(1 << 16)
            except OSError:
                break
            if not data:
                break
            received.extend(data)
            if received.endswith(b"0\r\n\r\n") or received.endswith(b"hello"):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        conn.close()

    th = threading.Thread(target=target, daemon=True)
    th.start()
    chunked = (b"PUT /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nabcde\r\n3;ext=1\r\nfgh\r\n0\r\n\r\n")
    plain = b"PUT /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    third = b"PUT /c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nxyz"
    with FaultProxy("127.0.0.1", listener.getsockname()[1], seed=0) as proxy:
        c = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        c.sendall(chunked)
        assert c.recv(100).endswith(b"ok")
        c.sendall(plain)
        assert c.recv(100).endswith(b"ok")
        proxy.set_rates(slowdown_rate=1.0)
        c.sendall(third)
        answer = b""
        while chunk := c.recv(4096):
            answer += chunk
        c.close()
        done.set()
        assert answer.startswith(b"HTTP/1.1 503 Slow Down\r\n") and b"<Code>SlowDown</Code>" in answer
        assert [e[1:] for e in proxy.events] == [("PUT", "/a", None), ("PUT", "/b", None), ("PUT", "/c", "slowdown")]
    th.join(10)
    listener.close()
    assert bytes(received) == chunked + plain  # the answered request never reached the target


def test_proxy_faults_are_deterministic_given_the_seed(s3server):
    def run(seed):
        with FaultProxy("127.0.0.1", _port_of(s3server.endpoint), seed=seed, drop_rate=0.2,
                        slowdown_rate=0.2, error500_rate=0.2) as proxy:
            client = _boto(proxy.endpoint, s3server)
            for _ in range(30):
                try:
                    client.list_objects_v2(Bucket=BUCKET, Prefix="proxy/")
                except (botocore.exceptions.ClientError, botocore.exceptions.ConnectionError,
                        botocore.exceptions.HTTPClientError):
                    pass
            return [e[3] for e in proxy.events]

    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c
    assert {"drop", "slowdown", "error500", None} <= set(a)


# -- (b) saves through a faulty network -----------------------------------------

def _state(i: int) -> dict:
    """A few MB in several tensors, different for every i (4-16 MB in all)."""
    g = torch.Generator().manual_seed(1000 + i)
    n = (1 + i % 4) << 18  # 1-4 Mi elements in the big float32 tensor
    return {
        "step": i,
        "model": {
            "embed.weight": torch.randn(n, generator=g),
            "block.0.weight": torch.randn(512, 1024, generator=g),             # 2 MiB
            "block.0.bias": torch.randn(1024, generator=g),
            "head.weight": torch.randn(768, 1024, generator=g).to(torch.bfloat16),  # 1.5 MiB
        },
        "optimizer": {"exp_avg": torch.randn(n // 2, generator=g), "step": torch.tensor(i)},
        "token_ids": torch.randint(0, 50000, (1 << 17,), generator=g),      # 1 MiB int64
    }


def _assert_same(actual, expected, where="state"):
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), f"{where}: keys differ"
        for k in expected:
            _assert_same(actual[k], expected[k], f"{where}[{k!r}]")
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: not a tensor"
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, f"{where}: dtype/shape differ"
        assert torch.equal(actual.contiguous().reshape(-1).view(torch.uint8), expected.contiguous().reshape(-1).view(torch.uint8)), \
            f"{where}: values differ"
    else:
        assert type(actual) is type(expected) and actual == expected, f"{where}: {actual!r} != {expected!r}"


def _assert_no_secret(err: BaseException, secret: str) -> None:
    assert secret not in str(err), f"secret leaked in str(): {err}"
    assert secret not in repr(err), f"secret leaked in repr(): {err!r}"
    assert all(secret not in str(a) for a in err.args), "secret leaked in args"


def test_saves_through_faulty_network_commit_whole_or_keep_the_previous(s3server):
    saves = 10
    with FaultProxy("127.0.0.1", _port_of(s3server.endpoint), seed=20240611) as proxy:
        uri = (f"s3://{BUCKET}/run-{uuid.uuid4().hex}/ckpt?endpoint_url={proxy.endpoint}"
               f"&key={s3server.key}&secret={FAULT_SECRET}")
        state0 = _state(0)
        ckptstore.save(state0, uri)
        _assert_same(ckptstore.load(uri), state0)
        last_good = state0

        outcomes = []
        t_start = time.monotonic()
        for i in range(1, saves + 1):
            state = _state(i)
            proxy.set_rates(drop_rate=0.2, slowdown_rate=0.1, error500_rate=0.05, drop_after=(0, 3 << 20))
            before = dict(proxy.stats)
            t0 = time.monotonic()
            try:
                ckptstore.save(state, uri)
                outcome = "ok"
            except ckptstore.StorageError as e:  # anything else fails the test
                _assert_no_secret(e, FAULT_SECRET)
                outcome = f"StorageError: {str(e)[:200]}"
            seconds = time.monotonic() - t0
            proxy.faults_off()
            faults = {k: proxy.stats[k] - before[k] for k in ("requests", "drop", "slowdown", "error500")}
            outcomes.append((i, outcome, round(seconds, 2), faults))
            if outcome == "ok":
                last_good = state
                _assert_same(ckptstore.load(uri), state, f"after save {i} (ok)")
                report = ckptstore.verify(uri, deep=True)
                assert report.ok, f"save {i} returned but verify(deep=True) finds: {report.problems}"
            else:
                _assert_same(ckptstore.load(uri), last_good, f"after save {i} (failed)")
                assert ckptstore.verify(uri, deep=True).ok
        elapsed = time.monotonic() - t_start

    summary = "\n".join(map(str, outcomes)) + f"\nstats={proxy.stats} elapsed={elapsed:.1f}s"
    print(summary)
    assert proxy.injected() > 0, summary
    assert proxy.stats["drop"] > 0, summary
    assert sum(o[1] == "ok" for o in outcomes) >= 1, \
        "no save succeeded despite transient faults (are S3 requests retried?)\n" + summary


# -- (c) unreachable and silent endpoints ---------------------------------------

def _bounded(fn, limit: float = UNREACHABLE_LIMIT_S):
    """Run fn in a thread; return (exception or None, seconds). Fails if it takes longer than limit."""
    box: dict = {}

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - inspected by the caller
            box["error"] = e

    t0 = time.monotonic()
    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(limit + 1)
    seconds = time.monotonic() - t0
    if th.is_alive():
        pytest.fail(f"still running after {seconds:.1f}s (limit {limit:.0f}s): no connect/read timeout?")
    return box.get("error"), seconds


def _check_storage_error(err, seconds, what: str):
    assert err is not None, f"{what}: returned instead of raising"
    assert isinstance(err, ckptstore.StorageError), f"{what}: {type(err).__name__}: {err}"
    assert f"s3://{BUCKET}/x" in str(err), f"{what}: message does not name the URI: {err}"
    _assert_no_secret(err, SECRET)
    assert seconds < UNREACHABLE_LIMIT_S, f"{what}: took {seconds:.1f}s"


@pytest.mark.parametrize("op", ["save", "load"])
def test_unreachable_endpoint_raises_storage_error_quickly(op):
    port = _free_port()  # nothing listens there: connection refused
    uri = f"s3://{BUCKET}/x?endpoint_url=http://127.0.0.1:{port}&key=AKIAFAULTTEST&secret={SECRET}"
    fn = (lambda: ckptstore.save(_state(0), uri)) if op == "save" else (lambda: ckptstore.load(uri))
    err, seconds = _bounded(fn)
    print(f"unreachable {op}: {seconds:.2f}s {type(err).__name__}: {err}")
    _check_storage_error(err, seconds, f"unreachable {op} ({seconds:.1f}s)")


@pytest.mark.parametrize("op", ["save", "load"])
def test_silent_endpoint_raises_storage_error_quickly(op):
    # Accepts and reads, never answers: only a read timeout ends the wait.
    with FaultProxy("127.0.0.1", _free_port(), seed=0, blackhole_rate=1.0) as hole:
        uri = f"s3://{BUCKET}/x?endpoint_url={hole.endpoint}&key=AKIAFAULTTEST&secret={SECRET}"
        fn = (lambda: ckptstore.save(_state(0), uri)) if op == "save" else (lambda: ckptstore.load(uri))
        err, seconds = _bounded(fn)
        print(f"silent {op}: {seconds:.2f}s {type(err).__name__}: {err} ({hole.stats})")
        assert hole.stats["blackhole"] >= 1
    _check_storage_error(err, seconds, f"silent {op} ({seconds:.1f}s)")


@pytest.mark.parametrize("op", ["save", "load"])
def test_endpoint_that_goes_silent_raises_storage_error_quickly(s3server, op):
    # The endpoint answered before (a checkpoint was saved through it), then
    # stops answering: a network partition in the middle of a run. Only the
    # read timeouts of the requests themselves can end this wait.
    with FaultProxy("127.0.0.1", _port_of(s3server.endpoint), seed=0) as proxy:
        uri = f"s3://{BUCKET}/x?endpoint_url={proxy.endpoint}&key={s3server.key}&secret={SECRET}"
        ckptstore.save(_state(0), uri)
        proxy.set_rates(blackhole_rate=1.0)
        fn = (lambda: ckptstore.save(_state(1), uri)) if op == "save" else (lambda: ckptstore.load(uri))
        err, seconds = _bounded(fn)
        print(f"gone silent {op}: {seconds:.2f}s {type(err).__name__}: {err} ({proxy.stats})")
        assert proxy.stats["blackhole"] >= 1
    _check_storage_error(err, seconds, f"gone silent {op} ({seconds:.1f}s)")


@pytest.mark.parametrize("cut_after_puts", [2])
def test_save_cut_off_mid_upload_raises_and_keeps_the_previous(s3server, cut_after_puts):
    """The network dies for good part-way through a save's uploads: the save
    raises StorageError naming the URI, commits nothing, and once the network
    is back the previous checkpoint loads and verifies."""
    with FaultProxy("127.0.0.1", _port_of(s3server.endpoint), seed=7) as proxy:
        uri = (f"s3://{BUCKET}/cut-{cut_after_puts}/ckpt?endpoint_url={proxy.endpoint}"
               f"&key={s3server.key}&secret={FAULT_SECRET}&part_size=1MiB")
        ckptstore.save(_state(0), uri)
        before = len(proxy.events)
        stop = threading.Event()

        def cut():
            # Drop every request from the moment the new save's cut_after_puts-th
            # data PUT has been seen.
            while not stop.is_set():
                puts = [e for e in proxy.events[before:] if e[1] == "PUT" and e[2].split("?")[0].endswith(".bin")]
                if len(puts) >= cut_after_puts:
                    proxy.set_rates(drop_rate=1.0, drop_after=(0, 1))
                    return
                time.sleep(0.001)

        watcher = threading.Thread(target=cut, daemon=True)
        watcher.start()
        t0 = time.monotonic()
        with pytest.raises(ckptstore.StorageError) as e:
            ckptstore.save(_state(1), uri)
        seconds = time.monotonic() - t0
        stop.set()
        watcher.join(5)
        assert f"s3://{BUCKET}/cut-{cut_after_puts}/ckpt" in str(e.value)
        _assert_no_secret(e.value, FAULT_SECRET)
        assert seconds < 120, f"a dead network took {seconds:.0f} s to report"
        proxy.faults_off()
        _assert_same(ckptstore.load(uri), _state(0), "after the cut-off save")
        assert ckptstore.verify(uri, deep=True).ok


# ---------------------------------------------------------------- 409 ConditionalRequestConflict

def _conflict_uri(proxy, server) -> str:
    return (f"s3://{BUCKET}/conflict-{uuid.uuid4().hex}/ckpt?endpoint_url={proxy.endpoint}"
            f"&key={server.key}&secret={SECRET}")


def test_a_conditional_put_answered_409_is_retried_and_the_save_commits(s3server):
    with FaultProxy("127.0.0.1", _port_of(s3server.endpoint), seed=0, conflicts=2) as proxy:
        uri = _conflict_uri(proxy, s3server)
        ckptstore.save(_state(3), uri, overwrite=False)
        assert proxy.stats["conflict"] == 2
        _assert_same(ckptstore.load(uri), _state(3), "after two 409s")
        assert ckptstore.verify(uri, deep=True).ok


def test_a_409_race_lost_to_another_writer_is_checkpoint_exists(s3server):
    from ckptstore.format.manifest import CLAIM_NAME
    with FaultProxy("127.0.0.1", _port_of(s3server.endpoint), seed=0, conflicts=1) as proxy:
        uri = _conflict_uri(proxy, s3server)
        # The other writer's claim lands while ours is answered 409: the retry meets 412.
        key = uri.split("?")[0][len("s3://"):] + "/" + CLAIM_NAME
        s3server.fs.pipe_file(key, b'{"generation": "other"}')
        with pytest.raises(ckptstore.CheckpointExistsError):
            ckptstore.save(_state(4), uri, overwrite=False)
        assert proxy.stats["conflict"] == 1
        assert not ckptstore.exists(uri)


def test_a_conflict_that_never_clears_is_checkpoint_exists_not_a_storage_error(s3server):
    with FaultProxy("127.0.0.1", _port_of(s3server.endpoint), seed=0, conflicts=10 ** 6) as proxy:
        uri = _conflict_uri(proxy, s3server)
        with pytest.raises(ckptstore.CheckpointExistsError):
            ckptstore.save(_state(5), uri, overwrite=False)
        assert proxy.stats["conflict"] >= 2


# ---------------------------------------------------------------- a GCS endpoint that goes silent

@pytest.mark.parametrize("op", ["save", "load"])
def test_a_gcs_endpoint_that_goes_silent_raises_storage_error_within_its_deadline(gcs_emulator, op):
    # gcsfs retries a timed-out request six times with backoff (about 90 s in
    # all); the store's own deadline must end the wait first.
    with FaultProxy("127.0.0.1", _port_of(gcs_emulator.endpoint), seed=0) as proxy:
        uri = f"gs://{gcs_emulator.default_bucket}/silent-{uuid.uuid4().hex}/x?endpoint_url={proxy.endpoint}" \
              "&token=anon&project=test"
        ckptstore.save(_state(0), uri)
        proxy.set_rates(blackhole_rate=1.0)
        fn = (lambda: ckptstore.save(_state(1), uri)) if op == "save" else (lambda: ckptstore.load(uri))
        err, seconds = _bounded(fn)
        print(f"gcs gone silent {op}: {seconds:.2f}s {type(err).__name__}: {err} ({proxy.stats})")
        assert proxy.stats["blackhole"] >= 1
    assert isinstance(err, ckptstore.StorageError), f"{type(err).__name__}: {err}"
    assert "silent-" in str(err) and "stopped answering" in str(err), err
    assert seconds < UNREACHABLE_LIMIT_S, f"took {seconds:.1f}s"
