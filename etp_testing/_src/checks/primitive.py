r"""Checks of the primitive itself: evaluation, abstract evaluation, JVP, vmap.

The rules are only as good as the primitive they describe, and the oracles of
the other checks (``jax.vjp``, ``jax.grad``) go through the primitive's own
derived JAX rules.  These checks hold those rules to ``impl``:

* ``primitive.jit``: eager ``bind`` equals ``jax.jit`` of it (values, dtype);
* ``primitive.abstract_eval``: ``jax.eval_shape`` equals the real output;
* ``primitive.jvp``: as ``jax.test_util.check_grads`` does, in float64:
  forward mode against central finite differences of ``impl`` (not of
  ``bind``), reverse mode by the dot-product test
  :math:`\langle u, J v \rangle = \langle J^\top u, v \rangle`, and both again
  at second order (the JVP function differentiated once more);
* ``primitive.vmap``: every combination of mapped operands and axes (sampled
  above ``VMAP_COMBINATIONS``) equals the stacked per-example results.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from etp_testing._src import tolerances
from etp_testing._src.checks.registry import check
from etp_testing._src.context import to_float64, x64_enabled

VMAP_COMBINATIONS = 12
VMAP_SIZE = 2


def _float_positions(operands):
  return [i for i, o in enumerate(operands)
          if jnp.issubdtype(jnp.result_type(o), jnp.floating)]


@check('primitive.jit')
def check_jit(ctx):
  """Eager ``bind`` equals ``jax.jit(bind)``, in value and dtype."""
  eager = ctx.y()
  jitted = jax.jit(lambda *ops: ctx.bind(*ops))(*ctx.operands)
  ctx.compare(jitted, eager, rule='impl', check_dtype=True,
              what='jax.jit(bind) vs eager bind')


@check('primitive.abstract_eval')
def check_abstract_eval(ctx):
  """``jax.eval_shape`` of the bind equals the real output's shape/dtype."""
  abstract = jax.eval_shape(lambda *ops: ctx.bind(*ops), *ctx.operands)
  real = ctx.y()
  if (tuple(abstract.shape), abstract.dtype) != (tuple(real.shape),
                                                 real.dtype):
    ctx.fail('abstract_eval', message=(
        f'eval_shape gives {abstract.dtype}{list(abstract.shape)}, the real '
        f'output is {real.dtype}{list(real.shape)}'),
             actual_shape=tuple(abstract.shape),
             expected_shape=tuple(real.shape), dtype=str(abstract.dtype))
  else:
    ctx.record_pass('abstract_eval', message=(
        f'eval_shape matches {real.dtype}{list(real.shape)}'))


def _dot(a, b):
  return jnp.vdot(jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64))


@check('primitive.jvp')
def check_jvp(ctx):
  """Forward mode vs finite differences of ``impl``, reverse mode by the
  dot-product test, at first and second order (float64)."""
  with x64_enabled(True):
    ops = to_float64(ctx.operands)
    diff = _float_positions(ops)
    if not diff:
      ctx.skip(f'{ctx.name} has no floating operands')
    impl = ctx.primitive.impl_fn
    y_index = ctx.primitive.y_outvar_index
    multi = ctx.primitive.multiple_results

    def full(fn, args):
      new = list(ops)
      for i, a in zip(diff, args):
        new[i] = a
      out = fn(*new)
      return out[y_index] if multi else out

    bound = lambda *args: full(lambda *o: ctx.primitive.bind(*o, **ctx.params),
                               args)
    plain = lambda *args: full(lambda *o: impl(*o, **ctx.params), args)
    primals = [ops[i] for i in diff]
    tangents = [jnp.asarray(ctx.normal(f'primitive.jvp.v{i}', ops[i].shape,
                                       jnp.float32), jnp.float64) for i in diff]
    eps = tolerances.FD_EPS
    # First order, forward: J v vs (impl(p + eps v) - impl(p - eps v)) / 2 eps.
    _, jv = jax.jvp(bound, primals, tangents)
    fd = (plain(*[p + eps * t for p, t in zip(primals, tangents)]) -
          plain(*[p - eps * t for p, t in zip(primals, tangents)])) / (2 * eps)
    ctx.compare(jv, fd, rule='jvp', kind='fd',
                what='jax.jvp(bind) vs central differences of impl')
    # First order, reverse: <u, J v> == <J^T u, v>.
    u = jnp.asarray(ctx.normal('primitive.jvp.u', jv.shape, jnp.float32),
                    jnp.float64)
    _, vjp = jax.vjp(bound, *primals)
    jtu = vjp(u)
    ctx.compare(jnp.stack([_dot(a, b) for a, b in zip(jtu, tangents)]).sum(),
                _dot(u, jv), rule='jvp', what='<J^T u, v> (jax.vjp) vs '
                '<u, J v> (jax.jvp)')
    # Second order: differentiate v -> J(p) v once more, along p.
    jvp_of = lambda *p: jax.jvp(bound, list(p), tangents)[1]
    jvp_plain = lambda *p: jax.jvp(plain, list(p), tangents)[1]
    w = [jnp.asarray(ctx.normal(f'primitive.jvp.w{i}', t.shape, jnp.float32),
                     jnp.float64) for i, t in zip(diff, tangents)]
    _, jjv = jax.jvp(jvp_of, primals, w)
    fd2 = (jvp_plain(*[p + eps * t for p, t in zip(primals, w)]) -
           jvp_plain(*[p - eps * t for p, t in zip(primals, w)])) / (2 * eps)
    ctx.compare(jjv, fd2, rule='jvp', kind='fd', what='second order: jvp of '
                'the jvp vs central differences of impl\'s jvp')
    _, vjp2 = jax.vjp(jvp_of, *primals)
    u2 = jnp.asarray(ctx.normal('primitive.jvp.u2', jjv.shape, jnp.float32),
                     jnp.float64)
    ctx.compare(jnp.stack([_dot(a, b) for a, b in zip(vjp2(u2), w)]).sum(),
                _dot(u2, jjv), rule='jvp', what='second order: dot-product '
                'test of the jvp function')


def _axis_choices(operand):
  ndim = np.ndim(operand) + 1
  return sorted({0, 1 % ndim, -1})


def _combinations(ctx):
  """``in_axes`` tuples to try: x alone and all mapped always, then a seeded
  sample of the rest."""
  n = len(ctx.operands)
  per_operand = [[None] + _axis_choices(o) for o in ctx.operands]
  every = [c for c in itertools.product(*per_operand)
           if any(a is not None for a in c)]
  must = [tuple(0 for _ in range(n))]
  if ctx.primitive.x_invar_index is not None:
    must.append(tuple(0 if i == ctx.primitive.x_invar_index else None
                      for i in range(n)))
  rest = [c for c in every if c not in must]
  rng = np.random.default_rng(ctx.seed)
  take = max(0, VMAP_COMBINATIONS - len(must))
  if len(rest) > take:
    rest = [rest[i] for i in sorted(rng.choice(len(rest), take, replace=False))]
  return must + rest


def _stack(ctx, i, operand, axis):
  """``VMAP_SIZE`` examples of an operand, stacked on ``axis``."""
  if jnp.issubdtype(operand.dtype, jnp.floating):
    examples = [operand] + [ctx.normal(f'primitive.vmap.{i}.{k}',
                                       operand.shape, operand.dtype)
                            for k in range(1, VMAP_SIZE)]
  else:  # integer operands (indices) stay valid: the same values per example
    examples = [operand] * VMAP_SIZE
  return jnp.moveaxis(jnp.stack(examples), 0, axis)


@check('primitive.vmap')
def check_vmap(ctx):
  """``jax.vmap`` of the bind over any mapped operands and axes equals the
  stacked per-example binds."""
  f = lambda *ops: ctx.bind(*ops)
  for axes in _combinations(ctx):
    batched = [o if a is None else _stack(ctx, i, o, a)
               for i, (o, a) in enumerate(zip(ctx.operands, axes))]
    got = jax.vmap(f, in_axes=axes)(*batched)
    want = jnp.stack([
        f(*[o if a is None else jnp.take(b, k, axis=a)
            for o, a, b in zip(ctx.operands, axes, batched)])
        for k in range(VMAP_SIZE)])
    ctx.compare(got, want, rule='batching',
                what=f'vmap(in_axes={axes}) vs stacked per-example binds')
