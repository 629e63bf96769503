import math

import pytest

from hf_qat.planner import FITTED_RANGE, optimal_qat_fraction, plan_qat, range_warning, tokens_per_parameter_byte


@pytest.mark.parametrize(
    "n,bits,tokens,expected",
    [(86e6, 6, 2.3e9, 0.152), (86e6, 1, 1.4e12, 0.565), (2.2e9, 4, 1e11, 0.225), (135e6, 4, 10e9, 0.260)],
)
def test_method_md_vectors(n, bits, tokens, expected):
    s = tokens_per_parameter_byte(n, tokens, bits)
    assert round(optimal_qat_fraction(s), 3) == expected
    assert round(plan_qat(n, tokens, bits).qat_fraction, 3) == expected


def test_s_definition_and_ternary_bytes():
    assert tokens_per_parameter_byte(1e6, 4e6, 8) == pytest.approx(4.0)
    assert tokens_per_parameter_byte(1e6, 4e6, "ternary") == pytest.approx(4e6 / (1e6 * math.log2(3) / 8))


def test_fraction_grows_with_s_and_is_zero_at_or_below_one():
    values = [optimal_qat_fraction(s) for s in (1.0, 2.0, 36, 1e3, 1e5, 1e9)]
    assert values[0] == 0.0 and values == sorted(values) and values[-1] < 1.0
    assert optimal_qat_fraction(0.5) == 0.0


def test_range_warning_names_the_range():
    assert range_warning(100.0) is None
    text = range_warning(2.0)
    assert "below the range" in text and f"{FITTED_RANGE[0]:.2g}" in text and "2509.22935" in text
    assert "above" in range_warning(1e7)
