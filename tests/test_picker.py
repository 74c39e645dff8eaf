"""The compiled smooth weighted round robin picker."""
from hypothesis import given, strategies as st

from gateway._native.picker import SmoothWeightedPicker


def test_nginx_sequence_for_5_1_1():
    picker = SmoothWeightedPicker("abc", [5, 1, 1])
    assert "".join(picker.pick() for _ in range(7)) == "aabacaa"


@given(st.lists(st.integers(0, 50), min_size=1, max_size=12))
def test_each_cycle_gives_exact_shares(weights):
    picker = SmoothWeightedPicker(list(range(len(weights))), weights)
    total = sum(weights)
    if total == 0:
        assert picker.pick_index() == -1
        return
    picks = [picker.pick_index() for _ in range(total * 3)]
    for index, weight in enumerate(weights):
        assert picks.count(index) == 3 * weight  # weight 0 drains: never picked


def test_tried_instances_are_skipped():
    picker = SmoothWeightedPicker("abc", [1, 1, 1])
    assert picker.pick(tried=(0, 1)) == "c"
    assert picker.pick_index((0, 1, 2)) == -1
    many = SmoothWeightedPicker(list(range(100)), [1] * 100)
    tried = tuple(range(99))  # more than any fixed buffer
    assert many.pick_index(tried) == 99


def test_down_instances_are_skipped_and_come_back():
    picker = SmoothWeightedPicker("ab", [1, 1])
    picker.set_down(0, True)
    assert {picker.pick() for _ in range(10)} == {"b"}
    picker.set_down(0, False)
    assert {picker.pick() for _ in range(10)} == {"a", "b"}


def test_failures_lower_traffic_and_it_recovers():
    picker = SmoothWeightedPicker("ab", [100, 100])
    for _ in range(10):  # far more failures than it takes to reach effective weight 0
        picker.report_failure(0)
    assert picker.effective_weights()[0] == 0
    first = [picker.pick() for _ in range(50)]
    assert first.count("a") < 25  # less traffic while it recovers...
    later = [picker.pick() for _ in range(400)]
    assert later.count("a") >= 190  # ...and its full share once recovered
    assert picker.effective_weights() == [100, 100]
