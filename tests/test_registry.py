"""Control-plane state store: SQLite (embedded) and Redis backends."""
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import given, settings, strategies as st

from gateway.registry import (InstanceRecord, ServiceRecord, StoreUnavailable, open_store)
from gateway.registry.redis_store import RedisStore, parse_redis_url
from gateway.registry.sqlite_store import SqliteStore

from conftest import free_port


class Events:
    """A subscriber that records (kind, name) and lets a test wait for one."""

    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    def __call__(self, kind, name):
        self.seen.append((kind, name))

    async def wait_for(self, kind, name, timeout=1.0):
        deadline = time.monotonic() + timeout
        while (kind, name) not in self.seen:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {kind}:{name} within {timeout}s; saw {self.seen}")
            await asyncio.sleep(0.01)

    def count(self, kind, name):
        return self.seen.count((kind, name))


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path):
    """Where the state lives: a directory or a redis URL (real redis-server)."""
    if request.param == "sqlite":
        return str(tmp_path / "state")
    return request.getfixturevalue("redis_server").url


@pytest.fixture
async def stores(backend):
    """stores() -> a started store on the shared backend (as another gateway would
    open it: own connection). All are closed at teardown."""
    opened = []

    async def make():
        s = open_store(backend)
        await s.start()
        opened.append(s)
        return s

    yield make
    for s in opened:
        await s.close()


def svc(name="digits", **kw):
    return ServiceRecord(name=name, config={"name": name, "processor": "tensorflow",
                                            "metadata": {"instance": 1, "rpc.batching": False}},
                         **kw)


def inst(service="digits", port=9001, **kw):
    return InstanceRecord(service=service, ip="127.0.0.1", port=port, **kw)


# ---- records ---------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                         max_size=3),
                     max_leaves=8)


@settings(max_examples=30, deadline=None)
@given(name=st.text(min_size=1, max_size=10), token=st.text(max_size=10), config=_json,
       traffic=st.dictionaries(st.text(min_size=1, max_size=5), st.integers(0, 100), max_size=3),
       linked=st.none() | st.text(min_size=1, max_size=5))
def test_service_record_json_roundtrip(name, token, config, traffic, linked):
    rec = ServiceRecord(name=name, config={"x": config}, token=token, traffic=traffic,
                        linked_to=linked, history=[{"revision": 1, "config": {"x": config}}],
                        rules=[{"condition": "#HEADER_v == '1'", "target": "a",
                                "header_name": "", "header_value": ""}])
    assert ServiceRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


def test_instance_record_defaults_and_unknown_keys():
    i = InstanceRecord(service="s", ip="10.0.0.1", port=80)
    assert i.instance_id == "10.0.0.1:80" and i.weight > 0 and i.healthy
    d = i.to_dict() | {"from_the_future": 1}
    assert InstanceRecord.from_dict(d) == i


def test_open_store_dispatch(tmp_path):
    d = tmp_path / "a" / "b"
    s = open_store(str(d))
    assert isinstance(s, SqliteStore) and d.is_dir()
    assert isinstance(open_store("redis://127.0.0.1:1/0"), RedisStore)
    assert parse_redis_url("redis+cluster://h:7000/0") == ("redis://h:7000", True, None)
    assert parse_redis_url("redis://h:1/2?cluster=true&prefix=x:") == ("redis://h:1", True, "x:")
    assert parse_redis_url("rediss://:pw@h:1/3") == ("rediss://:pw@h:1/3", False, None)
    r = open_store("redis://127.0.0.1:1/0?prefix=other:")
    assert r.prefix == "other:" and r.channel == "other:changes"


# ---- shared behaviour --------------------------------------------------------

async def test_service_crud(stores):
    s = await stores()
    assert await s.get_service("digits") is None
    assert await s.list_services() == []
    rec = svc(token="tok-1")
    await s.put_service(rec)
    got = await s.get_service("digits")
    assert got == rec and got is not rec
    rec.revision, rec.status = 2, "Running"
    rec.history.append({"revision": 1, "config": dict(rec.config)})
    rec.traffic = {"digits": 80, "digits_canary": 20}
    await s.put_service(rec)
    await s.put_service(svc("alpha"))
    assert [r.name for r in await s.list_services()] == ["alpha", "digits"]
    got = await s.get_service("digits")
    assert got.revision == 2 and got.traffic == {"digits": 80, "digits_canary": 20}
    assert got.history[0]["revision"] == 1
    assert await s.delete_service("digits") is True
    assert await s.delete_service("digits") is False
    assert await s.get_service("digits") is None
    assert [r.name for r in await s.list_services()] == ["alpha"]


async def test_instances_health_weight_and_delete(stores):
    s = await stores()
    ev = Events()
    s.subscribe(ev)
    await s.put_service(svc())
    await s.register_instance(inst(port=9001, meta={"zone": "a", "tags": []}), ttl=0)
    await s.register_instance(inst(port=9002, weight=50), ttl=30)
    ids = [i.instance_id for i in await s.list_instances("digits")]
    assert ids == ["127.0.0.1:9001", "127.0.0.1:9002"]
    assert (await s.list_instances("digits"))[0].meta == {"zone": "a", "tags": []}
    assert await s.set_instance_weight("digits", "127.0.0.1:9002", 0) is True
    assert await s.set_instance_health("digits", "127.0.0.1:9001", False) is True
    assert await s.set_instance_health("digits", "nope:1", False) is False
    a, b = await s.list_instances("digits")
    assert (a.healthy, a.weight, b.healthy, b.weight) == (False, 100, True, 0)
    assert await s.deregister_instance("digits", "127.0.0.1:9001") is True
    assert await s.deregister_instance("digits", "127.0.0.1:9001") is False
    assert [i.port for i in await s.list_instances("digits")] == [9002]
    assert ev.count("instances", "digits") >= 5
    # A bare worker's instances (no service record) are in the snapshot too.
    await s.register_instance(inst("bare", port=9100), ttl=30)
    services, instances = await s.snapshot()
    assert list(services) == ["digits"]
    assert {k: [i.port for i in v] for k, v in instances.items()} == {"bare": [9100],
                                                                      "digits": [9002]}
    # Deleting a service removes its instances.
    assert await s.delete_service("digits") is True
    assert await s.list_instances("digits") == []
    services, instances = await s.snapshot()
    assert services == {} and list(instances) == ["bare"]
    await ev.wait_for("service", "digits")


async def test_heartbeat_and_expiry(stores):
    s = await stores()
    other = await stores()
    ev, ev_other = Events(), Events()
    s.subscribe(ev)
    await other.subscribe(ev_other)          # awaitable form works too
    await s.register_instance(inst(port=9001), ttl=1.0)
    await s.register_instance(inst(port=9002), ttl=0)      # static: never expires
    assert await s.heartbeat("digits", "127.0.0.1:9001", 1.0) is True
    assert await s.heartbeat("digits", "127.0.0.1:9999", 1.0) is False
    assert await s.heartbeat("ghost", "x", 1.0) is False
    for _ in range(3):                       # kept alive past its first ttl
        await asyncio.sleep(0.4)
        assert await s.heartbeat("digits", "127.0.0.1:9001", 1.0) is True
    live = await other.list_instances("digits")
    assert [i.port for i in live] == [9001, 9002]
    assert time.time() - live[0].heartbeat_at < 0.6
    ev.seen.clear()
    ev_other.seen.clear()
    t0 = time.monotonic()
    await ev.wait_for("instances", "digits", timeout=2.5)   # ttl + ~1 s
    await ev_other.wait_for("instances", "digits", timeout=1.0)
    assert time.monotonic() - t0 >= 0.5
    assert [i.port for i in await s.list_instances("digits")] == [9002]
    assert [i.port for i in (await other.snapshot())[1]["digits"]] == [9002]
    # A lapsed instance must re-register.
    assert await s.heartbeat("digits", "127.0.0.1:9001", 1.0) is False
    assert await s.heartbeat("digits", "127.0.0.1:9002", 1.0) is True


async def test_change_reaches_second_store(stores):
    a = await stores()
    b = await stores()
    ev_a, ev_b = Events(), Events()
    a.subscribe(ev_a)
    b.subscribe(ev_b)
    t0 = time.monotonic()
    await a.put_service(svc(token="secret"))
    await ev_b.wait_for("service", "digits", timeout=1.0)
    assert (await b.get_service("digits")).token == "secret"
    await a.register_instance(inst(), ttl=10)
    await ev_b.wait_for("instances", "digits", timeout=1.0)
    assert time.monotonic() - t0 < 2.0
    assert [i.port for i in (await b.snapshot())[1]["digits"]] == [9001]
    # ... and back the other way.
    await b.set_instance_weight("digits", "127.0.0.1:9001", 0)
    ev_a.seen.clear()
    ev_b.seen.clear()
    await b.delete_service("digits")
    await ev_a.wait_for("service", "digits")
    await ev_a.wait_for("instances", "digits")
    # The store that made a change tells its own subscribers exactly once
    # (directly, not again through the echo of its publish).
    await asyncio.sleep(0.4)
    assert ev_b.count("service", "digits") == 1
    assert (await a.get_service("digits")) is None


async def test_async_subscriber_and_unsubscribe(stores):
    s = await stores()
    got = []

    async def cb(kind, name):
        await asyncio.sleep(0)
        got.append((kind, name))

    sub = s.subscribe(cb)
    await s.put_service(svc("one"))
    await asyncio.sleep(0.05)
    sub.cancel()
    await s.put_service(svc("two"))
    await asyncio.sleep(0.3)
    assert got == [("service", "one")]


# ---- SQLite specifics -----------------------------------------------------

async def test_sqlite_survives_restart(tmp_path):
    d = str(tmp_path / "state")
    s = open_store(d)
    await s.start()
    rec = svc(token="tok-xyz", status="Running", traffic={"digits": 100})
    await s.put_service(rec)
    await s.register_instance(inst(port=9001), ttl=0)        # static endpoint
    await s.register_instance(inst(port=9002), ttl=0.3)      # a worker that will not come back
    await s.close()                                          # the gateway stops
    assert os.path.exists(os.path.join(d, "state.db"))
    await asyncio.sleep(0.4)
    s2 = open_store(d)
    await s2.start()
    try:
        got = await s2.get_service("digits")
        assert got == rec and got.token == "tok-xyz"
        assert [i.port for i in await s2.list_instances("digits")] == [9001]
        assert await s2.heartbeat("digits", "127.0.0.1:9002", 1) is False
    finally:
        await s2.close()
    with pytest.raises(StoreUnavailable):
        await s2.put_service(svc())


async def test_sqlite_other_process_sees_changes(tmp_path):
    """A change written by another OS process (a sibling --processes gateway)."""
    d = str(tmp_path / "state")
    s = open_store(d)
    await s.start()
    ev = Events()
    s.subscribe(ev)
    code = ("import asyncio, sys\n"
            "from gateway.registry import open_store, ServiceRecord\n"
            "async def main():\n"
            "    st = open_store(sys.argv[1])\n"
            "    await st.put_service(ServiceRecord(name='from-child', token='t'))\n"
            "    await st.close()\n"
            "asyncio.run(main())\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, d, cwd=repo)
    try:
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        await ev.wait_for("service", "from-child", timeout=1.0)
        assert (await s.get_service("from-child")).token == "t"
    finally:
        await s.close()


# ---- Redis specifics --------------------------------------------------------

async def test_redis_outage_serves_snapshot_and_resyncs(redis_server):
    s = RedisStore(redis_server.url, reconnect_max=0.5)
    await s.start()
    ev = Events()
    s.subscribe(ev)
    try:
        await s.put_service(svc(token="tok"))
        await s.register_instance(inst(), ttl=30)
        before = await s.snapshot()
        redis_server.stop()
        await asyncio.sleep(0.2)
        assert await s.snapshot() == before
        assert (await s.get_service("digits")).token == "tok"
        assert [i.port for i in await s.list_instances("digits")] == [9001]
        with pytest.raises(StoreUnavailable, match="unavailable"):
            await s.put_service(svc("new"))
        with pytest.raises(StoreUnavailable):
            await s.heartbeat("digits", "127.0.0.1:9001", 30)
        assert not s.available
        redis_server.start()                  # same port, empty (no persistence)
        await ev.wait_for("resync", "", timeout=3.0)
        assert s.available
        # What the store held is written back: the service, and the instance with a lease.
        services, instances = await s.snapshot()
        assert services == before[0]
        assert [(i.instance_id, i.port) for i in instances["digits"]] == [("127.0.0.1:9001", 9001)]
        assert await s.heartbeat("digits", "127.0.0.1:9001", 30) is True
        await s.put_service(svc("new"))
        assert [r.name for r in await s.list_services()] == ["digits", "new"]
    finally:
        await s.close()


async def test_redis_start_while_down_then_recovers():
    port = free_port()
    s = RedisStore(f"redis://127.0.0.1:{port}/0", reconnect_max=0.3, connect_timeout=0.3)
    await s.start()
    try:
        assert await s.snapshot() == ({}, {})
        with pytest.raises(StoreUnavailable):
            await s.put_service(svc())
    finally:
        await s.close()


async def test_redis_expiry_notifies_once_per_gateway(redis_server):
    a = RedisStore(redis_server.url)
    b = RedisStore(redis_server.url)
    await a.start()
    await b.start()
    ev = Events()
    b.subscribe(ev)
    try:
        await a.register_instance(inst(port=9001), ttl=0.3)
        await ev.wait_for("instances", "digits")       # the registration
        ev.seen.clear()
        await ev.wait_for("instances", "digits", timeout=1.5)   # the expiry
        await asyncio.sleep(0.5)
        # both expirers raced; only the one that deleted it announced it
        assert ev.count("instances", "digits") == 1
        assert await a.list_instances("digits") == []
    finally:
        await a.close()
        await b.close()


def _start_cluster_node(exe, d):
    """-> (proc, port) of a redis-server in cluster mode owning all 16384 slots,
    or None if it did not come up (e.g. its free port was taken meanwhile)."""
    import redis
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", d, "--cluster-enabled", "yes",
                             "--cluster-config-file", f"nodes-{port}.conf"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=2)
    deadline = time.monotonic() + 10
    try:
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                return None
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster did not become ok")
            time.sleep(0.05)
        return proc, port
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        client.close()


@pytest.fixture
def redis_cluster():
    """A one-node Redis Cluster (all 16384 slots on one redis-server)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    d = tempfile.mkdtemp(prefix="infergate-rcluster-")
    started = None
    try:
        for _ in range(3):
            started = _start_cluster_node(exe, d)
            if started:
                break
        assert started, "redis-server (cluster mode) did not start"
        yield f"redis+cluster://127.0.0.1:{started[1]}"
    finally:
        if started:
            started[0].terminate()
            started[0].wait(5)
        shutil.rmtree(d, ignore_errors=True)


async def test_redis_cluster(redis_cluster):
    a = open_store(redis_cluster)
    b = open_store(redis_cluster)
    assert isinstance(a, RedisStore) and a.cluster
    await a.start()
    await b.start()
    ev = Events()
    b.subscribe(ev)
    try:
        await a.put_service(svc(token="c"))
        await a.register_instance(inst(), ttl=0.5)
        await ev.wait_for("service", "digits")
        await ev.wait_for("instances", "digits")
        services, instances = await b.snapshot()
        assert services["digits"].token == "c" and [i.port for i in instances["digits"]] == [9001]
        assert await b.heartbeat("digits", "127.0.0.1:9001", 0.5) is True
        assert await b.set_instance_weight("digits", "127.0.0.1:9001", 0) is True
        ev.seen.clear()
        await ev.wait_for("instances", "digits", timeout=2.0)       # expiry
        assert await b.list_instances("digits") == []
        assert await a.delete_service("digits") is True
    finally:
        await a.close()
        await b.close()


# ---- versions: compare-and-set ---------------------------------------------

async def test_service_versions_compare_and_set(stores):
    from gateway.registry import VersionConflict

    a, b = await stores(), await stores()       # two gateways on one backend
    rec = svc()
    await a.put_service(rec, expect_version=0)   # create only if absent
    assert rec.version == 1
    with pytest.raises(VersionConflict) as err:
        await b.put_service(svc(), expect_version=0)
    assert err.value.current == 1
    # Both read version 1; a writes first; b's write from the stale copy is refused.
    ra, rb = await a.get_service("digits"), await b.get_service("digits")
    assert ra.version == rb.version == 1
    ra.token = "from-a"
    await a.put_service(ra, expect_version=ra.version)
    assert ra.version == 2
    rb.status = "Running"
    with pytest.raises(VersionConflict) as err:
        await b.put_service(rb, expect_version=rb.version)
    assert (err.value.expected, err.value.current) == (1, 2)
    got = await b.get_service("digits")
    assert got.token == "from-a" and got.status != "Running" and got.version == 2
    # An unconditional put (seeding tools) still works and bumps the version.
    await b.put_service(svc(token="seeded"))
    assert (await a.get_service("digits")).version == 3
    # Conditional delete: refused on a stale version, done on the current one.
    with pytest.raises(VersionConflict):
        await a.delete_service("digits", expect_version=2)
    assert await a.get_service("digits") is not None
    assert await a.delete_service("digits", expect_version=3) is True
    # A write from a copy read before the delete cannot bring the record back.
    got.status = "Running"
    with pytest.raises(VersionConflict) as err:
        await b.put_service(got, expect_version=got.version)
    assert err.value.current == 0
    assert await a.get_service("digits") is None and await b.list_services() == []


async def test_interleaved_read_modify_write_loses_nothing(stores):
    """Two writers, each reading then writing back a changed copy, interleaved:
    the slower one must fail and retry, never overwrite the other's change."""
    from gateway.registry import VersionConflict

    a, b = await stores(), await stores()
    await a.put_service(svc(), expect_version=0)

    async def rmw(store, change, pause=None):
        for _ in range(10):
            rec = await store.get_service("digits")
            change(rec)
            if pause is not None:
                await pause()
                pause = None
            try:
                await store.put_service(rec, expect_version=rec.version)
                return
            except VersionConflict:
                continue
        raise AssertionError("no progress")

    async def other_writer():   # runs between a's read and a's write
        await rmw(b, lambda r: r.config["metadata"].__setitem__("instance", 3))

    await rmw(a, lambda r: setattr(r, "status", "Running"), pause=other_writer)
    got = await a.get_service("digits")
    assert got.status == "Running" and got.config["metadata"]["instance"] == 3
    assert got.version == 3


async def test_register_instance_can_require_the_service(stores):
    from gateway.registry import ServiceNotFound

    s = await stores()
    with pytest.raises(ServiceNotFound):
        await s.register_instance(inst("ghost"), ttl=30, require_service=True)
    assert await s.list_instances("ghost") == []
    assert "ghost" not in (await s.snapshot())[1]
    await s.put_service(svc("ghost"))
    await s.register_instance(inst("ghost"), ttl=30, require_service=True)
    assert [i.port for i in await s.list_instances("ghost")] == [9001]
    # Without the flag bare registrations still work (tests, static seeding).
    await s.register_instance(inst("bare"), ttl=30)
    assert len(await s.list_instances("bare")) == 1


def test_instance_healthy_is_parsed_strictly():
    assert InstanceRecord.from_dict({"service": "s", "healthy": "false"}).healthy is False
    assert InstanceRecord.from_dict({"service": "s", "healthy": True}).healthy is True
    for bad in ("no", "yes", 2, None):
        with pytest.raises(ValueError, match="healthy"):
            InstanceRecord.from_dict({"service": "s", "healthy": bad})


async def test_sqlite_state_from_before_versions_is_migrated(tmp_path):
    import sqlite3

    d = tmp_path / "old"
    d.mkdir()
    conn = sqlite3.connect(str(d / "state.db"))
    conn.execute("CREATE TABLE services (name TEXT PRIMARY KEY, data TEXT NOT NULL)")
    old = svc(token="old").to_dict()
    del old["version"]
    conn.execute("INSERT INTO services VALUES (?, ?)", ("digits", json.dumps(old)))
    conn.commit()
    conn.close()
    s = SqliteStore(str(d))
    await s.start()
    try:
        rec = await s.get_service("digits")
        assert rec.token == "old" and rec.version == 1
        rec.status = "Running"
        await s.put_service(rec, expect_version=1)
        assert (await s.get_service("digits")).version == 2
    finally:
        await s.close()


async def test_redis_record_from_before_versions(redis_server):
    import redis.asyncio as aredis

    from gateway.registry import VersionConflict

    old = svc(token="old").to_dict()
    del old["version"]
    r = aredis.Redis.from_url(redis_server.url)
    await r.hset("infergate:{state}:services", "digits", json.dumps(old))
    await r.aclose()
    s = open_store(redis_server.url)
    await s.start()
    try:
        rec = await s.get_service("digits")
        assert rec.token == "old" and rec.version == 1
        with pytest.raises(VersionConflict):
            await s.put_service(rec, expect_version=0)
        await s.put_service(rec, expect_version=1)
        assert (await s.get_service("digits")).version == 2
    finally:
        await s.close()
