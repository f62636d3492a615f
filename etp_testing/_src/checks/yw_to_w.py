r"""Checks of ``yw_to_w``, the y -> w link of the D-RTRL recurrence.

* ``yw_to_w.anchor``: the sparsity pattern :math:`\mathrm{mask}(J)` of
  :math:`J = \partial y / \partial w_k` is measured with ``jax.jvp`` along
  one-hot directions at two random points (per example for batched
  primitives).  A weight element is *anchored* when it reaches exactly one
  output :math:`\pi(e)`; for a key whose elements are all anchored the rule
  must give :math:`\mathrm{yw\_to\_w}(g, T)[e] = g[\pi(e)]\, T[e]` (beside
  ``instant_drtrl`` too, where that key's trace is shaped like its weight).
  A key whose elements reach several outputs needs
  ``instant_drtrl``/``solve_drtrl`` (then ``drtrl.exact`` judges it) or an
  ``approximate`` declaration (then the spread is reported); otherwise the
  check fails and says how many outputs an element reaches.  Above
  ``ANCHOR_SAMPLES`` weight elements (or in fast mode) a seeded sample of
  elements is measured instead of all of them.
* ``yw_to_w.linear``: linear in ``g``, and element-wise in the trace
  (additive, and commuting with an element-wise mask).
* ``yw_to_w.vmap``: the same answer with the batch kept, under ``jax.vmap``
  with it stripped, and with extra leading axes on ``g`` and the trace.
"""

from __future__ import annotations

import itertools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from etp._src.arrays import to_jax
from etp_testing._src import (compilations, context, directions, executor,
                               tolerances)
from etp_testing._src.checks.registry import check
from etp_testing._src.checks.xy_to_dw import device_seeds
from etp_testing._src.context import compiled
from etp_testing._src.differences import errors_from_device, traced_errors
from etp_testing._src.errors import RuleFailure, raised
from etp_testing._src.report import Finding

# Weight elements whose Jacobian columns yw_to_w.anchor measures at most.
ANCHOR_SAMPLES = 512
FAST_ANCHOR_SAMPLES = 64
# Largest weight whose sampled columns a large case takes one dispatch each
# (see reach).
DISPATCHED_COLUMNS_UP_TO = 1 << 20


def trace_shapes(ctx) -> dict:
  """Per-key trace shapes without the state axis, as ``init_drtrl`` says."""
  try:
    traces = ctx.trace_avals   # shapes only: a large layer's is not allocated
  except Exception as e:  # pylint: disable=broad-except
    raise RuleFailure('init_drtrl', raised('init_drtrl', e)) from e
  ctx.check_keys('init_drtrl', traces, ctx.weights.keys())
  return {k: tuple(np.shape(v))[:-1] for k, v in traces.items()}


def random_traces(ctx, tag, shapes, dtype, keys=None):
  """Random traces of ``shapes`` in ``dtype`` (one, or one per key); only
  ``keys``' random where given (the others zeros: a rule needs every key,
  but a check that compares some need not draw LoRA's 1 GiB trace for one
  it does not)."""
  dtype_of = dtype.get if isinstance(dtype, Mapping) else lambda _: dtype
  return {k: ctx.normal(f'{tag}.{k}', s, dtype_of(k))
          if keys is None or k in keys else np.zeros(s, dtype_of(k))
          for k, s in shapes.items()}


def _example_operands(ctx, point: int):
  """Random operands shaped like the case (one example for batched ones),
  each floating one valid where the case's is (``CheckContext.values_like``:
  drawn from a normal distribution, ``sqrt(W)``'s Jacobian was ``nan`` at
  negative entries, counted as reaching no output, and a wrong ``yw_to_w``
  passed on no measured element)."""
  ops = []
  for i, o in enumerate(ctx.operands):
    if i == ctx.primitive.x_invar_index and ctx.batched:
      o = o[:1]
    if jnp.issubdtype(o.dtype, jnp.floating):
      o = ctx.values_like(f'yw_to_w.anchor.point{point}.{i}', i, operand=o)
    ops.append(o)
  return ops


def _sample(ctx, size, key):
  limit = FAST_ANCHOR_SAMPLES if ctx.fast else ANCHOR_SAMPLES
  if size <= limit:
    return np.arange(size)
  rng = np.random.default_rng(ctx.seed + size)
  return np.sort(rng.choice(size, limit, replace=False))


def _column_fn(primitive, params, key):
  """``(operands, element) -> col``: the flattened ``dy`` for a one-hot
  tangent on element ``element`` of weight ``key`` (``jax.jvp``)."""
  index = primitive.trainable_invars(params)[key]

  def column(operands, e):
    w = operands[index]

    def y_of(wk):
      new = list(operands)
      new[index] = wk
      return executor.bind_y(primitive, new, params)
    onehot = jnp.zeros(w.size, w.dtype).at[e].set(1).reshape(w.shape)
    return jax.jvp(y_of, (w,), (onehot,))[1].reshape(-1)
  return column


@compiled
def _columns(primitive, params, keys):
  """``(operands, elements) -> cols``: ``cols[k][i]`` is the column of
  element ``elements[k][i]`` of weight ``k`` (:func:`_column_fn`), for
  every key in ``keys``, each under ``lax.map``; one program for them all
  (a program per key compiled one more per signature and weight)."""
  column = {k: _column_fn(primitive, params, k) for k in keys}
  return lambda operands, elements: {
      k: jax.lax.map(lambda e, k=k: column[k](operands, e), elements[k])
      for k in keys}


_column = compiled(_column_fn)


def reach(ctx, elements: dict) -> dict:
  """``{key: mask}``, ``mask[i, j]``: output ``j`` (flat, one example)
  depends on element ``elements[key][i]`` of weight ``key``.

  A large case takes the columns of a weight with at most
  ``DISPATCHED_COLUMNS_UP_TO`` elements one dispatch each: XLA:CPU (jax
  0.10.2) ran a convolution inside ``lax.map``'s loop 30x slower than on
  its own (64 -> 64 conv: 4.1 s a point, 0.13 s dispatched).  Larger
  weights, and every weight of a small case, stay in the loop: there a
  fresh one-hot tangent per dispatch costs more (dense 4096: 3.5 s
  dispatched, 0.64 s looped)."""
  dispatched = tuple(
      k for k in elements if not ctx.small and
      int(np.prod(ctx.weight_avals[k].shape)) <= DISPATCHED_COLUMNS_UP_TO)
  looped = tuple(k for k in elements if k not in dispatched)
  masks = {}
  for point in range(2 if elements else 0):
    operands = jax.device_put(_example_operands(ctx, point))
    # All dispatched before the first is read: they queue, not wait.
    pending = {k: [_column(ctx, k)(operands, np.int32(e)) for e in elements[k]]
               for k in dispatched}
    if looped:
      pending.update(_columns(ctx, looped)(
          operands, {k: to_jax(elements[k]) for k in looped}))
    for k in elements:
      cols = (np.stack([np.asarray(c) for c in pending[k]]) if k in dispatched
              else np.asarray(pending[k]))
      hit = np.abs(cols) > 0
      masks[k] = hit if point == 0 else (masks[k] | hit)
  return masks


@check('yw_to_w.anchor')
def check_anchor(ctx):
  """For anchored weights ``yw_to_w(g, T)[e] == g[pi(e)] * T[e]`` with ``pi``
  from the Jacobian's sparsity; weights that reach several outputs need
  ``instant_drtrl``/``solve_drtrl`` or an ``approximate`` declaration."""
  if not ctx.weights:
    ctx.skip(f'{ctx.name} has no trainable operands')
  shapes = trace_shapes(ctx)
  y = ctx.y_aval()
  g = ctx.normal('yw_to_w.anchor.g', y.shape, y.dtype)
  traces = linked = None   # built when an anchored key needs them
  sampled = {k: _sample(ctx, w.size, k) for k, w in ctx.weights.items()
             if w.size}
  masks = reach(ctx, sampled)
  lead = tuple(g.shape[:1]) if ctx.batched else ()
  # The keys compared below: every measured element anchored, the trace
  # shaped like the weight.
  compared = [k for k, w in ctx.weights.items() if w.size and
              int(masks[k].sum(axis=1).max(initial=0)) <= 1 and
              shapes[k] == lead + tuple(w.shape)]
  for k, w in ctx.weights.items():
    if w.size == 0:
      ctx.record_pass('yw_to_w', key=k, message='empty weight: nothing to link')
      continue
    elements, mask = sampled[k], masks[k]
    n_reach = mask.sum(axis=1)
    worst = int(n_reach.max(initial=0))
    if worst > 1:
      e = int(elements[int(np.argmax(n_reach))])
      where = tuple(int(i) for i in np.unravel_index(e, w.shape))
      spread = (f'weight element {where} reaches {worst} outputs '
                f'({int((n_reach > 1).sum())} of {len(elements)} measured '
                'elements reach more than one)')
      if ctx.rules.instant_drtrl is not None:
        ctx.record_pass('yw_to_w', key=k, message=(
            f'{spread}: handled by instant_drtrl/solve_drtrl (judged by '
            'drtrl.exact and drtrl.instant)'))
      elif k in ctx.rules.approximate:
        ctx.record(Finding(rule='yw_to_w', key=k, passed=True,
                           approximate=True, message=(
                               f'{spread}: declared approximate')))
      else:
        # A declaration that names no weight here is likely a typo for this
        # one: say what it names.
        declared = sorted(set(ctx.rules.approximate) - set(ctx.weights))
        note = (f' (approximate= names {", ".join(map(repr, declared))}, '
                f'not a weight of this case: the weights are '
                f'{", ".join(map(repr, ctx.weights))})' if declared else '')
        ctx.fail('yw_to_w', key=k, message=(
            f'{spread}; a weight-shaped trace cannot be exact for it: provide '
            'instant_drtrl/solve_drtrl with a trace that keeps output '
            f'positions, or declare the weight approximate{note}'))
      continue
    if k not in compared and ctx.rules.instant_drtrl is not None:
      # A trace that keeps other positions has no element per weight
      # element to pick g for.
      ctx.record_pass('yw_to_w', key=k, message=(
          f'anchored; its trace from instant_drtrl is shaped {shapes[k]}, '
          'not like its weight (drtrl.exact and drtrl.instant judge the '
          'pair)'))
      continue
    if k not in compared:
      ctx.fail('init_drtrl', key=k, message=(
          f'trace shape {shapes[k]} is not (*lead, *weight_shape) = '
          f'{lead + tuple(w.shape)} for an anchored weight'))
      continue
    if linked is None:
      traces = random_traces(ctx, 'yw_to_w.anchor.T', shapes,
                             ctx.weight_dtype(), keys=compared)
      linked = ctx.call_rule('yw_to_w', g, traces)
      ctx.check_keys('yw_to_w', linked, ctx.weights.keys())
    reached = n_reach == 1
    anchor = np.argmax(mask, axis=1)
    flat_g = np.asarray(g).reshape(lead + (-1,))
    t_flat = np.asarray(traces[k]).reshape(lead + (-1,))
    expected = t_flat[..., elements[reached]] * flat_g[..., anchor[reached]]
    actual = np.asarray(linked[k])
    if actual.shape != traces[k].shape:
      ctx.fail('yw_to_w', key=k, message=(
          f'returned shape {tuple(actual.shape)} for a trace of shape '
          f'{tuple(traces[k].shape)}'))
      continue
    ctx.compare(actual.reshape(lead + (-1,))[..., elements[reached]], expected,
                rule='yw_to_w', key=k, what=(
                    f'yw_to_w vs g at the anchor (mask(J)^T g * T) on '
                    f'{int(reached.sum())} measured elements'))


# The three properties yw_to_w.linear checks, and its coefficients a, b.
LINEAR_PROPERTIES = {
    'g': 'linear in g: yw(a g1 + b g2, T) vs a yw(g1, T) + b yw(g2, T)',
    'add': 'additive in the trace: yw(g, T1 + T2) vs yw(g, T1) + yw(g, T2)',
    'mask': 'element-wise in the trace: yw(g, T * m) vs yw(g, T) * m',
}
LINEAR_A, LINEAR_B = 1.5, -0.75
# Traces yw_to_w.linear holds at once: T1, T2, their sum, the mask and seven
# results of the rule (measured 14 with the three comparisons' sides all
# held; made one comparison at a time, about 9 on the conv and batched dense
# layers); on the device (_check_linear_on_device) XLA's plan decides, or
# where the backend gives none, an estimate of 3.
LINEAR_HOST_COPIES = 16
LINEAR_DEVICE_COPIES = 3


@check('yw_to_w.linear')
def check_linear(ctx):
  """``yw_to_w`` is linear in ``g`` and element-wise in the trace.

  In fast mode, a case whose traces do not fit the host comparison (LoRA's
  4096 x 4096 layer: 16 GiB) is checked on the device instead (see
  :func:`_check_linear_on_device`)."""
  if not ctx.weights:
    ctx.skip(f'{ctx.name} has no trainable operands')
  fitted = ctx.for_traces(copies=LINEAR_HOST_COPIES, skip=False)
  if fitted is None:
    _check_linear_on_device(ctx)
    return
  ctx = fitted
  shapes = trace_shapes(ctx)
  y = ctx.y_aval()
  dt = ctx.weight_dtype()
  g1, g2 = (ctx.normal(f'yw_to_w.linear.g{i}', y.shape, y.dtype) for i in (1, 2))
  t1 = random_traces(ctx, 'yw_to_w.linear.T1', shapes, dt)
  t2 = random_traces(ctx, 'yw_to_w.linear.T2', shapes, dt)
  masks = {k: (np.asarray(ctx.uniform(f'yw_to_w.linear.m.{k}', s, dt, 0., 1.))
               > 0.5).astype(dt) for k, s in shapes.items()}
  def yw(g, t):
    """The rule's results as host arrays: the sides' combinations are then
    made on the host, in the operands' dtype (nothing to compile)."""
    out = ctx.call_rule('yw_to_w', g, t)
    ctx.check_keys('yw_to_w', out, shapes.keys())
    return {k: np.asarray(v) for k, v in out.items()}
  g1, g2 = np.asarray(g1), np.asarray(g2)
  t1 = {k: np.asarray(v) for k, v in t1.items()}
  t2 = {k: np.asarray(v) for k, v in t2.items()}
  masks = {k: np.asarray(v) for k, v in masks.items()}
  # T1 + T2 is rounded to the trace's dtype, a g combination to y's.
  dtype = tolerances.coarsest(dt, y.dtype)
  for which, what in LINEAR_PROPERTIES.items():
    # Each property's sides made once the one before has been compared and
    # dropped (all three at once held twice the traces).
    actual, expected, terms = _linear_sides(which, yw, g1, g2, t1, t2,
                                            masks, with_terms=True)
    ctx.compare_trees(actual, expected, rule='yw_to_w', what=what,
                      dtype=dtype, term_scales=terms)
    del actual, expected, terms


def _linear_sides(which, yw, g1, g2, t1, t2, masks, with_terms=False):
  """``(actual, expected, terms)`` of property ``which``
  (``LINEAR_PROPERTIES``) for the rule ``yw(g, t)``: on host arrays (the
  host comparison), or traced (the device's); each combination in its
  operands' dtype.

  ``terms``: with ``with_terms`` (host arrays only), per key, the size of
  the terms a side adds (``None`` where nothing is added, or without it):
  each side rounds the sum differently (the other one the combination of
  ``g`` or of the traces), and where it cancels that rounding is relative
  to the terms (a float16 sparse layer's ``a g1 + b g2`` took 3.14 of a
  bound scaled by the result; soak seed 76).  The device's comparison, of
  a large layer, does without: there the scale, ``max|expected|`` over
  millions of elements, is already the terms' size unless every element
  cancels, and reading the rule's results a second time made XLA:CPU hold
  two more traces of LoRA's 4096 layer (1.3 -> 3.3 GiB)."""
  a, b = LINEAR_A, LINEAR_B
  if which == 'g':
    r1, r2 = yw(g1, t1), yw(g2, t1)
    return (yw((a * g1 + b * g2).astype(g1.dtype), t1),
            {k: (a * r1[k] + b * r2[k]).astype(r1[k].dtype) for k in r1},
            {k: np.abs(a * r1[k]) + np.abs(b * r2[k]) for k in r1}
            if with_terms else None)
  if which == 'add':
    r1, r2 = yw(g1, t1), yw(g1, t2)
    return (yw(g1, {k: t1[k] + t2[k] for k in t1}),
            {k: r1[k] + r2[k] for k in r1},
            {k: np.abs(r1[k]) + np.abs(r2[k]) for k in r1}
            if with_terms else None)
  r = yw(g1, t1)
  return (yw(g1, {k: t1[k] * masks[k] for k in t1}),
          {k: r[k] * masks[k] for k in r}, None)


@compiled
def _linear_program(primitive, params, rule, shapes, keys, dtype, y_shape,
                    y_dtype, which):
  """``(operands, seeds) -> [{key: differences.traced_errors}]``: property
  ``which`` of ``yw_to_w.linear`` for the trace keys and shapes ``shapes``
  (a tuple of pairs), its cotangents, traces and mask drawn on the device
  from ``seeds`` (``directions.uniform``: ``g1``, ``g2``, then per key
  ``T1``, ``T2`` and the mask's), and both sides compared there for the
  keys ``keys``."""

  def program(operands, seeds):
    _, _, rule_params = primitive.split_operands(operands, params)
    yw = lambda g, t: rule(g, t, **rule_params)
    draw = lambda i, shape, dt: directions.uniform(seeds[i], shape, dt)
    g1, g2 = (draw(i, y_shape, y_dtype) for i in (0, 1))
    t1, t2, masks = ({k: draw(2 + 3 * i + j, s, dtype)
                      for i, (k, s) in enumerate(shapes)} for j in range(3))
    # Half the mask's elements zero, half one.
    masks = {k: (m > 0).astype(dtype) for k, m in masks.items()}
    actual, expected, _ = _linear_sides(which, yw, g1, g2, t1, t2, masks)
    return [{k: traced_errors(actual[k], expected[k]) for k in keys}]
  return program


def _check_linear_on_device(ctx):
  """``yw_to_w.linear`` where its traces do not fit on the host: one program
  per property draws the traces on the device (``directions.uniform``, as
  fast mode's directions), calls the rule there and reduces each key's two
  sides to the numbers a comparison reports (``differences.traced_errors``:
  the largest difference, where, and the scale), judged on the host as
  :meth:`CheckContext.compare` judges a large array.  Nothing trace-sized
  is copied.  The same three properties as the host comparison, each
  element compared.

  The programs are compiled first; they run only if the largest one's
  memory as XLA plans it (``compilations.planned_bytes``: scratch and
  outputs) fits ``FAST_TRACE_BYTES`` (where the backend does not say, an
  estimate of ``LINEAR_DEVICE_COPIES`` traces decides).  An element-wise
  rule lets XLA fuse most of it: LoRA's 4096 x 4096 layer plans one trace
  per program."""
  shapes = trace_shapes(ctx)
  y = ctx.y_aval()
  dt = np.dtype(ctx.weight_dtype())
  keys = _keys_shaped_as_traces(
      ctx, jax.ShapeDtypeStruct(y.shape, y.dtype),
      {k: jax.ShapeDtypeStruct(s, dt) for k, s in shapes.items()})
  if not keys:
    return
  programs = {what: ([what], _linear_program(
      ctx, ctx.rules.yw_to_w, tuple(shapes.items()), tuple(keys), dt.name,
      tuple(y.shape), np.dtype(y.dtype).name, which))
              for which, what in LINEAR_PROPERTIES.items()}
  _judge_on_device(ctx, programs, 'yw_to_w.linear.device',
                   2 + 3 * len(shapes), keys, shapes,
                   tolerances.coarsest(dt, y.dtype), LINEAR_HOST_COPIES,
                   LINEAR_DEVICE_COPIES)


def _keys_shaped_as_traces(ctx, g_aval, t_avals: dict, depth: int = 0,
                           what: str = '') -> list:
  """The keys for which ``yw_to_w``, traced on ``g_aval`` and ``t_avals``
  (shapes only: nothing is allocated) under ``depth`` nested ``jax.vmap``,
  returns an array of its trace's shape; each other key is failed.  A rule
  that raises, or returns other keys, is a :class:`RuleFailure` (``what``:
  how it was called, for the message)."""
  rule = ctx.rules.yw_to_w
  # The aux operands as given (ctx.rule_params would copy every operand).
  _, _, rule_params = ctx.primitive.split_operands(ctx.device_operands,
                                                   ctx.params)
  fn = lambda g, t: rule(g, t, **rule_params)
  for _ in range(depth):
    fn = jax.vmap(fn)
  shapes = {k: tuple(v.shape) for k, v in t_avals.items()}
  try:
    returned = jax.eval_shape(fn, g_aval, t_avals)
  except Exception as e:  # pylint: disable=broad-except
    raise RuleFailure('yw_to_w', raised(
        'yw_to_w', e, (f'{what}: ' if what else '') + 'traced on a '
        f'cotangent of shape {tuple(g_aval.shape)} and traces of shapes '
        f'{shapes}')) from e
  ctx.check_keys('yw_to_w', returned, shapes.keys())
  keys = []
  for k, s in shapes.items():
    if tuple(returned[k].shape) != s:
      ctx.fail('yw_to_w', key=k, message=(
          (f'{what}: ' if what else '') + 'returned shape '
          f'{tuple(returned[k].shape)} for a trace of shape {s}'))
    else:
      keys.append(k)
  return keys


def _judge_on_device(ctx, programs: dict, seed_tag: str, n_seeds: int, keys,
                     shapes: dict, dtype, host_copies: int,
                     device_copies: int) -> None:
  """Runs ``programs`` on the device and judges what they find.

  ``programs``: ``what -> (labels, program)``; each program of ``(operands,
  seeds)`` (``n_seeds`` seeds named ``<seed_tag>.<i>``, on the device)
  returns one ``{key: differences.traced_errors}`` per label, judged for
  ``keys`` (of trace ``shapes``) with ``dtype``'s tolerance, as
  :meth:`CheckContext.compare` judges a large array.

  All are compiled first; they run only if the memory XLA plans for the
  largest (``compilations.planned_bytes``: scratch and outputs) fits
  ``FAST_TRACE_BYTES``, else the check is skipped (where the backend does
  not say, an estimate of ``device_copies`` traces decides).  The report
  says what the host comparison would have held (``host_copies`` traces)
  and what the device holds.  A rule that raises while a program is
  compiled or run is a :class:`RuleFailure` saying which (``what``)."""
  seeds = device_seeds(
      tuple(int(ctx.seed32(f'{seed_tag}.{i}')) for i in range(n_seeds)),
      jax.config.jax_default_device)
  args = (list(ctx.device_operands), seeds)
  compiled_programs = {}
  for what, (_, program) in programs.items():
    try:
      compiled_programs[what] = program.lower(*args).compile()
    except Exception as e:  # pylint: disable=broad-except
      raise RuleFailure('yw_to_w', raised(
          'yw_to_w', e, f'on the device, {what}')) from e
  one = ctx.trace_bytes()
  plans = [compilations.planned_bytes(p) for p in compiled_programs.values()]
  if None in plans:
    held = device_copies * one
    how = f'{device_copies} x {context.size_text(one)}, estimated'
  else:
    held, how = max(plans), 'as XLA plans its largest program'
  if held > context.FAST_TRACE_BYTES:
    ctx.skip_over_trace_budget(held, f'even on the device ({how})')
  ctx.record_pass('trace', message=(
      f'fast mode: about {context.size_text(host_copies * one)} of '
      'traces on the host; drawn and compared on the device instead '
      f'({context.size_text(held)}, {how})'))
  for what, (labels, _) in programs.items():
    try:
      errors = jax.device_get(compiled_programs.pop(what)(*args))
    except Exception as e:  # pylint: disable=broad-except
      raise RuleFailure('yw_to_w', raised(
          'yw_to_w', e, f'on the device, {what}')) from e
    for label, by_key in zip(labels, errors):
      for k in keys:
        ctx.judge_errors(errors_from_device(*by_key[k], shapes[k]),
                         rule='yw_to_w', key=k, shape=shapes[k], dtype=dtype,
                         what=f'fast mode, on the device: {label}')


# The extra leading axes yw_to_w.vmap adds to g and the traces.
VMAP_EXTRA = (2, 2)
# Traces yw_to_w.vmap holds at once on the host: four with the extra axes,
# the rule's results on them, direct and mapped, and one entry at a time
# (measured 19 with both results held, as a small case holds them; a large
# case holds one at a time: measured 9-10 on the conv and batched dense
# layers).  On the device (_check_vmap_on_device) XLA's plan decides, or
# where the backend gives none, an estimate of 9: the four entries and the
# rule's results on them, and the base trace.
VMAP_HOST_COPIES = 20
VMAP_DEVICE_COPIES = 9
# On the device, entry e of the extra axes' trace is VMAP_ENTRY_SCALES[e] *
# T + VMAP_ENTRY_SHIFTS[e] for one drawn T (see _vmap_program).
VMAP_ENTRY_SCALES = (1.0, -0.75, 0.5, 1.25)
VMAP_ENTRY_SHIFTS = (0.0, 0.5, -0.25, 0.75)


@check('yw_to_w.vmap')
def check_vmap(ctx):
  """The same result with the batch kept, under ``vmap`` with it stripped,
  and with two extra leading axes."""
  if not ctx.weights:
    ctx.skip(f'{ctx.name} has no trainable operands')
  fitted = ctx.for_traces(copies=VMAP_HOST_COPIES, skip=False)
  if fitted is None:
    _check_vmap_on_device(ctx)
    return
  ctx = fitted
  shapes = trace_shapes(ctx)
  y = ctx.y_aval()
  dt = ctx.weight_dtype()
  g = ctx.normal('yw_to_w.vmap.g', y.shape, y.dtype)
  t = random_traces(ctx, 'yw_to_w.vmap.T', shapes, dt)
  yw = lambda g, t, vmap=0: ctx.call_rule('yw_to_w', g, t, vmap=vmap)
  kept = yw(g, t)
  ctx.check_keys('yw_to_w', kept, ctx.weights.keys())
  if ctx.batched:
    try:
      stripped = yw(g, t, vmap=1)
    except RuleFailure as e:
      raise RuleFailure('yw_to_w', f'under vmap with the batch stripped: '
                        f'{e.message}') from e
    ctx.compare_trees(stripped, kept, rule='yw_to_w',
                      what='vmap over the batch (stripped) vs batch kept')
    del stripped
  del g, t, kept   # the extra axes' traces are four times as large
  extra = VMAP_EXTRA
  g_extra = ctx.normal_on_host('yw_to_w.vmap.G', extra + tuple(y.shape),
                               y.dtype)
  t_extra = {k: ctx.normal_on_host(f'yw_to_w.vmap.TT.{k}', extra + s, dt)
             for k, s in shapes.items()}
  ways = {0: f'extra leading axes {extra}', 2: f'vmap over extra axes {extra}'}
  if ctx.small:   # one program: direct and under vmap
    _compare_entries(ctx, extra, g_extra, t_extra, ways, yw)
  else:           # one result at a time (each entry's call made twice)
    for depth, way in ways.items():
      _compare_entries(ctx, extra, g_extra, t_extra, {depth: way}, yw)


def _on_cpu(tree) -> bool:
  """Whether every array of ``tree`` is on a CPU device (where NumPy reads
  it without a copy)."""
  return all(d.platform == 'cpu' for v in jax.tree.leaves(tree)
             for d in v.devices())


def _compare_entries(ctx, extra, g_extra, t_extra, ways: dict, yw):
  """Calls the rule on traces with ``extra`` leading axes, directly or
  under nested ``vmap`` (``ways``: depth -> label; all in one program), and
  compares each entry of each result with the call on that entry alone."""
  depths = tuple(ways)
  try:
    results = yw(g_extra, t_extra, vmap=depths)
  except RuleFailure as e:
    raise RuleFailure('yw_to_w', f'with extra leading axes {extra}: '
                      f'{e.message}') from e
  for result in results:
    ctx.check_keys('yw_to_w', result, ctx.weights.keys())
  if ctx.small or _on_cpu(results):
    # On the host: taking entries compiles nothing (and a CPU's results are
    # there already).  A large case's stay on a GPU, an entry at a time
    # copied out (a whole one's host copy set the check's peak there).
    results = jax.tree.map(np.asarray, results)
  for i, j in itertools.product(range(extra[0]), range(extra[1])):
    one = yw(g_extra[i, j], {k: v[i, j] for k, v in t_extra.items()})
    for depth, result in zip(depths, results):
      what = (f'entry {(i, j)} vs the call on that entry alone' if depth == 0
              else f'entry {(i, j)}')
      ctx.compare_trees({k: v[i, j] for k, v in result.items()}, one,
                        rule='yw_to_w', what=f'{ways[depth]}, {what}')


@compiled
def _vmap_program(primitive, params, rule, shapes, keys, dtype, y_shape,
                  y_dtype, depths, entries):
  """``(operands, seeds) -> errors``: comparisons of ``yw_to_w.vmap`` on
  the device, for the trace keys and shapes ``shapes`` (a tuple of pairs),
  compared for the keys ``keys``; ``g`` and the traces are drawn there from
  ``seeds`` (``directions.uniform``: ``g``'s first, then one per key).

  ``depths`` ``None``: the rule under ``jax.vmap`` over the batch vs the
  rule with the batch kept.  Otherwise the rule on ``g`` and traces with
  ``VMAP_EXTRA`` leading axes, called directly (depth 0) or under two
  nested ``jax.vmap`` (depth 2), at each of ``entries`` vs the rule on
  that entry alone.  ``errors`` is a list of ``{key: traced_errors}``, one
  per comparison: entry by entry, each at every depth.

  ``g``'s entries are drawn independently.  The traces' entries are affine
  images of one drawn trace ``T`` (``VMAP_ENTRY_SCALES[e] * T +
  VMAP_ENTRY_SHIFTS[e]``): every pair of entries differs, so a rule that
  mixes entries up or reads one entry for another shows, and XLA need not
  hold four traces' worth of draws.  Two entries per program: with all
  four compared in one, XLA:CPU held the rule's whole result (4 GiB on
  LoRA's 4096 x 4096 layer; with one, an element-wise rule fuses into the
  comparison and only ``T`` is held); two plan 2 GiB, and the check took
  18 s against 20 s with one entry a program (2-core CPU, a run each)."""

  def program(operands, seeds):
    _, _, rule_params = primitive.split_operands(operands, params)
    yw = lambda g, t: rule(g, t, **rule_params)
    draw = lambda i, shape, dt: directions.uniform(seeds[i], shape, dt)
    if depths is None:
      g = draw(0, y_shape, y_dtype)
      t = {k: draw(1 + i, s, dtype) for i, (k, s) in enumerate(shapes)}
      kept, stripped = yw(g, t), jax.vmap(yw)(g, t)
      return [{k: traced_errors(stripped[k], kept[k]) for k in keys}]
    g = draw(0, VMAP_EXTRA + tuple(y_shape), y_dtype)
    t = {}
    for i, (k, s) in enumerate(shapes):
      per_entry = lambda c: jnp.asarray(c, dtype).reshape(
          VMAP_EXTRA + (1,) * len(s))
      t[k] = (per_entry(VMAP_ENTRY_SCALES) * draw(1 + i, s, dtype)
              + per_entry(VMAP_ENTRY_SHIFTS))
    results = []
    for d in depths:
      mapped = yw
      for _ in range(d):
        mapped = jax.vmap(mapped)
      results.append(mapped(g, t))
    errors = []
    for e in entries:
      one = yw(g[e], {k: v[e] for k, v in t.items()})
      errors.extend({k: traced_errors(result[k][e], one[k]) for k in keys}
                    for result in results)
    return errors
  return program


def _check_vmap_on_device(ctx):
  """``yw_to_w.vmap`` where its traces do not fit on the host (LoRA's
  4096 x 4096 layer: 20 GiB): each comparison is one program that draws
  ``g`` and the traces on the device, calls the rule there both ways and
  reduces each key's two sides to the numbers a comparison reports
  (:func:`_vmap_program`), judged on the host as :meth:`CheckContext.compare`
  judges a large array; nothing trace-sized is copied.  The same
  comparisons as on the host, each element compared, but for how the
  extra axes' traces are drawn (affine images of one trace).  The programs
  run only if XLA's plan fits ``FAST_TRACE_BYTES`` (see
  :func:`_judge_on_device`)."""
  shapes = trace_shapes(ctx)
  y = ctx.y_aval()
  dt = np.dtype(ctx.weight_dtype())
  extra = VMAP_EXTRA
  ways = {None: 'vmap over the batch (stripped) vs batch kept'} \
      if ctx.batched else {}
  ways.update({0: f'extra leading axes {extra}',
               2: f'vmap over extra axes {extra}'})
  g_aval = lambda lead: jax.ShapeDtypeStruct(lead + tuple(y.shape), y.dtype)
  t_avals = lambda lead: {k: jax.ShapeDtypeStruct(lead + s, dt)
                          for k, s in shapes.items()}
  keys = _keys_shaped_as_traces(ctx, g_aval(()), t_avals(()))
  for depth, what in ways.items():
    lead = () if depth is None else extra
    if keys:
      keys = [k for k in _keys_shaped_as_traces(
          ctx, g_aval(lead), t_avals(lead), 1 if depth is None else depth,
          what) if k in keys]
  if not keys:
    return
  program = lambda depths, entries=None: _vmap_program(
      ctx, ctx.rules.yw_to_w, tuple(shapes.items()), tuple(keys), dt.name,
      tuple(y.shape), np.dtype(y.dtype).name, depths, entries)
  # what -> (the labels of its comparisons, in order, and its program).
  comparisons = {}
  if ctx.batched:
    comparisons[ways[None]] = ([ways[None]], program(None))
  for i in range(extra[0]):
    entries = tuple((i, j) for j in range(extra[1]))
    comparisons[f'{ways[0]} and {ways[2]}, entries {entries}'] = (
        [label for e in entries for label in (
            f'{ways[0]}, entry {e} vs the call on that entry alone',
            f'{ways[2]}, entry {e}')], program((0, 2), entries))
  _judge_on_device(ctx, comparisons, 'yw_to_w.vmap.device', 1 + len(shapes),
                   keys, shapes, tolerances.coarsest(dt, y.dtype),
                   VMAP_HOST_COPIES, VMAP_DEVICE_COPIES)
