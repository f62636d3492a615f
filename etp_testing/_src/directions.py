r"""Random directions drawn on the device, cheaply.

The fast-mode projections need a few random directions as large as a weight
(16M elements each for a 4096 x 4096 layer).  Drawing Gaussians on the host,
or with JAX's threefry on a CPU, costs several times a forward plus VJP of the
layer; this counter-based draw is a few integer operations per element, run
inside the program that consumes it.  (XLA:CPU in jax 0.10.2 still writes
each draw out as an array: its reduction fusions take float element-wise
code, not the integer hash.  Hence ``xy_to_dw``'s fast mode draws a large
weight's directions one at a time.)

Element ``i`` of a draw with seed ``s`` is uniform on
:math:`[-\sqrt3, \sqrt3]` (mean 0, variance 1):

.. math::  v_i = \sqrt3\,(2 u_i - 1), \qquad
           u_i = \text{the 23 high bits of } h(i\varphi + s) \,/\, 2^{23},

with ``h`` the 32-bit MurmurHash3 finaliser and ``phi`` the golden-ratio
constant: SplitMix's construction (a Weyl sequence through a mixing
function), one hash per element.  It is not a cryptographic generator; it
only has to be a fixed random-looking vector that no rule's error is built
from.  Two seeds give windows of one stream at offsets
:math:`(s' - s)\varphi^{-1} \bmod 2^{32}` apart, for random seeds far beyond
any draw.  (It hashed twice, ``h(h(i phi + s) xor s)``, until the draws
of ``yw_to_w.linear`` on LoRA's 4096 x 4096 layer, 268M elements each, took
most of its 21-24 s; 15-17 s with one hash, run side by side on the 2-core
CPU.  The fast-mode projections' cost did not change.)

Why uniform is as good as Gaussian here: a rule off by ``d`` passes a
projection only if :math:`|\langle d, v\rangle| \le \tau`.  For ``v`` with
independent unit-variance uniform entries, the density of
:math:`\langle d, v\rangle / \lVert d\rVert` at 0 is at most
:math:`1/\sqrt6 \approx 0.41` (Ball's cube-slicing theorem: no central
hyperplane section of the unit cube exceeds :math:`\sqrt2` in volume), and
it is symmetric and unimodal, so
:math:`P(|\langle d, v\rangle| \le \tau) \le 0.82\,\tau / \lVert d\rVert`;
for a Gaussian ``v`` the bound is :math:`0.80\,\tau / \lVert d\rVert`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

_GOLDEN = 0x9E3779B9


def _mix(x):
  """MurmurHash3's 32-bit finaliser: every input bit flips ~half the output."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def uniform(seed, shape, dtype=jnp.float32, offset=0):
  """Unit-variance uniform array of ``shape`` and ``dtype`` (entries on
  ``[-sqrt(3), sqrt(3)]``) fixed by ``seed``, a uint32 scalar, traced or not.

  It holds elements ``offset, offset + 1, ...`` of the stream: the draw of
  ``(n, *shape)`` equals ``n`` draws of ``shape`` at offsets ``k * size``.
  Every step is exact in float32 but the final scaling (one rounding), so
  the same elements are bit-identical in any program on any backend.
  """
  size = int(np.prod(shape, dtype=np.int64))
  if size >= 2**32:
    raise ValueError(f'a draw of {size} elements exceeds the 32-bit counter')
  seed = jnp.asarray(seed, jnp.uint32)
  counter = lax.iota(jnp.uint32, size) + jnp.asarray(offset, jnp.uint32)
  bits = _mix(counter * jnp.uint32(_GOLDEN) + seed)
  # 23 random bits as the mantissa of a float in [1, 2): u in [0, 1).
  u = lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000),
                               jnp.float32) - 1.0
  v = jnp.float32(np.sqrt(3)) * (2 * u - 1 + 2.0**-23)
  return v.reshape(shape).astype(dtype)
