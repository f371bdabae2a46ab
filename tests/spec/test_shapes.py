import math

import pytest

from cnnrun.spec.shapes import output_size, pad_amounts


@pytest.mark.parametrize("n", [1, 5, 6, 27, 28])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("s", [1, 2, 3])
def test_same_padding_matches_tensorflow_definition(n, k, s):
    out = output_size(n, k, s, "same")
    assert out == math.ceil(n / s)
    before, after = pad_amounts(n, k, s, "same")
    total = max((out - 1) * s + k - n, 0)
    assert (before, after) == (total // 2, total - total // 2)
    # the padded input gives exactly `out` windows with no partial window
    assert (n + before + after - k) // s + 1 == out


@pytest.mark.parametrize(
    "n,k,s,p,expected",
    [
        (28, 5, 1, 0, 24),
        (28, 5, 2, 2, 14),
        (7, 3, 3, 1, 3),
        (4, 5, 1, 0, 0),
        (2, 3, 1, 1, 2),  # the window fits only thanks to the padding
        (1, 7, 1, 2, 0),  # wider than the padded input: no window at all, never a negative size
    ],
)
def test_valid_and_explicit(n, k, s, p, expected):
    assert output_size(n, k, s, p if p else "valid") == expected
    assert output_size(n, k, s, p) == expected


def test_explicit_padding_is_symmetric():
    assert pad_amounts(10, 3, 2, 2) == (2, 2)
    assert pad_amounts(10, 3, 2, "valid") == (0, 0)
