"""Hypothesis strategies that draw valid cases for ETP primitives.

Modelled on ``hypothesis.extra.numpy``: small named pieces, each drawing one
thing, composed into one strategy per built-in family.  A *case* is
``(operands, params)``: NumPy operands in the primitive's invar order and the
bind params, always valid for the primitive.

Sizes come from a few fixed values (``SIZES``), so generated examples share
shapes and the harness's jitted oracles are compiled once per shape, not once
per example.  Values are drawn from a seed (hypothesis shrinks the seed and
the shapes, not every element), with magnitudes in ``[0.25, 1.5]`` and a random
sign: away from zero, where relative errors blow up, and bounded, so finite
differences stay well conditioned.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from hypothesis import strategies as st

import etp
from etp_testing._src.errors import PREFIX

SIZES = (1, 2, 3, 5)


# ---------------------------------------------------------------- pieces
def dims(sizes=SIZES) -> st.SearchStrategy:
  """One dimension size from ``sizes`` (shrinks towards the first)."""
  return st.sampled_from(tuple(sizes))


def batch_sizes() -> st.SearchStrategy:
  """A batch size: 1 (the degenerate batch) or more."""
  return st.sampled_from((1, 2, 3))


def float_dtypes(allow_low_precision: bool = False) -> st.SearchStrategy:
  """``float32`` or ``float64``; with ``allow_low_precision``, also
  ``float16`` and ``bfloat16`` (judged by their own tolerances)."""
  names = ['float32', 'float64']
  if allow_low_precision:
    names += ['float16', 'bfloat16']
  return st.sampled_from(names)


def _np_dtype(name):
  import jax.numpy as jnp
  return np.dtype(jnp.dtype(name))


def arrays_of(shape, dtype) -> st.SearchStrategy:
  """An array of ``shape``/``dtype`` with magnitudes in ``[0.25, 1.5]`` and
  random signs, from a drawn seed."""
  def make(seed):
    rng = np.random.default_rng(seed)
    mag = rng.uniform(0.25, 1.5, size=shape)
    sign = rng.choice([-1.0, 1.0], size=shape)
    return (mag * sign).astype(_np_dtype(dtype))
  return st.integers(0, 2**32 - 1).map(make)


@st.composite
def sparse_patterns(draw, n_in: int, n_out: int) -> np.ndarray:
  """A duplicate-free ``(nnz, 2)`` int32 ``(row, col)`` pattern in an
  ``(n_in, n_out)`` matrix: any density from one entry to full, so empty rows
  and columns occur."""
  cells = n_in * n_out
  nnz = draw(st.integers(1, cells))
  seed = draw(st.integers(0, 2**32 - 1))
  flat = np.sort(np.random.default_rng(seed).choice(cells, nnz,
                                                    replace=False))
  return np.stack([flat // n_out, flat % n_out], axis=1).astype(np.int32)


LAYOUTS = {1: [None, ('NWC', 'WIO', 'NWC')],
           2: [None, ('NHWC', 'HWIO', 'NHWC')],
           3: [None, ('NDHWC', 'DHWIO', 'NDHWC')]}


@st.composite
def conv_configs(draw, max_spatial: int = 5) -> dict:
  """A convolution: 1 to 3 spatial dims, spatial sizes, window, strides,
  padding (SAME, VALID or explicit pairs), rhs dilation and a layout.  The
  window, once dilated, always fits the padded input."""
  n = draw(st.integers(1, 3))
  largest = max_spatial if n < 3 else 3   # 3-D stays small
  spatial = tuple(draw(st.sampled_from((3, largest))) for _ in range(n))
  window = tuple(draw(st.sampled_from((1, 2, 3))) for _ in range(n))
  dilation = tuple(draw(st.sampled_from((1, 2))) if w > 1 else 1
                   for w in window)
  strides = tuple(draw(st.sampled_from((1, 2))) for _ in range(n))
  padding = draw(st.sampled_from(('SAME', 'VALID', 'explicit')))
  pads = ((0, 0),) * n
  if padding == 'explicit':
    padding = tuple((draw(st.integers(0, 1)), draw(st.integers(0, 1)))
                    for _ in range(n))
    pads = padding
  # The dilated window must fit the padded input (SAME always fits).
  if padding != 'SAME':
    spatial = tuple(max(s, (w - 1) * d + 1 - lo - hi)
                    for s, w, d, (lo, hi) in zip(spatial, window, dilation,
                                                 pads))
  return dict(n=n, spatial=spatial, window=window, window_strides=strides,
              padding=padding, rhs_dilation=dilation,
              dimension_numbers=draw(st.sampled_from(LAYOUTS[n])))


def lora_ranks() -> st.SearchStrategy:
  """A LoRA rank: 1 (the smallest) to 3."""
  return st.sampled_from((1, 2, 3))


def _batched_choice(batched: Optional[bool]):
  return st.booleans() if batched is None else st.just(batched)


# -------------------------------------------------------------- families
@st.composite
def elemwise_cases(draw):
  """``etp_elemwise_p``: one weight of rank 0 to 2."""
  dtype = draw(float_dtypes())
  shape = tuple(draw(dims()) for _ in range(draw(st.integers(0, 2))))
  return (draw(arrays_of(shape, dtype)),), {}


@st.composite
def dense_cases(draw, batched: Optional[bool] = None):
  """``etp_mv_p``/``etp_mm_p``: ``x``, an ``(in, out)`` weight, maybe a bias."""
  dtype = draw(float_dtypes())
  is_batched = draw(_batched_choice(batched))
  n_in, n_out = draw(dims()), draw(dims())
  lead = (draw(batch_sizes()),) if is_batched else ()
  has_bias = draw(st.booleans())
  ops = [draw(arrays_of(lead + (n_in,), dtype)),
         draw(arrays_of((n_in, n_out), dtype))]
  if has_bias:
    ops.append(draw(arrays_of((n_out,), dtype)))
  return tuple(ops), {'has_bias': has_bias}


@st.composite
def sparse_cases(draw, batched: Optional[bool] = None):
  """``etp_sp_mv_p``/``etp_sp_mm_p``: ``x``, stored values, a pattern."""
  dtype = draw(float_dtypes())
  is_batched = draw(_batched_choice(batched))
  n_in, n_out = draw(dims()), draw(dims())
  indices = draw(sparse_patterns(n_in, n_out))
  lead = (draw(batch_sizes()),) if is_batched else ()
  has_bias = draw(st.booleans())
  ops = [draw(arrays_of(lead + (n_in,), dtype)),
         draw(arrays_of((len(indices),), dtype)), indices]
  if has_bias:
    ops.append(draw(arrays_of((n_out,), dtype)))
  return tuple(ops), {'shape': (n_in, n_out), 'has_bias': has_bias}


@st.composite
def conv_cases(draw):
  """``etp_conv_p``: a batched 1-D/2-D/3-D convolution (see ``conv_configs``)."""
  dtype = draw(float_dtypes())
  cfg = draw(conv_configs())
  batch = draw(st.sampled_from((1, 2)))
  c_in, c_out = draw(st.sampled_from((1, 2))), draw(st.sampled_from((1, 2)))
  dn = cfg['dimension_numbers']
  if dn is None:
    x_shape = (batch, c_in) + cfg['spatial']
    k_shape = (c_out, c_in) + cfg['window']
  else:
    x_shape = (batch,) + cfg['spatial'] + (c_in,)
    k_shape = cfg['window'] + (c_in, c_out)
  has_bias = draw(st.booleans())
  ops = [draw(arrays_of(x_shape, dtype)), draw(arrays_of(k_shape, dtype))]
  if has_bias:
    ops.append(draw(arrays_of((c_out,), dtype)))
  params = {k: cfg[k] for k in ('window_strides', 'padding', 'rhs_dilation',
                                'dimension_numbers')}
  params['has_bias'] = has_bias
  return tuple(ops), params


@st.composite
def lora_cases(draw, batched: Optional[bool] = None):
  """``etp_lora_mv_p``/``etp_lora_mm_p``: ``x``, ``B (in, rank)``,
  ``A (rank, out)``, maybe a bias, and ``alpha`` away from 1 (so a missing
  ``alpha`` shows)."""
  dtype = draw(float_dtypes())
  is_batched = draw(_batched_choice(batched))
  n_in, n_out, rank = draw(dims()), draw(dims()), draw(lora_ranks())
  lead = (draw(batch_sizes()),) if is_batched else ()
  has_bias = draw(st.booleans())
  ops = [draw(arrays_of(lead + (n_in,), dtype)),
         draw(arrays_of((n_in, rank), dtype)),
         draw(arrays_of((rank, n_out), dtype))]
  if has_bias:
    ops.append(draw(arrays_of((n_out,), dtype)))
  return tuple(ops), {'alpha': draw(st.sampled_from((0.5, 2.0))),
                      'has_bias': has_bias}


# --------------------------------------------------------------- registry
_STRATEGIES: dict = {}


def register_strategy(primitive, strategy: st.SearchStrategy) -> None:
  """Makes ``strategy`` (drawing ``(operands, params)``) the generator of
  cases for ``primitive``; registering again replaces the previous one."""
  if not etp.is_etp_primitive(primitive):
    raise TypeError(f'{PREFIX}{primitive!r} is not an ETP primitive')
  if not isinstance(strategy, st.SearchStrategy):
    raise TypeError(f'{PREFIX}register_strategy needs a hypothesis strategy '
                    f'drawing (operands, params), got {type(strategy).__name__}')
  _STRATEGIES[primitive] = strategy


def strategy_for(primitive) -> Optional[st.SearchStrategy]:
  """The registered strategy of ``primitive``, or ``None``."""
  return _STRATEGIES.get(primitive)


def registered_primitives() -> tuple:
  """Primitives with a strategy, in ``etp.primitives()`` order."""
  return tuple(p for p in etp.primitives() if p in _STRATEGIES)


for _prim, _strategy in (
    (etp.etp_elemwise_p, elemwise_cases()),
    (etp.etp_mv_p, dense_cases(batched=False)),
    (etp.etp_mm_p, dense_cases(batched=True)),
    (etp.etp_sp_mv_p, sparse_cases(batched=False)),
    (etp.etp_sp_mm_p, sparse_cases(batched=True)),
    (etp.etp_conv_p, conv_cases()),
    (etp.etp_lora_mv_p, lora_cases(batched=False)),
    (etp.etp_lora_mm_p, lora_cases(batched=True))):
  register_strategy(_prim, _strategy)
