"""Pure parts of the reconciler: placement diffs and the drain condition."""

import pytest

from moefleet.controller.reconciler import placement_diff, routers_drained, worker_diff
from moefleet.core.placement import Placement


def test_diff_loads_gains_and_unloads_losses_per_device():
    cur = Placement(version=3, assignments={"a": [(0, 0), (0, 1)], "b": [(0, 2)]})
    tgt = Placement(assignments={"a": [(0, 0)], "b": [(0, 2), (0, 1)], "c": [(0, 1)]})
    d = placement_diff(cur, tgt)
    assert d.adds == {"b": [(0, 1)], "c": [(0, 1)]}
    assert d.removes == {"a": [(0, 1)]}
    assert d.new_devices == ["c"] and d.retired_devices == []
    assert d.num_loads == 2


def test_diff_retires_devices_left_empty_and_is_empty_for_equal_placements():
    cur = Placement(assignments={"a": [(0, 0)], "b": [(0, 1)]})
    tgt = Placement(assignments={"a": [(0, 0), (0, 1)]})
    d = placement_diff(cur, tgt)
    assert d.retired_devices == ["b"] and d.removes == {"b": [(0, 1)]}
    assert placement_diff(tgt, Placement(version=9, assignments={"a": [(0, 1), (0, 0)]})).empty


def test_drained_only_when_every_router_serves_the_version_with_nothing_older_in_flight():
    assert not routers_drained({}, 5)  # no router reporting is not "drained": they may be cut off from the store
    assert routers_drained({"r1": {"placement_version": 5, "oldest_inflight_version": 5}}, 5)
    assert not routers_drained({"r1": {"placement_version": 5, "oldest_inflight_version": 4}}, 5)
    assert not routers_drained(
        {"r1": {"placement_version": 5, "oldest_inflight_version": 5}, "r2": {"placement_version": 4, "oldest_inflight_version": 4}}, 5
    )


def test_drained_needs_the_routers_to_serve_the_same_table():
    """After a store reset, a router still on version 7 of the old table has not drained version 2 of the new."""
    old = {"r1": {"placement_version": 7, "oldest_inflight_version": 7, "placement_generation": "old"}}
    assert not routers_drained(old, 2, "new")
    new = {"r1": {"placement_version": 2, "oldest_inflight_version": 2, "placement_generation": "new"}}
    assert routers_drained(new, 2, "new")


def test_drained_counts_calls_in_flight_by_generation_and_version():
    """A call still out on version 7 of the old table, the router already on version 1 of the new: not drained."""
    still_out = {"r1": {"placement_version": 1, "placement_generation": "new", "oldest_inflight": ["old", 7],
                        "oldest_inflight_version": 7}}
    assert not routers_drained(still_out, 1, "new")
    done = {"r1": {"placement_version": 1, "placement_generation": "new", "oldest_inflight": ["new", 1],
                   "oldest_inflight_version": 1}}
    assert routers_drained(done, 1, "new")
    assert not routers_drained({"r1": {**done["r1"], "oldest_inflight": ["new", 0]}}, 1, "new")


def test_worker_diff_unloads_what_no_placement_names_and_loads_what_is_missing():
    placement = Placement(version=4, assignments={"a": [(0, 0), (0, 1)], "b": [(0, 2)], "dead": [(0, 3)]})
    held = {"a": [(0, 0), (0, 5)], "b": [(0, 2)], "spare": [(0, 6)]}  # "dead" reports nothing: it is not live
    d = worker_diff(placement, held)
    assert d.adds == {"a": [(0, 1)]}
    assert d.removes == {"a": [(0, 5)], "spare": [(0, 6)]}
    assert d.new_devices == [] and d.retired_devices == []
    assert worker_diff(placement, {"a": [(0, 1), (0, 0)], "b": [(0, 2)]}).empty


def test_a_swap_on_a_full_device_is_staged_room_first():
    """gpu1 is full: the hot expert 6 can come in only after 5 has moved out to the CPU tier."""
    from moefleet.controller.reconciler import stage_transition

    cur = Placement(assignments={"gpu0": [(0, 0), (0, 1), (0, 2)], "gpu1": [(0, 3), (0, 4), (0, 5)], "cpu0": [(0, 6)]})
    tgt = Placement(assignments={"gpu0": [(0, 0), (0, 1), (0, 2)], "gpu1": [(0, 3), (0, 4), (0, 6)], "cpu0": [(0, 5)]})
    cap = {"gpu0": 3, "gpu1": 3, "cpu0": 10}
    stages = stage_transition(cur, tgt, lambda k: 1, cap)
    assert len(stages) == 2 and stages[-1] is tgt
    first = {d: set(k) for d, k in stages[0].assignments.items()}
    assert first["gpu1"] == {(0, 3), (0, 4)} and first["cpu0"] == {(0, 5), (0, 6)}
    prev = {d: set(map(tuple, k)) for d, k in cur.assignments.items()}
    for stage in stages:  # every step fits while a device holds old and new, and loses no expert
        nxt = {d: set(map(tuple, k)) for d, k in stage.assignments.items()}
        assert all(len(prev.get(d, set()) | nxt.get(d, set())) <= cap[d] for d in cap)
        assert set().union(*nxt.values()) == {(0, e) for e in range(7)}
        prev = nxt


def test_a_move_that_fits_is_one_step_and_an_impossible_one_is_named():
    from moefleet.controller.reconciler import stage_transition

    cur = Placement(assignments={"a": [(0, 0)], "b": [(0, 1)]})
    tgt = Placement(assignments={"a": [(0, 0), (0, 1)], "b": [(0, 1)]})
    assert stage_transition(cur, tgt, lambda k: 1, {"a": 2, "b": 2}) == [tgt]
    swap = Placement(assignments={"a": [(0, 1)], "b": [(0, 0)]})
    with pytest.raises(ValueError, match="cannot stage"):
        stage_transition(cur, swap, lambda k: 1, {"a": 1, "b": 1})  # each full, each expert only there
