"""EAS signatures replayed against a gateway (issue 21, M4): the replay memory is shared
by a gateway's processes and kept over restarts, a token holder cannot flush another's
share of it, and it lasts as long as a signature's Date can be accepted (zone offsets
included: up to 14 hours).
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from conftest import free_port, infergate_cmd
from gateway import auth
from gateway_helpers import endpoints, error_message, post, seed_services, start_gateway
from test_gateway import digits_request

CALLER_TOKEN = "caller-token-of-mallory"


def signed_bodies(count: int) -> list[tuple[bytes, dict]]:
    """`count` distinct predict bodies, each with its EAS-signed headers for token "tok"."""
    signed = []
    for i in range(count):
        body = digits_request(np.full((1, 784), i / count, dtype=np.float32))
        signed.append((body, auth.sign("tok", body, "digits")))
    return signed


@pytest.fixture(params=["state-dir", "redis"])
def store_location(request, tmp_path) -> tuple[str, str]:
    """(the gateway's store flag, its value): the embedded store, or Redis."""
    if request.param == "redis":
        return "--registry", request.getfixturevalue("redis_server").url
    return "--state-dir", str(tmp_path)


def start_gateway_on(procs, store_location, *extra: str):
    port = free_port()
    return procs.start(infergate_cmd("gateway", "--host", "127.0.0.1", "--port", str(port),
                                     *store_location, "--admin-token", "admin-secret", *extra),
                       port)


def test_replays_are_refused_by_every_process_and_after_a_restart(procs, store_location,
                                                                   worker_factory):
    """With --processes 2 each connection lands on either process: a signature used on
    one must be refused by the other, and by the gateway started again."""
    worker = worker_factory()  # no token of its own: the gateway is the only check
    seed_services(store_location[1], [{"name": "digits", "token": "tok",
                                       "config": {"endpoints": endpoints(worker)}}])
    gateway = start_gateway_on(procs, store_location, "--processes", "2")
    url = f"{gateway.url}/api/predict/digits"
    requests = signed_bodies(40)
    for body, headers in requests:
        assert post(url, body, headers)[0] == 200
    time.sleep(auth.REPEAT_S + 0.5)  # past the SDK's retry allowance
    passed = [i for i, (body, headers) in enumerate(requests) if post(url, body, headers)[0] != 401]
    assert passed == [], f"{len(passed)} of {len(requests)} replays passed"
    status, answer, _ = post(url, *requests[0])
    assert status == 401 and "already used" in error_message(answer)

    gateway.stop()
    gateway = start_gateway_on(procs, store_location, "--processes", "2")
    url = f"{gateway.url}/api/predict/digits"
    passed = [i for i, (body, headers) in enumerate(requests[:10])
              if post(url, body, headers)[0] != 401]
    assert passed == [], f"after a restart {len(passed)} of 10 replays passed"
    fresh = digits_request(np.ones((1, 784), dtype=np.float32))
    assert post(url, fresh, auth.sign("tok", fresh, "digits"))[0] == 200


def test_one_token_cannot_flush_another_tokens_signatures(procs, tmp_path, worker_factory):
    """A caller who signs request after request fills its own share of the memory (and is
    then refused) but neither pushes out the service token's signatures nor locks it out."""
    worker = worker_factory()
    seed_services(str(tmp_path), [{
        "name": "digits", "token": "tok", "config": {"endpoints": endpoints(worker)},
        "callers": [{"user_name": "mallory", "token": CALLER_TOKEN}]}])
    gateway = start_gateway(procs, str(tmp_path), "--replay-memory", "30")
    url = f"{gateway.url}/api/predict/digits"
    victim_body, victim_headers = signed_bodies(1)[0]
    assert post(url, victim_body, victim_headers)[0] == 200

    flood = []
    for i in range(40):
        body = digits_request(np.full((1, 784), (i + 1) / 64, dtype=np.float32))
        flood.append(post(url, body, auth.sign(CALLER_TOKEN, body, "digits")))
    assert [status for status, _, _ in flood[:30]] == [200] * 30
    refused = flood[30:]
    assert all(status == 401 for status, _, _ in refused), [s for s, _, _ in refused]
    assert "replay memory is full" in error_message(refused[0][1])

    time.sleep(auth.REPEAT_S + 0.5)
    status, answer, _ = post(url, victim_body, victim_headers)
    assert status == 401 and "already used" in error_message(answer)
    fresh = digits_request(np.ones((1, 784), dtype=np.float32))
    assert post(url, fresh, auth.sign("tok", fresh, "digits"))[0] == 200


def _verdict(result):
    """verify's answer, awaited where the gateway's store memory gave an awaitable."""
    return asyncio.get_event_loop().run_until_complete(result) \
        if asyncio.iscoroutine(result) else result


@pytest.fixture(params=["process", "sqlite", "redis"])
def memory(request, tmp_path):
    """auth's replay memory: a worker's (in the process), or a gateway's (in its store)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    store = None
    if request.param == "process":
        auth._local = auth.SeenSignatures()
    else:
        from gateway.registry import open_store

        if request.param == "redis":
            store = open_store(request.getfixturevalue("redis_server").url)
        else:
            store = open_store(str(tmp_path))
        auth.remember_signatures_in(store)
    yield request.param
    if store is not None:
        loop.run_until_complete(store.close())
    auth._shared = None
    auth._local = auth.SeenSignatures()
    loop.close()
    asyncio.set_event_loop(None)


def test_a_replay_in_a_later_zone_window_is_refused(memory):
    """A Date stays acceptable in the windows of every zone offset (each 15 minutes, for 14
    hours either way): a signature first used in one is refused in each later one, and
    remembered no longer than its Date can be accepted."""
    t0 = 1_800_000_000.0
    body = b'{"x": 1}'
    headers = {k.lower(): v for k, v in auth.sign("tok", body, "digits", now=t0).items()}

    def verify(now):
        return _verdict(auth.verify(headers, "POST", "/api/predict/digits", body, "tok",
                                    "digits", now=now))

    assert verify(t0) is None
    for later in (t0 + 1800, t0 + 3600 + 30, t0 + 9 * 3600, t0 + 14 * 3600 + 50):
        assert auth.date_is_fresh(t0, later)
        assert verify(later) == auth.REPLAYED, later - t0
    assert not auth.date_is_fresh(t0, t0 + auth.REPLAY_WINDOW_S + 1)


def test_a_full_share_refuses_until_its_signatures_expire(memory):
    """Full, the memory refuses new signatures of that token (it does not forget the oldest
    early), other tokens' go on, and expired ones make room."""
    capacity = 5
    if memory == "process":
        auth._local = auth.SeenSignatures(capacity)
    else:
        auth._shared.capacity = capacity
    t0 = 1_800_000_000.0

    def verify(token, i, now):
        body = b"%d" % i
        headers = {k.lower(): v for k, v in auth.sign(token, body, "digits", now=t0).items()}
        return _verdict(auth.verify(headers, "POST", "/api/predict/digits", body, token,
                                    "digits", now=now))

    assert [verify("tok", i, t0) for i in range(capacity)] == [None] * capacity
    assert verify("tok", capacity, t0 + 60) == auth.MEMORY_FULL
    assert verify("tok", 0, t0 + 60) == auth.REPLAYED  # what it holds it still refuses
    assert verify("other-token", 0, t0 + 60) is None
    after = t0 + auth.REPLAY_WINDOW_S + 1  # every Date signed at t0 has expired ...
    assert verify("tok", capacity + 1, after) == \
        "the request's Date is more than 15 minutes from the server's clock"
    t1 = after  # ... and the share has room again for signatures of now
    body = b"new"
    headers = {k.lower(): v for k, v in auth.sign("tok", body, "digits", now=t1).items()}
    assert _verdict(auth.verify(headers, "POST", "/api/predict/digits", body, "tok", "digits",
                                now=t1)) is None


def test_a_flood_of_signatures_does_not_take_the_stores_redis(redis_server):
    """Replay checks wait for a few Redis connections of their own: 500 at once neither
    exhaust the client's pool nor make the store think Redis is down."""
    from gateway.registry import open_store

    async def flood():
        store = open_store(redis_server.url)
        await store.start()
        try:
            now = time.time()
            firsts = await asyncio.gather(*(
                store.remember_signature("digits:flood", f"signature-{i}", now, now + 60, 10_000)
                for i in range(500)))
            return firsts, store.available, await store.list_services()
        finally:
            await store.close()

    firsts, available, services = asyncio.run(flood())
    assert len(firsts) == 500 and all(first is not None for first in firsts)
    assert available and services == []


def test_signed_requests_are_served_while_the_store_is_down(procs, redis_server,
                                                          worker_factory):
    """Without its Redis a gateway serves on from its last snapshot: signed requests too,
    each process then remembering signatures itself (a replay to it is refused)."""
    worker = worker_factory()
    seed_services(redis_server.url, [{"name": "digits", "token": "tok",
                                      "config": {"endpoints": endpoints(worker)}}])
    gateway = start_gateway_on(procs, ("--registry", redis_server.url))
    url = f"{gateway.url}/api/predict/digits"
    assert post(url, *signed_bodies(1)[0])[0] == 200
    redis_server.stop()
    fresh = digits_request(np.ones((1, 784), dtype=np.float32))
    signed = auth.sign("tok", fresh, "digits")
    assert post(url, fresh, signed)[0] == 200
    time.sleep(auth.REPEAT_S + 0.5)
    status, answer, _ = post(url, fresh, signed)
    assert status == 401 and "already used" in error_message(answer)


def test_the_replay_memory_needs_room_for_a_signature():
    from gateway.cli.errors import CliError
    from gateway.cli.main import build_parser

    args = build_parser().parse_args(["gateway", "--replay-memory", "0"])
    with pytest.raises(CliError, match="--replay-memory must be at least 1"):
        args.run(args)


def test_a_date_past_any_calendar_is_a_401_naming_it(procs, tmp_path, worker_factory):
    """A signed request whose Date has a 20-digit year (found by tests/fuzz/fuzz_eas_auth.py)
    is refused as a bad Date, not answered with a 500 before authentication."""
    worker = worker_factory()
    seed_services(str(tmp_path), [{"name": "digits", "token": "tok",
                                   "config": {"endpoints": endpoints(worker)}}])
    gateway = start_gateway_on(procs, ("--state-dir", str(tmp_path)))
    body = digits_request(np.zeros((1, 784), dtype=np.float32))
    headers = dict(auth.sign("tok", body, "digits"),
                   Date="Mon, 1 Jan 99999999999999999999 00:00:00 GMT")
    status, answer, _ = post(f"{gateway.url}/api/predict/digits", body, headers)
    assert status == 401 and "Date" in error_message(answer)
