r"""Checks of ``xy_to_dw``: the weight gradient for a given output cotangent.

The rule must equal the vector-Jacobian product

.. math::  \mathrm{xy\_to\_dw}(x, g, w)_k = \mathrm{VJP}_{w_k}[P(x, \cdot)](g),

summed over the batch for batched primitives.  Three oracles, from the one that
shares the most machinery with JAX to the one that shares none:

* ``xy_to_dw.vjp``: ``jax.vjp`` of the primitive (whose JVP comes from ``impl``);
* ``xy_to_dw.jacrev``: the full Jacobian from ``jax.jacrev`` contracted with
  ``g``; in fast mode, or above ``JACREV_LIMIT`` entries, random projections
  ``<xy_to_dw, v> == <g, J v>`` with ``J v`` from ``jax.jvp`` instead;
* ``xy_to_dw.fd``: central finite differences of ``impl`` in float64 along
  random directions ``v`` per weight key:
  :math:`\langle \mathrm{xy\_to\_dw}_k, v \rangle \approx
  \langle g, (P(w_k + \epsilon v) - P(w_k - \epsilon v)) / 2\epsilon \rangle`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from etp._src.arrays import to_jax
from etp_testing._src import directions, executor, tolerances
from etp_testing._src.checks.registry import check
from etp_testing._src.context import (compiled, terms_or_none,
                                      to_float64,
                                      traced_shapes, x64_enabled, x64_scope)
from etp_testing._src.errors import RuleFailure, raised

# Largest Jacobian (output elements x weight elements) xy_to_dw.jacrev builds.
JACREV_LIMIT = 2_000_000
# Random directions per weight key for xy_to_dw.fd.
FD_DIRECTIONS = 3
# Random projections per weight key for xy_to_dw.jacrev in fast mode.
JVP_PROJECTIONS = 3
# From this many elements up, a weight's fast-mode directions are drawn one
# after another (see _fast_projections); smaller ones all at once.
SEQUENTIAL_DIRECTIONS = 2**20


def _cotangent(ctx, tag='xy_to_dw.g'):
  y = ctx.y_aval()
  return ctx.normal(tag, y.shape, y.dtype)


def _rule_grads(ctx, x, g, weights):
  grads = ctx.call_rule('xy_to_dw', x, g, weights)
  ctx.check_keys('xy_to_dw', grads, weights.keys())
  return grads


def _weights_of(primitive, params, operands) -> dict:
  return {k: operands[i] for k, i in primitive.trainable_invars(params).items()}


def _y_of_weights(primitive, params, operands):
  return lambda w: executor.bind_y(
      primitive, executor.with_weights(primitive, operands, params, w), params)


@compiled
def vjp_oracle(primitive, params):
  """``(operands, g) -> {key: VJP_{w_k}(g)}`` through ``jax.vjp``."""
  def vjp(operands, g):
    y_of = _y_of_weights(primitive, params, operands)
    return jax.vjp(y_of, _weights_of(primitive, params, operands))[1](g)[0]
  return vjp


@compiled
def _jacrev_oracle(primitive, params):
  """``(operands, g) -> {key: g . J_k}`` with ``J_k`` from ``jax.jacrev``."""
  def contracted(operands, g):
    y_of = _y_of_weights(primitive, params, operands)
    jac = jax.jacrev(y_of)(_weights_of(primitive, params, operands))
    return {k: jnp.tensordot(g, j, axes=g.ndim) for k, j in jac.items()}
  return contracted


def _dot64(a, b):
  """``sum(a * b)`` summed in float64 (x64 for this part of the trace only),
  so no long low-precision reduction adds its rounding.

  Each product is rounded once, in float32 (or the wider of the operands'
  dtypes): a relative error of at most :math:`2^{-24}` per term, the same
  as the gradient's own rounding to float32.  Converting the product, not
  the operands, keeps the conversion inside this reduction: converted
  operands are one array that XLA:CPU (jax 0.10.2) shares between the
  reductions reading it, a float64 copy as large as the weight."""
  dtype = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
  with x64_scope():
    return jnp.sum((a.astype(dtype) * b.astype(dtype)).astype(jnp.float64))


def _zero_after(values):
  """A uint32 zero that XLA cannot tell is zero until ``values`` exist
  (``isnan(v) & ~isnan(v)`` is not folded for floats).  Xor-ed into a seed,
  it orders a draw after ``values`` without changing the draw."""
  with x64_scope():
    flat = jnp.stack(values)
    return jnp.any(jnp.isnan(flat) & ~jnp.isnan(flat)).astype(jnp.uint32)


@compiled
def _fast_projections(primitive, params, rule, keys, n, to_host=True):
  """``(operands, seeds) -> (dots, grads)``: the whole fast-mode check as
  one program, for ``n`` random directions ``v`` of each weight in ``keys``;
  ``dots[i] = (<xy_to_dw_k, v>, <g, J_k v>, sum((g * J_k v)**2))`` for
  ``k = keys[i]`` (the last: the second's squared spread, see
  :func:`_check_projections`), float64, shape ``(len(keys), 3, n)`` (one
  array: one transfer back); ``grads`` is the rule's output, left on the
  device for the caller to drop.

  The cotangent ``g`` and the directions are drawn on the device
  (``directions``; each direction is as big as its weight) from ``seeds``,
  one uint32 array: ``g``'s first, then one per key.  ``rule`` (the
  primitive's ``xy_to_dw``) is traced into the program, as the ETP
  compiler's ``jit`` traces it; ``J_k v`` comes from ``jax.jvp`` in ``w_k``
  alone.  One dispatch per check, XLA shares the primal between the JVPs,
  and only the dot products leave the device, so a large layer's operands
  and gradients are never copied to the host.  With ``to_host`` the
  program writes ``dots`` to host memory itself (where the device has it:
  :func:`writes_to_host`).

  The directions of a weight of ``SEQUENTIAL_DIRECTIONS`` elements or more
  are drawn one after another, each once the previous one's dot products
  exist (:func:`_zero_after`), so XLA holds one of them at a time, not
  ``n``.  That matters on a CPU beyond the memory: XLA:CPU allocates a
  program's scratch afresh on every call, and glibc maps anything above
  32 MiB with its own ``mmap``, which the kernel zeroes page by page on each
  call.  For the same reason the gradients are an output: XLA:CPU allocates
  outputs apart from the scratch.  (Dense 2048 x 2048, batch 8: 96 MiB of
  scratch and 24,600 page faults per call before, 16 MiB and none after.)
  Smaller weights keep their directions side by side, where XLA overlaps
  the JVPs (a convolution's three ran 20 % slower one after another)."""
  def program(operands, seeds):
    x, weights, rule_params = primitive.split_operands(operands, params)
    y_of = _y_of_weights(primitive, params, operands)
    y = jax.eval_shape(y_of, weights)
    g = directions.uniform(seeds[0], y.shape, y.dtype)
    grads = rule(x, g, weights, **rule_params)
    out, after = [], jnp.uint32(0)
    for i, key in enumerate(keys):
      w = weights[key]
      if n * w.size >= 2**32:   # the directions' counters must not wrap
        raise ValueError(f'{n} directions of {w.size} elements exceed the '
                         '32-bit counter of directions.uniform')
      one_at_a_time = w.size >= SEQUENTIAL_DIRECTIONS
      rule_dd, jvp_dd, jvp_ss = [], [], []
      for d in range(n):   # unrolled: XLA's CPU loops run bodies slower
        v = directions.uniform(seeds[1 + i] ^ after, w.shape, w.dtype,
                               offset=d * w.size)
        # The other weights are closed over, not given zero tangents: JAX
        # then skips their terms.  A zero tangent of a dense weight still
        # cost a whole x @ 0 product per bias direction, and in a variant
        # of this program (g passed in) XLA:CPU (jax 0.10.2) fused that
        # product into a reduction that returned NaN.
        y_dot = jax.jvp(lambda wk, key=key: y_of({**weights, key: wk}),
                        (w,), (v,))[1]
        rule_dd.append(_dot64(grads[key], v))
        jvp_dd.append(_dot64(g, y_dot))
        # The spread over y only: the rule side's own (a sum of squares
        # over the weight) cost a second pass over it, measured 4.4x ->
        # 5.2x a forward plus VJP on the batched dense 2048 layer (one run
        # each, not interleaved), and as one variadic reduction with the
        # dot product XLA:CPU ran it 3-4x slower (LoRA 2.8x -> 8.4x).
        gy = g * y_dot
        jvp_ss.append(_dot64(gy, gy))
        if one_at_a_time:
          after = _zero_after([rule_dd[-1], jvp_dd[-1]])
      out.append(rule_dd + jvp_dd + jvp_ss)
    with x64_scope():
      dots = jnp.stack([jnp.stack(dd) for dd in out]).reshape(len(keys), 3, n)
      if to_host:
        # The dots go to host memory from inside the program: on an H200,
        # reading a few bytes back from the device afterwards cost
        # 110-170 us (a synchronous copy), a third of the whole check on
        # LoRA's layer; written to pinned host memory, they cost nothing.
        dots = jax.device_put(dots, jax.memory.Space.Host)
    # The gradients leave as an output (the caller drops them): XLA:CPU
    # then allocates them apart from the program's scratch.
    return dots, grads
  return program


def _rule_shapes(primitive, params, operands, rule):
  x, weights, rule_params = primitive.split_operands(operands, params)
  y = executor.bind_y(primitive, operands, params)
  return rule(x, jnp.zeros(y.shape, y.dtype), weights, **rule_params)


def _rule_avals(ctx, avals=None, label: str = '') -> dict:
  """What ``xy_to_dw`` returns on this case (or on operand ``avals``, named
  by ``label``), as shapes and dtypes (traced once per signature; nothing
  runs, nothing is copied); raises :class:`RuleFailure` for a rule that
  raises or returns no dict with the weights' keys."""
  operands = ctx.given if avals is None else avals
  try:
    out = traced_shapes(_rule_shapes, ctx.primitive, operands, ctx.params,
                        ctx.rules.xy_to_dw,
                        avals=ctx.avals() if avals is None else avals)
  except Exception as e:  # pylint: disable=broad-except
    raise RuleFailure('xy_to_dw', raised(
        'xy_to_dw', e, f'traced with {label}' if label else
        'traced on operand shapes '
        f'{[tuple(np.shape(o)) for o in ctx.given]}')) from e
  ctx.check_keys('xy_to_dw', out, ctx.weight_avals.keys())
  return out


@compiled
def impl_y(primitive, params):
  """``operands -> y`` through ``impl`` alone (no JAX rule of the primitive)."""
  def y(operands):
    return executor.y_of_outputs(primitive,
                                 primitive.impl_fn(*operands, **params))
  return y


def require_weights(ctx):
  if not ctx.weight_avals:
    ctx.skip(f'{ctx.name} has no trainable operands')


def term_sizes(ctx, g) -> dict:
  """``{key: jax.vjp on absolute values}`` (``{}`` where that raises): the
  size of the terms each gradient sums, the scale of both sides' rounding
  where they cancel (a float16 LoRA gradient of 0.66 summed from six
  products of about 1.3 took 1.95 of a bound scaled by the gradient; soak
  seed 75).  Same program as ``xy_to_dw.vjp``'s oracle: nothing more to
  compile."""
  return terms_or_none(vjp_oracle(ctx), ctx.magnitudes(ctx.operands),
                       np.abs(np.asarray(g))) or {}


def _check_mixed_dtypes(ctx):
  """``xy_to_dw`` traced with ``x`` in float64 and in bfloat16 over float32
  weights (shapes only; ``MIXED_DTYPES``), and with each weight in float64
  among float32 operands: each leaf still in its weight's dtype.  A rule
  whose result is in ``x``'s dtype, in the wider of ``x``'s and the
  weights' (a plain einsum of ``x`` and ``g``, uncast), or in another
  weight's dtype, is right on every case drawn in one dtype."""
  trained = ctx.primitive.trainable_invars(ctx.params)
  for label, avals, _ in ctx.other_dtype_avals():
    with x64_enabled(True):
      out = _rule_avals(ctx, avals, label)
    for k, i in trained.items():
      dtype = out[k].dtype
      if dtype != avals[i].dtype:
        ctx.fail('xy_to_dw', f'{label}: dtype {dtype} != its weight\'s '
                 f'{avals[i].dtype}', key=k, dtype=str(dtype))
      else:
        ctx.record_pass('xy_to_dw', key=k, message=f'{label}: {dtype}')


@check('xy_to_dw.vjp')
def check_vjp(ctx):
  """``xy_to_dw`` equals ``jax.vjp`` of the primitive w.r.t. each weight, with
  each leaf of its weight's shape and dtype (also traced with ``x`` in
  another dtype than the weights)."""
  require_weights(ctx)
  g = _cotangent(ctx)
  expected = vjp_oracle(ctx)(list(ctx.operands), g)
  actual = _rule_grads(ctx, ctx.x, g, ctx.weights)
  terms = term_sizes(ctx, g)
  for k, w in ctx.weights.items():
    ctx.compare(actual[k], expected[k], rule='xy_to_dw', key=k,
                what=f'xy_to_dw vs jax.vjp (weight {w.dtype}{list(w.shape)})',
                check_dtype=True, term_scale=terms.get(k))
  _check_mixed_dtypes(ctx)


@check('xy_to_dw.jacrev')
def check_jacrev(ctx):
  """``xy_to_dw`` equals the full Jacobian ``jax.jacrev`` contracted with ``g``.

  In fast mode (chosen automatically above ``FAST_MODE_THRESHOLD`` Jacobian
  entries) the Jacobian is never built: ``JVP_PROJECTIONS`` random directions
  ``v`` per key compare ``<xy_to_dw_k, v>`` with ``<g, J_k v>`` from
  ``jax.jvp`` (the dot-product test).  A rule that is off by ``d != 0`` passes
  one projection only if ``|<d, v>|`` falls under the tolerance ``tol``; for
  the unit-variance uniform directions of ``directions`` that has probability
  at most ``0.82 tol / |d|``, so ``n`` projections let it through with
  probability at most ``(0.82 tol / |d|)^n``.
  """
  require_weights(ctx)
  y_size = math.prod(ctx.y_aval().shape)
  if ctx.fast or any(y_size * w.size > JACREV_LIMIT
                     for w in ctx.weight_avals.values()):
    _check_projections(ctx)
    return
  g = _cotangent(ctx)
  actual = _rule_grads(ctx, ctx.x, g, ctx.weights)
  expected = _jacrev_oracle(ctx)(list(ctx.operands), g)
  terms = term_sizes(ctx, g)
  for k in ctx.weights:
    ctx.compare(actual[k], expected[k], rule='xy_to_dw', key=k,
                term_scale=terms.get(k),
                what='xy_to_dw vs jax.jacrev contracted with g')


def _shaped_like(ctx, key, grad, weight) -> bool:
  """Whether ``xy_to_dw``'s ``grad`` for ``key`` has ``weight``'s shape;
  records the failure where it does not."""
  got, want = tuple(np.shape(grad)), tuple(np.shape(weight))
  if got != want:
    ctx.fail('xy_to_dw', key=key, message=(
        f'xy_to_dw returned shape {got} for {key!r}, a weight of shape '
        f'{want}'),
             actual_shape=got, expected_shape=want)
  return got == want


def projection_call(ctx, keys):
  """``(program, args)``: the fast-mode program for the weights ``keys``
  (see :func:`_fast_projections`) and its arguments, the operands as
  ``ctx.device_operands`` and the seeds; ``program(*args)`` gives the dots."""
  seeds = device_seeds(
      (int(ctx.seed32('xy_to_dw.jacrev.g')),) +
      tuple(int(ctx.seed32(f'xy_to_dw.jacrev.v.{k}')) for k in keys),
      jax.config.jax_default_device)
  program = _fast_projections(ctx, ctx.rules.xy_to_dw, tuple(keys),
                              JVP_PROJECTIONS, writes_to_host(ctx))
  return program, (list(ctx.device_operands), seeds)


def writes_to_host(ctx) -> bool:
  """Whether the fast-mode program can write its dots to host memory: the
  device it runs on (that of the first operand given as a JAX array, else
  the default device) has a ``pinned_host`` memory.  Where it has none
  (the CPU and CUDA backends have one; a plugin may not), a program naming
  host memory may not compile, so there the dots stay on the device and
  are copied back."""
  for operand in ctx.device_operands:
    if isinstance(operand, jax.Array):
      return _has_pinned_host(next(iter(operand.devices())))
  device = jax.config.jax_default_device or jax.devices()[0]
  if isinstance(device, str):   # jax.default_device('cpu')
    device = jax.devices(device)[0]
  return _has_pinned_host(device)


@functools.lru_cache(maxsize=64)
def _has_pinned_host(device) -> bool:
  try:
    return any(m.kind == 'pinned_host' for m in device.addressable_memories())
  except Exception:  # pylint: disable=broad-except
    return False   # a backend that cannot say


@functools.lru_cache(maxsize=1024)
def device_seeds(seeds: tuple, default_device) -> jax.Array:
  """``seeds`` as a uint32 array already on the default device (which is
  part of the key).  Kept: a NumPy argument is copied to the device by every
  call, which on an H200 cost 60-100 us of a 0.7-0.9 ms fast-mode check."""
  del default_device
  return jax.device_put(np.array(seeds, np.uint32))


def _check_projections(ctx):
  """The fast-mode half of ``xy_to_dw.jacrev`` (see there)."""
  returned = _rule_avals(ctx)
  keys = []
  for k, w in ctx.weight_avals.items():
    if _shaped_like(ctx, k, returned[k], w):
      keys.append(k)
  if not keys:
    return
  program, args = projection_call(ctx, keys)
  dots = np.asarray(program(*args)[0])
  for k, (rule_dd, jvp_dd, jvp_ss) in zip(keys, dots):
    # The bound's scale is at least the spread of <g, J v>, the 2-norm of
    # its terms g_j (J v)_j.  Over the unit-variance directions its
    # expectation is sqrt(sum_j g_j^2 |J_j|^2), the size of the terms the
    # gradient J^T g sums, which both sides round in float32: where they
    # cancel, the gradient (so every dot product) is far smaller than that
    # rounding (a correct LoRA rule took 1.22 of a bound scaled by dots of
    # 0.0085, from a gradient of 0.005 summed from terms of order one).
    # Without cancellation the spread is the dot products' typical size,
    # so the detection guarantee keeps its form.
    ctx.compare(rule_dd, jvp_dd, rule='xy_to_dw', key=k, use_chex=False,
                dtype=ctx.weight_avals[k].dtype, term_scale=np.sqrt(jvp_ss),
                what=(
                    'fast mode: <xy_to_dw, v> vs <g, J v> from jax.jvp '
                    f'along {JVP_PROJECTIONS} random directions'))


@check('xy_to_dw.fd')
def check_fd(ctx):
  """``xy_to_dw`` agrees with central finite differences of ``impl`` in float64
  along random directions, one weight key at a time (no JAX autodiff)."""
  require_weights(ctx)
  with x64_enabled(True):
    ops = to_float64(ctx.operands)
    x, weights, _ = ctx.primitive.split_operands(ops, ctx.params)
    g = np.asarray(_cotangent(ctx), np.float64)
    grads = _rule_grads(ctx, x, to_jax(g), weights)
    index_of = ctx.primitive.trainable_invars(ctx.params)
    impl = impl_y(ctx)
    eps = tolerances.FD_EPS
    # The size of y's terms (impl on absolute values; the same shapes in
    # the same list as below, so nothing new to compile): where y is large
    # beside its derivative, the differences' own rounding sets the bound
    # (tolerances.fd_rounding_scale).
    rounding = tolerances.fd_rounding_scale(np.vdot(
        np.abs(g), np.abs(np.asarray(impl(ctx.magnitudes(ops)), np.float64))))
    for k, w in weights.items():
      grad_k = np.asarray(grads[k], np.float64)
      if not _shaped_like(ctx, k, grad_k, w):
        continue
      rule_dd, fd_dd = [], []
      for d in range(FD_DIRECTIONS):
        v = np.asarray(ctx.normal(f'xy_to_dw.fd.v{d}.{k}', w.shape,
                                  jnp.float32), np.float64)
        v = v * (tolerances.fd_step_scale(w) /
                 np.sqrt(np.mean(v * v) + 1e-300))
        plus, minus = list(ops), list(ops)
        # On the host: eager JAX arithmetic would compile per shape.
        plus[index_of[k]] = np.asarray(w) + eps * v
        minus[index_of[k]] = np.asarray(w) - eps * v
        y_dot = (np.asarray(impl(plus)) - np.asarray(impl(minus))) / (2 * eps)
        rule_dd.append(np.vdot(grad_k, v))
        fd_dd.append(np.vdot(g, y_dot))
      ctx.compare(np.array(rule_dd), np.array(fd_dd), rule='xy_to_dw', key=k,
                  kind='fd', term_scale=rounding,
                  what=f'<xy_to_dw, v> vs finite differences of '
                  f'impl along {FD_DIRECTIONS} random directions (float64)')
