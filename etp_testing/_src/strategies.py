"""Hypothesis strategies that draw valid cases for ETP primitives.

Modelled on ``hypothesis.extra.numpy``: small named pieces, each drawing one
thing, composed into one strategy per built-in family.  A *case* is
``(operands, params)``: a tuple of NumPy operands in the primitive's invar
order and the dict of bind params.  Every draw is valid for its primitive
(``primitive.bind(*operands, **params)`` does not raise).

Two concerns shape the pieces:

* **Compile reuse.**  Every new operand shape makes the harness's jitted
  oracles compile again, which costs far more than running them.  Sizes are
  therefore drawn from a few fixed buckets (:data:`DIM_BUCKETS`; 1, 2, 3
  for matrix dimensions and 1, 2 for batches by default, sparse densities in
  quarters), so examples share shapes.  ``max_dim``-like knobs widen
  the buckets for larger cases.
* **Well-conditioned numbers.**  The harness compares rules with JAX's
  autodiff (exact up to rounding) and with central finite differences
  (truncation plus cancellation error).  Values are drawn with magnitudes in
  ``[0.25, 1.5]`` and a random sign (see :func:`arrays_of`): bounded away
  from zero (relative errors, and the kinks of ``abs``/``relu``-like
  functions at 0, live there) and bounded above (products of three factors,
  as in LoRA, stay O(1); float16 does not overflow; the finite-difference
  step stays small against every value).  Values come from a drawn seed, so
  hypothesis shrinks the seed and the shapes, not each element.

Shrinking goes towards the first choice of every piece: dimension 1, batch 2
(see :func:`batch_sizes`), float32 (one dtype for ``x`` and the weights), no
bias, a single stored sparse value, a 1-D convolution with a window of 1,
stride 1 and ``'VALID'`` padding.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from hypothesis import strategies as st

import etp
from etp_testing._src.errors import PREFIX

# Sizes a dimension may take.  Few values, so shapes repeat across examples
# and jit caches are reused; 1 is first, so failures shrink to it.
DIM_BUCKETS = (1, 2, 3, 5, 8, 16, 32, 64, 128, 256, 512, 1024)
MAX_DIM = 3             # default largest matrix dimension: buckets 1, 2, 3
MAX_BATCH = 2           # default largest batch: buckets 1, 2
MAX_SPATIAL = 5         # default largest conv spatial size (1-D and 2-D)
MAX_SPATIAL_3D = 3      # ... and for 3-D convolutions
MAX_CHANNELS = 3        # default largest conv channel count
MAX_RANK = 2            # default largest LoRA rank
SIZES = tuple(b for b in DIM_BUCKETS if b <= MAX_DIM)   # (1, 2, 3)

# Magnitudes of drawn values (see arrays_of).
MIN_MAGNITUDE = 0.25
MAX_MAGNITUDE = 1.5

_SEEDS = st.integers(0, 2**32 - 1)


# ---------------------------------------------------------------- pieces
def dims(min_dim: int = 1, max_dim: int = MAX_DIM) -> st.SearchStrategy:
  """One dimension size: a bucket of :data:`DIM_BUCKETS` in
  ``[min_dim, max_dim]``, or ``max_dim`` itself (a knob raised to 4 draws
  4, not only the buckets 1, 2 and 3 below it).

  Shrinks towards the smallest.  Drawing from buckets instead of every integer
  keeps the number of distinct shapes, hence of compilations, small.
  """
  if min_dim < 0 or max_dim < min_dim:
    raise ValueError(f'{PREFIX}dims needs 0 <= min_dim <= max_dim, got '
                     f'{min_dim}, {max_dim}')
  return st.sampled_from(_buckets(min_dim, max_dim))


def _buckets(min_dim: int, max_dim: int) -> list:
  """The buckets of :data:`DIM_BUCKETS` in ``[min_dim, max_dim]`` and
  ``max_dim`` itself, smallest first (``max_dim`` is one more shape, not a
  new one per draw)."""
  inside = [b for b in DIM_BUCKETS if min_dim <= b <= max_dim]
  return inside + ([max_dim] if max_dim not in inside else [])


def batch_sizes(max_batch: int = MAX_BATCH) -> st.SearchStrategy:
  """A batch size from 1 (the degenerate batch, where a missing sum over the
  batch cannot show) to ``max_batch`` (where it does), in buckets.

  Shrinks towards 2, not 1: hypothesis's first example is the one every
  piece shrinks to, and a battery of a few examples whose first has a batch
  of one missed a mean taken instead of a sum over the batch in 4 of 12
  seeds (mutant ``dense_batch_mean``, 3 examples).  A failure that needs a
  batch of one still shrinks to it."""
  # A stable sort: 2 first, the rest in their order.
  return st.sampled_from(sorted(_buckets(1, max_batch), key=lambda b: b != 2))


def float_dtypes(allow_low_precision: bool = False) -> st.SearchStrategy:
  """A dtype name: ``'float32'`` or ``'float64'``; with
  ``allow_low_precision``, also ``'float16'`` and ``'bfloat16'`` (judged by
  their own, looser tolerances; ``drtrl.exact``, ``drtrl.instant`` and
  ``pp.exact`` run them on float32 copies).  Shrinks towards
  ``'float32'``."""
  names = ['float32', 'float64']
  if allow_low_precision:
    names += ['float16', 'bfloat16']
  return st.sampled_from(names)


def _dtype_strategy(dtypes) -> st.SearchStrategy:
  """``None`` -> :func:`float_dtypes`; a name -> that; names -> one of them;
  a strategy -> itself."""
  if dtypes is None:
    return float_dtypes()
  if isinstance(dtypes, st.SearchStrategy):
    return dtypes
  if isinstance(dtypes, str) or not isinstance(dtypes, (list, tuple)):
    return st.just(np_dtype(dtypes).name)
  return st.sampled_from([np_dtype(d).name for d in dtypes])


@st.composite
def operand_dtypes(draw, dtypes=None, *, mixed: bool = True):
  """``(x_dtype, weight_dtype)``, two dtype names.  The weights' dtype is
  drawn from ``dtypes`` (``None``: :func:`float_dtypes`; a name; names; or a
  strategy); ``x``'s is the same, or with ``mixed`` one time in three drawn
  from ``dtypes`` afresh (mixed precision, which a rule must handle as the
  contract says: traces in ``result_type`` of the operands, gradients in
  each weight's dtype).  Shrinks towards one dtype for both."""
  names = _dtype_strategy(dtypes)
  weight_dtype = draw(names)
  if mixed and draw(st.sampled_from((False, False, True))):
    return draw(names), weight_dtype
  return weight_dtype, weight_dtype


def np_dtype(dtype) -> np.dtype:
  """A dtype name (or dtype) as a NumPy dtype, ``bfloat16`` included."""
  import jax.numpy as jnp  # ml_dtypes' bfloat16 comes through jnp
  return np.dtype(jnp.dtype(dtype))


def _bias_choice(bias: Optional[bool]) -> st.SearchStrategy:
  return st.booleans() if bias is None else st.just(bool(bias))


def _batched_choice(batched: Optional[bool]) -> st.SearchStrategy:
  return st.booleans() if batched is None else st.just(bool(batched))


def arrays_of(shape, dtype, *, min_magnitude: float = MIN_MAGNITUDE,
              max_magnitude: float = MAX_MAGNITUDE) -> st.SearchStrategy:
  """A NumPy array of ``shape`` and ``dtype`` with magnitudes uniform in
  ``[min_magnitude, max_magnitude]`` and a random sign per element.

  Avoids: zeros and tiny values (relative errors there are meaningless, and
  ``abs``/``relu``/``sign``-like functions have their kink at 0, where a
  finite difference straddles it); huge values (overflow in low precision,
  and finite-difference cancellation grows with the magnitude).  The values
  come from one drawn seed: hypothesis shrinks the seed, not each element.
  """
  shape = tuple(int(s) for s in shape)
  dt = np_dtype(dtype)

  def make(seed):
    rng = np.random.default_rng(seed)
    mag = rng.uniform(min_magnitude, max_magnitude, size=shape)
    sign = rng.choice(np.array([-1.0, 1.0]), size=shape)
    return np.asarray(mag * sign).astype(dt)
  return _SEEDS.map(make)


def nnz_buckets(cells: int, lo: int = 1, hi: Optional[int] = None) -> tuple:
  """Stored-value counts for a matrix of ``cells`` cells: one entry, about a
  quarter, half and three quarters of the cells, and every cell (within
  ``[lo, hi]``), so densities span the range with few distinct shapes."""
  hi = cells if hi is None else min(hi, cells)
  picks = {1, -(-cells // 4), -(-cells // 2), -(-3 * cells // 4), cells}
  return tuple(sorted(n for n in picks if lo <= n <= hi)) or (lo,)


@st.composite
def sparse_patterns(draw, n_in: int, n_out: int, *, min_nnz: int = 1,
                    max_nnz: Optional[int] = None,
                    bucketed: bool = True) -> np.ndarray:
  """A duplicate-free ``(nnz, 2)`` int32 array of ``(row, col)`` pairs inside
  an ``(n_in, n_out)`` matrix, ``min_nnz <= nnz <= max_nnz`` (default: every
  cell), the cells chosen uniformly at random.

  Any density from a single entry to full (``nnz`` from :func:`nnz_buckets`,
  or any count with ``bucketed=False``), so rows and columns with no entry
  occur often (they must get zero gradients and be left alone by the trace
  rules).  The pairs come sorted (row-major) or in a random order, since BCOO
  does not require sorted indices and a rule must not assume it.  Shrinks
  towards one sorted entry.
  """
  cells = n_in * n_out
  hi = cells if max_nnz is None else min(max_nnz, cells)
  lo = max(1, min_nnz)
  if lo > hi:
    raise ValueError(f'{PREFIX}sparse_patterns: no pattern with nnz in '
                     f'[{lo}, {hi}] fits ({n_in}, {n_out})')
  nnz = draw(st.sampled_from(nnz_buckets(cells, lo, hi)) if bucketed
             else st.integers(lo, hi))
  rng = np.random.default_rng(draw(_SEEDS))
  flat = np.sort(rng.choice(cells, nnz, replace=False))
  if draw(st.booleans()):      # shuffled
    flat = rng.permutation(flat)
  return np.stack([flat // n_out, flat % n_out], axis=1).astype(np.int32)


_SPATIAL_LETTERS = {1: 'W', 2: 'HW', 3: 'DHW'}


def conv_layouts(n_spatial: int) -> st.SearchStrategy:
  """``dimension_numbers`` for ``n_spatial`` spatial dims: ``None`` (lax's
  ``NC...``/``OI...``), channels-last (``NHWC``/``HWIO``/``NHWC``), or mixed
  (``NCHW`` input, ``HWIO`` kernel, ``NHWC`` output, so the output feature
  axis moves).  The batch axis always leads the input and the output."""
  s = _SPATIAL_LETTERS[n_spatial]
  return st.sampled_from([None, ('N' + s + 'C', s + 'IO', 'N' + s + 'C'),
                          ('NC' + s, s + 'IO', 'N' + s + 'C')])


@st.composite
def conv_configs(draw, n_spatial: Optional[int] = None, *,
                 max_spatial: int = MAX_SPATIAL,
                 max_spatial_3d: int = MAX_SPATIAL_3D) -> dict:
  """A convolution's geometry, as a dict: ``n`` (1 to 3 spatial dims, or
  ``n_spatial``), ``spatial`` (input sizes), ``window``, ``window_strides``
  (1 or 2), ``padding`` (``'VALID'``, ``'SAME'``, ``'SAME_LOWER'`` or
  explicit ``(low, high)`` pairs in 0..2, asymmetric included),
  ``rhs_dilation`` (1 or 2 where the window is wider than 1) and
  ``dimension_numbers`` (see :func:`conv_layouts`).

  Always valid: the dilated window fits the padded input, so every output
  spatial size is at least 1.  Spatial sizes are buckets (1, 2, 3, 5) no
  larger than ``max_spatial`` (``max_spatial_3d`` for 3-D, whose traces grow
  with the cube).  Shrinks towards a 1-D, window-1, stride-1, VALID, default
  layout convolution.
  """
  n = draw(st.integers(1, 3)) if n_spatial is None else int(n_spatial)
  if n not in (1, 2, 3):
    raise ValueError(f'{PREFIX}conv_configs: n_spatial must be 1, 2 or 3, '
                     f'got {n_spatial!r}')
  largest = max_spatial if n < 3 else min(max_spatial, max_spatial_3d)
  window, dilation = [], []
  for _ in range(n):
    w = draw(st.sampled_from([w for w in (1, 2, 3) if w <= largest] or [1]))
    d = draw(st.sampled_from([d for d in (1, 2) if (w - 1) * d + 1 <= largest]
                             if w > 1 else [1]))
    window.append(w)
    dilation.append(d)
  strides = tuple(draw(st.sampled_from((1, 2))) for _ in range(n))
  kind = draw(st.sampled_from(('VALID', 'SAME', 'SAME_LOWER', 'explicit')))
  if kind == 'explicit':
    padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2)))
                    for _ in range(n))
  else:
    padding = kind
  spatial = []
  for i in range(n):
    needed = 1
    if kind == 'VALID':
      needed = (window[i] - 1) * dilation[i] + 1
    elif kind == 'explicit':
      needed = max(1, (window[i] - 1) * dilation[i] + 1 - sum(padding[i]))
    spatial.append(draw(dims(needed, max(needed, largest))))
  return dict(n=n, spatial=tuple(spatial), window=tuple(window),
              window_strides=strides, padding=padding,
              rhs_dilation=tuple(dilation),
              dimension_numbers=draw(conv_layouts(n)))


def lora_ranks(max_rank: int = MAX_RANK) -> st.SearchStrategy:
  """A LoRA rank from 1 (a rank-one update) to ``max_rank``, in buckets.
  The rank is drawn independently of ``in``/``out``, so it may exceed them."""
  return dims(1, max_rank)


# -------------------------------------------------------------- families
@st.composite
def elemwise_cases(draw, *, max_dim: int = MAX_DIM, max_ndim: int = 2,
                   dtypes=None):
  """``etp_elemwise_p``: ``((weight,), {})`` with ``weight`` of rank 0 to
  ``max_ndim`` (scalar, vector, non-square matrix, 1-element arrays)."""
  dtype = draw(_dtype_strategy(dtypes))
  ndim = draw(st.integers(0, max_ndim))
  shape = tuple(draw(dims(1, max_dim)) for _ in range(ndim))
  return (draw(arrays_of(shape, dtype)),), {}


@st.composite
def dense_cases(draw, batched: Optional[bool] = None, *,
                max_dim: int = MAX_DIM, max_batch: int = MAX_BATCH,
                dtypes=None, bias: Optional[bool] = None,
                mixed: bool = True):
  """``etp_mv_p`` (``batched=False``) / ``etp_mm_p`` (``True``; ``None``
  draws either): ``((x, weight[, bias]), {'has_bias': ...})`` with ``x`` of
  shape ``(in,)`` or ``(batch, in)``, ``weight (in, out)`` and ``bias
  (out,)``; ``in`` and ``out`` independent (square or not, 1 included).
  Dtypes from :func:`operand_dtypes` (``x``'s may differ from the weights')."""
  x_dtype, dtype = draw(operand_dtypes(dtypes, mixed=mixed))
  is_batched = draw(_batched_choice(batched))
  n_in, n_out = draw(dims(1, max_dim)), draw(dims(1, max_dim))
  lead = (draw(batch_sizes(max_batch)),) if is_batched else ()
  has_bias = draw(_bias_choice(bias))
  ops = [draw(arrays_of(lead + (n_in,), x_dtype)),
         draw(arrays_of((n_in, n_out), dtype))]
  if has_bias:
    ops.append(draw(arrays_of((n_out,), dtype)))
  return tuple(ops), {'has_bias': has_bias}


@st.composite
def sparse_cases(draw, batched: Optional[bool] = None, *,
                 max_dim: int = MAX_DIM, max_batch: int = MAX_BATCH,
                 dtypes=None, bias: Optional[bool] = None,
                 mixed: bool = True):
  """``etp_sp_mv_p`` / ``etp_sp_mm_p``: ``((x, data, indices[, bias]),
  {'shape': (in, out), 'has_bias': ...})`` with ``x`` ``(in,)`` or ``(batch,
  in)``, ``data (nnz,)``, ``indices`` an int32 ``(nnz, 2)`` pattern from
  :func:`sparse_patterns` (empty rows and columns included) and ``bias
  (out,)``; dtypes from :func:`operand_dtypes`."""
  x_dtype, dtype = draw(operand_dtypes(dtypes, mixed=mixed))
  is_batched = draw(_batched_choice(batched))
  n_in, n_out = draw(dims(1, max_dim)), draw(dims(1, max_dim))
  indices = draw(sparse_patterns(n_in, n_out))
  lead = (draw(batch_sizes(max_batch)),) if is_batched else ()
  has_bias = draw(_bias_choice(bias))
  ops = [draw(arrays_of(lead + (n_in,), x_dtype)),
         draw(arrays_of((len(indices),), dtype)), indices]
  if has_bias:
    ops.append(draw(arrays_of((n_out,), dtype)))
  return tuple(ops), {'shape': (n_in, n_out), 'has_bias': has_bias}


@st.composite
def conv_cases(draw, *, n_spatial: Optional[int] = None,
               max_spatial: int = MAX_SPATIAL,
               max_spatial_3d: int = MAX_SPATIAL_3D,
               max_channels: int = MAX_CHANNELS, max_batch: int = MAX_BATCH,
               dtypes=None, bias: Optional[bool] = None,
               mixed: bool = True):
  """``etp_conv_p``: ``((x, kernel[, bias]), params)`` for a batched 1-D/2-D/
  3-D convolution (geometry from :func:`conv_configs`), ``C_in`` and
  ``C_out`` independent in 1..``max_channels``, batch 1..``max_batch``.
  ``x`` is ``(batch, C_in, *spatial)`` and ``kernel`` ``(C_out, C_in,
  *window)`` in the default layout, or as ``dimension_numbers`` say; ``bias``
  is ``(C_out,)``.  Params: ``window_strides``, ``padding``,
  ``rhs_dilation``, ``dimension_numbers``, ``has_bias`` (all hashable).
  Dtypes from :func:`operand_dtypes`."""
  x_dtype, dtype = draw(operand_dtypes(dtypes, mixed=mixed))
  cfg = draw(conv_configs(n_spatial, max_spatial=max_spatial,
                          max_spatial_3d=max_spatial_3d))
  batch = draw(batch_sizes(max_batch))
  c_in = draw(dims(1, max_channels))
  c_out = draw(dims(1, max_channels))
  x_shape = _layout_shape(cfg['dimension_numbers'], 0, cfg['n'],
                          {'N': batch, 'C': c_in}, cfg['spatial'])
  k_shape = _layout_shape(cfg['dimension_numbers'], 1, cfg['n'],
                          {'O': c_out, 'I': c_in}, cfg['window'])
  has_bias = draw(_bias_choice(bias))
  ops = [draw(arrays_of(x_shape, x_dtype)), draw(arrays_of(k_shape, dtype))]
  if has_bias:
    ops.append(draw(arrays_of((c_out,), dtype)))
  params = {k: cfg[k] for k in ('window_strides', 'padding', 'rhs_dilation',
                                'dimension_numbers')}
  params['has_bias'] = has_bias
  return tuple(ops), params


def _layout_shape(dimension_numbers, which: int, n: int, named: dict,
                  spatial: tuple) -> tuple:
  """The shape of operand ``which`` (0: input, 1: kernel) in its layout."""
  if dimension_numbers is None:
    return tuple(named[c] for c in ('NC' if which == 0 else 'OI')) + spatial
  letters = _SPATIAL_LETTERS[n]
  sizes = dict(named, **dict(zip(letters, spatial)))
  return tuple(sizes[c] for c in dimension_numbers[which])


@st.composite
def lora_cases(draw, batched: Optional[bool] = None, *,
               max_dim: int = MAX_DIM, max_batch: int = MAX_BATCH,
               max_rank: int = MAX_RANK, dtypes=None,
               bias: Optional[bool] = None, alphas=(2.0,),
               mixed: bool = True):
  """``etp_lora_mv_p`` / ``etp_lora_mm_p``: ``((x, lora_b, lora_a[, bias]),
  {'alpha': ..., 'has_bias': ...})`` with ``x`` ``(in,)`` or ``(batch, in)``,
  ``lora_b (in, rank)``, ``lora_a (rank, out)``, ``bias (out,)``.

  ``alpha`` is drawn from ``alphas``; the default, 2, is away from 1 (a rule
  that forgets ``alpha``, or applies it twice or inverted, shows) and from 0
  (every gradient would vanish).  One value by default, since ``alpha`` is a
  static param and each value compiles anew.  Dtypes from
  :func:`operand_dtypes`."""
  x_dtype, dtype = draw(operand_dtypes(dtypes, mixed=mixed))
  is_batched = draw(_batched_choice(batched))
  n_in, n_out = draw(dims(1, max_dim)), draw(dims(1, max_dim))
  rank = draw(lora_ranks(max_rank))
  lead = (draw(batch_sizes(max_batch)),) if is_batched else ()
  has_bias = draw(_bias_choice(bias))
  ops = [draw(arrays_of(lead + (n_in,), x_dtype)),
         draw(arrays_of((n_in, rank), dtype)),
         draw(arrays_of((rank, n_out), dtype))]
  if has_bias:
    ops.append(draw(arrays_of((n_out,), dtype)))
  return tuple(ops), {'alpha': float(draw(st.sampled_from(tuple(alphas)))),
                      'has_bias': has_bias}


# ----------------------------------------------------------- rich cases
# The shapes of the built-ins' rich cases: every axis a different size, each
# at least 2, batch 3 and an output of 5 (sizes the default draws, at most
# 3 and batches of 1 or 2, never reach).
RICH_BATCH, RICH_IN, RICH_OUT, RICH_RANK = 3, 4, 5, 2


def _rich_values(shape, dtype, seed: int) -> np.ndarray:
  """Values as :func:`arrays_of` draws them, from a fixed seed."""
  rng = np.random.default_rng(seed)
  mag = rng.uniform(MIN_MAGNITUDE, MAX_MAGNITUDE, size=shape)
  sign = rng.choice(np.array([-1.0, 1.0]), size=shape)
  return np.asarray(mag * sign).astype(np_dtype(dtype))


def _rich_elemwise(_):
  return (_rich_values((RICH_IN, RICH_OUT), 'float32', 0),), {}


def _rich_dense(batched):
  lead = (RICH_BATCH,) if batched else ()
  return ((_rich_values(lead + (RICH_IN,), 'float32', 1),
           _rich_values((RICH_IN, RICH_OUT), 'float32', 2),
           _rich_values((RICH_OUT,), 'float32', 3)), {'has_bias': True})


def _rich_sparse(batched):
  lead = (RICH_BATCH,) if batched else ()
  # Half the cells, in a shuffled order; row 0 and column 0 left empty, so
  # rules meet rows and columns without an entry.
  rng = np.random.default_rng(4)
  cells = [(i, j) for i in range(1, RICH_IN) for j in range(1, RICH_OUT)]
  picked = rng.permutation(len(cells))[:RICH_IN * RICH_OUT // 2]
  indices = np.array([cells[k] for k in picked], np.int32)
  return ((_rich_values(lead + (RICH_IN,), 'float32', 5),
           _rich_values((len(indices),), 'float32', 6), indices,
           _rich_values((RICH_OUT,), 'float32', 7)),
          {'shape': (RICH_IN, RICH_OUT), 'has_bias': True})


def _rich_conv(_):
  # 2-D, channels first (the bias on axis 1, not the last), C_in != C_out,
  # a non-square window dilated along one axis, strides 2 and 1, and
  # asymmetric explicit padding; the output, (3, 4, 6, 7), has no two axes
  # of one size.
  c_in, c_out, spatial, window = 2, 4, (12, 8), (3, 2)
  return ((_rich_values((RICH_BATCH, c_in) + spatial, 'float32', 8),
           _rich_values((c_out, c_in) + window, 'float32', 9),
           _rich_values((c_out,), 'float32', 10)),
          {'window_strides': (2, 1), 'padding': ((1, 0), (0, 1)),
           'rhs_dilation': (1, 2), 'dimension_numbers': None,
           'has_bias': True})


def _rich_lora(batched):
  lead = (RICH_BATCH,) if batched else ()
  return ((_rich_values(lead + (RICH_IN,), 'float32', 11),
           _rich_values((RICH_IN, RICH_RANK), 'float32', 12),
           _rich_values((RICH_RANK, RICH_OUT), 'float32', 13),
           _rich_values((RICH_OUT,), 'float32', 14)),
          {'alpha': 2.0, 'has_bias': True})


_RICH_CASES = {
    'etp_elemwise_p': (_rich_elemwise, None),
    'etp_mv_p': (_rich_dense, False), 'etp_mm_p': (_rich_dense, True),
    'etp_sp_mv_p': (_rich_sparse, False), 'etp_sp_mm_p': (_rich_sparse, True),
    'etp_conv_p': (_rich_conv, None),
    'etp_lora_mv_p': (_rich_lora, False),
    'etp_lora_mm_p': (_rich_lora, True),
}


def rich_case(primitive) -> Optional[tuple]:
  """A built-in's *rich case*, ``(operands, params)``: float32, every
  optional operand present (the bias), every axis at least 2 and no two
  the same size, a batch of 3, an output of 5 (above the default draws'
  sizes), a sparse pattern with empty rows and columns, a 2-D
  channels-first convolution with ``C_in != C_out``, strides, dilation and
  asymmetric padding, and a LoRA rank below ``in`` and ``out``.  ``None``
  for any other primitive.

  Every run checks it first (see :func:`fixed_cases_for`): three drawn
  examples missed the bias of five families out of eight for seed 0, and
  never drew a batch above 2 or a size above 3, so rules wrong only there
  (a bias gradient averaged over the batch, a kernel gradient reshaped
  instead of transposed, a sum of the first two examples) passed the
  default run.
  """
  for name, (build, arg) in _RICH_CASES.items():
    if getattr(etp, name, None) is primitive:
      return build(arg)
  return None


# --------------------------------------------------------------- registry
_STRATEGIES: dict = {}
_FIXED: dict = {}


def register_strategy(primitive, strategy: st.SearchStrategy, *,
                      fixed_cases=()) -> None:
  """Makes ``strategy`` the generator of cases for ``primitive``.

  ``strategy`` must draw ``(operands, params)``: a tuple of concrete arrays in
  the primitive's invar order and the dict of bind params, valid for
  ``primitive.bind``.  ``fixed_cases``: cases of the same form that every
  run checks first, before the drawn ones and counted among its examples
  (a run of 3 examples checks one fixed case and draws 2): the case where
  every optional operand and unusual shape is present, which a few random
  draws may miss.  Registering a primitive again replaces its previous
  strategy and fixed cases (this is how a built-in's default is swapped for
  a custom one; there is no stacking: pass ``fixed_cases=
  [rich_case(prim)]`` to keep a built-in's).  ``check_with_hypothesis``,
  the pytest plugin and the CLI use the registered strategy.
  """
  if not etp.is_etp_primitive(primitive):
    raise TypeError(f'{PREFIX}register_strategy: {primitive!r} is not an ETP '
                    'primitive (create it with etp.register_primitive)')
  if not isinstance(strategy, st.SearchStrategy):
    raise TypeError(f'{PREFIX}register_strategy needs a hypothesis strategy '
                    f'drawing (operands, params), got '
                    f'{type(strategy).__name__}')
  _STRATEGIES[primitive] = strategy
  _FIXED[primitive] = tuple(fixed_cases)


def strategy_for(primitive) -> Optional[st.SearchStrategy]:
  """The strategy registered for ``primitive``, or ``None``."""
  return _STRATEGIES.get(primitive)


def fixed_cases_for(primitive) -> tuple:
  """The fixed cases registered with ``primitive``'s strategy (for a
  built-in, its :func:`rich_case`), checked first by every run of the
  registered strategy; ``()`` for none."""
  return _FIXED.get(primitive, ())


def registered_primitives() -> tuple:
  """Primitives with a strategy, in ``etp.primitives()`` order."""
  return tuple(p for p in etp.primitives() if p in _STRATEGIES)


# Each built-in's family of cases, and the arguments that pick it.
_BUILTIN_FAMILIES = {
    'etp_elemwise_p': (elemwise_cases, {}),
    'etp_mv_p': (dense_cases, {'batched': False}),
    'etp_mm_p': (dense_cases, {'batched': True}),
    'etp_sp_mv_p': (sparse_cases, {'batched': False}),
    'etp_sp_mm_p': (sparse_cases, {'batched': True}),
    'etp_conv_p': (conv_cases, {}),
    'etp_lora_mv_p': (lora_cases, {'batched': False}),
    'etp_lora_mm_p': (lora_cases, {'batched': True}),
}


def builtin_strategy(primitive, dtypes=None) -> Optional[st.SearchStrategy]:
  """The default strategy of a built-in primitive, drawing ``dtypes`` (as
  the families take them: ``None`` for float32 and float64, a name, names,
  or a strategy; ``'float16'`` and ``'bfloat16'`` included; with several,
  ``x`` is now and then in another than the weights, see
  :func:`operand_dtypes`); ``None`` for any other primitive."""
  if dtypes is None and primitive in _DEFAULTS:
    return _DEFAULTS[primitive]   # the very one registered
  for name, (family, kwargs) in _BUILTIN_FAMILIES.items():
    if getattr(etp, name, None) is primitive:
      return family(**kwargs, dtypes=dtypes)
  return None


_DEFAULTS: dict = {}


def _register_builtins() -> None:
  for name in _BUILTIN_FAMILIES:
    prim = getattr(etp, name, None)   # a family may not be written yet
    if prim is not None:
      _DEFAULTS[prim] = builtin_strategy(prim)
      register_strategy(prim, _DEFAULTS[prim], fixed_cases=[rich_case(prim)])


_register_builtins()
