"""The eval-curve plot's x axis: iterations, or training minutes (the comparison at equal time)."""

from __future__ import annotations

from plot_eval_curves import points

RECORDS = [
    {"iteration": 0, "wall_s": 0.0, "eval_strict": 0.46},
    {"iteration": 1, "wall_s": 6.0, "reward_mean": 0.5},  # a training record: no eval key
    {"iteration": 20, "wall_s": 90.0, "eval_strict": 0.50, "eval_exact": 0.48},
]


def test_points_by_iteration_keep_only_records_with_the_key():
    assert points(RECORDS, "eval_strict") == [(0, 0.46), (20, 0.50)]
    assert points(RECORDS, "eval_exact") == [(20, 0.48)]


def test_points_by_wall_time_are_training_minutes():
    assert points(RECORDS, "eval_strict", x="wall") == [(0.0, 0.46), (1.5, 0.50)]
