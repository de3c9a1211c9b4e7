"""The maths of two objectives, both minimised: dominance, the Pareto front, non-dominated sorting, the knee,
and the hypervolume. Pure functions on ``(objective 1, objective 2)`` pairs; nothing here knows about trials.

Conventions (the tests hold them on tiny hand-made sets):
- ``a`` dominates ``b`` when it is no worse in both objectives and better in at least one.
- Equal points do not dominate each other, so duplicates are all on the front; a point that ties another in one
  objective and is worse in the other is dominated.
- Points with a NaN or an infinite coordinate are never on a front, never counted in a hypervolume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Point = tuple[float, float]


def _finite(p: Point) -> bool:
    return all(math.isfinite(v) for v in p)


def dominates(a: Point, b: Point) -> bool:
    return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the non-dominated finite points, ordered by the first objective, then the second, then index."""
    ok = [i for i, p in enumerate(points) if _finite(p)]
    order = sorted(ok, key=lambda i: (points[i][0], points[i][1], i))
    front: list[int] = []
    best_second = math.inf  # the lowest second objective among points with a strictly lower first one
    group: list[int] = []  # points sharing the current first objective
    for i in order:
        if group and points[i][0] != points[group[0]][0]:
            best_second = min(best_second, points[group[0]][1])
            group = []
        group.append(i)
        lowest_in_group = points[group[0]][1]
        if points[i][1] < best_second and points[i][1] == lowest_in_group:
            front.append(i)
    return front


def nondominated_sort(points: Sequence[Point]) -> list[list[int]]:
    """NSGA-II's fronts: the first front, then the front of what is left, and so on (finite points only)."""
    left = [i for i, p in enumerate(points) if _finite(p)]
    fronts = []
    while left:
        sub = pareto_front([points[i] for i in left])
        fronts.append([left[j] for j in sub])
        taken = set(fronts[-1])
        left = [i for i in left if i not in taken]
    return fronts


def crowding_distance(points: Sequence[Point], front: Sequence[int]) -> dict[int, float]:
    """NSGA-II's crowding distance of each point of one front: the extremes are infinitely far, the others the
    sum over objectives of the gap between their neighbours, over that objective's range on the front."""
    dist = {i: 0.0 for i in front}
    if len(front) <= 2:
        return {i: math.inf for i in front}
    for k in range(2):
        order = sorted(front, key=lambda i: (points[i][k], i))
        lo, hi = points[order[0]][k], points[order[-1]][k]
        dist[order[0]] = dist[order[-1]] = math.inf
        if hi == lo:
            continue
        for a, i, b in zip(order, order[1:], order[2:], strict=False):
            dist[i] += (points[b][k] - points[a][k]) / (hi - lo)
    return dist


def nondominated_order(points: Sequence[Point]) -> list[int]:
    """Every finite point, best first: by front, then by crowding distance (larger first), then by index."""
    out = []
    for front in nondominated_sort(points):
        crowd = crowding_distance(points, front)
        out += sorted(front, key=lambda i: (-crowd[i], i))
    return out


def hypervolume(points: Sequence[Point], reference: Point) -> float:
    """The area dominated by ``points`` and bounded by ``reference`` (both objectives minimised). Points not
    strictly better than the reference in both objectives add nothing."""
    inside = [p for p in points if _finite(p) and p[0] < reference[0] and p[1] < reference[1]]
    area, ceiling = 0.0, reference[1]
    for p in sorted(inside):  # by the first objective: each point adds the slab below the previous best second
        if p[1] < ceiling:
            area += (reference[0] - p[0]) * (ceiling - p[1])
            ceiling = p[1]
    return area


def knee(points: Sequence[Point]) -> int | None:
    """The knee of the front of ``points``: the front point farthest beyond the chord that joins the front's two
    extremes, after scaling each objective to [0, 1] over the front (the maximum-distance-to-chord rule).

    The point farthest toward the ideal corner from that chord is where trading more of one objective buys the
    least of the other. Ties -- two extremes only, a straight front -- go to the lower first objective, then
    the lower index. None if no point is finite.
    """
    front = pareto_front(points)
    if not front:
        return None
    xs, ys = [points[i][0] for i in front], [points[i][1] for i in front]
    sx, sy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    scaled = {i: ((points[i][0] - min(xs)) / sx, (points[i][1] - min(ys)) / sy) for i in front}
    # The chord from the extreme with the lowest first objective (0, 1) to the one with the lowest second
    # (1, 0): x + y = 1. Its distance beyond the chord, toward (0, 0), is (1 - x - y) / sqrt(2).
    gap = {i: (1.0 - x - y) / math.sqrt(2) for i, (x, y) in scaled.items()}
    return min(front, key=lambda i: (-round(gap[i], 12), points[i][0], i))
