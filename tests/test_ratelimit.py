"""Rate limits (issue 8): the compiled buckets, the config, the Redis script, and real gateways.

Gateway tests run real gateway processes in front of a real echo worker and,
for global limits, a real redis-server. Accuracy bounds are on counts only:
with rate 100/s and burst 100, 5 seconds of excess load let 100 + 100 * 5 =
600 requests through, and the tests accept 5% either way.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from conftest import free_port, infergate_cmd
from gateway._native.ratelimit import ReplyError, TokenBuckets, parse_replies
from gateway.ratelimit import parse_rate_limits, validate_rate_limits
from gateway_helpers import endpoints, error_message, post, seed_services, start_gateway

ECHO = os.path.join(os.path.dirname(__file__), "data", "echo_processor.py")


# --- the compiled bucket ------------------------------------------------------------------

def test_bucket_refill_math():
    b = TokenBuckets(10.0, 5.0)
    assert b.tokens("k") == 5.0                       # unknown keys have a full bucket
    assert [b.take_at("k", 100.0) for _ in range(5)] == [4.0, 3.0, 2.0, 1.0, 0.0]
    assert b.take_at("k", 100.0) == pytest.approx(-0.1)    # one token comes in 1/rate s
    assert b.take_at("k", 100.04) == pytest.approx(-0.06)  # refused requests take nothing
    assert b.take_at("k", 100.1) == pytest.approx(0.0)     # the token arrived and was taken
    assert b.tokens("k", 100.35) == pytest.approx(2.5)
    assert b.take_at("k", 200.0) == pytest.approx(4.0)     # refills up to burst, not beyond
    b.refund("k")
    assert b.tokens("k", 200.0) == pytest.approx(5.0)
    b.refund("k")                                          # never above burst
    assert b.tokens("k", 200.0) == pytest.approx(5.0)
    assert b.take_at("k", 150.0) == pytest.approx(4.0)     # time going back refills nothing
    slow = TokenBuckets(0.25, 1.0)                         # one request per 4 s
    assert slow.take_at("x", 0.0) == 0.0
    assert slow.take_at("x", 1.0) == pytest.approx(-3.0)
    for bad in ((0, 1), (-1, 1), (1, 0.5), (float("inf"), 1), (1, float("nan"))):
        with pytest.raises(ValueError):
            TokenBuckets(*bad)


def test_bucket_keys_are_bounded_lru():
    b = TokenBuckets(1.0, 2.0, max_keys=3)
    for key in ("a", "b", "c"):
        b.take_at(key, 0.0)
        b.take_at(key, 0.0)
    assert len(b) == 3 and b.keys_by_recency() == ["c", "b", "a"]
    assert b.take_at("a", 0.0) < 0                        # "a" used: now most recent
    assert b.keys_by_recency() == ["a", "c", "b"]
    b.take_at("d", 0.0)                                    # full: "b" (least recent) goes
    assert len(b) == 3 and "b" not in b and b.keys_by_recency() == ["d", "a", "c"]
    assert b.take_at("b", 0.0) == 1.0                      # forgotten key: full bucket again
    assert "c" not in b
    big = TokenBuckets(1.0, 1.0, max_keys=1000)
    for i in range(5000):
        big.take_at(i, float(i))
    assert len(big) == 1000 and sorted(big.keys_by_recency()) == list(range(4000, 5000))


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(0.5, 200.0), burst=st.integers(1, 20),
       gaps=st.lists(st.floats(0.0, 0.2), min_size=1, max_size=150))
def test_bucket_never_lets_more_than_burst_plus_rate_t(rate, burst, gaps):
    b = TokenBuckets(rate, float(burst))
    now, accepted = 1000.0, []
    for gap in gaps:
        now += gap
        if b.take_at("k", now) >= 0:
            accepted.append(now)
    # In every window [accepted[i], accepted[j]] at most burst + rate * t requests passed.
    for i in range(len(accepted)):
        for j in range(i, len(accepted)):
            assert j - i + 1 <= burst + rate * (accepted[j] - accepted[i]) + 1e-6
    # And it is a token bucket, not just a bound: with no gaps, exactly burst pass at once.
    fresh = TokenBuckets(rate, float(burst))
    assert sum(fresh.take_at("k", 5.0) >= 0 for _ in range(burst + 3)) == burst


def test_parse_replies():
    done = b"*3\r\n:1\r\n:-7\r\n$3\r\nabc\r\n-NOSCRIPT gone\r\n+OK\r\n$-1\r\n"
    replies, pos = parse_replies(done + b"*2\r\n:1")
    assert replies[:2] == [[1, -7, b"abc"], replies[1]] and isinstance(replies[1], ReplyError)
    assert str(replies[1]) == "NOSCRIPT gone" and replies[2:] == [b"OK", None]
    assert pos == len(done)
    assert parse_replies(b"$5\r\nab") == ([], 0)


def test_validate_rate_limits_names_entry_and_field():
    validate_rate_limits(None)
    validate_rate_limits([])
    specs = parse_rate_limits([
        {"key": "header:X-User", "rate": 100, "burst": 200},
        {"key": "service", "rate": "2.5", "scope": "global", "on_redis_error": "closed"},
        {"key": "ip", "rate": 0.5}])
    assert specs[0].header == "x-user" and specs[0].burst == 200 and specs[0].scope == "local"
    assert (specs[1].rate, specs[1].burst, specs[1].on_redis_error) == (2.5, 3.0, "closed")
    assert specs[2].burst == 1.0
    cases = [
        ({"rate": 1}, "rate_limits[0]", "'key'"),
        ({"key": "cookie", "rate": 1}, "rate_limits[0] (key 'cookie')", "'key'"),
        ({"key": "header:", "rate": 1}, "rate_limits[0]", "'key'"),
        ({"key": "header:X User", "rate": 1}, "rate_limits[0]", "'key'"),
        ({"key": "ip"}, "rate_limits[0] (key 'ip')", "'rate'"),
        ({"key": "ip", "rate": 0}, "rate_limits[0] (key 'ip')", "'rate'"),
        ({"key": "ip", "rate": -5}, "rate_limits[0]", "'rate'"),
        ({"key": "ip", "rate": True}, "rate_limits[0]", "'rate'"),
        ({"key": "ip", "rate": "fast"}, "rate_limits[0]", "'rate'"),
        ({"key": "ip", "rate": float("nan")}, "rate_limits[0]", "'rate'"),
        ({"key": "ip", "rate": 1, "burst": 0.5}, "rate_limits[0]", "'burst'"),
        ({"key": "ip", "rate": 1, "scope": "cluster"}, "rate_limits[0]", "'scope'"),
        ({"key": "ip", "rate": 1, "on_redis_error": "retry"}, "rate_limits[0]",
         "'on_redis_error'"),
        ({"key": "ip", "rate": 1, "rps": 3}, "rate_limits[0]", "'rate_limits[0].rps'"),
    ]
    for entry, where, field in cases:
        with pytest.raises(ValueError) as info:
            validate_rate_limits([entry])
        assert where in str(info.value) and field in str(info.value), (entry, info.value)
    with pytest.raises(ValueError, match=r"rate_limits\[2\].*'key' repeats rate_limits\[0\]"):
        validate_rate_limits([{"key": "header:x-user", "rate": 1}, {"key": "ip", "rate": 1},
                              {"key": "header:X-User", "rate": 2}])
    with pytest.raises(ValueError, match=r"rate_limits\[1\]: must be an object"):
        validate_rate_limits([{"key": "ip", "rate": 1}, "ip"])
    with pytest.raises(ValueError, match="must be a list"):
        validate_rate_limits({"key": "ip", "rate": 1})


# --- the filter on its own ---------------------------------------------------------------

class FakeRoute:
    def __init__(self, name, limits, token=""):
        self.name, self.rate_limits, self.token = name, limits, token


class FakeExchange:
    def __init__(self, route, headers=None, peer=("10.0.0.1", 5000)):
        from gateway.server import Request
        self.route, self.service = route, route.name
        self.request = Request("POST", "/api/predict/" + route.name, "", headers or {}, [], b"",
                               peer, True)
        self.response_headers = []


def test_filter_all_limits_or_none_and_keeps_state_across_rebuilds():
    from gateway.ratelimit import RateLimitFilter

    f = RateLimitFilter()
    limits = [{"key": "service", "rate": 0.001, "burst": 5},
              {"key": "header:X-User", "rate": 0.001, "burst": 1}]
    route = FakeRoute("svc", limits)
    ex = FakeExchange(route, {"x-user": "a"})
    assert f.check(ex) is None
    assert ex.response_headers == [("X-RateLimit-Limit", "0.001"), ("X-RateLimit-Remaining", "0")]
    for _ in range(3):                    # refused by the per-user limit ...
        assert f.check(FakeExchange(route, {"x-user": "a"})).status == 429
    # ... which took nothing from the service's bucket: 4 of its 5 tokens are left.
    assert [f.check(FakeExchange(route, {"x-user": u})) for u in "bcde"] == [None] * 4
    assert f.check(FakeExchange(route, {"x-user": "f"})).status == 429
    # A rebuilt route (another service changed) keeps the state of unchanged limits ...
    assert f.check(FakeExchange(FakeRoute("svc", list(limits)), {"x-user": "g"})).status == 429
    # ... and a changed limit starts afresh.
    bigger = [dict(limits[0], burst=6), limits[1]]
    assert f.check(FakeExchange(FakeRoute("svc", bigger), {"x-user": "g"})) is None
    # Long header values and tokens are tracked by digest, never verbatim.
    r = FakeExchange(FakeRoute("t", [{"key": "header:X-User", "rate": 1}]), {"x-user": "v" * 5000})
    assert f.check(r) is None
    tracked = f._limits["t"][parse_rate_limits([{"key": "header:X-User", "rate": 1}])[0]]
    assert all(len(k) < 64 for k in tracked.buckets.keys_by_recency())
    tok = FakeRoute("tok", [{"key": "token", "rate": 1, "burst": 1}], token="s3cret")
    assert f.check(FakeExchange(tok)) is None
    refused = f.check(FakeExchange(tok))
    assert b"s3cret" not in refused.body and b"this token" in refused.body
    assert not any("s3cret" in str(k) for k in f._limits["tok"][
        parse_rate_limits(tok.rate_limits)[0]].buckets.keys_by_recency())


# --- the Redis script, straight on Redis --------------------------------------------------

def test_redis_script_is_gcra_all_or_nothing(redis_server):
    from gateway.ratelimit.redis_limiter import GlobalLimiter

    async def scenario():
        limiter = GlobalLimiter(redis_server.url)
        assert limiter.client == "pipelined"
        slow = ("250000.000000", "2.000000")     # 4/s, burst 2
        # 1/min, burst 1000: wide enough to admit every call here, slow enough that
        # its remaining count cannot refill between two calls on a loaded machine.
        wide = ("60000000.000000", "1000.000000")
        assert await limiter.decide(["t:a", "t:b"], [slow, wide]) == [1, 1, 999]
        assert await limiter.decide(["t:a", "t:b"], [slow, wide]) == [1, 0, 998]
        refused = await limiter.decide(["t:a", "t:b"], [slow, wide])
        assert refused[:2] == [0, 1] and 150_000 < refused[2] <= 250_000  # about 1/4 s
        # All or nothing: the refusal took nothing from the other limit.
        assert (await limiter.decide(["t:b"], [wide]))[1] == 997
        # Pipelined: many decisions in flight on the one connection come back in order.
        replies = await asyncio.gather(*[limiter.decide([f"t:k{i % 3}"], [slow])
                                         for i in range(30)])
        assert 6 <= sum(r[0] for r in replies) <= 9  # burst 2 on 3 keys (+ refill if slow)
        # Redis lost the script: EVAL loads it again, transparently.
        import redis
        redis.Redis.from_url(redis_server.url).script_flush()
        assert (await limiter.decide(["t:c"], [slow]))[0] == 1
        await limiter.close()

    asyncio.run(scenario())


def test_redis_lease_takes_what_the_bucket_has(redis_server):
    """A lease takes up to the tokens asked for in one step, as many as the GCRA state
    has (at least one), and moves it exactly as that many single decisions would."""
    import redis
    from gateway.ratelimit.redis_limiter import GlobalLimiter

    client = redis.Redis.from_url(redis_server.url)

    async def scenario():
        limiter = GlobalLimiter(redis_server.url)
        slow = ("60000000.000000", "10.000000")   # 1/min, burst 10: no refill meanwhile
        assert await limiter.lease("l:a", slow, 4) == [4, 6]
        tat = float(client.get("l:a"))
        assert await limiter.lease("l:a", slow, 4) == [4, 2]
        assert float(client.get("l:a")) == pytest.approx(tat + 4 * 60e6, abs=1e6)
        assert await limiter.lease("l:a", slow, 4) == [2, 0]  # what is left
        refused = await limiter.lease("l:a", slow, 4)
        assert refused[0] == 0 and 55e6 < refused[1] <= 60e6  # a minute to the next token
        # The single-decision script sees the same state: nothing left.
        assert (await limiter.decide(["l:a"], [slow]))[0] == 0
        await limiter.close()

    asyncio.run(scenario())


def test_stalled_redis_is_skipped_then_used_again(redis_server):
    """A Redis that accepts but does not answer costs one short timeout, then is skipped."""
    import redis
    from gateway.ratelimit.redis_limiter import GlobalLimiter, RedisUnavailable

    async def scenario():
        limiter = GlobalLimiter(redis_server.url, circuit_s=0.5)
        args = [("1000.000000", "10.000000")]
        assert (await limiter.decide(["s:a"], args))[0] == 1
        redis.Redis.from_url(redis_server.url).execute_command("CLIENT", "PAUSE", 1500, "ALL")
        with pytest.raises(RedisUnavailable, match="no reply within 100 ms"):
            await limiter.decide(["s:a"], args)
        assert not limiter.available()    # the circuit is open: requests skip Redis
        while not limiter.available():
            await asyncio.sleep(0.05)
        # Still paused: the next attempt times out again; after the pause it answers.
        outcomes = []
        for _ in range(100):
            if limiter.available():
                try:
                    outcomes.append((await limiter.decide(["s:a"], args))[0])
                except RedisUnavailable:
                    outcomes.append("down")
                if outcomes[-1] == 1:
                    break
            await asyncio.sleep(0.05)
        assert outcomes[-1] == 1 and "down" in outcomes, outcomes
        await limiter.close()

    asyncio.run(scenario())


# --- through real gateways ----------------------------------------------------------------

def start_echo_worker(procs):
    port = free_port()
    return procs.start(infergate_cmd("worker", "--service", "echo", "--processor", "python",
                                     "--model", ECHO, "--host", "127.0.0.1", "--port", str(port)),
                       port, env={"ECHO_PORT": str(port)})


def service(name, worker, limits):
    return {"name": name, "config": {"name": name, "endpoints": endpoints(worker),
                                     "upstream_path": "/api/predict/echo",
                                     "metadata": {"rate_limits": limits}}}


def seed_redis(url, records):
    from gateway.registry import open_store
    from gateway.registry.records import ServiceRecord

    async def write():
        store = open_store(url)
        await store.start()
        for record in records:
            await store.put_service(ServiceRecord.from_dict({"status": "Running", **record}))
        await store.close()

    asyncio.run(write())


def start_redis_gateway(procs, url, *extra):
    port = free_port()
    return procs.start(infergate_cmd("gateway", "--host", "127.0.0.1", "--port", str(port),
                                     "--registry", url, "--health-interval", "0.3", *extra), port)


def wait_for_route(gw, path, headers=None, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, _ = post(gw.url + path, b"probe", headers)
        if status != 404:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never routed on {gw.url}")


def load(targets, seconds, per_thread_rps=200.0):
    """Paced POSTs, one thread per (port, path, headers) target, for `seconds`.

    -> list of (seconds since start at sending, status). Every target sends
    faster than the limits under test, so the limiter, not the client, decides.
    """
    results = []
    lock = threading.Lock()
    start = time.monotonic() + 0.05

    def run(port, path, headers):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine = []
        next_at = start
        while True:
            now = time.monotonic()
            if now - start >= seconds:
                break
            if next_at > now:
                time.sleep(next_at - now)
            next_at += 1.0 / per_thread_rps
            sent = time.monotonic() - start
            try:
                conn.request("POST", path, body=b"x", headers=headers or {})
                resp = conn.getresponse()
                resp.read()
                mine.append((sent, resp.status))
            except (OSError, http.client.HTTPException):
                mine.append((sent, -1))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.close()
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=run, args=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return results


def accepted(results, seconds):
    return sum(1 for sent, status in results if status == 200 and sent < seconds)


def assert_about_600(results, what):
    ok = accepted(results, 5.0)
    statuses = sorted({status for _, status in results})
    assert set(statuses) <= {200, 429}, (what, statuses)
    assert len(results) > 1000, (what, len(results))  # the load really exceeded the limit
    print(f"{what}: {ok} accepted of {len(results)} sent in 5 s")
    assert 570 <= ok <= 630, f"{what}: {ok} accepted in 5 s, want 600 +- 5%"


LIMIT_100 = {"key": "service", "rate": 100, "burst": 100}


def test_local_limit_accuracy(procs, tmp_path):
    w = start_echo_worker(procs)
    seed_services(str(tmp_path), [service("svc", w, [LIMIT_100])])
    gw = start_gateway(procs, str(tmp_path))
    results = load([(gw.port, "/api/predict/svc", None)] * 2, 5.0)
    assert_about_600(results, "local, one gateway")


def test_global_limit_accuracy_one_and_two_gateways(procs, redis_server):
    import redis

    w = start_echo_worker(procs)
    glob = dict(LIMIT_100, scope="global")
    seed_redis(redis_server.url, [service("one", w, [glob]), service("split", w, [glob])])
    gw1 = start_redis_gateway(procs, redis_server.url)
    gw2 = start_redis_gateway(procs, redis_server.url)
    # All the load on one gateway.
    client = redis.Redis.from_url(redis_server.url)
    results = load([(gw1.port, "/api/predict/one", None)] * 2, 5.0)
    # (the key lives while the bucket is not full again: 1 s after the last request)
    assert client.keys("infergate:rl:*") == [b"infergate:rl:{one}:100:100:service:"]
    assert_about_600(results, "global, one gateway")
    # The same limit with the load split over two gateway processes sharing the Redis.
    results = load([(gw1.port, "/api/predict/split", None),
                    (gw2.port, "/api/predict/split", None)], 5.0)
    assert b"infergate:rl:{split}:100:100:service:" in client.keys("infergate:rl:*")
    assert_about_600(results, "global, two gateways")
    for gw in (gw1, gw2):
        assert "unreachable" not in gw.output()  # decided on Redis, never by the fallback


def test_fast_global_limit_is_leased_and_stays_accurate_across_gateways(procs, redis_server):
    """A limit fast enough for leases (400/s: up to 4 tokens per lease) is taken from
    Redis several tokens at a time: under the limit, two gateways ask Redis far less often
    than requests pass; over it, together they still pass burst + rate * t within 5%."""
    import redis

    w = start_echo_worker(procs)
    fast = {"key": "service", "rate": 400, "burst": 400, "scope": "global"}
    seed_redis(redis_server.url, [service("fast", w, [fast])])
    gw1 = start_redis_gateway(procs, redis_server.url)
    gw2 = start_redis_gateway(procs, redis_server.url)
    client = redis.Redis.from_url(redis_server.url)
    for gw in (gw1, gw2):
        wait_for_route(gw, "/api/predict/fast")

    def script_calls():
        stats = client.info("commandstats")
        return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0)
                   for name in ("evalsha", "eval"))

    before = script_calls()
    under = load([(gw1.port, "/api/predict/fast", None), (gw2.port, "/api/predict/fast", None)],
                 2.0, per_thread_rps=120)
    calls = script_calls() - before
    assert {status for _, status in under} == {200} and len(under) > 300, len(under)
    assert calls < len(under) / 2, (calls, len(under))  # several passes per round trip
    time.sleep(1.2)  # the bucket is full again
    over = load([(gw1.port, "/api/predict/fast", None), (gw2.port, "/api/predict/fast", None)]
                * 2, 5.0)
    ok = accepted(over, 5.0)
    assert {status for _, status in over} <= {200, 429}
    assert len(over) > 3000, len(over)  # well over the limit
    print(f"leased global: {calls} round trips for {len(under)} passes under the limit; "
          f"{ok} accepted of {len(over)} in 5 s over it")
    assert 2280 <= ok <= 2520, f"{ok} accepted in 5 s, want 400 + 400 * 5 = 2400 +- 5%"


def test_per_key_isolation_and_headers(procs, tmp_path):
    w = start_echo_worker(procs)
    seed_services(str(tmp_path), [service("svc", w, [
        {"key": "header:X-User", "rate": 0.5, "burst": 3}])])
    gw = start_gateway(procs, str(tmp_path))
    url = gw.url + "/api/predict/svc"
    for user in ("alice", "bob"):
        seen = [post(url, b"x", {"X-User": user}) for _ in range(4)]
        assert [s for s, _, _ in seen] == [200, 200, 200, 429], user
        assert [h["X-RateLimit-Remaining"] for _, _, h in seen] == ["2", "1", "0", "0"]
        assert all(h["X-RateLimit-Limit"] == "0.5" for _, _, h in seen)
        status, body, headers = seen[3]
        message = f"rate limit of 0.5 requests/s for header X-User={user} exceeded"
        assert json.loads(body) == {"code": 429, "message": message, "error": message}
        assert headers["Retry-After"] == "2"    # one token every 2 s
    # Requests without the header share one bucket of their own.
    assert [post(url, b"x")[0] for _ in range(4)] == [200, 200, 200, 429]
    assert post(url, b"x", {"X-User": "carol"})[0] == 200


def test_retry_after_matches_rate_and_burst(procs, tmp_path, redis_server):
    w = start_echo_worker(procs)
    limits = [{"key": "ip", "rate": 0.25, "burst": 2}]       # a token every 4 s
    seed_services(str(tmp_path), [service("loc", w, limits)])
    seed_redis(redis_server.url, [service("glob", w, [dict(limits[0], scope="global")])])
    local_gw = start_gateway(procs, str(tmp_path))
    global_gw = start_redis_gateway(procs, redis_server.url)
    for gw, path in ((local_gw, "/api/predict/loc"), (global_gw, "/api/predict/glob")):
        statuses = [post(gw.url + path, b"x") for _ in range(2)]
        assert [s for s, _, _ in statuses] == [200, 200], path
        status, body, headers = post(gw.url + path, b"x")
        assert status == 429, path
        assert headers["Retry-After"] == "4", path         # burst used up: 1/rate to the next
        assert headers["X-RateLimit-Limit"] == "0.25"
        assert headers["X-RateLimit-Remaining"] == "0"
        assert error_message(body) == "rate limit of 0.25 requests/s for client 127.0.0.1 exceeded"
        time.sleep(1.2)
        status, _, headers = post(gw.url + path, b"x")
        assert status == 429 and headers["Retry-After"] == "3", path   # about 2.8 s left


def redis_tat(client, service: str) -> float | None:
    """The GCRA state (theoretical arrival time, us) of the service-wide 1/s limit of
    `service` on Redis: it moves by exactly 1e6 for each request decided there (other
    users of EVALSHA, like the store's own scripts, do not blur it)."""
    value = client.get(f"infergate:rl:{{{service}}}:1:10000:service:")
    return None if value is None else float(value)


def test_redis_outage_fails_open_or_closed_and_recovers(procs, redis_server):
    import redis

    w = start_echo_worker(procs)
    # 1/s with a burst of 10,000: never refuses in this test, and its Redis key lives
    # (TTL about one second per request taken) long enough to watch each decision.
    high = {"key": "service", "rate": 1, "burst": 10000, "scope": "global"}
    seed_redis(redis_server.url, [service("open", w, [dict(high, on_redis_error="open")]),
                                  service("closed", w, [dict(high, on_redis_error="closed")])])
    gw = start_redis_gateway(procs, redis_server.url)
    for name in ("open", "closed"):
        assert post(gw.url + f"/api/predict/{name}", b"x")[0] == 200
    client = redis.Redis.from_url(redis_server.url)
    assert redis_tat(client, "open") is not None  # decided on Redis
    assert redis_tat(client, "closed") is not None
    client.save()  # the restarted server loads this snapshot: the services survive
    client.close()

    outcomes = {"open": [], "closed": []}
    stop = threading.Event()

    def hammer(name):
        while not stop.is_set():
            status, body, _ = post(gw.url + f"/api/predict/{name}", b"x", timeout=5)
            outcomes[name].append((time.monotonic(), status, body))
            time.sleep(0.01)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in outcomes]
    for t in threads:
        t.start()
    time.sleep(0.5)
    killed_at = time.monotonic()
    redis_server.stop()
    time.sleep(2.5)
    back_at = time.monotonic()
    redis_server.start()
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(30)

    during = {n: [(s, b) for t, s, b in v if killed_at + 0.3 < t < back_at] for n, v in
              outcomes.items()}
    # Fail open: the gateway kept answering, limited by its own buckets meanwhile.
    assert during["open"] and {s for s, _ in during["open"]} == {200}
    # Fail closed: 503 with a message saying why.
    assert during["closed"] and {s for s, _ in during["closed"]} == {503}
    assert "unreachable" in error_message(during["closed"][0][1])
    assert "on_redis_error: closed" in error_message(during["closed"][0][1])
    # Recovered by itself: the last second answers 200 again, decided on Redis.
    for name, seen in outcomes.items():
        tail = [s for t, s, _ in seen if t > back_at + 2.0]
        assert tail and set(tail) == {200}, (name, tail)
    client = redis.Redis.from_url(redis_server.url)
    for name in ("open", "closed"):
        before = redis_tat(client, name)
        assert post(gw.url + f"/api/predict/{name}", b"x")[0] == 200
        assert redis_tat(client, name) - before == pytest.approx(1e6, abs=1.0)  # on Redis
    log = gw.output()
    assert log.count("unreachable for global rate limits") == 1, log
    assert log.count("reachable again: global rate limits") == 1, log


@pytest.mark.parametrize("scope", ["local", "global"])
def test_changing_the_limit_applies_without_restart(procs, tmp_path, request, scope):
    """A modify (a new record in the store) applies to the next requests, no restart."""
    w = start_echo_worker(procs)
    if scope == "local":
        def change(limits):
            seed_services(str(tmp_path), [service("svc", w, limits)])
    else:
        redis_url = request.getfixturevalue("redis_server").url

        def change(limits):
            seed_redis(redis_url, [service("svc", w, [dict(lim, scope="global")
                                                       for lim in limits])])
    change([{"key": "service", "rate": 1, "burst": 2}])
    gw = (start_gateway(procs, str(tmp_path)) if scope == "local"
          else start_redis_gateway(procs, redis_url))
    url = gw.url + "/api/predict/svc"
    assert [post(url, b"x")[0] for _ in range(3)] == [200, 200, 429]

    def limit_header():
        return post(url, b"x")[2].get("X-RateLimit-Limit")

    change([{"key": "service", "rate": 1000, "burst": 1000}])
    deadline = time.monotonic() + 10
    while limit_header() != "1000" and time.monotonic() < deadline:
        time.sleep(0.1)
    # The raised limit starts with a full bucket: the old backlog does not hold clients back.
    assert [post(url, b"x")[0] for _ in range(20)] == [200] * 20
    change([])
    deadline = time.monotonic() + 10
    while limit_header() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert limit_header() is None


def test_global_limit_without_redis_acts_local_and_says_so(procs, tmp_path):
    w = start_echo_worker(procs)
    seed_services(str(tmp_path), [service("svc", w, [{"key": "service", "rate": 1, "burst": 2,
                                                      "scope": "global"}])])
    gw = start_gateway(procs, str(tmp_path))
    url = gw.url + "/api/predict/svc"
    assert [post(url, b"x")[0] for _ in range(3)] == [200, 200, 429]
    assert post(url, b"x")[0] == 429
    assert gw.output().count("global limits act as local ones") == 1


# --- shutdown ------------------------------------------------------------------------------

def test_limiter_close_is_safe_unused_twice_and_with_redis_down(redis_server):
    """close() on a limiter that never connected, twice, after Redis went away, and
    decisions after close() fail as 'unavailable' instead of reconnecting."""
    from gateway.ratelimit.redis_limiter import GlobalLimiter, RedisUnavailable

    args = [("1000.000000", "10.000000")]

    async def scenario():
        unused = GlobalLimiter(redis_server.url)
        await unused.close()
        await unused.close()
        used = GlobalLimiter(redis_server.url)
        assert (await used.decide(["c:a"], args))[0] == 1
        redis_server.stop()
        with pytest.raises(RedisUnavailable):  # the connection is gone: dropped, then refused
            for _ in range(3):
                await used.decide(["c:a"], args)
        await used.close()
        await used.close()
        with pytest.raises(RedisUnavailable, match="closed"):
            await used.decide(["c:a"], args)

    asyncio.run(scenario())


@pytest.mark.parametrize("redis_state", ["up", "stopped"])
def test_gateway_on_redis_exits_cleanly_on_sigterm(procs, redis_server, redis_state):
    """SIGTERM ends a gateway on --registry redis:// with exit code 0, whether its rate
    limiter never talked to Redis (no global limits) or did, and whether Redis is still
    up or was stopped before the shutdown."""
    w = start_echo_worker(procs)
    seed_redis(redis_server.url, [service("glob", w, [{"key": "service", "rate": 1000,
                                                       "burst": 1000, "scope": "global"}])])
    unused = start_redis_gateway(procs, redis_server.url)  # no request: limiter never used
    used = start_redis_gateway(procs, redis_server.url)
    wait_for_route(used, "/api/predict/glob")
    assert post(used.url + "/api/predict/glob", b"x")[0] == 200  # decided on Redis
    if redis_state == "stopped":
        redis_server.stop()
        time.sleep(0.3)  # the gateways see the connections close
    for gw in (unused, used):
        code = gw.stop(timeout=20)
        log = gw.output()
        assert code == 0, log
        assert "Traceback" not in log, log
