"""What every check gets: the case under test and the means to judge it.

A :class:`CheckContext` holds one concrete case (a primitive, its operands and
params), draws every other input a check needs from the seed, calls rules so
that a raising or malformed rule becomes a :class:`RuleFailure` naming the rule
and key, and compares results against oracles (recording a :class:`Finding`
per comparison, with chex doing the closeness test).
"""

from __future__ import annotations

import contextlib
import functools
import math
import zlib
from typing import Any, Mapping, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

import etp
from etp._src.arrays import to_jax
from etp_testing._src import compilations, executor, tolerances
from etp_testing._src.differences import (abs_max, cosine,
                                          max_errors_and_scale, ratio,
                                          rms_or_one)
from etp_testing._src.errors import (CheckSkipped, RuleFailure, raised,
                                     returned_kind)
from etp_testing._src.report import Finding

# Above this many Jacobian entries (output size x weight size), fast mode is
# chosen automatically: random projections instead of full Jacobians.
FAST_MODE_THRESHOLD = 1_000_000
# In fast mode, a check that builds whole traces (yw_to_w.linear and .vmap,
# init.drtrl, drtrl.exact and .instant) runs on the case as given only if the
# traces it holds at once fit in this many bytes; otherwise on a batch of one,
# then with a single n_state, and it is skipped, saying so, when even that
# does not fit: what these checks verify does not depend on the size, and the
# generated small cases check it.  3.25 GiB keeps a large layer's check under
# issue 6's 4 GiB peak (see CheckContext.for_traces).
FAST_TRACE_BYTES = int(3.25 * 2**30)
# Above this many elements, compare judges from differences.max_errors alone.
LARGE_COMPARE = 1_000_000


# (x, weights) dtypes of CheckContext.mixed_precision_avals: result_type is
# x's in the first and the weights' in the second, so a result in either
# operand's own dtype shows in one of them.
MIXED_DTYPES = (('float64', 'float32'), ('bfloat16', 'float32'))


@contextlib.contextmanager
def x64_enabled(enabled: bool = True):
  """Sets ``jax_enable_x64`` for the block and restores the old value."""
  old = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', enabled)
  try:
    yield
  finally:
    jax.config.update('jax_enable_x64', old)


def x64_scope():
  """Turns x64 on for part of a trace (``jax.enable_x64``; older JAX: its
  ``jax.experimental`` form), e.g. to accumulate float32 values in float64
  inside a program whose other parts must keep the caller's setting."""
  if hasattr(jax, 'enable_x64'):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top
  return enable_x64(True)


def hashable_params(params: Mapping) -> Optional[tuple]:
  """``params`` as a sorted tuple of items if hashable, else ``None`` (then
  compiled oracles cannot be cached across cases and are built per case)."""
  try:
    key = tuple(sorted(params.items()))
    hash(key)
    return key
  except TypeError:
    return None


def compiled(builder):
  """Turns ``builder(primitive, params, *static) -> fn`` into
  ``get(ctx, *static) -> jax.jit(fn)``, cached per primitive, params and
  ``static``.

  Every generated example of the same primitive and params then reuses the
  same jitted function, and ``jax.jit``'s own cache reuses its compilation
  for every example of the same shapes and dtypes.  ``fn`` must be pure in
  its array arguments: anything it closes over is fixed by the key.
  """
  @functools.lru_cache(maxsize=2048)
  def cached(primitive, params_key, static, small):
    return compilations.jit(builder(primitive, dict(params_key), *static),
                            small=small)

  @functools.wraps(builder)
  def get(ctx, *static):
    if ctx.params_key is None:
      return compilations.jit(builder(ctx.primitive, ctx.params, *static),
                              small=ctx.small)
    return cached(ctx.primitive, ctx.params_key, static, ctx.small)
  get.cache_clear = compilations.register_cache(cached.cache_clear)
  get.builder = builder
  return get


@compiled
def jitted_bind(primitive, params):
  """``operands -> every output of the bind``, under ``jax.jit``.  Every
  check that binds the primitive as it is under ``jit`` uses this one
  (``primitive.jit``, ``primitive.vmap``'s per-example binds, ``pp.exact``'s
  affinity test), so a signature compiles it once for all of them."""
  return lambda operands: primitive.bind(*operands, **params)


def _split_static(kwargs: Mapping):
  """``(static, arrays)``: hashable non-array kwargs and array kwargs, or
  ``None`` when a non-array kwarg is unhashable."""
  static, arrays = [], {}
  for k, v in kwargs.items():
    if isinstance(v, (jax.Array, np.ndarray)) or hasattr(v, 'aval'):
      arrays[k] = v
    else:
      static.append((k, v))
  try:
    static = tuple(sorted(static))
    hash(static)
  except TypeError:
    return None
  return static, arrays


# XLA:CPU takes a host buffer aligned to this many bytes without copying it
# (jax.device_put and every call of a jitted oracle); NumPy's own large
# arrays sit 16 bytes past a page boundary, so each transfer copied them.
HOST_ALIGNMENT = 64


def host_copy(value, dtype=None) -> np.ndarray:
  """A host copy of ``value`` in ``dtype`` (by default its own) as JAX gives
  it (float64 becomes float32 unless x64 is on), ``HOST_ALIGNMENT``-aligned
  where ``value`` is a NumPy array or scalar.

  Made with NumPy for those: the same bytes as a round trip through the
  device, without its two dispatches per operand (0.2-0.28 ms of a
  2.8 ms fast-mode check call on the LoRA 4096 layer; 0.03 ms this way)."""
  if isinstance(value, np.generic):
    value = np.asarray(value)
  if not isinstance(value, np.ndarray):
    return np.asarray(to_jax(value, dtype))
  out = aligned_empty(value.shape,
                      jax.dtypes.canonicalize_dtype(dtype or value.dtype))
  np.copyto(out, value, casting='unsafe')
  return out


def aligned_empty(shape, dtype) -> np.ndarray:
  """``np.empty(shape, dtype)`` starting on a ``HOST_ALIGNMENT`` boundary
  (a buffer XLA:CPU can take without copying)."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  buffer = np.empty(nbytes + HOST_ALIGNMENT, np.uint8)
  start = -buffer.ctypes.data % HOST_ALIGNMENT
  return buffer[start:start + nbytes].view(dtype).reshape(shape)


def _rule_fn(rule, static: tuple, vmap_depth, small: bool = True):
  """``jax.jit`` of ``(args, arrays) -> rule(*args, **static, **arrays)``,
  mapped over a leading axis of ``args`` ``vmap_depth`` times (compiled as
  ``compilations.jit`` does for a ``small`` case or a large one); for a
  tuple of depths, one program giving the tuple of results at each."""
  def mapped(depth):
    f = lambda args, arrays: rule(*args, **dict(static), **arrays)
    for _ in range(depth):
      f = jax.vmap(f, in_axes=(0, None))
    return f
  if isinstance(vmap_depth, tuple):
    fs = [mapped(d) for d in vmap_depth]
    return compilations.jit(
        lambda args, arrays: tuple(f(args, arrays) for f in fs), small=small)
  return compilations.jit(mapped(vmap_depth), small=small)


_jitted_rule = functools.lru_cache(maxsize=4096)(_rule_fn)
compilations.register_cache(_jitted_rule.cache_clear)


@functools.lru_cache(maxsize=4096)
def _cached_shapes(fn, primitive, params_key, avals, x64, static):
  del x64   # part of the key: a bind may follow the default dtype
  params = dict(params_key)
  return jax.eval_shape(
      lambda *ops: fn(primitive, params, ops, *static),
      *(jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type)
        for a in avals))


def operand_avals(operands) -> tuple:
  """``jax.typeof`` of each operand (under the current x64 setting, which
  decides a NumPy float64 array's)."""
  return tuple(jax.typeof(o) for o in operands)


def traced_shapes(fn, primitive, operands, params, *static, avals=None):
  """Shapes and dtypes of ``fn(primitive, params, operands, *static)``
  (traced, nothing compiled or run).

  Traced once per ``fn``, primitive, params, operand avals, x64 setting and
  ``static`` (hashable), where the params are hashable: the checks ask many
  times per case, and each trace of the LoRA 4096 layer's bind cost
  0.2-0.35 ms, about half the fast-mode check's compiled work there.
  ``avals``: the operands' :func:`operand_avals`, where the caller has them
  (a device array's costs 3-4 us to ask for, and a fast-mode call asked
  eleven times).  Raises what ``fn`` raises (and caches nothing then)."""
  key = hashable_params(params)
  if key is None:
    return jax.eval_shape(lambda *ops: fn(primitive, params, ops, *static),
                          *operands)
  return _cached_shapes(fn, primitive, key,
                        operand_avals(operands) if avals is None else avals,
                        bool(jax.config.jax_enable_x64), static)


def _bound_y(primitive, params, operands):
  return executor.bind_y(primitive, operands, params)


def y_aval(primitive, operands, params, avals=None) -> jax.ShapeDtypeStruct:
  """Shape and dtype of the bind's ``y`` on ``operands`` (nothing compiled;
  see :func:`traced_shapes`).  Raises what the bind raises."""
  return traced_shapes(_bound_y, primitive, operands, params, avals=avals)


def shape_of(tree) -> Any:
  return jax.tree.map(lambda v: tuple(np.shape(v)), tree)


def _is_float(v) -> bool:
  return jnp.issubdtype(jnp.result_type(v), jnp.inexact)


def to_float64(tree):
  """Floating leaves to float64 (call inside :func:`x64_enabled`)."""
  return jax.tree.map(
      lambda v: to_jax(v, jnp.float64) if _is_float(v) else to_jax(v),
      tree)


def absolute(tree):
  """Floating leaves (half precision included) replaced by their absolute
  values, others (indices) kept: operands whose bind gives the size of the
  terms a result sums, the ``term_scale`` of a comparison where they may
  cancel."""
  return jax.tree.map(
      lambda v: np.abs(v) if jnp.issubdtype(jnp.result_type(v), jnp.floating)
      else v, tree)


def terms_or_none(fn, *args):
  """``fn(*args)`` (a program on :func:`absolute` operands: the size of the
  terms), or ``None`` where it raises (a primitive may reject such
  operands): a comparison then keeps its plain scale, and the check's own
  calls report what is wrong."""
  try:
    return fn(*args)
  except Exception:  # pylint: disable=broad-except
    return None


# How far beyond one evaluation's rounding the residual of the affinity
# test (CheckContext.nonaffine_operands) may go: it adds three results.
AFFINE_SLACK = 8

# ``str(dtype)``, cached: NumPy takes 3 us to name a dtype, and a fast-mode
# call names five (operands, comparisons).
dtype_str = functools.lru_cache(maxsize=256)(str)


def array_text(value) -> str:
  """An array (or aval) as messages name it: ``float32[2, 3]``."""
  return f'{dtype_str(value.dtype)}{list(np.shape(value))}'


def size_text(n_bytes: float) -> str:
  """``n_bytes`` in the largest binary unit it reaches, e.g. ``'1.5 GiB'``."""
  for unit, scale in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if n_bytes >= scale:
      return f'{n_bytes / scale:.3g} {unit}'
  return f'{n_bytes:.0f} B'


@functools.lru_cache(maxsize=4096)
def _seed32(seed: int, tag: str) -> np.uint32:
  # Cached: seeding a NumPy generator costs 25 us, a fair share of a
  # fast-mode check call's Python, and each call asks for the same seeds.
  return np.uint32(_rng(seed, tag).integers(0, 2**32, dtype=np.uint32))


def _rng(seed: int, tag: str) -> np.random.Generator:
  return np.random.default_rng((seed & 0xFFFFFFFF, zlib.crc32(tag.encode())))


class CheckContext:
  """One case under test plus the tools checks share.

  Attributes:
    primitive, rules: the primitive and its :class:`etp.EtpRules`.
    given: the concrete operands in invar order, as the caller passed them.
    operands: their host copies (made on first use).
    device_operands: what programs take (JAX arrays as given, the rest as
      host copies); weight_avals: the weights' shapes and dtypes.
    params: the bind params.
    x, weights, rule_params: from ``primitive.split_operands`` on the host
      copies.
    seed, steps, n_states: as given to ``assert_rule_consistent``.
    devices: the devices the device checks may use.
    fast: random-projection mode (no full Jacobians); ``None`` chooses it
      when the largest Jacobian exceeds ``FAST_MODE_THRESHOLD`` entries.
    small: whether the harness compiles this case's programs with
      ``compilations.COMPILER_OPTIONS`` (see ``compilations.is_small``).
    findings: what the current check recorded (reset per check).

  ``avals``, where the caller has them: the operands' :func:`operand_avals`
  under the current x64 setting (see :meth:`avals`).
  """

  def __init__(self, primitive, operands, params, *, seed: int = 0,
               steps: int = 3, n_states=(1, 2), rtol=None, atol=None,
               devices=None, fast=None, avals=None):
    self.primitive = primitive
    self.rules = etp.rules_of(primitive)
    # As given: a JAX array stays where it is until a check needs its host
    # copy (see operands); the fast-mode projections run on it in place.
    self.given = tuple(operands)
    self._host_copies: dict = {}
    self._y_avals: dict = {}
    self._avals: dict = {}
    if avals is not None:
      self._avals[bool(jax.config.jax_enable_x64)] = tuple(avals)
    self.params = dict(params)
    self.seed = int(seed)
    self.steps = int(steps)
    self.n_states = tuple(n_states)
    self.rtol_override = rtol
    self.atol_override = atol
    self.devices = list(devices) if devices is not None else jax.devices()
    self.findings: list = []
    self.params_key = hashable_params(self.params)
    self.fast = self.jacobian_size() > FAST_MODE_THRESHOLD if fast is None \
        else bool(fast)
    # Small cases compile for compile time, large ones for run time.
    self.small = compilations.is_small(self.avals())

  @functools.cached_property
  def operands(self) -> tuple:
    """Host copies of the operands, in the dtypes JAX gives them: slicing
    and combining them in checks compiles nothing, and jitted oracles take
    them as they are.  Made on first use: a check that only runs programs on
    the operands (fast mode's projections) never copies a device array of a
    large layer to the host."""
    return tuple(self._host_copy(i) for i in range(len(self.given)))

  def _host_copy(self, i: int) -> np.ndarray:
    if i not in self._host_copies:
      self._host_copies[i] = host_copy(self.given[i])
    return self._host_copies[i]

  @functools.cached_property
  def _split(self) -> tuple:
    return self.primitive.split_operands(self.operands, self.params)

  @property
  def x(self):
    """The input operand (host copy), ``None`` without one."""
    return self._split[0]

  @property
  def weights(self) -> dict:
    """``{key: operand}`` of the trainable operands (host copies)."""
    return self._split[1]

  @property
  def rule_params(self) -> dict:
    """The params every rule receives (bind params plus aux operands)."""
    return self._split[2]

  @functools.cached_property
  def device_operands(self) -> tuple:
    """The operands to pass to a program: a JAX array as given (no copy,
    wherever it lives), anything else as its host copy."""
    return tuple(o if isinstance(o, jax.Array) else self._host_copy(i)
                 for i, o in enumerate(self.given))

  @functools.cached_property
  def weight_avals(self) -> dict:
    """``{key: aval}`` of the trainable operands (their :meth:`avals`:
    ``shape``, ``dtype``, ``size``), from the operands as given (no copy)."""
    avals = self.avals()
    return {k: avals[i]
            for k, i in self.primitive.trainable_invars(self.params).items()}

  def avals(self) -> tuple:
    """:func:`operand_avals` of the operands as given, kept per x64
    setting (which decides a NumPy float64 operand's)."""
    x64 = bool(jax.config.jax_enable_x64)
    if x64 not in self._avals:
      self._avals[x64] = operand_avals(self.given)
    return self._avals[x64]

  # ------------------------------------------------------------- the case
  @property
  def name(self) -> str:
    return self.primitive.name

  @property
  def batched(self) -> bool:
    return self.primitive.batched

  def bind(self, *operands, **params):
    """Binds the primitive; returns ``y`` (the ``y_outvar_index`` output)."""
    return executor.bind_y(self.primitive, operands, params or self.params)

  def y(self):
    return self.bind(*self.operands)

  def y_aval(self, operands=None) -> jax.ShapeDtypeStruct:
    """Shape and dtype of ``y`` on ``operands`` (default: the case's); see
    :func:`y_aval`."""
    if operands is not None:
      return y_aval(self.primitive, operands, self.params)
    # The case's, kept per x64 setting: checks ask several times per call,
    # and each lookup in traced_shapes' cache builds its key again.
    x64 = bool(jax.config.jax_enable_x64)
    if x64 not in self._y_avals:
      self._y_avals[x64] = y_aval(self.primitive, self.given, self.params,
                                  self.avals())
    return self._y_avals[x64]

  def jacobian_size(self) -> int:
    """Entries of the largest ``dy/dw_k`` Jacobian of this case."""
    y = self.y_aval()
    sizes = [math.prod(y.shape) * w.size for w in self.weight_avals.values()]
    return max(sizes, default=0)

  def with_operands(self, x=None, weights: Optional[Mapping] = None) -> list:
    """The operands with ``x`` and/or some weights replaced."""
    ops = list(self.operands)
    if x is not None and self.primitive.x_invar_index is not None:
      ops[self.primitive.x_invar_index] = x
    for k, i in self.primitive.trainable_invars(self.params).items():
      if weights is not None and k in weights:
        ops[i] = weights[k]
    return ops

  @functools.cached_property
  def trace_avals(self):
    """What ``init_drtrl`` gives for one state, as shapes and dtypes (traced
    once per context; nothing allocated, so a large layer's trace is not);
    raises what ``init_drtrl`` raises."""
    from etp._src.registry import call_init_rule
    x_var, y_var, weight_vars = executor.jaxpr_vars(
        self.primitive, self.operands, self.params)
    return jax.eval_shape(lambda: call_init_rule(
        self.rules.init_drtrl, x_var, y_var, weight_vars, 1,
        self.rule_params))

  def trace_bytes(self) -> int:
    """Bytes of :attr:`trace_avals`, all keys together; 0 when it cannot
    say."""
    try:
      traces = self.trace_avals
    except Exception:  # pylint: disable=broad-except
      return 0   # the checks themselves report a broken init_drtrl
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
               for v in jax.tree.leaves(traces))

  def for_traces(self, copies: int, per_state: bool = False,
                 skip: bool = True) -> Optional['CheckContext']:
    """The context a trace-building check runs on (findings go to this one).

    Outside fast mode, this one.  In fast mode, the first whose traces fit
    ``FAST_TRACE_BYTES`` of: this one; this one with a single ``n_state``,
    largest first (``per_state`` checks only); its first two examples
    (batched primitives with a larger batch); its first example alone --
    each smaller batch with a single ``n_state`` too, largest first, where
    the check is ``per_state``: the rules never see the state axis (the
    executor maps them over it, and ``init.drtrl`` traces every
    ``n_state``'s shapes), while a batch of one passes a rule right only
    for one example (a ``solve_drtrl`` that contracts example 0 alone).
    When none fits, the check is skipped (``skip=False``: ``None`` is
    returned, for a check with a leaner way).
    A check holds about ``copies`` traces at once (its own, its rule's
    results and temporaries; measured on LoRA's 1 GiB trace), for every
    ``n_state`` of the run where ``per_state``:
    ``copies * trace_bytes * (sum(n_states) if per_state else 1)``.
    """
    if not self.fast:
      return self
    held = lambda c, b: copies * b * (sum(c.n_states) if per_state else 1)
    whole = self.trace_bytes()

    states = (sorted(set(self.n_states), reverse=True)
              if per_state and len(self.n_states) > 1 else [None])

    def bases():
      """``(context, trace bytes per state, how)``: this one, then its
      first two examples and its first alone (where the batch is larger),
      each made only when asked for."""
      yield self, whole, ''
      for size, how in ((2, 'a batch of two (its first two examples)'),
                        (1, 'a batch of one')):
        if (self.batched and self.x is not None and
            np.shape(self.x)[0] > size):
          part = self._on(self.with_operands(x=self.x[:size]))
          yield part, part.trace_bytes(), how

    def candidates():
      """``(context, trace bytes per state, how it is reduced)``, in order of
      preference, each made only when the one before does not fit."""
      yield self, whole, ''
      for c, b, how in bases():
        for n in states:
          if n is not None:
            yield (c._on(c.operands, n_states=(n,)), b,
                   ' and '.join(filter(None, (how, f'n_state={n}'))))
          elif c is not self:
            yield c, b, how

    for ctx, trace_bytes, how in candidates():
      if held(ctx, trace_bytes) <= FAST_TRACE_BYTES:
        if ctx is not self:
          ctx.findings = self.findings
          self.record_pass('trace', message=(
              f'fast mode: about {size_text(held(self, whole))} of traces; '
              f'checked with {how} ({size_text(held(ctx, trace_bytes))})'))
        return ctx
    if not skip:
      return None
    self.skip_over_trace_budget(
        held(ctx, trace_bytes), (f'even with {how} ' if how else '') +
        f'({copies} x {size_text(trace_bytes)} per state)')

  def skip_over_trace_budget(self, held: int, detail: str):
    """Skips a fast-mode check that would hold ``held`` bytes of traces,
    above ``FAST_TRACE_BYTES`` (``detail``: how that was reckoned)."""
    self.skip(f'fast mode: this check would hold about {size_text(held)} of '
              f'traces {detail}, above FAST_TRACE_BYTES='
              f'{size_text(FAST_TRACE_BYTES)}; the generated small cases '
              'check this (or run with fast=False)')

  def _on(self, operands, n_states=None) -> 'CheckContext':
    """A context on other ``operands`` (and ``n_states``) with this one's
    other settings."""
    derived = CheckContext(
        self.primitive, operands, self.params, seed=self.seed,
        steps=self.steps,
        n_states=self.n_states if n_states is None else n_states,
        rtol=self.rtol_override,
        atol=self.atol_override, devices=self.devices, fast=self.fast)
    derived.root = self.root   # see nonaffine_operands
    return derived

  @property
  def root(self) -> 'CheckContext':
    """The context of the case as given, which this one was derived from
    (itself, for that one)."""
    return self.__dict__.get('_root', self)

  @root.setter
  def root(self, value: 'CheckContext'):
    self.__dict__['_root'] = value

  @functools.cached_property
  def _nonaffine(self) -> frozenset:
    """:meth:`nonaffine_operands` of this context's operands."""
    bind = jitted_bind(self)
    ops = list(self.operands)
    y_of = lambda o: np.asarray(executor.y_of_outputs(
        self.primitive, bind(o)), np.float64)
    try:
      f1 = y_of(ops)
    except Exception:  # pylint: disable=broad-except
      return frozenset()   # the checks report a bind that raises
    found = set()
    rtol, atol = tolerances.tolerance(self.bind_dtype(), 'exact')
    for i, o in enumerate(ops):
      if not _is_float(o) or not np.size(o):
        continue
      v = np.asarray(o)
      try:
        f0 = y_of(ops[:i] + [np.zeros_like(v)] + ops[i + 1:])
        f2 = y_of(ops[:i] + [v + v] + ops[i + 1:])
        f_neg = y_of(ops[:i] + [-v] + ops[i + 1:])
      except Exception:  # pylint: disable=broad-except
        found.add(i)
        continue
      scale = max(abs_max(f0), abs_max(f1), abs_max(f2), abs_max(f_neg))
      # P(2u) - 2 P(u) + P(0) misses a positively homogeneous P (relu(x)
      # @ W at a positive x): P(u) + P(-u) - 2 P(0) does not.
      residual = np.max([abs_max(f2 - 2 * f1 + f0),   # nan stays nan
                         abs_max(f1 + f_neg - 2 * f0)])
      if not np.isfinite(residual) or residual > AFFINE_SLACK * (
          atol + rtol * scale):
        found.add(i)
    return frozenset(found)

  @functools.cached_property
  def _restricted(self) -> frozenset:
    """:meth:`restricted_operands` of this context's operands."""
    bind = jitted_bind(self)
    ops = list(self.operands)
    found = set()
    for i, o in enumerate(ops):
      if not _is_float(o) or not np.size(o):
        continue
      v = np.asarray(self.normal(f'domain.{i}', np.shape(o), o.dtype))
      try:
        finite = all(np.all(np.isfinite(np.asarray(executor.y_of_outputs(
            self.primitive, bind(ops[:i] + [u] + ops[i + 1:])))))
                     for u in (v, -v))
      except Exception:  # pylint: disable=broad-except
        finite = False
      if not finite:
        found.add(i)
    return frozenset(found)

  def restricted_operands(self) -> frozenset:
    """Positions of the floating operands with a restricted domain: the
    bind's output is not finite at a standard normal draw of the operand or
    at its negation, the others as given (``log(x)``, ``sqrt(W)``).  Found
    once per case, on the case as given (:attr:`root`: primitive.jit's
    program, nothing new to compile).  See :meth:`values_like`."""
    return self.root._restricted

  def nonaffine_operands(self) -> frozenset:
    """Positions of the floating operands in which the bind is not affine:
    ``P(2u) - 2 P(u) + P(0)`` or ``P(u) + P(-u) - 2 P(0)`` beyond rounding,
    the others as given (a learnable gain ``exp(s) * (x @ W)`` is not
    affine in ``s``).  Found once per case, on the case as given
    (:attr:`root`: primitive.jit's program, nothing new to compile).  See
    :meth:`magnitudes`."""
    return self.root._nonaffine

  def magnitudes(self, operands) -> list:
    """``operands`` with each floating one the bind is affine in replaced
    by its absolute values, the others kept (:meth:`nonaffine_operands`):
    the operands on which a program gives the size of the terms its result
    sums, a comparison's ``term_scale``.

    For a sum of products (affine in each operand: dense, conv, LoRA, a
    bias) that size is the program on absolute values.  For an operand
    that enters otherwise, its absolute value says nothing: ``exp(|s|)``
    for ``exp(s)`` at ``s = -5`` is 22,000 times the terms, and loosened a
    bound that much (a sign error in the gain's trace passed); kept as it
    is, the terms carry the factor it really contributes."""
    kept = self.nonaffine_operands()
    return [o if i in kept else absolute(o) for i, o in enumerate(operands)]

  def in_float32_for_composed_rules(self, rule: str) -> 'CheckContext':
    """The context the checks of composed rules (``drtrl.exact``,
    ``drtrl.instant``, ``pp.exact``) run on: this one, or where an operand
    is float16 or bfloat16 one on float32 copies of the operands (findings
    go to this context).

    Both sides of those checks round at every step and state in the
    operands' dtype, in different orders: over 3 steps bfloat16's rounding
    alone put the correct built-ins up to 36 % apart (320 drawn cases, 1 in
    10 beyond bfloat16's bound), where a 5 % error is what the table is
    there to catch; ``drtrl.instant``'s two chains of about four roundings
    each took the correct LoRA pair to 1.02 of it (1 case in 400).  What
    they check, how the rules compose, does not depend on the dtype; how
    the rules treat half-precision operands is ``xy_to_dw.*``,
    ``yw_to_w.*`` and ``init.*``'s business, and those run in it, and
    ``drtrl.instant``'s, which runs each of ``instant_drtrl``,
    ``solve_drtrl`` and ``yw_to_w`` in it against float32 copies."""
    half = {i for i, o in enumerate(self.operands)
            if o.dtype in (jnp.float16, jnp.bfloat16)}
    if not half:
      return self
    wide = self._on([o.astype(np.float32) if i in half else o
                     for i, o in enumerate(self.operands)])
    wide.findings = self.findings
    self.record_pass(rule, message=(
        'half precision: the check runs on float32 copies of operands '
        f'{sorted(half)} (the rounding of its composed rules is beyond the '
        "half-precision bounds; the rules' own half-precision results are "
        'judged by xy_to_dw.*, yw_to_w.*, init.* and drtrl.instant)'))
    return wide

  def mixed_precision_avals(self, dtypes=MIXED_DTYPES) -> list:
    """``[(label, avals, y)]``: the case's operand avals with ``x`` in one
    dtype and the floating weights in another, per ``(x, weights)`` pair of
    ``dtypes``, and ``y``'s aval on them; empty where ``x`` is absent or
    not floating.  Made, and to be traced, with x64 on.  Where the bind
    raises on one (a primitive that takes one dtype), a note says so and it
    is left out.

    A rule that makes its result in ``x``'s or in the weights' dtype
    instead of the one the contract names is right whenever the two agree,
    as on every case drawn in one dtype; traced on these (shapes only,
    nothing compiled) it shows whatever dtypes the case has."""
    index = self.primitive.x_invar_index
    avals = self.avals()
    if index is None or not jnp.issubdtype(avals[index].dtype, jnp.floating):
      return []
    trained = set(self.primitive.trainable_invars(self.params).values())
    return self._recast([
        (f'x {x_dtype} with {w_dtype} weights',
         {i: x_dtype if i == index else w_dtype for i in trained | {index}})
        for x_dtype, w_dtype in dtypes])

  def one_wider_weight_avals(self) -> list:
    """``[(label, avals, y)]`` as :meth:`mixed_precision_avals` gives them,
    with one trainable weight in float64 and every other floating operand
    in float32, per weight (none with fewer than two weights): a rule that
    gives one weight's result in another weight's dtype is right whenever
    they share one, as on every case a strategy draws in one dtype."""
    trained = self.primitive.trainable_invars(self.params)
    if len(trained) < 2:
      return []
    floating = [i for i, a in enumerate(self.avals())
                if jnp.issubdtype(a.dtype, jnp.floating)]
    return self._recast([
        (f'weight {key!r} float64, the other operands float32',
         {i: 'float64' if i == index else 'float32' for i in floating})
        for key, index in trained.items()])

  def other_dtype_avals(self) -> list:
    """:meth:`mixed_precision_avals` and :meth:`one_wider_weight_avals`:
    every dtype variant of the case that rules are traced on for their
    result dtypes."""
    return self.mixed_precision_avals() + self.one_wider_weight_avals()

  def _recast(self, variants) -> list:
    """``[(label, avals, y)]`` for ``(label, {operand index: dtype})``
    variants of the case's avals (floating operands only are recast), made
    with x64 on; a variant the bind rejects is noted and left out."""
    avals = self.avals()
    out = []
    for label, dtypes in variants:
      cast = tuple(jax.ShapeDtypeStruct(
          a.shape, dtypes[i] if i in dtypes and
          jnp.issubdtype(a.dtype, jnp.floating) else a.dtype)
          for i, a in enumerate(avals))
      with x64_enabled(True):
        try:
          y = y_aval(self.primitive, cast, self.params, avals=cast)
        except Exception as e:  # pylint: disable=broad-except
          self.record_pass('operands', message=(
              f'{label}: not checked, binding {self.name} raised '
              f'{type(e).__name__}: {e}'))
          continue
      out.append((label, cast, y))
    return out

  def weight_dtype(self):
    dts = [w.dtype for w in self.weights.values()]
    return jnp.result_type(*dts) if dts else self.y().dtype

  # ------------------------------------------------------- randomness
  def rng(self, tag: str) -> np.random.Generator:
    """A NumPy generator for ``tag``, fixed by the seed (stable across runs).

    Inputs are drawn on the host: a JAX PRNG draw compiles once per new
    shape, and drawing costs nothing next to the oracles.
    """
    return _rng(self.seed, tag)

  def normal(self, tag: str, shape, dtype=None, scale: float = 1.0):
    dtype = dtype or self.weight_dtype()
    v = scale * self.rng(tag).standard_normal(tuple(shape), np.float32)
    return to_jax(v, dtype)

  def rescaled(self, tag: str, value, lead=()) -> np.ndarray:
    """``value`` (a floating host array) on ``lead`` more leading axes, each
    entry scaled by its own factor in ``[0.5, 1.5]``: signs and orders of
    magnitude kept, so an impl with a restricted domain (``log``, ``sqrt``)
    stays inside it.  Standard normal where ``value`` is all zeros (nothing
    to keep)."""
    value = np.asarray(value)
    shape = tuple(lead) + value.shape
    if value.size and not np.any(value != 0):
      return np.asarray(self.normal(tag, shape, value.dtype))
    scale = self.rng(tag).uniform(0.5, 1.5, shape).astype(np.float32)
    return (value * scale).astype(value.dtype)

  def permuted(self, tag: str, value, lead=()) -> np.ndarray:
    """``value`` (an integer or boolean host array) on ``lead`` more
    leading axes, each entry of them ``value`` with its first axis permuted
    afresh: indices stay in range and each row keeps its structure (a
    0-d or one-row ``value`` is repeated as it is)."""
    value = np.asarray(value)
    count = int(np.prod(lead, dtype=np.int64))
    if value.ndim and value.shape[0] > 1:
      rng = self.rng(tag)
      rows = [value[rng.permutation(value.shape[0])] for _ in range(count)]
    else:
      rows = [value] * count
    if not lead:
      return rows[0]
    return np.stack(rows).reshape(tuple(lead) + value.shape)

  def values_like(self, tag: str, index: int, lead=(), operand=None):
    """Values for operand ``index`` (``operand`` if given: a batch of one,
    say) on ``lead`` more leading axes, drawn from the seed and valid where
    the case's own value is: the inputs of a recurrence's steps, the points
    at which a Jacobian is taken.

    * A floating operand: normal, as :meth:`normal`, with the RMS of the
      case's value (1 where that is 0), so that signs change from draw to
      draw (a rule right only for a positive ``x`` is caught on a case
      whose ``x`` is positive) and the case's scale is kept (a case with
      an input of spread 0.003, chosen to exercise a layer norm near its
      ``eps``, ran its recurrence on inputs of spread 1) ...
    * ... unless its domain is restricted (:meth:`restricted_operands`):
      then :meth:`rescaled`, so ``log(x)`` and ``sqrt(W)`` stay finite
      (drawn from a normal distribution, the recurrence's inputs made
      ``log`` return ``nan`` and failed correct rules at ``inf`` times the
      bound).
    * An integer or boolean operand (indices, spikes): :meth:`permuted`
      (cast from a normal draw, an embedding's indices were -2 to 2 whatever
      its table's size, and failed a correct ``xy_to_dw``).
    """
    value = self.operands[index] if operand is None else operand
    shape = tuple(lead) + tuple(np.shape(value))
    if _is_float(value):
      if index not in self.restricted_operands():
        return self.normal(tag, shape, value.dtype, scale=rms_or_one(value))
      return self.rescaled(tag, value, lead)
    return self.permuted(tag, value, lead)

  def normal_on_host(self, tag: str, shape, dtype=None) -> np.ndarray:
    """:meth:`normal`'s numbers as a host array, drawn straight into a
    ``HOST_ALIGNMENT``-aligned buffer: taking entries of it compiles
    nothing, and XLA:CPU takes it, and each entry whose bytes are a multiple
    of that (a large layer's are), without a copy (``yw_to_w.vmap``'s
    extra-axes traces: a large conv layer's check ran in 7.5 s instead of
    10.3 s)."""
    dtype = dtype or self.weight_dtype()
    draw = aligned_empty(tuple(shape), np.float32)
    self.rng(tag).standard_normal(dtype=np.float32, out=draw)
    if draw.dtype == jax.dtypes.canonicalize_dtype(dtype):
      return draw
    return host_copy(draw, dtype)

  def seed32(self, tag: str) -> np.uint32:
    """A 32-bit seed for ``tag``, fixed by the seed: for draws made on the
    device (``directions.uniform``: directions as large as a weight)."""
    return _seed32(self.seed, tag)

  def uniform(self, tag: str, shape, dtype=None, minval=0.5, maxval=1.5):
    dtype = dtype or self.weight_dtype()
    v = self.rng(tag).uniform(minval, maxval, tuple(shape)).astype(np.float32)
    return to_jax(v, dtype)

  # ------------------------------------------------------------ rules
  def call_rule(self, rule_name: str, *args, rules=None, vmap=0,
                jit: bool = True, **kwargs):
    """Calls a rule under ``jax.jit`` (as the ETP compiler runs it; compiled
    once per shape and reused by every example), under ``vmap`` nested
    ``jax.vmap`` over the leading axis of ``args``; for a tuple of depths,
    the tuple of results at each, from one program.  ``jit=False`` calls it
    eagerly (where placement matters); anything it raises becomes a
    :class:`RuleFailure`."""
    rules = rules or self.rules
    rule = getattr(rules, rule_name)
    if rule is None:
      raise RuleFailure(rule_name, f'rule {rule_name!r} is not registered for '
                        f'{self.name}')
    try:
      kw = {**self.rule_params, **kwargs}
      if not jit:
        assert not vmap, 'eager calls are not mapped'
        return rule(*args, **kw)
      split = _split_static(kw)
      if split is None:   # an unhashable param: jit afresh, nothing cached
        arrays = {k: v for k, v in kw.items() if hasattr(v, 'shape')}
        static = tuple((k, v) for k, v in kw.items() if k not in arrays)
        return _rule_fn(rule, static, vmap, self.small)(args, arrays)
      static, arrays = split
      return _jitted_rule(rule, static, vmap, self.small)(args, arrays)
    except RuleFailure:
      raise
    except Exception as e:  # pylint: disable=broad-except
      shapes = [tuple(np.shape(a)) if hasattr(a, 'shape') else
                jax.tree.map(lambda v: tuple(np.shape(v)), a)
                if isinstance(a, Mapping) else type(a).__name__ for a in args]
      raise RuleFailure(rule_name, raised(
          rule_name, e, f'called with argument shapes {shapes}')) from e

  def check_keys(self, rule_name: str, tree, expected_keys) -> None:
    """Fails unless ``tree`` is a dict with exactly ``expected_keys``."""
    if not isinstance(tree, Mapping):
      raise RuleFailure(rule_name, f'{rule_name} returned '
                        f'{returned_kind(tree)}, expected a dict with keys '
                        f'{sorted(expected_keys)}')
    got, want = set(tree), set(expected_keys)
    if got != want:
      raise RuleFailure(rule_name, f'{rule_name} returned keys {sorted(got)}, '
                        f'expected {sorted(want)} (missing '
                        f'{sorted(want - got)}, extra {sorted(got - want)})')

  # ------------------------------------------------------- judgement
  def tolerance(self, dtype, kind: str = 'exact') -> tuple:
    rtol, atol = tolerances.tolerance(dtype, kind)
    if self.rtol_override is not None:
      rtol = self.rtol_override
    if self.atol_override is not None:
      atol = self.atol_override
    return rtol, atol

  def bind_dtype(self, *dtypes):
    """The coarsest of ``dtypes`` and of the floating operands' dtypes: the
    rounding a result of the bind can carry whatever it is stored in (``y``
    of a float32 ``x @ W`` plus a float64 bias is float64, rounded in
    float32, and XLA's program rounds it in another order than the eager
    ops do)."""
    return tolerances.coarsest(*dtypes, *(
        o.dtype for o in self.operands if jnp.issubdtype(o.dtype,
                                                         jnp.inexact)))

  def record(self, finding: Finding) -> Finding:
    self.findings.append(finding)
    return finding

  def record_pass(self, rule: str, message: str, key=None) -> Finding:
    """Records a passed structural finding (so a report shows what ran)."""
    return self.record(Finding(rule=rule, key=key, passed=True,
                               message=message))

  def fail(self, rule: str, message: str, key=None, **fields) -> Finding:
    """Records a failed finding without numbers (a structural problem)."""
    return self.record(Finding(rule=rule, key=key, passed=False,
                               message=message, **fields))

  def compare(self, actual, expected, *, rule: str, key=None, what: str = '',
              kind: str = 'exact', dtype=None, check_dtype: bool = False,
              approximate: bool = False, term_scale=None,
              use_chex: bool = True) -> Finding:
    """Compares two arrays; records and returns a :class:`Finding`.

    Shapes must match exactly; values must satisfy the norm-wise bound of
    ``tolerances`` for ``dtype`` (by default the coarser of the two sides'
    dtypes: ``tolerances.coarsest``), checked with
    ``chex.assert_trees_all_close`` on the scaled difference; non-finite
    values fail.  ``check_dtype`` also asks for equal dtypes.
    ``approximate`` records the error, and the cosine of the two, without
    failing, unless a value is not finite.

    ``use_chex=False`` judges the same bound from
    ``differences.max_errors`` alone, as arrays above ``LARGE_COMPARE``
    elements always are: for fast mode's few dot products, where chex's
    0.05-0.15 ms per call is a fifth of the whole check on a layer whose
    forward plus VJP takes 0.25 ms.

    ``term_scale``: for two sums of products added up in different orders,
    the magnitude of the terms (``max |sum_i |a_i b_i||``, from a trusted
    oracle on absolute values).  Their rounding differs by up to about
    ``n eps sum_i |a_i b_i|``, which cancellation can make far larger than
    ``eps`` times the result; the bound's scale is then the larger of the
    two.  It only loosens the bound where the result cancels.
    """
    # On the host: comparing must not compile anything.
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    dtype = dtype or tolerances.coarsest(actual.dtype, expected.dtype)
    rtol, atol = self.tolerance(dtype, kind)
    base = dict(rule=rule, key=key, actual_shape=tuple(actual.shape),
                expected_shape=tuple(expected.shape),
                dtype=dtype_str(actual.dtype), rtol=rtol, atol=atol,
                approximate=approximate)
    if actual.shape != expected.shape:
      return self.record(Finding(passed=False, message=(
          f'{what or "result"}: shape {tuple(actual.shape)} != expected '
          f'{tuple(expected.shape)}'), **base))
    if check_dtype and actual.dtype != expected.dtype:
      return self.record(Finding(passed=False, message=(
          f'{what or "result"}: dtype {actual.dtype} != expected '
          f'{expected.dtype}'), **base))
    max_abs, max_rel, index, scale = max_errors_and_scale(actual, expected)
    base['vacuous'] = bool(scale == 0 and max_abs == 0)   # both sides 0
    if approximate:
      base['cosine'] = cosine(actual, expected)
    if term_scale is not None:
      scale = max(scale, abs_max(term_scale))
    bound = atol + rtol * scale
    # Above LARGE_COMPARE, or without chex: the bound straight from
    # max_errors' float64 pass (_judged; for large arrays chex would make
    # more float64 copies of them).
    passed = None
    if expected.size <= LARGE_COMPARE and use_chex:
      # A non-finite value on either side made max_abs infinite; otherwise
      # the norm-wise bound, through chex: |a - e| <= atol + rtol * scale.
      passed = bool(np.isfinite(max_abs))
      try:
        if passed:
          chex.assert_trees_all_close(
              actual.astype(np.float64), expected.astype(np.float64),
              rtol=0.0, atol=bound)
      except AssertionError:
        passed = False
    return self._judged(base, what, (max_abs, max_rel, index, scale), bound,
                        passed)

  def judge_errors(self, errors, *, rule: str, key=None, what: str,
                   shape, dtype) -> Finding:
    """Records a :class:`Finding` for two arrays of ``shape`` compared where
    they are (``errors``: ``differences.errors_from_device`` of a program's
    ``differences.traced_errors``), judged as :meth:`compare` judges a large
    array: ``max_abs <= atol + rtol * scale``, finite, with ``dtype``'s
    ``exact`` tolerance."""
    rtol, atol = self.tolerance(dtype)
    shape = tuple(shape)
    base = dict(rule=rule, key=key, actual_shape=shape, expected_shape=shape,
                dtype=dtype_str(np.dtype(dtype)), rtol=rtol, atol=atol,
                approximate=False,
                vacuous=bool(errors[0] == 0 and errors[3] == 0))
    return self._judged(base, what, errors, atol + rtol * errors[3])

  def _judged(self, base, what, errors, bound, passed=None) -> Finding:
    """Records the finding of ``errors`` (``max_abs, max_rel, index,
    scale``) against ``bound``: ``passed`` as given, or where ``None``,
    ``max_abs`` finite and within ``bound``; when
    ``base['approximate']``, passed wherever ``max_abs`` is finite."""
    max_abs, max_rel, index, scale = errors
    if passed is None:
      passed = bool(np.isfinite(max_abs) and max_abs <= bound)
    if base['approximate']:
      passed = bool(np.isfinite(max_abs))
      if not passed:
        what = (f'{what or "result"}: not finite, which no approximation '
                'excuses')
    return self.record(Finding(
        passed=passed, message=what or 'compared', max_abs_err=max_abs,
        max_rel_err=max_rel, index=index, scale=scale,
        tolerance_used=ratio(max_abs, bound), **base))

  def compare_trees(self, actual: Mapping, expected: Mapping, *, rule: str,
                    what: str = '', kind: str = 'exact', dtype=None,
                    check_dtype: bool = False, approximate_keys=(),
                    term_scales: Optional[Mapping] = None) -> list:
    """:meth:`compare` per key of two dicts (after :meth:`check_keys`);
    ``term_scales``: each key's ``term_scale``."""
    self.check_keys(rule, actual, expected.keys())
    return [self.compare(actual[k], expected[k], rule=rule, key=k, what=what,
                         kind=kind, dtype=dtype, check_dtype=check_dtype,
                         approximate=k in approximate_keys,
                         term_scale=None if term_scales is None
                         else term_scales[k])
            for k in expected]

  def skip(self, reason: str):
    raise CheckSkipped(reason)
