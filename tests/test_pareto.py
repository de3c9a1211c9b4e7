"""The two-objective maths (search/pareto.py) on tiny hand-made sets: the front with ties and duplicates, the
non-dominated order, the hypervolume (against Optuna's own), and the knee."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from search.pareto import crowding_distance, dominates, hypervolume, knee, nondominated_order, nondominated_sort
from search.pareto import pareto_front as front


def brute_front(points):
    return sorted(
        i
        for i, p in enumerate(points)
        if all(map(math.isfinite, p)) and not any(dominates(q, p) for q in points if all(map(math.isfinite, q)))
    )


def test_dominance_is_strict_in_one_objective():
    assert dominates((1, 1), (1, 2)) and dominates((1, 1), (2, 2)) and dominates((0, 3), (1, 3))
    assert not dominates((1, 1), (1, 1))  # equal points: neither dominates
    assert not dominates((1, 2), (2, 1)) and not dominates((2, 1), (1, 2))


def test_front_of_a_hand_made_set():
    # 0 (1, 5) and 2 (2, 3) and 4 (4, 1) are the front; 1 (2, 5) is dominated by 0; 3 (3, 3) by 2.
    points = [(1, 5), (2, 5), (2, 3), (3, 3), (4, 1), (5, 1)]
    assert front(points) == [0, 2, 4]  # by the first objective


def test_ties_in_one_objective_leave_only_the_better_in_the_other():
    assert front([(1, 2), (1, 3), (1, 2.5)]) == [0]  # same first objective: the lowest second wins alone
    assert front([(2, 1), (3, 1), (1, 4)]) == [2, 0]  # same second objective: the lowest first wins
    assert front([(1, 1), (1, 1), (2, 0)]) == [0, 1, 2]


def test_duplicates_are_all_on_the_front_and_never_dominate_each_other():
    assert front([(1, 2), (1, 2), (2, 1)]) == [0, 1, 2]
    assert front([(3, 3), (1, 2), (1, 2)]) == [1, 2]  # and a dominated point stays off


def test_nan_and_inf_are_never_on_the_front():
    assert front([(math.nan, 0), (1, math.inf), (2, 2), (3, 1)]) == [2, 3]
    assert front([]) == [] and front([(math.nan, math.nan)]) == []


def test_front_agrees_with_brute_force_on_random_sets_with_ties():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 12)
        points = [(rng.randint(0, 4), rng.randint(0, 4)) for _ in range(n)]  # small ints: many ties and duplicates
        assert sorted(front(points)) == brute_front(points), points


def test_nondominated_sort_peels_fronts_and_the_order_puts_extremes_first():
    points = [(1, 5), (2, 5), (2, 3), (3, 3), (4, 1), (5, 1), (3, 2)]
    fronts = nondominated_sort(points)
    assert fronts == [[0, 2, 6, 4], [1, 3, 5]]
    assert sum(map(len, fronts)) == len(points)
    crowd = crowding_distance(points, fronts[0])
    assert crowd[0] == crowd[4] == math.inf  # the extremes
    # 2 (2, 3): neighbours 0 (1, 5) and 6 (3, 2) -> (3-1)/3 + (5-2)/4; 6 (3, 2): neighbours 2 and 4 -> 2/3 + 2/4
    assert crowd[2] == pytest.approx(2 / 3 + 3 / 4) and crowd[6] == pytest.approx(2 / 3 + 2 / 4)
    assert nondominated_order(points) == [0, 4, 2, 6, 1, 5, 3]


def test_hypervolume_by_hand_and_against_optuna():
    from optuna._hypervolume import compute_hypervolume

    ref = (4.0, 4.0)
    assert hypervolume([(1, 3), (2, 2), (3, 1)], ref) == pytest.approx(3 + 2 + 1)
    assert hypervolume([(1, 3), (2, 2), (3, 1), (2, 2), (3, 3)], ref) == pytest.approx(6)  # dominated, duplicates
    assert hypervolume([(5, 1), (1, 4), (math.nan, 0)], ref) == 0  # outside the reference box, or not finite
    assert hypervolume([], ref) == 0
    rng = np.random.default_rng(0)
    for _ in range(50):
        pts = rng.random((rng.integers(1, 15), 2))
        on = np.array([pts[i] for i in front([tuple(p) for p in pts])])
        expected = compute_hypervolume(on, np.array([1.1, 1.1]), assume_pareto=True)
        assert hypervolume([tuple(p) for p in pts], (1.1, 1.1)) == pytest.approx(expected, rel=1e-12)


def test_knee_is_the_front_point_farthest_beyond_the_chord():
    # Extremes (0, 10) and (10, 0); (2, 2) is farthest toward the ideal corner; (6, 6) is dominated by it.
    points = [(0, 10), (2, 2), (5, 1), (10, 0), (6, 6)]
    assert knee(points) == 1
    # The scaling makes the rule unit-free: stretching one objective changes nothing.
    assert knee([(x * 1000, y) for x, y in points]) == 1


def test_knee_ties_go_to_the_lower_first_objective_then_the_earlier_point():
    assert knee([(1, 2), (2, 1)]) == 0  # two extremes, both on the chord
    assert knee([(2, 1), (1, 2)]) == 1
    assert knee([(1, 3), (2, 2), (3, 1)]) == 0  # a straight front: every point on the chord
    assert knee([(1, 1), (1, 1)]) == 0  # duplicates: the earlier one
    assert knee([(5, 5)]) == 0 and knee([(math.nan, 1)]) is None
    assert knee([(3, 3), (0, 10), (2, 2), (10, 0), (2, 2)]) == 2  # a duplicated knee: the earlier copy
