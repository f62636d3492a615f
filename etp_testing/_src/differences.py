"""How far apart two arrays are: the numbers every comparison reports.

``max_errors`` gives the largest absolute difference, taken in float64, the
relative error (to ``max |expected|``, a norm-wise scale: see
``tolerances``) and the first place the largest difference occurs; a
non-finite difference anywhere (NaN, an infinity, ``inf - inf``) makes both
errors infinite and is reported where it first occurs.  Large arrays are
taken ``ERROR_BLOCK`` elements at a time; small real ones
(``SMALL_ERRORS``) on Python floats, for the same answer at a fraction of
NumPy's per-call cost.  ``CheckContext.compare`` judges these numbers.

Arrays too large to copy to the host are compared where they are:
:func:`traced_errors`, inside a program, reduces them to the same numbers
(:func:`errors_from_device` reads them back), and
``CheckContext.judge_errors`` judges them.
"""

from __future__ import annotations

import math

import numpy as np

# Elements per block of max_errors' float64 differences (8 MiB each).
ERROR_BLOCK = 1 << 20
# Up to this many elements, max_errors works on Python floats (see
# _small_errors): fast mode compares a few dot products per weight.
SMALL_ERRORS = 64


def abs_max(x) -> float:
  """``max |x|``, 0 for an empty array (``ERROR_BLOCK`` elements at a time:
  no temporary as large as ``x``); NaN if ``x`` holds one."""
  x = np.asarray(x)
  # A signed integer's abs in its own dtype wraps at its minimum
  # (|-2**31| is -2**31 in int32): take it in float64.
  cast = {'dtype': np.float64} if x.dtype.kind == 'i' else {}
  if x.size <= ERROR_BLOCK:
    return float(np.max(np.abs(x, **cast), initial=0.0))
  flat = x.reshape(-1)
  return float(np.max([np.max(np.abs(flat[i:i + ERROR_BLOCK], **cast))
                       for i in range(0, flat.size, ERROR_BLOCK)]))


def max_errors(actual, expected):
  """``(max_abs, max_rel, index)``; see ``tolerances`` for the definitions.

  The differences are taken in float64 ``ERROR_BLOCK`` elements at a time:
  for a large layer's traces, a whole-array float64 difference was twice
  the size of the float32 arrays compared, and set the check's peak."""
  return max_errors_and_scale(actual, expected)[:3]


def max_errors_and_scale(actual, expected):
  """:func:`max_errors` and the scale it is relative to, ``max |expected|``
  (computed once, here, for both: ``compare`` needs the scale too).  The
  scale is the whole array's even where a non-finite difference ends the
  blocks early."""
  a, e = np.asarray(actual), np.asarray(expected)
  if a.shape != e.shape:
    a, e = np.broadcast_arrays(a, e)
  if a.size == 0:
    return 0.0, 0.0, (), 0.0
  if (a.size <= SMALL_ERRORS and a.dtype.kind in _REAL_KINDS
      and e.dtype.kind in _REAL_KINDS):
    return _small_errors(a, e)
  scale = abs_max(e)
  a_flat, e_flat = a.reshape(-1), e.reshape(-1)
  max_abs, at = -1.0, 0
  for start in range(0, a.size, ERROR_BLOCK):
    stop = start + ERROR_BLOCK
    with np.errstate(invalid='ignore', over='ignore'):
      diff = np.abs(np.subtract(a_flat[start:stop], e_flat[start:stop],
                                dtype=np.float64))
    bad = ~np.isfinite(diff)
    if bad.any():
      flat = start + int(np.flatnonzero(bad)[0])
      return float('inf'), float('inf'), _unravel(flat, a.shape), scale
    i = int(np.argmax(diff))
    if diff[i] > max_abs:   # the first largest, as np.argmax gives it
      max_abs, at = float(diff[i]), start + i
  return max_abs, ratio(max_abs, scale), _unravel(at, a.shape), scale


def ratio(error: float, scale: float) -> float:
  """``error / scale``; at a scale of 0, 0 for no error and infinite for
  any (a relative error, or the share of a tolerance an error takes)."""
  if scale > 0:
    return error / scale
  return 0.0 if error == 0 else float('inf')


def rms_or_one(value) -> float:
  """The root mean square of ``value``'s entries, in float64; 1 where that
  is 0 or not finite (no scale to keep)."""
  values = np.asarray(value, np.float64)
  rms = float(np.sqrt(np.mean(values * values))) if values.size else 0.0
  return rms if rms > 0 and np.isfinite(rms) else 1.0


def cosine(actual, expected):
  """:math:`\\langle a, e\\rangle / (\\|a\\| \\|e\\|)` in float64 over every
  element; ``None`` where ``expected`` is zero (no direction to compare
  with), 0 where only ``actual`` is, NaN where a value is not finite."""
  a = np.asarray(actual, np.float64).ravel()
  e = np.asarray(expected, np.float64).ravel()
  norm_a, norm_e = float(np.linalg.norm(a)), float(np.linalg.norm(e))
  if norm_e == 0:
    return None
  if norm_a == 0:
    return 0.0
  return float(a @ e) / (norm_a * norm_e)


# NumPy's real number kinds (float, signed, unsigned): ``tolist`` gives
# Python floats and ints, which float() turns into float64 exactly as NumPy
# casts them.  (bfloat16 is kind 'V' and takes the NumPy path.)
_REAL_KINDS = 'fiu'


def _small_errors(a: np.ndarray, e: np.ndarray):
  """:func:`max_errors_and_scale` of two small real arrays of one shape,
  the same answer on Python floats (IEEE float64, as NumPy's float64
  pass): each NumPy call costs a microsecond or more, and a fast-mode
  check's two comparisons of a few dot products spent 70 us in that pass,
  a tenth of the whole check on LoRA's layer on a GPU.
  ``test_small_errors_are_numpys`` holds the two paths to one answer, NaN,
  infinity and ties included."""
  a_flat = [float(v) for v in a.reshape(-1).tolist()]
  e_flat = [float(v) for v in e.reshape(-1).tolist()]
  scale = 0.0
  for v in e_flat:
    if v != v:          # NaN: np.max propagates it
      scale = v
      break
    scale = max(scale, abs(v))
  max_abs, at = -1.0, 0
  for i, (x, y) in enumerate(zip(a_flat, e_flat)):
    diff = abs(x - y)   # inf - inf is NaN, as in NumPy
    if not math.isfinite(diff):
      return float('inf'), float('inf'), _unravel(i, a.shape), scale
    if diff > max_abs:  # the first largest, as np.argmax gives it
      max_abs, at = diff, i
  return max_abs, ratio(max_abs, scale), _unravel(at, a.shape), scale


def _unravel(flat: int, shape: tuple) -> tuple:
  """``np.unravel_index(flat, shape)`` as a tuple of ints."""
  index = []
  for n in reversed(shape):
    flat, i = divmod(flat, n)
    index.append(i)
  return tuple(reversed(index))


def traced_errors(actual, expected):
  """Inside a traced program: the numbers of :func:`max_errors_and_scale`
  for two arrays of one shape, neither of which leaves the device.

  Returns ``(stats, index)``: ``stats = [max_abs, scale]`` and the flat
  index of the first largest difference (of the first NaN where there is
  one, else of the first infinity: a non-finite difference makes
  ``max_abs`` non-finite).  The differences are taken inside the
  reductions (no copy of either array) in the wider of the arrays' dtype
  and float32: exact for half precision; for float32 rounded once, a
  relative ``2**-24`` of the difference, where the host takes it exactly
  in float64 (a float64 pass inside an x64-off program does not lower).
  Turn them into the host's four numbers with :func:`errors_from_device`."""
  import jax.numpy as jnp   # the host-side functions need NumPy only
  dtype = jnp.promote_types(jnp.result_type(actual, expected), jnp.float32)
  if actual.size == 0:
    return jnp.zeros(2, dtype), jnp.int32(0)
  a = actual.reshape(-1).astype(dtype)
  e = expected.reshape(-1).astype(dtype)
  # One reduction gives both the largest difference and its place: a second
  # reading of the differences made XLA:CPU hold them all (256 MiB of
  # scratch for a 64M-element trace where the one reduction needs none).
  max_abs, index = _largest_first(jnp.abs(a - e))
  return jnp.stack([max_abs, jnp.max(jnp.abs(e))]), index


def _largest_first(values):
  """``(value, index)`` of the 1-d ``values``' first NaN, or with none of
  their first maximum: one reduction of ``(value, index)`` pairs by
  :func:`first_of`.

  Not ``jnp.max`` and ``jnp.argmax``: argmax prefers a NaN but breaks ties
  by index only between equal numbers, so between two NaNs it keeps
  whichever the reduction met first, and on a GPU that order is not the
  array's.  A ``lax.cond`` choosing a NaN search instead would materialise
  its trace-sized operand."""
  import jax
  import jax.numpy as jnp
  indices = jax.lax.iota(jnp.int32, values.size)
  lowest = jnp.array(-jnp.inf, values.dtype)
  return jax.lax.reduce((values, indices), (lowest, jnp.int32(0)),
                        first_of, (0,))


def first_of(a, b):
  """Of two ``(value, index)`` pairs, the one :func:`_largest_first` keeps:
  the larger value, a NaN over a number, and between ties (equal, or both
  NaN) the smaller index.  Commutative and associative, so any order of
  reduction gives the same pair."""
  import jax.numpy as jnp
  (a_value, a_index), (b_value, b_index) = a, b
  a_nan, b_nan = jnp.isnan(a_value), jnp.isnan(b_value)
  tied = (a_value == b_value) | (a_nan & b_nan)
  a_wins = ((a_value > b_value) | (a_nan & ~b_nan)
            | (tied & (a_index < b_index)))
  return (jnp.where(a_wins, a_value, b_value),
          jnp.where(a_wins, a_index, b_index))


def errors_from_device(stats, index, shape) -> tuple:
  """``(max_abs, max_rel, index, scale)`` as :func:`max_errors_and_scale`
  gives them, from :func:`traced_errors`' ``stats`` and ``index`` (host
  values) for arrays of ``shape``."""
  max_abs, scale = float(stats[0]), float(stats[1])
  shape = tuple(shape)
  where = () if 0 in shape else _unravel(int(index), shape)
  if not math.isfinite(max_abs):
    return float('inf'), float('inf'), where, scale
  return max_abs, ratio(max_abs, scale), where, scale
