"""``differences``: how far apart two arrays are, the numbers every
comparison reports and judges (largest error, where, relative to what)."""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etp_testing._src import differences


@pytest.mark.parametrize('block', [1, 3, 1 << 20])
def test_max_errors_block_by_block_is_the_whole_array_answer(monkeypatch,
                                                             block):
  # Blocks keep a large comparison's float64 temporaries small; the answer
  # (largest error, the first place it occurs, the scale, the first
  # non-finite value) must not depend on where the blocks fall.
  monkeypatch.setattr(differences, 'ERROR_BLOCK', block)
  monkeypatch.setattr(differences, 'SMALL_ERRORS', 0)   # NumPy's blocks
  expected = np.arange(12, dtype=np.float32).reshape(3, 4) - 8
  actual = expected.copy()
  actual[0, 3] += 0.5
  actual[2, 1] += 0.5       # as large, later: not reported
  actual[1, 2] -= 0.25
  assert differences.max_errors(actual, expected) == (0.5, 0.5 / 8, (0, 3))
  assert differences.abs_max(expected) == 8.0
  actual[2, 2] = np.nan
  actual[2, 3] = np.inf
  assert differences.max_errors(actual, expected)[2] == (2, 2)
  assert differences.max_errors(np.zeros((0, 2)),
                                np.zeros((0, 2))) == (0., 0., ())
  assert differences.abs_max(np.zeros(0)) == 0.0
  assert np.isnan(differences.abs_max(np.array([1.0, np.nan, 5.0])))
  # NumPy's abs wraps at a signed integer's minimum; the scale must not.
  assert differences.abs_max(np.array([3, -2**31], np.int32)) == 2.0**31


_REAL_DTYPES = ('float16', 'float32', 'float64', 'int32', 'uint8')


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
@hypothesis.given(data=st.data())
def test_small_errors_are_numpys(data):
  # Small comparisons (fast mode's dot products) take a Python-float path
  # for speed; it must give NumPy's float64 answer exactly: the largest
  # error, the first place it occurs (ties), the scale, and the first
  # non-finite difference (NaN, infinity, inf - inf).
  shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=1,
                                     max_side=4))
  actual, expected = (
      data.draw(hnp.arrays(st.sampled_from(_REAL_DTYPES), shape))
      for _ in range(2))
  assert actual.size <= differences.SMALL_ERRORS
  small = differences._small_errors(actual, expected)
  numpy_path = differences.SMALL_ERRORS
  try:
    differences.SMALL_ERRORS = 0
    reference = differences.max_errors_and_scale(actual, expected)
  finally:
    differences.SMALL_ERRORS = numpy_path
  assert len(small) == len(reference) == 4
  np.testing.assert_equal(small, reference)
  assert all(type(v) is float for v in (small[0], small[1], small[3]))
  assert all(type(i) is int for i in small[2])


def test_small_errors_cover_fast_modes_comparisons():
  # The path is taken where it pays: a few dot products per weight, any
  # real dtype; bfloat16 (kind 'V') and larger arrays stay on NumPy's.
  calls = []
  real = differences._small_errors
  try:
    differences._small_errors = (
        lambda a, e: calls.append(a.size) or real(a, e))
    for actual in (np.ones(3), np.ones(64, np.float32), np.ones(65),
                   np.ones(3, jnp.bfloat16)):
      differences.max_errors_and_scale(actual, np.zeros(actual.shape))
  finally:
    differences._small_errors = real
  assert calls == [3, 64]


# Values whose differences float32 holds exactly: the device's float32
# pass and the host's float64 one must then agree to the bit, ties and
# non-finite values included.
_EXACT_VALUES = st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.0, -3.0, 8.0,
                                 np.nan, np.inf, -np.inf])
_traced_errors = jax.jit(differences.traced_errors)


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
@hypothesis.given(data=st.data())
def test_device_errors_are_the_hosts(data):
  # Comparisons made on the device (yw_to_w.linear of a large layer in
  # fast mode) report what max_errors_and_scale reports on the host: the
  # largest error, its first place (of the first NaN where there is one),
  # the scale.
  dtype = data.draw(st.sampled_from(['float16', 'float32']))
  shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0,
                                     max_side=4))
  actual, expected = (data.draw(hnp.arrays(dtype, shape,
                                           elements=_EXACT_VALUES))
                      for _ in range(2))
  stats, index = jax.device_get(_traced_errors(jnp.asarray(actual),
                                               jnp.asarray(expected)))
  device = differences.errors_from_device(stats, index, shape)
  host = differences.max_errors_and_scale(actual, expected)
  if np.isinf(host[0]):
    # Both report a non-finite difference: the host at the first one, the
    # device at the first NaN or, with none, the first infinity.
    assert np.isinf(device[0]) and np.isinf(device[1])
    with np.errstate(invalid='ignore'):
      diff = np.abs(actual.astype(np.float64) - expected)
    first = (np.flatnonzero(np.isnan(diff)) if np.isnan(diff).any()
             else np.flatnonzero(np.isinf(diff)))[0]
    assert device[2] == np.unravel_index(first, shape)
    np.testing.assert_equal(device[3], host[3])
  else:
    np.testing.assert_equal(device, host)


def _reduce_in_drawn_order(data, pairs, combine):
  # Any order a parallel reduction may take: the pairs shuffled, then
  # neighbours combined one drawn pair at a time, either way round.
  pending = data.draw(st.permutations(pairs))
  while len(pending) > 1:
    i = data.draw(st.integers(0, len(pending) - 2))
    a, b = pending[i], pending[i + 1]
    if data.draw(st.booleans()):
      a, b = b, a
    pending[i:i + 2] = [tuple(np.asarray(v) for v in combine(a, b))]
  return int(pending[0][1])


def _argmax_pair(a, b):
  # jnp.argmax's own choice (jax.lax's argmax reducer): a NaN wins, but
  # ties are broken by index only between equal numbers.
  (a_value, a_index), (b_value, b_index) = a, b
  a_wins = (a_value > b_value) | (a_value != a_value)
  a_wins |= (a_value == b_value) & (a_index < b_index)
  return np.where(a_wins, a_value, b_value), np.where(a_wins, a_index, b_index)


_DIFFERENCES = st.sampled_from([0.0, 1.0, 2.0, np.nan, np.inf])


@hypothesis.settings(max_examples=100, deadline=None, derandomize=True)
@hypothesis.given(data=st.data())
def test_largest_first_does_not_depend_on_the_reductions_order(data):
  # A GPU reduces in an order of its own; the device's index must still be
  # the host's: the first NaN, else the first maximum.
  values = data.draw(hnp.arrays(np.float32, st.integers(1, 8),
                                elements=_DIFFERENCES))
  pairs = [(np.float32(v), np.int32(i)) for i, v in enumerate(values)]
  first = int(np.argmax(values))   # NumPy: the first NaN, else first max
  assert _reduce_in_drawn_order(data, pairs, differences.first_of) == first
  value, index = jax.jit(differences._largest_first)(values)
  assert int(index) == first
  np.testing.assert_equal(np.asarray(value), values[first])


def test_argmaxs_own_reducer_loses_the_first_nan_out_of_order():
  # The order-dependence first_of exists to remove, and that the test above
  # would catch: jnp.argmax's reducer, met with its NaNs out of order.
  @hypothesis.settings(max_examples=100, derandomize=True, database=None)
  @hypothesis.given(data=st.data())
  def with_argmaxs_reducer(data):
    values = np.array([0.0, np.nan, np.nan], np.float32)
    pairs = [(v, np.int32(i)) for i, v in enumerate(values)]
    assert _reduce_in_drawn_order(data, pairs, _argmax_pair) == 1

  with pytest.raises(AssertionError):
    with_argmaxs_reducer()


def test_device_errors_of_an_empty_array():
  stats, index = differences.traced_errors(jnp.zeros((0, 2)),
                                           jnp.zeros((0, 2)))
  assert differences.errors_from_device(stats, index, (0, 2)) == \
      differences.max_errors_and_scale(np.zeros((0, 2)), np.zeros((0, 2)))
