"""StateStore against a real redis-server: placement CAS and watch, load windows, lease, registry, events.

Time-based behaviour runs on a fake clock (``now`` passed in); the only
sleeps are the Redis-side expiries (lease PX, window TTL), each under 0.5 s.
"""

from __future__ import annotations

import math
import threading
import uuid
import time

import pytest

from moefleet.core.placement import Placement
from moefleet.core.redis_server import RedisServer, RedisServerNotFound, _ping, find_redis_server, free_port
from moefleet.core.state import (
    LeaseLostError,
    StaleVersionError,
    StateStore,
    StateStoreError,
    StateStoreUnavailable,
)

pytestmark = pytest.mark.integration

T0 = 1_000_000.0  # fake clock origin, a whole number of windows for every window size used


def placement(*devices: str, layers: int = 1) -> Placement:
    return Placement(assignments={d: [(l, i) for l in range(layers)] for i, d in enumerate(devices)})


def wait_until(predicate, timeout_s: float = 3.0, step_s: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


class Recorder:
    """A watch callback that keeps what it got."""

    def __init__(self):
        self.versions: list[int] = []
        self.placements: list[Placement] = []
        self._lock = threading.Lock()

    def __call__(self, p: Placement) -> None:
        with self._lock:
            self.versions.append(p.version)
            self.placements.append(p)

    def saw(self, version: int) -> bool:
        with self._lock:
            return version in self.versions


# ------------------------------------------------------------------ placement table


def test_empty_store_has_no_placement_and_version_zero(store):
    assert store.get_placement() is None
    assert store.placement_version() == 0
    assert store.placement_history(5) == []


def test_publish_from_expected_version_stores_next_version(store):
    stored = store.publish_placement(placement("gpu0", "gpu1"), expected_version=0)
    assert stored.version == 1
    assert store.placement_version() == 1
    got = store.get_placement()
    assert got == stored
    assert got.replicas() == {(0, 0): ["gpu0"], (0, 1): ["gpu1"]}


def test_publish_ignores_the_version_field_of_its_argument(store):
    stored = store.publish_placement(placement("gpu0").model_copy(update={"version": 42}), expected_version=0)
    assert stored.version == 1 and store.placement_version() == 1


def test_publish_with_stale_version_raises_naming_both_versions(store):
    store.publish_placement(placement("gpu0"), 0)
    store.publish_placement(placement("gpu1"), 1)
    with pytest.raises(StaleVersionError) as info:
        store.publish_placement(placement("gpu2"), expected_version=1)
    assert info.value.expected == 1 and info.value.actual == 2
    assert "2" in str(info.value) and "1" in str(info.value)
    # Nothing changed.
    assert store.placement_version() == 2
    assert list(store.get_placement().assignments) == ["gpu1"]


def test_publish_ahead_of_stored_version_is_stale_too(store):
    with pytest.raises(StaleVersionError, match="version is 0, expected 3"):
        store.publish_placement(placement("gpu0"), expected_version=3)


def test_concurrent_publishers_from_same_version_exactly_one_wins(store, redis_server):
    others = [StateStore(redis_server.url, namespace=store.namespace) for _ in range(8)]
    results: list[object] = []
    barrier = threading.Barrier(len(others))

    def publish(s: StateStore, i: int) -> None:
        barrier.wait()
        try:
            results.append(s.publish_placement(placement(f"gpu{i}"), expected_version=0))
        except StaleVersionError as exc:
            results.append(exc)

    threads = [threading.Thread(target=publish, args=(s, i)) for i, s in enumerate(others)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in others:
        s.close()
    wins = [r for r in results if isinstance(r, Placement)]
    assert len(wins) == 1 and wins[0].version == 1
    assert all(r.actual == 1 for r in results if isinstance(r, StaleVersionError))
    assert store.get_placement() == wins[0]


def test_versions_are_monotonic_and_history_is_newest_first_and_capped(redis_server):
    with StateStore(redis_server.url, namespace=f"hist-{time.monotonic_ns()}", placement_history_size=3) as s:
        versions = [s.publish_placement(placement(f"gpu{v}"), v).version for v in range(5)]
        assert versions == [1, 2, 3, 4, 5]
        history = s.placement_history(10)
        assert [p.version for p in history] == [5, 4, 3]
        assert [list(p.assignments) for p in history] == [["gpu4"], ["gpu3"], ["gpu2"]]
        assert [p.version for p in s.placement_history(2)] == [5, 4]


# ------------------------------------------------------------------ placement watch


def test_watch_delivers_each_publish_promptly_through_pubsub(store):
    rec = Recorder()
    # A poll interval far beyond the wait below: a prompt delivery can only come from pub/sub.
    watch = store.watch_placement(rec, poll_interval_s=30.0)
    try:
        time.sleep(0.05)  # let the thread subscribe
        for expected in (1, 2, 3):
            store.publish_placement(placement(f"gpu{expected}"), expected - 1)
            assert wait_until(lambda: rec.saw(expected), timeout_s=1.0), rec.versions
        assert rec.versions == [1, 2, 3]
        assert [list(p.assignments) for p in rec.placements] == [["gpu1"], ["gpu2"], ["gpu3"]]
    finally:
        watch.stop()
    assert not watch.is_alive()


def test_watch_catches_an_update_whose_message_was_never_published(store):
    """A version bump with no pub/sub message (as a lost message looks) is found by polling."""
    rec = Recorder()
    watch = store.watch_placement(rec, poll_interval_s=0.05)
    try:
        bumped = placement("gpu7").model_copy(update={"version": 1})
        # Write the table directly, bypassing publish_placement and its PUBLISH.
        store._client.set(store.keys.placement, bumped.model_dump_json())
        store._client.set(store.keys.placement_version, 1)
        assert wait_until(lambda: rec.saw(1), timeout_s=2.0)
        assert rec.placements[-1] == bumped
    finally:
        watch.stop()


def test_watch_catches_a_publish_made_while_its_subscription_was_cut(store):
    rec = Recorder()
    watch = store.watch_placement(rec, poll_interval_s=0.1)
    try:
        time.sleep(0.05)
        store.publish_placement(placement("gpu0"), 0)
        assert wait_until(lambda: rec.saw(1))
        # Drop every pub/sub connection on the server, then publish straight away.
        store._client.client_kill_filter(_type="pubsub")
        store.publish_placement(placement("gpu1"), 1)
        store.publish_placement(placement("gpu2"), 2)
        assert wait_until(lambda: rec.saw(3), timeout_s=3.0), rec.versions
    finally:
        watch.stop()
    assert rec.versions == sorted(set(rec.versions)) and rec.versions[-1] == 3


def test_watch_burst_ends_on_latest_version_with_increasing_versions(store):
    rec = Recorder()
    watch = store.watch_placement(rec, poll_interval_s=0.05)
    try:
        for v in range(20):
            store.publish_placement(placement(f"gpu{v}"), v)
        assert wait_until(lambda: rec.saw(20))
    finally:
        watch.stop()
    assert rec.versions == sorted(set(rec.versions))
    assert rec.placements[-1] == store.get_placement()


def test_watch_since_version_delivers_what_is_newer_than_the_callers_copy(store):
    store.publish_placement(placement("gpu0"), 0)
    store.publish_placement(placement("gpu1"), 1)
    rec = Recorder()
    watch = store.watch_placement(rec, poll_interval_s=0.05, since_version=0)
    try:
        assert wait_until(lambda: rec.saw(2))
    finally:
        watch.stop()
    assert rec.versions == [2]


def test_watch_without_since_version_skips_the_current_placement(store):
    store.publish_placement(placement("gpu0"), 0)
    rec = Recorder()
    watch = store.watch_placement(rec, poll_interval_s=0.02)
    try:
        time.sleep(0.15)
        assert rec.versions == []
        store.publish_placement(placement("gpu1"), 1)
        assert wait_until(lambda: rec.saw(2))
    finally:
        watch.stop()


def test_watch_follows_a_table_that_was_reset(store):
    """Redis restarted without its data: versions start again from 1 and the watch follows them."""
    rec = Recorder()
    watch = store.watch_placement(rec, poll_interval_s=0.05)
    try:
        for v in range(3):
            store.publish_placement(placement(f"gpu{v}"), v)
        assert wait_until(lambda: rec.saw(3))
        store._client.delete(store.keys.placement, store.keys.placement_version, store.keys.placement_history)
        fresh = store.publish_placement(placement("gpu9"), 0)
        assert wait_until(lambda: rec.placements[-1] == fresh), rec.versions
    finally:
        watch.stop()


def test_version_one_starts_a_generation_that_later_versions_keep(store):
    first = store.publish_placement(placement("gpu0"), 0)
    second = store.publish_placement(placement("gpu1"), 1)
    assert first.generation and second.generation == first.generation
    assert store.get_placement().generation == first.generation
    store._client.delete(store.keys.placement, store.keys.placement_version, store.keys.placement_history)
    reborn = store.publish_placement(placement("gpu2"), 0)
    assert reborn.version == 1 and reborn.generation != first.generation
    assert reborn.newer_than(second)  # a router holding version 2 of the old table follows version 1 of the new
    assert not second.newer_than(second)


def test_a_fenced_publish_lands_only_under_the_current_holding(store):
    token_a = store.try_acquire_lease("ctl-a", ttl_s=0.2)
    assert token_a
    store.publish_placement(placement("gpu0"), 0, fence=("ctl-a", token_a))
    assert wait_until(lambda: store.lease() is None, timeout_s=2.0)  # A stalls; its lease lapses in Redis
    token_b = store.try_acquire_lease("ctl-b", ttl_s=5.0)
    assert token_b > token_a
    with pytest.raises(LeaseLostError, match="ctl-a"):
        store.publish_placement(placement("gpu1"), 1, fence=("ctl-a", token_a))
    assert store.placement_version() == 1  # nothing landed
    assert store.publish_placement(placement("gpu1"), 1, fence=("ctl-b", token_b)).version == 2
    # A comes back and takes the lease again only after B's lapses, under a new, larger token
    assert not store.renew_lease("ctl-a", 5.0, token=token_a)
    store.release_lease("ctl-b")
    token_a2 = store.try_acquire_lease("ctl-a", ttl_s=5.0)
    assert token_a2 > token_b
    with pytest.raises(LeaseLostError):
        store.publish_placement(placement("gpu0"), 2, fence=("ctl-a", token_a))


def test_an_unfenced_publish_lands_only_while_no_one_holds_the_lease(store):
    """A fleet's starting publish carries no fence; once a leader holds the lease, only its fenced writes land
    (a restarted Serve replica cannot publish a placement of its own over the controller's)."""
    store.publish_placement(placement("gpu0"), 0)  # no leader yet: the fleet's starting placement
    token = store.try_acquire_lease("ctl-a", ttl_s=5.0)
    with pytest.raises(LeaseLostError, match="held by 'ctl-a'"):
        store.publish_placement(placement("gpu1"), 1)
    assert store.placement_version() == 1
    assert store.publish_placement(placement("gpu1"), 1, fence=("ctl-a", token)).version == 2


def test_a_leaders_records_events_and_counters_land_only_under_its_current_holding(store):
    token_a = store.try_acquire_lease("ctl-a", ttl_s=0.2)
    store.put_record("rebalance", {"phase": "loading"}, fence=("ctl-a", token_a))
    store.emit_event("plan", {"by": "a"}, fence=("ctl-a", token_a))
    store.add_counters("rebalance", {"count": 1}, fence=("ctl-a", token_a))
    assert store.get_record("rebalance") == {"phase": "loading"} and store.counters("rebalance") == {"count": 1.0}
    assert wait_until(lambda: store.lease() is None, timeout_s=2.0)  # A stalls; B leads
    token_b = store.try_acquire_lease("ctl-b", ttl_s=5.0)
    store.put_record("rebalance", {"phase": None}, fence=("ctl-b", token_b))
    for write in (lambda: store.put_record("rebalance", {"phase": "published"}, fence=("ctl-a", token_a)),
                  lambda: store.emit_event("plan", {"by": "a"}, fence=("ctl-a", token_a)),
                  lambda: store.add_counters("rebalance", {"count": 1}, fence=("ctl-a", token_a)),
                  lambda: store.put_record("rebalance", {"phase": "published"}, fence=("ctl-a", token_b))):
        with pytest.raises(LeaseLostError):
            write()
    assert store.get_record("rebalance") == {"phase": None}
    assert [e.data["by"] for e in store.events()] == ["a"] and store.counters("rebalance") == {"count": 1.0}


def test_a_fence_check_accepts_only_the_current_holdings_token(store):
    assert not store.check_fence(1)  # no lease
    token_a = store.try_acquire_lease("ctl-a", ttl_s=0.2)
    assert store.check_fence(token_a) and not store.check_fence(token_a + 1) and not store.check_fence(token_a - 1)
    assert wait_until(lambda: store.lease() is None, timeout_s=2.0)
    assert not store.check_fence(token_a)  # lapsed
    token_b = store.try_acquire_lease("ctl-b", ttl_s=5.0)
    assert store.check_fence(token_b) and not store.check_fence(token_a)


def test_fencing_tokens_keep_growing_when_the_store_loses_its_data(store):
    t1 = store.try_acquire_lease("ctl-a", ttl_s=5.0)
    store._client.delete(store.keys.lease, store.keys.lease_token)  # a Redis restarted without data
    t2 = store.try_acquire_lease("ctl-b", ttl_s=5.0)
    assert t2 > t1


def test_renewing_keeps_the_token_and_a_token_names_one_holding(store):
    token = store.try_acquire_lease("ctl-a", ttl_s=5.0)
    assert store.renew_lease("ctl-a", 5.0) == token
    assert store.renew_lease("ctl-a", 5.0, token=token) == token
    assert store.try_acquire_lease("ctl-a", ttl_s=5.0) == token  # re-acquiring your own keeps it
    assert not store.renew_lease("ctl-a", 5.0, token=token - 1)


def test_heartbeats_without_a_clock_are_judged_by_the_store_clock(store):
    """Hosts whose clocks disagree pass now=None: the entry's times are the store's."""
    server_now = store.time()
    assert abs(server_now - time.time()) < 5  # loopback: same host
    store.register_worker("router:skewed", {"kind": "router"}, None, ttl_s=1.0)
    rec = store.worker_records()["router:skewed"]
    assert abs(rec.heartbeat_at - server_now) < 1.0
    # judged by a clock 10 s ahead (a skewed host judging by its own clock), the heartbeat looks dead;
    # judged by the store's clock it is alive
    assert "router:skewed" not in store.workers(time.time() + 10)
    assert "router:skewed" in store.workers()


def test_watch_survives_a_failing_callback(store):
    calls: list[int] = []

    def flaky(p: Placement) -> None:
        calls.append(p.version)
        if p.version == 1:
            raise RuntimeError("boom")

    watch = store.watch_placement(flaky, poll_interval_s=0.05)
    try:
        store.publish_placement(placement("gpu0"), 0)
        assert wait_until(lambda: 1 in calls)
        store.publish_placement(placement("gpu1"), 1)
        assert wait_until(lambda: 2 in calls)
    finally:
        watch.stop()
    assert calls == [1, 2] and watch.callback_errors == 1


def test_close_stops_the_stores_watches(redis_server):
    s = StateStore(redis_server.url, namespace=f"close-{time.monotonic_ns()}")
    watch = s.watch_placement(lambda p: None, poll_interval_s=10.0)
    started = time.monotonic()
    s.close()
    assert not watch.is_alive()
    assert time.monotonic() - started < 1.0  # stop does not wait out the poll interval
    with pytest.raises(StateStoreError, match="closed"):
        s.get_placement()


# ------------------------------------------------------------------ load windows


def test_record_load_sums_within_a_window_and_splits_across_windows(store):
    store.record_load({(0, 1): 5, (1, 3): 2}, now=T0 + 0.1)
    store.record_load({(0, 1): 7}, now=T0 + 0.9)
    store.record_load({(0, 1): 1, (0, 2): 4}, now=T0 + 1.0)  # next window starts exactly here
    windows = store.read_windows(now=T0 + 1.5, window_s=1.0, num_windows=3)
    assert windows == [
        (T0 - 1.0, {}),
        (T0, {(0, 1): 12, (1, 3): 2}),
        (T0 + 1.0, {(0, 1): 1, (0, 2): 4}),
    ]


def test_windows_two_behind_are_read_once_with_a_cache_and_the_recent_ones_again(store):
    cache: dict = {}
    store.record_load({(0, 1): 5}, now=T0 + 0.1)
    store.record_load({(0, 1): 2}, now=T0 + 1.1)
    assert store.read_windows(T0 + 2.5, 1.0, 3, cache) == [(T0, {(0, 1): 5}), (T0 + 1.0, {(0, 1): 2}), (T0 + 2.0, {})]
    assert set(cache) == {int(T0)}  # only the window two behind is kept
    store.record_load({(0, 1): 100}, now=T0 + 0.2)  # (a late write into a kept window is not seen: none is made)
    store.record_load({(0, 1): 3}, now=T0 + 1.2)  # the previous window is read again
    store.record_load({(0, 1): 4}, now=T0 + 2.2)
    assert store.read_windows(T0 + 2.6, 1.0, 3, cache) == [(T0, {(0, 1): 5}), (T0 + 1.0, {(0, 1): 5}), (T0 + 2.0, {(0, 1): 4})]
    assert store.read_windows(T0 + 2.6, 1.0, 3) == [(T0, {(0, 1): 105}), (T0 + 1.0, {(0, 1): 5}), (T0 + 2.0, {(0, 1): 4})]
    assert store.read_load(T0 + 2.6, 1.0, 3, 1e9, cache)[(0, 1)] == pytest.approx(5 + 5 + 4 * 0.6, rel=1e-3)


def test_window_sizes_do_not_mix(store):
    store.record_load({(0, 0): 3}, now=T0, window_s=1.0)
    store.record_load({(0, 0): 5}, now=T0, window_s=10.0)
    assert store.read_windows(T0, 1.0, 1) == [(T0, {(0, 0): 3})]
    assert store.read_windows(T0, 10.0, 1) == [(T0, {(0, 0): 5})]


def test_read_load_decays_by_window_age(store):
    store.record_load({(0, 0): 100, (0, 1): 10}, now=T0 + 0.5)  # complete, its middle 2.2 s before the read
    store.record_load({(0, 0): 100}, now=T0 + 1.5)  # complete, middle 1.2 s before
    store.record_load({(0, 0): 100, (2, 5): 1}, now=T0 + 2.5)  # current window: 0.7 filled, middle 0.35 s before
    load = store.read_load(now=T0 + 2.7, window_s=1.0, num_windows=3, half_life_s=1.0)
    current = 0.7 * 0.5**0.35
    assert load[(0, 0)] == pytest.approx(100 * (0.5**2.2 + 0.5**1.2 + current))
    assert load[(0, 1)] == pytest.approx(10 * 0.5**2.2)
    assert load[(2, 5)] == pytest.approx(current)
    assert set(load) == {(0, 0), (0, 1), (2, 5)}
    flat = store.read_load(now=T0 + 2.7, window_s=1.0, num_windows=3, half_life_s=math.inf)
    assert flat[(0, 0)] == pytest.approx(100 + 100 + 70)


def test_windows_older_than_num_windows_drop_out_of_reads(store):
    store.record_load({(0, 0): 9}, now=T0)
    assert store.read_load(T0 + 4.0, 1.0, num_windows=5, half_life_s=10.0)[(0, 0)] > 0
    assert store.read_load(T0 + 5.0, 1.0, num_windows=5, half_life_s=10.0) == {}
    assert all(counts == {} for _, counts in store.read_windows(T0 + 5.0, 1.0, 5))


def test_load_windows_carry_a_ttl_and_expire_in_redis(redis_server):
    with StateStore(redis_server.url, namespace=f"ttl-{time.monotonic_ns()}", load_retention_s=0.3) as s:
        s.record_load({(0, 0): 1}, now=T0, window_s=0.1, source="router-a")
        key = s.keys.load_window(0.1, int(T0 // 0.1))
        ttl_ms = s._client.pttl(key)
        assert 0 < ttl_ms <= 300
        assert 0 < s._client.pttl(s.keys.load_sources(0.1, int(T0 // 0.1))) <= 300
        assert wait_until(lambda: not s._client.exists(key), timeout_s=1.0)
        assert s.read_windows(T0, 0.1, 1) == [(pytest.approx(T0), {})]


def test_record_load_is_one_round_trip(store):
    conn_cls = store._client.connection_pool.connection_class
    store.ping()  # open the pooled connection first: its handshake is not part of the call
    sends: list[int] = []
    original = conn_cls.send_packed_command

    def counting(self, command, check_health=True):
        sends.append(1)
        return original(self, command, check_health)

    def hincrby_calls() -> int:
        stats = store._client.info("commandstats")
        return stats.get("cmdstat_hincrby", {}).get("calls", 0)

    counts = {(layer, expert): layer + expert + 1 for layer in range(4) for expert in range(16)}
    before = hincrby_calls()
    conn_cls.send_packed_command = counting
    try:
        store.record_load(counts, now=T0, source="router-a")
    finally:
        conn_cls.send_packed_command = original
    assert len(sends) == 1
    # one per expert into the window, one into the running total, one for the source tally
    assert hincrby_calls() - before == 2 * len(counts) + 1
    assert store.read_windows(T0, 1.0, 1)[0][1] == counts


def test_load_totals_keep_every_token_after_the_windows_expire(redis_server):
    with StateStore(redis_server.url, namespace=f"t-{uuid.uuid4().hex[:8]}", load_retention_s=0.1) as s:
        s.record_load({(0, 1): 5, (1, 3): 2}, now=T0, window_s=0.1)
        s.record_load({(0, 1): 7}, now=T0 + 5.0, window_s=0.1)
        time.sleep(0.3)  # both windows expired in Redis
        assert s.read_windows(T0 + 5.0, 0.1, 1)[0][1] == {}
        assert s.load_totals() == {(0, 1): 12, (1, 3): 2}


def test_counters_only_grow_and_refuse_negative_increments(store):
    assert store.counters("rebalance") == {}
    store.add_counters("rebalance", {"count": 1, "seconds": 0.25, "bytes": 1 << 20})
    store.add_counters("rebalance", {"count": 1, "seconds": 0.5, "idle": 0})
    assert store.counters("rebalance") == {"count": 2.0, "seconds": 0.75, "bytes": float(1 << 20)}
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and >= 0"):
            store.add_counters("rebalance", {"count": bad})
    assert store.counters("rebalance")["count"] == 2.0


def test_record_load_with_nothing_to_add_sends_nothing(store):
    store.record_load({}, now=T0)
    store.record_load({(0, 0): 0}, now=T0)
    assert store.read_windows(T0, 1.0, 1) == [(T0, {})]


@pytest.mark.parametrize(
    "counts, match",
    [({(0, 0): -1}, "negative"), ({(0,): 1}, "pair"), ({(0, -2): 1}, "negative index"), ({("a", 0): 1}, "pair")],
)
def test_record_load_rejects_bad_counts(store, counts, match):
    with pytest.raises(ValueError, match=match):
        store.record_load(counts, now=T0)


def test_load_sources_tally_tokens_per_reporter(store):
    store.record_load({(0, 0): 3, (0, 1): 2}, now=T0, source="router-a")
    store.record_load({(0, 0): 4}, now=T0 + 1, source="router-b")
    store.record_load({(0, 0): 1}, now=T0 + 1)  # anonymous: counted, not tallied
    assert store.load_sources(T0 + 1, 1.0, 2) == {"router-a": 5, "router-b": 4}
    assert store.load_sources(T0 + 1, 1.0, 1) == {"router-b": 4}


# ------------------------------------------------------------------ leader lease


def test_second_holder_cannot_acquire_a_held_lease(store):
    assert store.lease_holder() is None
    assert store.try_acquire_lease("ctl-a", ttl_s=10.0, now=T0)
    assert not store.try_acquire_lease("ctl-b", ttl_s=10.0, now=T0 + 1)
    assert store.lease_holder() == "ctl-a"
    assert store.try_acquire_lease("ctl-a", ttl_s=10.0, now=T0 + 1)  # re-acquiring your own is fine


def test_only_the_holder_renews(store):
    assert store.try_acquire_lease("ctl-a", ttl_s=10.0, now=T0)
    assert not store.renew_lease("ctl-b", ttl_s=10.0, now=T0 + 1)
    assert store.renew_lease("ctl-a", ttl_s=10.0, now=T0 + 9)
    # Renewed to T0 + 19: still held at T0 + 15 by the clock.
    assert not store.try_acquire_lease("ctl-b", ttl_s=10.0, now=T0 + 15)
    assert store.lease_holder(now=T0 + 15) == "ctl-a"


def test_renewing_a_lease_lapsed_by_the_clock_fails(store):
    assert store.try_acquire_lease("ctl-a", ttl_s=10.0, now=T0)
    assert not store.renew_lease("ctl-a", ttl_s=10.0, now=T0 + 10)
    assert store.lease_holder(now=T0 + 10) is None


def test_a_lease_lapsed_by_the_clock_can_be_taken_over(store):
    assert store.try_acquire_lease("ctl-a", ttl_s=10.0, now=T0)
    assert store.try_acquire_lease("ctl-b", ttl_s=10.0, now=T0 + 10.5)
    assert store.lease_holder() == "ctl-b"
    assert not store.renew_lease("ctl-a", ttl_s=10.0, now=T0 + 11)


def test_a_dead_holders_lease_lapses_in_redis_and_another_takes_over(store):
    now = time.time()
    assert store.try_acquire_lease("ctl-a", ttl_s=0.2, now=now)
    assert not store.try_acquire_lease("ctl-b", ttl_s=0.2, now=now)
    # ctl-a dies: nobody writes. Redis expires the key (PX) on its own.
    assert wait_until(lambda: store.lease_holder() is None, timeout_s=0.8)
    assert store.try_acquire_lease("ctl-b", ttl_s=5.0, now=time.time())
    assert store.lease_holder() == "ctl-b"


def test_release_is_only_by_the_holder(store):
    assert store.try_acquire_lease("ctl-a", ttl_s=10.0, now=T0)
    assert not store.release_lease("ctl-b")
    assert store.lease_holder() == "ctl-a"
    assert store.release_lease("ctl-a")
    assert store.lease_holder() is None
    assert not store.release_lease("ctl-a")
    assert store.try_acquire_lease("ctl-b", ttl_s=10.0, now=T0 + 1)


def test_lease_rejects_bad_arguments(store):
    with pytest.raises(ValueError, match="ttl_s"):
        store.try_acquire_lease("ctl-a", ttl_s=0, now=T0)
    with pytest.raises(ValueError, match="holder"):
        store.try_acquire_lease("", ttl_s=1, now=T0)


# ------------------------------------------------------------------ records, workers, events


def test_records_round_trip_as_json_objects(store):
    assert store.get_record("controller") is None
    value = {"target_version": 3, "policy": {"cooldown_until": T0 + 30.0}, "groups": ["g0", "g1"]}
    store.put_record("controller", value)
    assert store.get_record("controller") == value
    store.put_record("controller", {"target_version": 4})
    assert store.get_record("controller") == {"target_version": 4}
    with pytest.raises(TypeError, match="controller"):
        store.put_record("controller", {"bad": object()})


def test_workers_count_only_while_their_heartbeat_is_fresh(store):
    store.register_worker("w0", {"node": "n0", "gpus": 1}, now=T0, ttl_s=5.0)
    store.register_worker("w1", {"node": "n1"}, now=T0 + 2, ttl_s=5.0)
    assert store.workers(T0 + 1) == {"w0": {"node": "n0", "gpus": 1}, "w1": {"node": "n1"}}
    assert store.workers(T0 + 5) == {"w1": {"node": "n1"}}  # w0 expired at T0 + 5
    store.register_worker("w0", {"node": "n0", "gpus": 2}, now=T0 + 5.5, ttl_s=5.0)  # heartbeat again
    assert store.workers(T0 + 6) == {"w0": {"node": "n0", "gpus": 2}, "w1": {"node": "n1"}}
    assert store.worker_records(T0 + 6)["w0"].heartbeat_at == T0 + 5.5
    assert store.workers(T0 + 11) == {}


def test_long_expired_workers_are_forgotten_and_deregister_is_immediate(redis_server):
    with StateStore(redis_server.url, namespace=f"wk-{time.monotonic_ns()}", worker_forget_after_s=60.0) as s:
        s.register_worker("old", {}, now=T0, ttl_s=5.0)
        s.register_worker("live", {}, now=T0 + 100, ttl_s=5.0)  # "old" expired 95 s ago > 60 s
        assert s._client.hkeys(s.keys.workers) == ["live"]
        assert s._client.zrange(s.keys.workers_expiry, 0, -1) == ["live"]
        assert s.deregister_worker("live")
        assert not s.deregister_worker("live")
        assert s.workers(T0 + 100) == {}


def test_events_are_kept_in_order_and_capped(store):
    for i in range(1300):
        store.emit_event("tick", {"i": i}, now=T0 + i)
    last = store.events(3)
    assert [e.data["i"] for e in last] == [1297, 1298, 1299]
    assert [e.at for e in last] == [T0 + 1297, T0 + 1298, T0 + 1299]
    assert all(e.kind == "tick" and e.id for e in last)
    length = store._client.xlen(store.keys.events)
    assert 1000 <= length < 1300  # MAXLEN ~ trims whole stream nodes: about 1000, never unbounded


# ------------------------------------------------------------------ failures


def test_no_server_listening_raises_unavailable_naming_the_url():
    url = f"redis://127.0.0.1:{free_port()}/0"
    s = StateStore(url, socket_timeout_s=1.0)
    started = time.monotonic()
    assert s.ping() is False
    for call in (s.get_placement, s.placement_version, lambda: s.record_load({(0, 0): 1}, now=T0),
                 lambda: s.publish_placement(placement("gpu0"), 0), lambda: s.try_acquire_lease("a", 1.0, T0)):
        with pytest.raises(StateStoreUnavailable, match=url.replace(".", r"\.")):
            call()
    assert time.monotonic() - started < 5.0
    s.close()


def test_watch_refuses_to_start_without_redis():
    s = StateStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=1.0)
    with pytest.raises(StateStoreUnavailable):
        s.watch_placement(lambda p: None)
    s.close()


def test_passwords_stay_out_of_error_messages():
    s = StateStore(f"redis://user:s3cret@127.0.0.1:{free_port()}/0", socket_timeout_s=1.0)
    with pytest.raises(StateStoreUnavailable) as info:
        s.get_placement()
    assert "s3cret" not in str(info.value) and "user:***@127.0.0.1" in str(info.value)
    assert "s3cret" not in repr(s)
    s.close()


# ------------------------------------------------------------------ the redis-server helper


def test_redis_server_binds_loopback_and_stops(tmp_path):
    server = RedisServer(dir=tmp_path)
    try:
        assert server.url == f"redis://:{server.password}@127.0.0.1:{server.port}/0"
        assert server.is_running()
        with StateStore(server.url) as s:
            config = s._client.config_get("bind")["bind"]
            persistence = s._client.config_get("save")["save"], s._client.config_get("appendonly")["appendonly"]
        assert config.split() == ["127.0.0.1"]
        assert persistence == ("", "no")
    finally:
        server.stop()
    assert server._proc.poll() is not None
    assert not _ping(server.port)
    server.stop()  # idempotent


def test_redis_server_on_a_taken_port_fails_with_its_output(redis_server):
    with pytest.raises(RuntimeError, match="Address already in use|exited"):
        RedisServer(port=redis_server.port, startup_timeout_s=3.0)


def test_missing_redis_server_names_the_install_command(monkeypatch):
    monkeypatch.delenv("MOEFLEET_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RedisServerNotFound, match="apt-get install redis-server"):
        find_redis_server()
    with pytest.raises(RedisServerNotFound):
        RedisServer()


def test_local_redis_refuses_a_client_without_the_password(redis_server):
    assert redis_server.password and len(redis_server.password) >= 32
    assert _ping(redis_server.port, password=redis_server.password)
    assert not _ping(redis_server.port)  # NOAUTH
    assert not _ping(redis_server.port, password="wrong")
    no_password = f"redis://127.0.0.1:{redis_server.port}/0"
    with StateStore(no_password, namespace="noauth") as s:
        with pytest.raises(StateStoreError, match="(?i)auth"):
            s.get_placement()
    with StateStore(redis_server.url, namespace=f"auth-{time.monotonic_ns()}") as s:
        assert s.get_placement() is None  # the generated password works


def test_redis_password_stays_in_files_only_its_user_reads(tmp_path):
    import os
    import stat

    server = RedisServer(dir=tmp_path / "r")
    try:
        for path in (server.password_file, server.config_path):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert server.password_file.read_text().strip() == server.password
        cmdline = open(f"/proc/{server.pid}/cmdline", "rb").read().decode()
        assert server.password not in cmdline  # not visible in ps
        assert server.password not in repr(server) and server.password not in server.safe_url
    finally:
        server.stop()
    tmp = RedisServer()
    try:
        assert stat.S_IMODE(os.stat(tmp.dir).st_mode) == 0o700  # its own directory is private too
    finally:
        tmp.stop()


def test_rediss_url_reaches_a_tls_redis_and_plaintext_is_refused(tmp_path):
    from moefleet.core.redis_server import RedisTLS
    from tests.tls_certs import make_pki

    pki = make_pki(tmp_path / "pki")
    server = RedisServer(dir=tmp_path / "r", tls=RedisTLS(pki.server.cert, pki.server.key, pki.ca))
    try:
        assert server.url.startswith("rediss://:") and "ssl_ca_certs=" in server.url
        with StateStore(server.url, namespace="tls") as s:
            published = s.publish_placement(placement("a"), expected_version=0)
            assert s.get_placement() == published
        with StateStore(f"redis://:{server.password}@127.0.0.1:{server.port}/0", namespace="tls", socket_timeout_s=1.0) as s:
            with pytest.raises(StateStoreError):
                s.get_placement()
    finally:
        server.stop()
