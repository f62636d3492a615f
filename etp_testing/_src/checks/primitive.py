r"""Checks of the primitive itself: evaluation, abstract evaluation, JVP, vmap.

The rules are only as good as the primitive they describe, and the oracles of
the other checks (``jax.vjp``, ``jax.grad``, ``jax.vmap``) go through the
primitive's own JAX rules (derived from ``impl`` by ``register_primitive``, or
overridden).  These checks hold those JAX rules to ``impl``:

* ``primitive.jit``: eager ``bind`` (``impl`` on concrete arrays) equals
  ``jax.jit`` of it (the lowering), in value and dtype; for a
  ``gradient_enabled`` marker, it also equals its operand (the identity);
* ``primitive.abstract_eval``: ``jax.eval_shape`` of the bind gives the real
  output's shape and dtype, and for operands none of which is 64-bit the
  same dtype with ``jax_enable_x64`` off and on (an impl that mixes in a
  value of the default dtype returns float64 for float32 operands with it
  on);
* ``primitive.jvp``: as ``jax.test_util.check_grads(order=2, modes=('fwd',
  'rev'))``, in float64: the forward mode against central finite differences
  of ``impl`` (never of ``bind``), along one random tangent for every floating
  operand (``x`` included; integer operands are closed over):

  .. math::  J v \approx (f(p + \epsilon v) - f(p - \epsilon v)) / 2\epsilon,

  the reverse mode by the dot-product test
  :math:`\langle u, J v \rangle = \langle J^\top u, v \rangle` for random
  ``u``, and both again for the JVP function :math:`p \mapsto J(p) v` (second
  order: its ``jax.jvp`` against central differences of it, and its VJP by the
  dot-product test); each computation runs under ``jax.jit`` (the JAX rules
  run while tracing, as in eager mode, with a handful of compilations);
* ``primitive.vmap``: eager ``jax.vmap`` of the bind over every combination of
  mapped operands (floating and integer) and axes (``0``, ``1`` where the rank
  allows, ``-1``): always each operand alone at each of its axes, the
  weights alone and every operand mapped, and a sample of the other
  combinations that differs from shape to shape, plus one nested vmap,
  equals the stacked per-example binds; and for a batched primitive,
  changing one example of ``x`` leaves the other examples' ``y`` unchanged.

A primitive with several outputs is judged on all of them, not only ``y``:
``primitive.jvp`` differentiates every floating output, flattened and joined,
and ``primitive.vmap`` compares each output.

A JAX rule that raises is a failed finding naming the rule (``impl``,
``abstract_eval``, ``jvp``, ``batching``) and the shapes, not a crash.
"""

from __future__ import annotations

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from etp_testing._src import executor, tolerances
from etp_testing._src.differences import abs_max
from etp_testing._src.checks.registry import check
from etp_testing._src.context import (absolute, compiled, jitted_bind,
                                      shape_of, terms_or_none, to_float64,
                                      x64_enabled)
from etp_testing._src.errors import RuleFailure, raised

# in_axes combinations per case: the ones always tried (each operand alone
# at each axis, the weights alone, all mapped), then a sample of the others,
# at least VMAP_SAMPLED of them, up to VMAP_COMBINATIONS in all.
VMAP_COMBINATIONS = 12
VMAP_SAMPLED = 2
# Examples per mapped axis.
VMAP_SIZE = 2
# A large case's vmap cases run in programs holding at most this many bytes
# of stacked operands (over it, a case runs alone).
VMAP_GROUP_BYTES = 256 << 20
# Random cotangents of the dot-product tests.
DOT_PRODUCT_DIRECTIONS = 3


def _describe_operands(args) -> str:
  leaves = [a for a in jax.tree.leaves(args) if hasattr(a, 'dtype')]
  return ', '.join(f'{a.dtype}{list(np.shape(a))}' for a in leaves)


def _guarded(rule: str, what: str, fn, *args):
  """``fn(*args)``; whatever it raises becomes a :class:`RuleFailure`."""
  try:
    return fn(*args)
  except RuleFailure:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise RuleFailure(rule, raised(
        what, e, f'operands {_describe_operands(args)}')) from e


def _outputs(ctx, out) -> list:
  """Every output of a bind, as a list (one entry for single-output)."""
  return list(out) if ctx.primitive.multiple_results else [out]


def _output_label(ctx, i: int) -> str:
  return f'output {i}: ' if ctx.primitive.multiple_results else ''


def _differentiated(primitive, out):
  """What ``primitive.jvp`` differentiates: ``y``, or for a primitive with
  several outputs every floating one, flattened and joined, so that a JAX
  rule wrong for any output shows (JAX derives them all from ``impl``)."""
  if not primitive.multiple_results:
    return out
  return jnp.concatenate([jnp.ravel(o) for o in out
                          if jnp.issubdtype(o.dtype, jnp.inexact)])


# -------------------------------------------------------------------- jit
@check('primitive.jit')
def check_jit(ctx):
  """Eager ``bind`` equals ``jax.jit(bind)``, in value and dtype."""
  bind = lambda *ops: ctx.primitive.bind(*ops, **ctx.params)
  eager = _guarded('impl', 'eager bind', bind, *ctx.operands)
  jitted = _guarded('impl', 'jax.jit(bind)', jitted_bind(ctx),
                    list(ctx.operands))
  # XLA's fused program rounds a sum in another order than the eager ops:
  # where it cancels, relative to its terms (the bind on absolute values,
  # same program).  A float16 sparse layer's 0.12 from terms of about 4
  # took 1.71 of a bound scaled by the result (soak seed 82).
  terms = terms_or_none(jitted_bind(ctx), ctx.magnitudes(ctx.operands))
  terms = None if terms is None else _outputs(ctx, terms)
  for i, (a, e) in enumerate(zip(_outputs(ctx, jitted), _outputs(ctx, eager))):
    ctx.compare(a, e, rule='impl', check_dtype=True,
                dtype=ctx.bind_dtype(a.dtype, e.dtype),
                term_scale=None if terms is None else terms[i],
                what=f'{_output_label(ctx, i)}jax.jit(bind) vs eager bind')
  if ctx.primitive.gradient_enabled:
    _check_identity(ctx, eager)


def _check_identity(ctx, y):
  """A ``gradient_enabled`` marker is the identity on its (one trainable)
  operand: a compiler descends through it and uses JAX's VJP of whatever
  made the operand, so a marker that changed the value would train with
  gradients no rule and no autodiff oracle of the primitive could see."""
  trainable = ctx.primitive.trainable_invars(ctx.params)
  if len(trainable) != 1:
    ctx.fail('impl', message=(
        f'{ctx.name} is registered with gradient_enabled=True, a marker that '
        'is the identity on its one operand, but it has '
        f'{len(trainable)} trainable operands ({sorted(trainable)})'))
    return
  (key, index), = trainable.items()
  ctx.compare(executor.y_of_outputs(ctx.primitive, y), ctx.operands[index],
              rule='impl', key=key, check_dtype=True,
              what='gradient_enabled=True: the bind vs its operand (a '
              'marker is the identity)')


# --------------------------------------------------------- abstract eval
@check('primitive.abstract_eval')
def check_abstract_eval(ctx):
  """``jax.eval_shape`` of the bind equals the real output's shape/dtype."""
  bind = lambda *ops: ctx.primitive.bind(*ops, **ctx.params)
  abstract = _guarded('abstract_eval', 'jax.eval_shape(bind)',
                      lambda *ops: jax.eval_shape(bind, *ops), *ctx.operands)
  real = _guarded('impl', 'eager bind', bind, *ctx.operands)
  for i, (a, r) in enumerate(zip(_outputs(ctx, abstract),
                                 _outputs(ctx, real))):
    got = (tuple(a.shape), jnp.dtype(a.dtype))
    want = (tuple(np.shape(r)), jnp.dtype(r.dtype))
    label = _output_label(ctx, i)
    if got != want:
      ctx.fail('abstract_eval', message=(
          f'{label}eval_shape gives {got[1]}{list(got[0])}, the real output '
          f'is {want[1]}{list(want[0])}'), actual_shape=got[0],
               expected_shape=want[0], dtype=str(got[1]))
    else:
      ctx.record_pass('abstract_eval', message=(
          f'{label}eval_shape matches {want[1]}{list(want[0])}'))
  if len(_outputs(ctx, abstract)) != len(_outputs(ctx, real)):
    ctx.fail('abstract_eval', message=(
        f'eval_shape gives {len(_outputs(ctx, abstract))} outputs, the real '
        f'bind {len(_outputs(ctx, real))}'))
  _check_dtypes_ignore_x64(ctx, bind)


# 64-bit dtypes: operands of one of these exist only with jax_enable_x64 on.
_WIDE = tuple(np.dtype(t) for t in ('float64', 'int64', 'uint64',
                                    'complex128'))


def _check_dtypes_ignore_x64(ctx, bind) -> None:
  """The outputs' dtypes for these operands do not depend on
  ``jax_enable_x64`` (traced with it off and on; nothing runs).

  An impl that mixes in a value of the default dtype (``jnp.zeros(shape)``
  with no ``dtype``) returns float64 for float32 operands once x64 is on:
  every rule then sees another ``y`` than with it off.  Only operands that
  exist with x64 off (none of them 64-bit) can be traced both ways.
  """
  if any(np.result_type(o) in _WIDE for o in ctx.operands):
    return
  avals = [jax.ShapeDtypeStruct(np.shape(o), np.result_type(o))
           for o in ctx.operands]
  dtypes = {}
  for x64 in (False, True):
    with x64_enabled(x64):
      out = _guarded('impl', f'jax.eval_shape(bind) with jax_enable_x64 '
                     f'{"on" if x64 else "off"}',
                     lambda *ops: jax.eval_shape(bind, *ops), *avals)
      dtypes[x64] = [jnp.dtype(o.dtype) for o in _outputs(ctx, out)]
  for i, (off, on) in enumerate(zip(dtypes[False], dtypes[True])):
    label = _output_label(ctx, i)
    if off != on:
      ctx.fail('impl', message=(
          f'{label}the output dtype follows jax_enable_x64: {off} with it '
          f'off, {on} with it on, for operands '
          + ', '.join(str(a.dtype) for a in avals) + ' (a value made in '
          'the default dtype, as jnp.zeros(shape) without dtype= makes '
          'it, is mixed in): give it the operands\' dtype'),
               dtype=str(on))
    else:
      ctx.record_pass('impl', message=(
          f'{label}output dtype {off} with jax_enable_x64 off and on'))


# -------------------------------------------------------------------- jvp
def _floating_positions(operands) -> list:
  return [i for i, o in enumerate(operands)
          if jnp.issubdtype(jnp.result_type(o), jnp.inexact)]


def _dot(a, b) -> float:
  return float(np.vdot(np.asarray(a, np.float64), np.asarray(b, np.float64)))


def _dot_product_test(ctx, backward, forward, what):
  """``<J^T u_k, v>`` (from ``jax.vjp``) vs ``<u_k, J v>`` (from
  ``jax.jvp``) for the ``DOT_PRODUCT_DIRECTIONS`` random cotangents."""
  ctx.compare(np.array(backward), np.array(forward), rule='jvp',
              what=f'{what}: dot-product test <J^T u, v> (jax.vjp) vs '
              f'<u, J v> (jax.jvp), {DOT_PRODUCT_DIRECTIONS} random u')


def _pulled_back(fn, p, cotangents) -> list:
  """``[J^T u for u in cotangents]`` of ``fn`` at ``p``: one linearisation,
  its pullback applied to each (a linearisation per cotangent was a tenth
  of the check's time over the default battery)."""
  pullback = jax.vjp(fn, p)[1]
  return [pullback(u)[0] for u in cotangents]


def _jvp_functions(primitive, params, diff):
  """The functions of ``primitive.jvp``, of ``(operands, p, ...)`` with
  ``p`` the floating operands at positions ``diff`` (the rest are taken
  from ``operands``): ``impl``, first-order ``jvp``/``vjp`` of the bind,
  the JVP function ``p -> J(p) t`` and its ``jvp``/``vjp``."""
  def with_diff(fn, operands):
    def f(args):
      new = list(operands)
      for i, a in zip(diff, args):
        new[i] = a
      return _differentiated(primitive, fn(*new, **params))
    return f

  bound = lambda ops: with_diff(primitive.bind, ops)
  jvp_of = lambda ops, t: (lambda p: jax.jvp(bound(ops), (p,), (t,))[1])
  return {
      'impl': lambda ops, p: with_diff(primitive.impl_fn, ops)(p),
      'jvp': lambda ops, p, t: jax.jvp(bound(ops), (p,), (t,)),
      'vjp': lambda ops, p, us: _pulled_back(bound(ops), p, us),
      'jvp_of': lambda ops, p, t: jvp_of(ops, t)(p),
      'jvp2': lambda ops, p, t, w: jax.jvp(jvp_of(ops, t), (p,), (w,))[1],
      'vjp2': lambda ops, p, t, us: _pulled_back(jvp_of(ops, t), p, us),
  }


@compiled
def _jvp_step(primitive, params, diff, name):
  return _jvp_functions(primitive, params, diff)[name]


@compiled
def _jvp_all(primitive, params, diff, eps):
  """Every quantity of ``primitive.jvp`` in one program (the fast path; on
  any error the steps run one by one, so that the error names its rule)."""
  f = _jvp_functions(primitive, params, diff)

  def all_of(ops, p, t, w, us, ws):
    shift = lambda q, d, s: [a + s * eps * b for a, b in zip(q, d)]
    return {
        'y': f['impl'](ops, p),
        'jvp': f['jvp'](ops, p, t),
        'impl+': f['impl'](ops, shift(p, t, 1)),
        'impl-': f['impl'](ops, shift(p, t, -1)),
        'vjp': f['vjp'](ops, p, us),
        'jvp2': f['jvp2'](ops, p, t, w),
        'jvp_of+': f['jvp_of'](ops, shift(p, w, 1), t),
        'jvp_of-': f['jvp_of'](ops, shift(p, w, -1), t),
        'vjp2': f['vjp2'](ops, p, t, ws),
    }
  return all_of


def _jvp_stepwise(ctx, diff, eps, ops, p, t, w, us, ws):
  """The quantities of :func:`_jvp_all`, one guarded step at a time."""
  step = lambda name, rule, what, *args: _guarded(
      rule, what, _jvp_step(ctx, diff, name), ops, *args)
  shift = lambda q, d, s: [a + s * eps * b for a, b in zip(q, d)]
  return {
      'y': step('impl', 'impl', 'impl (float64)', p),
      'jvp': step('jvp', 'jvp', 'jax.jvp(bind)', p, t),
      'impl+': step('impl', 'impl', 'impl (float64)', shift(p, t, 1)),
      'impl-': step('impl', 'impl', 'impl (float64)', shift(p, t, -1)),
      'vjp': step('vjp', 'jvp', 'jax.vjp (first order)', p, us),
      'jvp2': step('jvp2', 'jvp', 'jax.jvp of jax.jvp(bind)', p, t, w),
      'jvp_of+': step('jvp_of', 'jvp', 'the JVP function', shift(p, w, 1), t),
      'jvp_of-': step('jvp_of', 'jvp', 'the JVP function', shift(p, w, -1),
                      t),
      'vjp2': step('vjp2', 'jvp', 'jax.vjp (second order)', p, t, ws),
  }


def _dots(cotangents, directions, u_list, f_dot):
  backward = [sum(_dot(c, v) for c, v in zip(cots, directions))
              for cots in cotangents]
  forward = [_dot(u, f_dot) for u in u_list]
  return backward, forward


@check('primitive.jvp')
def check_jvp(ctx):
  """Forward mode vs finite differences of ``impl``, reverse mode by the
  dot-product test, at first and second order (float64)."""
  with x64_enabled(True):
    ops = to_float64(ctx.operands)
    diff = tuple(_floating_positions(ops))
    if not diff:
      ctx.skip(f'{ctx.name} has no floating operands to differentiate')
    ops = list(ops)
    primals = [ops[i] for i in diff]
    y = _guarded('impl', 'impl (float64)', jax.eval_shape,
                 _jvp_step(ctx, diff, 'impl'), ops, primals)
    if not jnp.issubdtype(y.dtype, jnp.inexact):
      ctx.skip(f'{ctx.name} has a non-floating output ({y.dtype})')
    # Each direction sized to its operand (tolerances.fd_step_scale), so the
    # differences' step is too.
    # (Scaled as they are drawn, on the host: eager JAX arithmetic would
    # compile per shape.)
    step = [tolerances.fd_step_scale(ops[i]) for i in diff]
    tangents = [ctx.normal(f'primitive.jvp.v{i}', ops[i].shape, jnp.float64,
                           scale=s) for s, i in zip(step, diff)]
    w = [ctx.normal(f'primitive.jvp.w{i}', t.shape, jnp.float64, scale=s)
         for s, i, t in zip(step, diff, tangents)]
    us = [ctx.normal(f'primitive.jvp.1.u{k}', y.shape, jnp.float64)
          for k in range(DOT_PRODUCT_DIRECTIONS)]
    ws = [ctx.normal(f'primitive.jvp.2.u{k}', y.shape, jnp.float64)
          for k in range(DOT_PRODUCT_DIRECTIONS)]
    eps = tolerances.FD_EPS
    args = (ops, primals, tangents, w, us, ws)
    try:
      r = _jvp_all(ctx, diff, eps)(*args)
    except Exception:  # pylint: disable=broad-except
      r = _jvp_stepwise(ctx, diff, eps, *args)
    r = jax.tree.map(lambda v: np.asarray(v, np.float64), r)
    # The differences' own rounding (tolerances.fd_rounding_scale) from the
    # size of the terms each side sums: a small case's program again on
    # absolute values (same shapes: nothing to compile), else the values.
    sizes = None
    if ctx.small:   # (operands, primals, tangents, directions...)
      magnitudes = ctx.magnitudes(ops)
      sizes = terms_or_none(_jvp_all(ctx, diff, eps), magnitudes,
                            [magnitudes[i] for i in diff],
                            *absolute(args[2:]))
    sizes = r if sizes is None else sizes
    size = lambda name: abs_max(np.asarray(sizes[name], np.float64))
    first_rounding = tolerances.fd_rounding_scale(size('y'))
    second_rounding = tolerances.fd_rounding_scale(
        max(size('jvp_of+'), size('jvp_of-')))
    names = ', '.join(f'operand {i}' for i in diff)
    if ctx.primitive.multiple_results:
      names += ' (every floating output, flattened and joined)'
    y_out, jv = r['jvp']
    # First order, forward: J v vs central differences of impl.
    ctx.compare(y_out, r['y'], rule='jvp', what='primal output of '
                'jax.jvp(bind) vs impl')
    ctx.compare(jv, (r['impl+'] - r['impl-']) / (2 * eps), rule='jvp',
                kind='fd', term_scale=first_rounding,
                what=f'jax.jvp(bind) along random tangents of '
                f'{names} vs central differences of impl')
    # First order, reverse: <u, J v> == <J^T u, v>.
    _dot_product_test(ctx, *_dots(r['vjp'], tangents, us, jv), 'first order')
    # Second order: the JVP function p -> J(p) v, differentiated once more.
    ctx.compare(r['jvp2'], (r['jvp_of+'] - r['jvp_of-']) / (2 * eps),
                rule='jvp', kind='fd', term_scale=second_rounding,
                what='second order: jax.jvp of the JVP '
                'function vs central differences of the JVP function')
    _dot_product_test(ctx, *_dots(r['vjp2'], w, ws, r['jvp2']),
                      'second order')


# ------------------------------------------------------------------- vmap
def _axis_choices(operand) -> list:
  """Mapped axes to try for an operand: 0, 1 (rank allowing) and -1, each
  position once (``-1`` stands for ``1`` on a rank-1 operand)."""
  rank = np.ndim(operand) + 1  # of the stacked operand
  choices = [0]
  if rank >= 3:
    choices.append(1)
  if rank >= 2:
    choices.append(-1)
  return choices


def _combinations(ctx) -> list:
  """``in_axes`` tuples: always every operand mapped at axis 0, each operand
  mapped alone at each of its axes and the weights mapped alone; then
  ``VMAP_SAMPLED`` or more of the other combinations, up to
  ``VMAP_COMBINATIONS`` in all.

  The sample is drawn from the seed and the operands' shapes and dtypes:
  the cases of a hypothesis run (which share the harness seed) try other
  combinations shape by shape, while another example of a shape already
  seen tries the same ones and reuses their compiled program.
  """
  n = len(ctx.operands)
  choices = [_axis_choices(o) for o in ctx.operands]
  every = [c for c in itertools.product(*([None] + ch for ch in choices))
           if any(a is not None for a in c)]
  alone = lambda axis_of: tuple(axis_of.get(i) for i in range(n))
  must = [alone({i: 0 for i in range(n)})]
  must += [alone({i: a}) for i, ch in enumerate(choices) for a in ch]
  weights = set(ctx.primitive.trainable_invars(ctx.params).values())
  if weights:
    must.append(alone({i: 0 for i in weights}))
  must = list(dict.fromkeys(must))   # in order, once each
  rest = [c for c in every if c not in must]
  take = max(VMAP_SAMPLED, VMAP_COMBINATIONS - len(must))
  if len(rest) > take:
    rng = np.random.default_rng((ctx.seed & 0xFFFFFFFF,
                                 _signature_crc(ctx.operands)))
    rest = [rest[i] for i in sorted(rng.choice(len(rest), take,
                                               replace=False))]
  return must + rest


def _signature_crc(operands) -> int:
  """CRC-32 of the operands' shapes and dtypes."""
  return zlib.crc32(' '.join(f'{np.result_type(o)}{np.shape(o)}'
                             for o in operands).encode())


def _examples(ctx, i, operand, size) -> list:
  """``size`` valid examples of operand ``i``; the first is the operand.

  Floating operands are rescaled elementwise by factors in ``[0.5, 1.5]``
  (``CheckContext.rescaled``: signs and orders of magnitude kept, so an impl
  with a restricted domain stays inside it); integer and boolean operands
  (indices, masks) are permuted along their first axis
  (``CheckContext.permuted``), so every example is valid and they differ.
  """
  # On the host, so that making examples compiles nothing.
  operand = np.asarray(operand)
  floating = jnp.issubdtype(operand.dtype, jnp.inexact)
  return [operand] + [
      (ctx.rescaled if floating else ctx.permuted)(
          f'primitive.vmap.{i}.{k}', operand) for k in range(1, size)]


def _stack(examples, axis, depth=1):
  """``examples`` stacked on ``depth`` leading axes (example ``k`` at ``k``'s
  row-major index), for one vmap at ``axis`` or nested ones at axis 0."""
  assert depth == 1 or axis == 0, (depth, axis)
  stacked = np.stack(examples)
  stacked = stacked.reshape((VMAP_SIZE,) * depth + stacked.shape[1:])
  return np.moveaxis(stacked, 0, axis)


def _nest_vmap(primitive, params, in_axes, depth):
  f = lambda *ops: primitive.bind(*ops, **params)   # every output
  for _ in range(depth):
    f = jax.vmap(f, in_axes=in_axes)
  return f


@compiled
def _vmapped_bind(primitive, params, in_axes, depth):
  """``operands -> outputs`` under ``depth`` nested
  ``jax.vmap(in_axes=in_axes)``."""
  f = _nest_vmap(primitive, params, in_axes, depth)
  return lambda operands: f(*operands)


@compiled
def _all_vmapped_binds(primitive, params, variants):
  """``[operands per variant] -> [outputs per variant]`` for ``variants`` of
  ``(in_axes, depth)``: every vmap of the check in one compilation."""
  fs = [_nest_vmap(primitive, params, axes, depth) for axes, depth in variants]
  return lambda batched: [f(*ops) for f, ops in zip(fs, batched)]


def _per_example(ctx, examples_of, axes, index) -> list:
  """Every output of the bind on example ``index`` of each mapped
  operand."""
  ops = [o if a is None else examples_of[i][index]
         for i, (o, a) in enumerate(zip(ctx.operands, axes))]
  # primitive.jit's program (context.jitted_bind): compiled once a signature.
  out = _guarded('impl', f'jax.jit(bind) of example {index}',
                 jitted_bind(ctx), ops)
  return [np.asarray(o) for o in _outputs(ctx, out)]


def _vmap_plans(ctx) -> list:
  """``(in_axes, depth)`` of every vmap case: the sampled combinations
  (depth 1), then vmap of vmap (x alone when there is an x, else everything;
  the chain ``mv -> mm -> fold into the batch``)."""
  n = len(ctx.operands)
  xi = ctx.primitive.x_invar_index
  mapped = [xi] if xi is not None else list(range(n))
  return ([(axes, 1) for axes in _combinations(ctx)] +
          [(tuple(0 if i in mapped else None for i in range(n)), 2)])


def _stacked_bytes(ctx, plan) -> int:
  """Bytes of a case's stacked operands, before they are made."""
  axes, depth = plan
  return VMAP_SIZE ** depth * sum(
      int(np.size(o)) * np.dtype(np.result_type(o)).itemsize
      for o, a in zip(ctx.operands, axes) if a is not None)


def _vmap_groups(ctx) -> list:
  """The plans in runs of at most ``VMAP_GROUP_BYTES`` of stacked operands
  (one run for a small case; a case over the limit runs alone)."""
  groups, held = [[]], 0
  for plan in _vmap_plans(ctx):
    size = _stacked_bytes(ctx, plan)
    if not ctx.small and groups[-1] and held + size > VMAP_GROUP_BYTES:
      groups.append([])
      held = 0
    groups[-1].append(plan)
    held += size
  return groups


def _vmap_case(ctx, plan):
  """``(in_axes, depth, examples_of, batched operands, label)`` for a plan."""
  axes, depth = plan
  examples_of = {i: _examples(ctx, i, o, VMAP_SIZE ** depth)
                 for i, (o, a) in enumerate(zip(ctx.operands, axes))
                 if a is not None}
  batched = [o if a is None else _stack(examples_of[i], a, depth)
             for i, (o, a) in enumerate(zip(ctx.operands, axes))]
  label = 'bind'
  for _ in range(depth):
    label = f'jax.vmap({label}, in_axes={axes})'
  return axes, depth, examples_of, batched, label


@check('primitive.vmap')
def check_vmap(ctx):
  """``jax.vmap`` of the bind over mapped operands and axes equals the
  stacked per-example binds (all under ``jax.jit``: the batching rule runs
  while tracing).  A small case runs every vmap in one compilation per case
  shape, reused by later examples.  A large one runs them in groups of at
  most ``VMAP_GROUP_BYTES`` of stacked operands, each group's made after
  the one before is dropped (for dense 4096 x 4096, all at once held
  3.3 GiB; one program per case doubled the check's time on a GPU)."""
  if ctx.primitive.batched:   # first: where it fails, it is why vmap does
    _check_examples_independent(ctx)
  for group in _vmap_groups(ctx):
    cases = [_vmap_case(ctx, plan) for plan in group]
    program = _all_vmapped_binds(ctx, tuple(group))
    try:
      results = program([c[3] for c in cases])
    except Exception:  # pylint: disable=broad-except
      # One of them raises: run them one by one to say which.
      results = [None] * len(cases)
    # A small case's term sizes: the same program on absolute values (see
    # primitive.jit).  A large one's scale, over many elements, is already
    # their size unless every element cancels.
    terms = None if not ctx.small or results[0] is None else \
        terms_or_none(program, [ctx.magnitudes(c[3]) for c in cases])
    terms = terms or [None] * len(cases)
    for case, got, term in zip(cases, results, terms):
      _check_vmap_case(ctx, case, got, term)
    # Dropped before the next group is made (the loop variables of zip
    # keep the last case alive too).
    del cases, results, terms, case, got, term


def _check_examples_independent(ctx):
  """A batched primitive's examples are independent: changing example ``k``
  of ``x`` leaves every other example's ``y`` as it was.  The vmap cases
  see coupling only through the derived batching rule (which folds the
  mapped axis into the batch); a primitive with its own batching rule can
  couple its batch and pass them.  Nor does an example depend on its
  position in the batch: ``y`` of the batch reversed is ``y`` reversed (a
  ``y[b] = (b + 1) x[b] @ W`` failed primitive.vmap and drtrl.exact with
  nothing to say why).  No vmap runs here: a coupled batch is the impl's.
  Same shapes, so primitive.jit's program runs again and nothing is
  compiled."""
  xi = ctx.primitive.x_invar_index
  if xi is None or np.ndim(ctx.operands[xi]) == 0:
    return
  x = np.asarray(ctx.operands[xi])
  if x.shape[0] < 2:
    return
  bind = lambda ops: np.asarray(executor.y_of_outputs(
      ctx.primitive, _guarded('impl', 'jax.jit(bind)', jitted_bind(ctx), ops)))
  y = bind(list(ctx.operands))
  ctx.compare(bind(ctx.with_operands(x=x[::-1])), y[::-1], rule='impl',
              what='examples do not depend on their position in the batch '
              '(the contract): y of the batch reversed vs y reversed')
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return
  for k in range(x.shape[0]):
    changed = x.copy()
    changed[k] = _examples(ctx, xi, x[k], 2)[1]
    ops = list(ctx.operands)
    ops[xi] = changed
    ctx.compare(np.delete(bind(ops), k, axis=0), np.delete(y, k, axis=0),
                rule='impl', what=f'examples are independent (the '
                f'contract): y of the other examples of the batch after '
                f'example {k} of x changed')


def _check_vmap_case(ctx, case, got, term=None):
  """Compares one vmap case's result (``got``; run here when ``None``) with
  its stacked per-example binds (``term``: the size of their terms)."""
  axes, depth, examples_of, batched, what = case
  if got is None:
    try:
      got = _guarded('batching', what,
                     lambda *ops: _vmapped_bind(ctx, axes, depth)(list(ops)),
                     *batched)
    except RuleFailure as e:
      ctx.fail(e.rule, e.message)
      return
  count = VMAP_SIZE ** depth
  examples = [_per_example(ctx, examples_of, axes, k) for k in range(count)]
  terms = [None] * len(examples[0]) if term is None else _outputs(ctx, term)
  for i, (got_i, term_i) in enumerate(zip(_outputs(ctx, got), terms)):
    want = np.stack([e[i] for e in examples])
    want = want.reshape((VMAP_SIZE,) * depth + want.shape[1:])
    ctx.compare(got_i, want, rule='batching', check_dtype=True,
                dtype=ctx.bind_dtype(got_i.dtype, want.dtype),
                term_scale=term_i,
                what=f'{_output_label(ctx, i)}{what} vs {count} stacked '
                f'per-example binds (batched operands {shape_of(batched)})')
