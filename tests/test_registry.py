"""The C registry through ``wsmanager._core``: scale, slot reuse, indexes, sweep, threads."""
from __future__ import annotations

import threading

import pytest

from wsmanager import _core

OPEN = _core.STATE_OPEN


def test_hundred_thousand_inserts_and_removals():
    r = _core.Registry(16)
    handles = [r.add(f"c{i}", f"u{i % 1000}") for i in range(100_000)]
    assert len(r) == 100_000
    assert len(set(handles)) == 100_000
    st = r.stats()
    assert st["total_users"] == 1000 and st["connections_by_user"]["u7"] == 100
    for i in range(0, 100_000, 2):
        assert r.remove(handles[i])
    assert len(r) == 50_000
    assert r.find("c2") is None and r.find("c3") == handles[3]
    assert r.user_count("u3") == 100 and r.user_count("u2") == 0
    for i in range(1, 100_000, 2):
        assert r.remove(handles[i])
    assert len(r) == 0 and r.stats()["total_users"] == 0 and r.users() == {}
    assert r.stats()["total_connects"] == 100_000


def test_slot_reuse_is_caught_by_the_generation():
    r = _core.Registry()
    old = r.add("a", "u")
    assert r.remove(old)
    new = r.add("b", "u")
    assert new & 0xFFFFFFFF == old & 0xFFFFFFFF  # same slot
    assert new != old                            # other generation
    assert r.connection_id(old) is None and r.connection_id(new) == "b"
    assert not r.remove(old) and not r.set_state(old, OPEN) and r.state(old) == 0
    assert r.info(old) is None and not r.touch(old)
    assert r.remove(new) and not r.remove(new)
    assert r.state(12345678901234) == 0  # never issued


def test_duplicate_ids_and_limits_are_atomic_with_the_insert():
    r = _core.Registry()
    r.add("a", "u")
    with pytest.raises(ValueError, match="already registered"):
        r.add("a", "v")
    r.add("b", "u", max_per_user=2)
    with pytest.raises(_core.LimitReached) as err:
        r.add("c", "u", max_per_user=2)
    assert err.value.scope == "user"
    with pytest.raises(_core.LimitReached) as err:
        r.add("d", None, max_total=2)
    assert err.value.scope == "total"
    assert len(r) == 2 and r.find("c") is None


def test_bad_arguments_raise_clear_errors():
    r = _core.Registry()
    with pytest.raises(TypeError, match="connection_id must be str"):
        r.add(1)
    with pytest.raises(ValueError, match="must not be empty"):
        r.add("")
    with pytest.raises(TypeError, match="user_id must be str"):
        r.add("x", 5)
    with pytest.raises(TypeError, match="not a str"):
        r.resolve_all(exclude="abc")
    with pytest.raises(ValueError):
        r.set_state(r.add("y"), 99)
    with pytest.raises(ValueError, match="unknown connection"):
        r.join(0, "room")
    with pytest.raises(ValueError):
        _core.Registry(stale_after=-1)


def test_targets_respect_state_and_exclude():
    r = _core.Registry()
    hs = {c: r.add(c, "u" if c < "c" else "v") for c in "abcde"}
    for c in "abcd":
        r.set_state(hs[c], OPEN)  # e stays CONNECTING
    assert sorted(r.resolve_all()) == sorted(hs[c] for c in "abcd")
    assert sorted(r.resolve_all(exclude={"a", "zzz"})) == sorted(hs[c] for c in "bcd")
    assert sorted(r.resolve_user("u")) == sorted([hs["a"], hs["b"]])
    assert len(r.resolve_user("nobody")) == 0
    r.set_state(hs["b"], _core.STATE_DISCONNECTING)
    assert list(r.resolve_user("u")) == [hs["a"]]
    t = r.resolve_all()
    assert t.portable_count == 3 and t.native_count == 0


def test_channels_join_leave_and_removal():
    r = _core.Registry()
    hs = [r.add(f"c{i}") for i in range(100)]
    for h in hs:
        r.set_state(h, OPEN)
        assert r.join(h, "all")
        assert not r.join(h, "all")
    for h in hs[::3]:
        r.join(h, "thirds")
    assert r.channels() == {"all": 100, "thirds": 34}
    for h in hs[::2]:  # swap-removal inside the member arrays must keep them consistent
        assert r.remove(h)
    assert sorted(r.resolve_channel("all")) == sorted(hs[1::2])
    assert sorted(r.resolve_channel("thirds", exclude={"c3"})) == sorted(h for h in hs[3::6] if h != hs[3])
    assert sorted(r.channel_ids("thirds")) == sorted(f"c{i}" for i in range(3, 100, 6))
    assert r.leave(hs[1], "all") and not r.leave(hs[1], "all")
    assert r.channels_of(hs[3]) == ["all", "thirds"] or sorted(r.channels_of(hs[3])) == ["all", "thirds"]
    for h in hs[1::2]:
        r.remove(h)
    assert r.channels() == {}


def test_sweep_reports_only_expired_connections():
    r = _core.Registry(stale_after=10.0)
    now = _core.monotonic_ns()
    hs = [r.add(f"c{i}") for i in range(1000)]
    for h in hs:
        r.set_state(h, OPEN)
    assert list(r.sweep(now_ns=now + 9 * 10**9)) == []
    for h in hs[:500]:  # half of them answer a heartbeat at +5 s (the clock is faked forward)
        r.set_last_ping(h, now + 5 * 10**9)
    expired = list(r.sweep(now_ns=now + int(10.5 * 10**9)))
    assert sorted(expired) == sorted(hs[500:])
    assert list(r.sweep(now_ns=now + int(10.6 * 10**9))) == []  # each reported once
    # the touched half is rescheduled, not lost
    later = list(r.sweep(now_ns=now + 30 * 10**9))
    assert sorted(later) == sorted(hs[:500])


def test_sweep_is_proportional_to_what_expired():
    r = _core.Registry(stale_after=60.0)
    hs = [r.add(f"c{i}") for i in range(100_000)]
    for h in hs:
        r.set_state(h, OPEN)
    now = _core.monotonic_ns()
    assert list(r.sweep(now_ns=now)) == []
    assert r.stats()["sweep_heap_entries"] == 100_000  # nothing popped, nothing walked
    r.expire(hs[42])
    assert list(r.sweep(now_ns=now)) == [hs[42]]


def test_mass_expiry_takes_the_linear_pass_and_loses_nothing():
    """Past a few hundred due entries the sweep filters the heap array in one pass (and
    re-heapifies) instead of popping: the same verdicts, the max respected, the order kept."""
    r = _core.Registry(stale_after=10.0)
    now = _core.monotonic_ns()
    hs = [r.add(f"c{i}") for i in range(10_000)]
    for h in hs:
        r.set_state(h, OPEN)
    alive = hs[:3000]
    for i, h in enumerate(alive):  # answered heartbeats at +1..+3 s: due between +11 and +13 s
        r.set_last_ping(h, now + (1 + i % 3) * 10**9)
    for h in hs[3000:4000]:
        r.remove(h)
    stale = set(hs[4000:])
    first = r.sweep(now_ns=now + int(10.5 * 10**9), max=2000)
    assert first.typecode == "Q" and len(first) == 2000 and set(first) <= stale
    rest = r.sweep(now_ns=now + int(10.5 * 10**9))
    assert set(first) | set(rest) == stale and len(first) + len(rest) == len(stale)
    assert len(r.sweep(now_ns=now + int(10.9 * 10**9))) == 0
    # rescheduled in place, still in deadline order: each third comes due at its own time
    for k in range(3):
        due = r.sweep(now_ns=now + int((11.5 + k) * 10**9))
        assert set(due) == set(alive[k::3]), k
    assert r.stats()["sweep_heap_entries"] == 0


def test_last_ping_and_forced_expiry():
    r = _core.Registry(stale_after=1.0)
    h = r.add("a")
    r.set_state(h, OPEN)
    now = _core.monotonic_ns()
    r.set_last_ping(h, now + 5 * 10**9)  # a pong counts as life
    assert list(r.sweep(now_ns=now + 3 * 10**9)) == []
    assert list(r.sweep(now_ns=now + 7 * 10**9)) == [h]
    h2 = r.add("b")
    r.set_state(h2, _core.STATE_CLOSED)
    assert r.expire(h2) and list(r.sweep()) == [h2]
    r.set_state(h2, _core.STATE_DISCONNECTING)
    r.expire(h2)
    assert list(r.sweep()) == []  # being torn down already


def test_counters():
    r = _core.Registry()
    a, b = r.add("a"), r.add("b")
    r.set_state(a, OPEN), r.set_state(b, OPEN)
    r.touch(a, 100)
    r.record_sent(b, 7)
    r.record_sent_many(r.resolve_all(), 3)
    r.record_failure(2)
    r.record_disconnect(_core.REASONS.index("stale"))
    info = r.info(b)
    assert info[0] == "b" and info[7] == 2 and info[9] == 10
    s = r.stats()
    assert (s["messages_received"], s["bytes_received"]) == (1, 100)
    assert (s["messages_sent"], s["bytes_sent"], s["send_failures"]) == (3, 13, 2)
    assert s["disconnects"]["stale"] == 1
    with pytest.raises(ValueError):
        r.record_disconnect(99)


def test_concurrent_threads_keep_the_registry_consistent():
    r = _core.Registry()
    errors = []

    def worker(t: int) -> None:
        try:
            for i in range(5000):
                h = r.add(f"t{t}-{i}", f"user{i % 7}")
                r.set_state(h, OPEN)
                r.join(h, "room")
                if i % 2:
                    r.remove(h)
                r.stats()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(r) == 4 * 2500
    assert r.channels() == {"room": 10_000}
    assert sum(r.users().values()) == 10_000


def test_stats_connections_by_user_follows_every_change():
    """stats() keeps connections_by_user between calls while no user's count moved; every
    add/remove must still show, and a caller mutating its copy changes nothing."""
    r = _core.Registry()
    hs = [r.add(f"c{i}", f"u{i % 50}") for i in range(100)]
    first = r.stats()["connections_by_user"]
    assert len(first) == 50 and first["u7"] == 2
    first["u7"] = 99
    assert r.stats()["connections_by_user"]["u7"] == 2
    r.remove(hs[7])
    assert r.stats()["connections_by_user"]["u7"] == 1
    r.remove(hs[57])
    assert "u7" not in r.stats()["connections_by_user"]
    r.add("again", "u7")
    r.add("anonymous")
    by_user = r.stats()["connections_by_user"]
    assert by_user["u7"] == 1 and len(by_user) == 50 and sum(by_user.values()) == 99
