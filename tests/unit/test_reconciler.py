"""Pure parts of the reconciler: placement diffs and the drain condition."""

from moefleet.controller.reconciler import placement_diff, routers_drained
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
    assert routers_drained({}, 5)
    assert routers_drained({"r1": {"placement_version": 5, "oldest_inflight_version": 5}}, 5)
    assert not routers_drained({"r1": {"placement_version": 5, "oldest_inflight_version": 4}}, 5)
    assert not routers_drained(
        {"r1": {"placement_version": 5, "oldest_inflight_version": 5}, "r2": {"placement_version": 4, "oldest_inflight_version": 4}}, 5
    )
