"""The one tolerance table of the harness.

Two kinds of comparison, each with a per-dtype ``(rtol, atol)``:

* ``'exact'``: two computations that are mathematically equal and run in the
  operands' dtype (a rule against ``jax.vjp``, D-RTRL against ``jax.grad``).
  The error is rounding only, so the bound follows the dtype's epsilon.
* ``'fd'``: a rule against central finite differences.  Finite differences
  always run in float64 (the check turns x64 on and restores it), with a step
  chosen for float64; their truncation and cancellation error (~1e-9 relative
  for smooth primitives) sets the bound, whatever the operands' dtype.

A comparison passes when ``max|actual - expected| <= atol + rtol * scale`` with
``scale = max|expected|``: a norm-wise bound, so elements near zero do not turn
rounding noise into a huge per-element relative error.  The reported relative
error is ``max|actual - expected| / scale``.

A comparison whose sides went through different dtypes (mixed precision)
is judged at the coarsest of them (:func:`coarsest`).

Two differently ordered sums of the same products (``xy_to_dw.vjp``,
``xy_to_dw.jacrev``, ``yw_to_w.linear``, ``drtrl.instant``, ``drtrl.exact``,
``pp.exact``, ``units``, and ``primitive.jit``/``.vmap``, whose programs XLA
fuses differently) can cancel, or be long enough that their rounding adds
up (a GPU's convolution over 24,576 terms): their rounding is relative to
the terms, not to the result, so such a comparison passes ``term_scale``
(see ``CheckContext.compare``) and the scale is the larger of the two.
Every finding also reports ``tolerance_used``,
``max|actual - expected| / (atol + rtol * scale)`` with the scale the bound
used: how close it came to failing (the relative error, to the result
alone, can exceed ``rtol`` inside such a bound).

The bounds assume float32 products at float32 precision: the runner pins
``jax.default_matmul_precision('highest')`` for every check, since GPUs
default to TF32 (about 1e-3 relative).

Every deliberately broken rule in the mutant catalog is off by O(1) relative
error or more (a sign, a missing factor, a wrong axis), far above these bounds.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from etp_testing._src.differences import rms_or_one

# dtype name -> (rtol, atol)
EXACT = {
    'float64': (1e-10, 1e-12),
    'float32': (2e-5, 1e-7),
    'float16': (4e-3, 1e-4),
    'bfloat16': (3e-2, 1e-3),
}
FD = {
    'float64': (1e-6, 1e-9),
}
# Step of the central differences, relative to the direction's unit norm
# (each direction is scaled by fd_step_scale of its operand first).
FD_EPS = 1e-5
# Rounding units of y per evaluation that fd_rounding_scale allows (y sums
# its terms: a few units of each, for the sums of the built-ins' sizes).
FD_ROUNDING_UNITS = 8

TABLES = {'exact': EXACT, 'fd': FD}


def fd_rounding_scale(term_size) -> float:
  """The scale at which the ``'fd'`` bound covers the rounding of the
  differences themselves.

  Each side of ``P(w + eps v) - P(w - eps v)`` rounds, in float64, to about
  ``u`` times the size of the terms ``T`` that ``P`` sums (``u`` float64's
  epsilon); divided by ``2 eps`` that is ``u T / eps``.  ``term_size`` is
  ``T`` for the compared values: ``max T`` element-wise, ``<|g|, T>`` for
  a dot with ``g``.  Negligible for moderate operands (``T ~ 1``:
  ``1e-11``, against the bound's ``1e-6``), it is what a correct rule
  missed the bound by where ``P`` is large beside its derivative (a
  float32 weight of 131073 and an input of 1: ``1.1`` of the bound without
  it).  As a ``term_scale``: ``FD_ROUNDING_UNITS u T / (eps rtol)``.
  """
  rtol = FD['float64'][0]
  u = float(np.finfo(np.float64).eps)
  return FD_ROUNDING_UNITS * u * float(term_size) / (FD_EPS * rtol)


def fd_step_scale(operand) -> float:
  """The length, per unit-RMS direction, of the central differences' step
  along ``operand``, in units of ``FD_EPS``: the operand's RMS, at most 1
  (1 where it is zero).

  The truncation error of a central difference grows with the square of
  the step over the length on which the function bends, and for an operand
  that enters through a normalisation or through a product with a large
  input, that length is about the operand's own size: a fixed step of
  1e-5 failed correct rules 141 times over their bound for a weight-norm
  direction of size 1e-3, and 3 to 16 times for a layer norm whose input
  had a spread of 0.003.  Larger operands keep the unit step, since a
  saturating function bends on the scale of its argument, not of the
  operand.  The differences' rounding (``fd_rounding_scale``) does not
  depend on the step's length along the operand: both sides divide by
  ``2 FD_EPS``."""
  return min(1.0, rms_or_one(operand))


def dtype_name(dtype) -> str:
  return np.dtype(jnp.dtype(dtype)).name if dtype is not None else 'float32'


def coarsest(*dtypes):
  """The dtype among ``dtypes`` with the loosest ``'exact'`` tolerance.

  A value that passed through a coarser dtype carries that dtype's rounding
  whatever it is stored in (a float32 gradient of a bfloat16 weight, a
  float64 result of a float32 input), so a comparison is judged at the
  tolerance of the coarsest dtype that its two sides went through."""
  return max(dtypes, key=lambda d: tolerance(d)[0])


@functools.lru_cache(maxsize=256)
def tolerance(dtype, kind: str = 'exact') -> tuple:
  """``(rtol, atol)`` for comparing values of ``dtype`` by ``kind``.
  (Cached: a fast-mode check asks once per comparison, and naming a dtype
  costs NumPy 10 us.)"""
  table = TABLES[kind]
  if kind == 'fd':
    return table['float64']
  name = dtype_name(dtype)
  if name not in table:
    # Integer or complex outputs are compared like float64 (exactly enough).
    name = 'float64' if jnp.issubdtype(jnp.dtype(dtype), jnp.complexfloating) \
        else 'float32'
  return table[name]
