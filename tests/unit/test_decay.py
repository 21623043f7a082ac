"""The decayed load estimate's window weights: a filling window counts by its filled fraction, and no jump at a
window boundary."""

import math

import pytest

from moefleet.core.decay import window_weights


def test_a_filling_window_counts_by_its_filled_fraction():
    # window [10, 11) at now = 10.25: a quarter filled, its middle 0.125 s ago
    (w,) = window_weights(10.25, 1.0, [10.0], half_life_s=2.0)
    assert w == pytest.approx(0.25 * 0.5 ** (0.125 / 2.0))
    (just_begun,) = window_weights(10.0, 1.0, [10.0], half_life_s=2.0)
    assert just_begun == 0.0


def test_complete_windows_decay_by_the_age_of_their_middle():
    weights = window_weights(12.5, 1.0, [10.0, 11.0], half_life_s=1.0)
    assert weights == pytest.approx([0.5**2.0, 0.5**1.0])


def test_weights_are_continuous_across_a_window_boundary():
    starts = [7.0, 8.0, 9.0, 10.0]
    before = window_weights(10.0 - 1e-9, 1.0, starts, half_life_s=2.0)
    after = window_weights(10.0 + 1e-9, 1.0, starts, half_life_s=2.0)
    # the window closing at 10 weighs the same on both sides; the one opening weighs ~0
    assert before == pytest.approx(after, abs=1e-6)


def test_an_infinite_half_life_sums_complete_windows_and_the_filled_fraction():
    assert window_weights(12.4, 1.0, [10.0, 11.0, 12.0, 13.0], math.inf) == pytest.approx([1.0, 1.0, 0.4, 0.0])


@pytest.mark.parametrize(("kwargs", "field"), [({"window_s": 0}, "window_s"), ({"half_life_s": 0}, "half_life_s")])
def test_bad_arguments_name_the_field(kwargs, field):
    args = {"now": 1.0, "window_s": 1.0, "starts": [0.0], "half_life_s": 1.0, **kwargs}
    with pytest.raises(ValueError, match=field):
        window_weights(**args)
