"""The device-side random directions of the fast-mode projections."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etp_testing._src import directions
from etp_testing._src.context import x64_enabled


def test_a_stacked_draw_equals_draws_at_offsets_bit_for_bit():
  seed = np.uint32(1234)
  stack = np.asarray(jax.jit(lambda s: directions.uniform(s, (3, 5, 7)))(seed))
  for d in range(3):
    one = directions.uniform(seed, (5, 7), offset=d * 35)
    np.testing.assert_array_equal(np.asarray(one), stack[d])


def test_same_seed_same_draw_other_seed_other_draw():
  a = np.asarray(directions.uniform(np.uint32(7), (1000,)))
  np.testing.assert_array_equal(a, np.asarray(directions.uniform(7, (1000,))))
  b = np.asarray(directions.uniform(np.uint32(8), (1000,)))
  assert np.corrcoef(a, b)[0, 1] < 0.1


def test_entries_are_unit_variance_uniform():
  v = np.asarray(directions.uniform(np.uint32(3), (200_000,)), np.float64)
  assert abs(v.mean()) < 0.01 and abs(v.var() - 1) < 0.01
  assert np.abs(v).max() <= np.sqrt(3)
  # Uniform, not Gaussian: a quarter of the mass in each quarter of the range.
  counts = np.histogram(v, bins=4, range=(-np.sqrt(3), np.sqrt(3)))[0]
  np.testing.assert_allclose(counts / v.size, 0.25, atol=0.01)
  # Neighbouring entries are uncorrelated.
  assert abs(np.corrcoef(v[:-1], v[1:])[0, 1]) < 0.01


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.float64, jnp.bfloat16])
def test_dtype_is_the_requested_one(dtype):
  with x64_enabled(dtype == jnp.float64):
    assert directions.uniform(np.uint32(0), (4, 3), dtype).dtype == dtype


def test_the_documented_miss_probability_bound_holds():
  """``P(|<d, v>| <= tau) <= 0.82 tau / |d|`` (module docstring), for the
  error that defeats sign vectors half the time (``e1 - e2``) and for a dense
  one, over many seeds."""
  seeds = jnp.arange(20_000, dtype=jnp.uint32)
  draw = jax.jit(jax.vmap(lambda s: directions.uniform(s, (64,))))
  vs = np.asarray(draw(seeds), np.float64)
  dense = np.random.default_rng(0).standard_normal(64)
  for d in (np.eye(64)[0] - np.eye(64)[1], dense):
    dots = vs @ d
    for tau in (0.05, 0.2):
      miss = np.mean(np.abs(dots) <= tau * np.linalg.norm(d))
      assert miss <= 0.82 * tau + 0.01, (miss, tau)


def test_a_draw_too_large_for_the_counter_is_refused():
  with pytest.raises(ValueError, match='32-bit counter'):
    jax.eval_shape(lambda: directions.uniform(0, (2**16, 2**16)))


def test_a_draw_is_the_documented_formula():
  # v_i = sqrt3 (2 u_i - 1 + 2^-23), u_i the 23 high bits of
  # h(i phi + s) / 2^23, h MurmurHash3's finaliser: one hash per element,
  # recomputed here in NumPy.
  seed, offset = np.uint32(0xDEADBEEF), 5

  def h(x):
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))
  i = np.arange(offset, offset + 100, dtype=np.uint32)
  with np.errstate(over='ignore'):
    bits = h(i * np.uint32(0x9E3779B9) + seed)
  u = (bits >> np.uint32(9)).astype(np.float64) / 2**23
  expected = np.float32(np.sqrt(3)) * (2 * u - 1 + 2.0**-23).astype(np.float32)
  np.testing.assert_array_equal(
      np.asarray(directions.uniform(seed, (100,), offset=offset)), expected)
