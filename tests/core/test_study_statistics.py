"""The study's intervals over seeds: the mean and the 95% t half-width, checked against SciPy's t distribution."""
import math

import numpy as np
import pytest

from subject_personalization.study.run import T_975, interval

stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("degrees", sorted(T_975))
def test_the_t_quantiles_are_scipys(degrees):
    assert T_975[degrees] == pytest.approx(stats.t.ppf(0.975, degrees), abs=5e-4)


@pytest.mark.parametrize("values", [[0.5, 0.7, 0.9], [0.1, 0.1, 0.4, 0.2], [1.0, 0.0], [0.3, 0.31, 0.29, 0.35, 0.3]])
def test_the_interval_is_the_t_interval_of_the_mean(values):
    entry = interval(values)
    expected = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert entry["mean"] == pytest.approx(np.mean(values))
    assert entry["mean"] - entry["half_width"] == pytest.approx(expected[0], abs=1e-3)
    assert entry["mean"] + entry["half_width"] == pytest.approx(expected[1], abs=1e-3)
    assert entry["seeds"] == len(values)


def test_one_seed_has_no_interval():
    entry = interval([0.25])
    assert entry == {"mean": 0.25, "half_width": None, "seeds": 1} and not math.isnan(entry["mean"])
