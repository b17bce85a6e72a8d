"""The outer-step schedule (schedule.py): where each fragment's sync starts and lands, for any H, P and tau."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from intellect_jax.schedule import Schedule


def test_fragments_are_staggered_within_each_round():
    s = Schedule(10, 4)
    due = {step: s.due(step) for step in range(41) if s.due(step) is not None}
    assert due == {10: 0, 12: 1, 15: 2, 17: 3, 20: 0, 22: 1, 25: 2, 27: 3, 30: 0, 32: 1, 35: 2, 37: 3, 40: 0}
    assert [s.launch(r) for r in range(5)] == [10, 12, 15, 17, 20]
    plain = Schedule(10)  # plain DiLoCo: one fragment, no overlap
    assert [step for step in range(31) if plain.due(step) is not None] == [10, 20, 30]
    assert [plain.land(r) for r in range(3)] == [10, 20, 30] and plain.at_boundary(20) and not plain.at_boundary(25)


def test_a_resumed_run_knows_how_many_outer_steps_have_landed():
    s = Schedule(10, 4, overlap_steps=2)  # launches 10 12 15 17 20 ..., lands 12 14 17 19 22 ...
    assert [s.completed_by(step) for step in (0, 11, 12, 13, 14, 19, 21, 22)] == [0, 0, 1, 1, 2, 4, 4, 5]


@st.composite
def schedules(draw):
    H = draw(st.integers(1, 40))
    P = draw(st.integers(1, min(H, 8)))
    return Schedule(H, P, draw(st.integers(0, (H - 1) // P)))


@given(schedules(), st.integers(0, 400))
def test_due_launch_land_and_completed_by_agree(s, step):
    H, P = s.inner_steps, s.fragments
    launched = [r for r in range(0, 2 * P * (step // H + 2)) if s.launch(r) == step]
    assert len(launched) <= 1  # one sync starts at a time
    assert s.due(step) == (s.fragment(launched[0]) if launched else None)
    assert s.completed_by(step) == sum(1 for r in range(2 * P * (step // H + 2)) if s.land(r) <= step)
    assert all(s.launch(r) < s.launch(r + 1) for r in range(3 * P))  # in the order they are counted


def test_bad_schedules_are_refused():
    for bad in ((0, 1, 0), (10, 0, 0), (10, 1, -1), (4, 5, 0), (10, 4, 3), (10, 1, 10)):
        with pytest.raises(ValueError, match="a schedule needs"):
            Schedule(*bad)
