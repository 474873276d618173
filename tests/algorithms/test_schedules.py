import math

import pytest

from pebr_lightning.algorithms.schedules import warmup_cosine


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),  # warm-up starts at zero
        (5, 0.5),  # halfway through 10 warm-up steps
        (10, 1.0),  # peak
        (55, 0.1 + 0.9 * 0.5),  # halfway through the 90 decay steps: cos(pi/2) = 0
        (100, 0.1),  # floor
        (150, 0.1),  # past the end stays at the floor
    ],
)
def test_warmup_cosine_hand_values(step, expected):
    assert math.isclose(warmup_cosine(step, 100, 10, min_ratio=0.1), expected, abs_tol=1e-12)
