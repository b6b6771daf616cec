"""Small shared helpers."""

from __future__ import annotations

import statistics

import pytest

from mmr_core.utils import mean_std


def test_mean_std_is_the_sample_standard_deviation() -> None:
    values = [85.0, 82.5, 90.0]
    mean, std = mean_std(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert std == pytest.approx(statistics.stdev(values))
    assert mean_std([3.0]) == (3.0, 0.0)
    assert mean_std(iter([1, 3])) == (2.0, pytest.approx(2**0.5))
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])
