r"""D-RTRL and pp-prop: the rules composed, against ``jax.grad`` of the loop.

* ``drtrl.exact``: the reference executor (``etp_testing._src.executor``) runs
  ``steps`` steps of the diagonal recurrence for each ``n_state``, and its
  gradient from the rules must equal ``jax.grad`` of the unrolled loop, per
  weight.  Batched primitives also run on a batch of one example, with the
  last ``n_state`` (a rule right only for ``B = 1``, or only for ``B > 1``,
  fails one of the two).
  ``gradient_enabled`` primitives also run through a non-linear ``fn``
  (``element_wise(w, fn)``), so JAX's VJP of ``fn`` is chained on.  Weights the
  primitive declares approximate are measured, not judged.  The steps'
  inputs are ``CheckContext.values_like`` the case's ``x``; a failure says
  whether the first step alone, where no trace is carried, fails too.
* ``drtrl.instant``: where the primitive has ``instant_drtrl``/``solve_drtrl``:
  :math:`\mathrm{solve}(c, \mathrm{instant}(x, g, w)) = \mathrm{xy\_to\_dw}(x, c \odot g, w)`;
  for half-precision operands, each of the pair and ``yw_to_w`` in that
  precision equals itself on float32 copies.
* ``pp.exact``: for a primitive linear in ``x``, pp-prop's factorised gradient
  :math:`\sum_t \mathrm{xy\_to\_dw}(\varepsilon^x_t, c_t)` with
  :math:`\varepsilon^x_t = \alpha \varepsilon^x_{t-1} + x_t` equals ``jax.grad``
  of :math:`\sum_t \langle c_t, h_t \rangle`, :math:`h_t = \alpha h_{t-1} + P(x_t, w)`,
  for every key whose ``xy_to_dw`` is homogeneous in ``x`` (not an affine
  primitive's bias, which the finding reports as not applicable).  A boolean
  or integer ``x`` is judged as a real number, the input trace being a float.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from etp_testing._src import executor, tolerances
from etp_testing._src.checks import init as init_checks
from etp_testing._src.checks import xy_to_dw as xy_to_dw_checks
from etp_testing._src.checks import yw_to_w as yw_to_w_checks
from etp_testing._src.checks.registry import check
from etp_testing._src.context import (AFFINE_SLACK, absolute, compiled,
                                      jitted_bind, terms_or_none)
from etp_testing._src.errors import RuleFailure, raised, returned_kind

PP_ALPHA = 0.7
# The non-linear fn that drtrl.exact puts in front of gradient_enabled markers.
ELEMENT_WISE_FN = ('sin(w) + w**3 / 3', lambda w: jnp.sin(w) + w ** 3 / 3)


# The rules that return a dict keyed by weight name (init_pp returns one
# array): any other return would reach the executor's tree operations and
# fail there, in words about pytrees.
DICT_RULES = ('xy_to_dw', 'yw_to_w', 'init_drtrl', 'instant_drtrl',
              'solve_drtrl')


def _guarded(name, rule):
  @functools.wraps(rule)
  def call(*args, **kwargs):
    try:
      out = rule(*args, **kwargs)
    except RuleFailure:
      raise
    except Exception as e:  # pylint: disable=broad-except
      shapes = [tuple(np.shape(a)) if hasattr(a, 'shape') else
                {k: tuple(np.shape(v)) for k, v in a.items()}
                if isinstance(a, Mapping) else type(a).__name__ for a in args]
      raise RuleFailure(name, raised(
          name, e, f'argument shapes {shapes}')) from e
    if name in DICT_RULES and not isinstance(out, Mapping):
      raise RuleFailure(name, f'{name} returned {returned_kind(out)}, '
                        'expected a dict keyed by weight name')
    return out
  return call


@functools.lru_cache(maxsize=256)
def guarded_rules(rules):
  """The rules record with every rule's exceptions turned into RuleFailure
  (cached, so jitted functions keyed on it are reused)."""
  return executor.map_rules(rules, _guarded)


def _y_shape_dtype(ctx, operands):
  y = ctx.y_aval(operands)
  return tuple(y.shape), y.dtype


def _recurrence(ctx, operands, n_state, tag):
  """Inputs ``xs`` and coefficients ``A``, ``Bf``, ``C`` drawn from the seed;
  each input valid where the case's ``x`` is (``CheckContext.values_like``)."""
  y_shape, dtype = _y_shape_dtype(ctx, operands)
  x_index = ctx.primitive.x_invar_index
  xs = None
  if x_index is not None:
    xs = ctx.values_like(f'{tag}.xs', x_index, (ctx.steps,),
                         operand=operands[x_index])
  scale = 0.5 / math.sqrt(n_state)
  a = ctx.normal(f'{tag}.A', (ctx.steps,) + y_shape + (n_state, n_state),
                 dtype, scale)
  bf = ctx.normal(f'{tag}.B', (ctx.steps,) + y_shape + (n_state,), dtype)
  c = ctx.normal(f'{tag}.C', (ctx.steps,) + y_shape + (n_state,), dtype)
  return xs, a, bf, c


def _variants(ctx):
  """``(label, operands, transforms)`` cases the executor runs."""
  yield 'as given', ctx.operands, None
  if ctx.batched and ctx.x is not None and ctx.x.shape[0] > 1:
    yield 'batch of one', ctx.with_operands(x=ctx.x[:1]), None
  if ctx.primitive.gradient_enabled:
    label, fn = ELEMENT_WISE_FN
    yield f'through element_wise(w, {label})', ctx.operands, {
        k: fn for k in ctx.weights}


def _transforms(primitive, params, with_fn: bool):
  """The ``fn`` of every weight for a run through ``element_wise(w, fn)``."""
  return ({k: ELEMENT_WISE_FN[1] for k in primitive.trainable_invars(params)}
          if with_fn else None)


@compiled
def _drtrl_gradients(primitive, params, rules, with_fn: bool):
  """``(operands, xs, A, B, C) -> (D-RTRL grads, jax.grad grads)``."""
  transforms = _transforms(primitive, params, with_fn)

  def both(operands, xs, a, bf, c):
    want = executor.autodiff_gradient(primitive, operands, params, xs, a, bf,
                                      c, transforms)
    got = executor.drtrl_gradient(primitive, operands, params, xs, a, bf, c,
                                  transforms, rules=rules)
    return got, want
  return both


@compiled
def _all_drtrl_gradients(primitive, params, rules, with_fns):
  """``[(operands, xs, A, B, C)] -> [(D-RTRL grads, jax.grad grads)]``, one
  run per entry of ``with_fns``: every run of the check in one compilation."""
  runs = [_drtrl_gradients.builder(primitive, params, rules, f)
          for f in with_fns]
  return lambda args: [run(*a) for run, a in zip(runs, args)]


@compiled
def _all_autodiff_gradients(primitive, params, with_fns):
  """``[(operands, xs, A, B, C)] -> [jax.grad grads]``: the autodiff half of
  :func:`_all_drtrl_gradients` alone."""
  def grads(args):
    return [executor.autodiff_gradient(
        primitive, ops, params, xs, a, bf, c,
        _transforms(primitive, params, with_fn))
            for with_fn, (ops, xs, a, bf, c) in zip(with_fns, args)]
  return grads


def _gradients(ctx, rules, operands, xs, a, bf, c, with_fn):
  try:
    return _drtrl_gradients(ctx, rules, with_fn)(list(operands), xs, a, bf, c)
  except RuleFailure:
    raise
  except Exception as e:  # pylint: disable=broad-except
    try:
      blame_composition(ctx, rules, operands)
    except RuleFailure as fault:
      raise fault from e
    raise RuleFailure('drtrl', f'the reference executor could not compose the '
                      f'rules: {type(e).__name__}: {e}') from e


def _traced(fn, *args):
  """``jax.eval_shape(fn, *args)``; ``None`` where it raises, except for a
  :class:`RuleFailure` (a guarded rule's, naming it), which it raises."""
  try:
    return jax.eval_shape(fn, *args)
  except RuleFailure:
    raise
  except Exception:  # pylint: disable=broad-except
    return None


def blame_composition(ctx, rules, operands) -> None:
  """Raises a :class:`RuleFailure` naming the rule whose result the
  executor could not compose, from shapes alone (traced; nothing compiled
  or run): ``init_drtrl``'s keys; the trace increment (``instant_drtrl``,
  else ``xy_to_dw`` on one example) against the trace or weight it is added
  to; ``yw_to_w`` (or ``solve_drtrl``) against what it was given.  Returns
  when every shape fits: the failure is elsewhere, and JAX's own words say
  where."""
  from etp._src.registry import call_init_rule
  prim, params = ctx.primitive, ctx.params
  x, weights, rule_params = prim.split_operands(operands, params)
  y = ctx.y_aval(operands)
  g = jax.ShapeDtypeStruct(y.shape, y.dtype)
  increment = 'instant_drtrl' if rules.instant_drtrl else 'xy_to_dw'
  traces = _traced(lambda: call_init_rule(
      rules.init_drtrl, *executor.jaxpr_vars(prim, operands, params), 1,
      rule_params))
  added = _traced(lambda x, g, w: executor.instant_term(
      prim, rules, x, g, w, rule_params), x, g, weights)
  if traces is None or added is None:
    return
  ctx.check_keys('init_drtrl', traces, weights.keys())
  ctx.check_keys(increment, added, weights.keys())
  init_checks.require_per_example_increments(
      ctx, {k: v.shape for k, v in added.items()}, y.shape)
  states = {k: jax.ShapeDtypeStruct(v.shape[:-1], v.dtype)
            for k, v in traces.items()}
  per_example = prim.batched and rules.instant_drtrl is None
  for k in weights:
    have, want = tuple(added[k].shape), tuple(states[k].shape)
    if have != want:
      raise RuleFailure(increment, (
          f'on one example (a batch of one) returned shape {have[1:]}, not '
          f"its weight's {tuple(weights[k].shape)}: the executor adds it to "
          "each example's D-RTRL trace" if per_example else
          f'returned shape {have}: the executor adds it to the D-RTRL '
          f"trace, of init_drtrl's shape {want}"), key=k)
  # yw_to_w keeps the trace's shape; solve_drtrl gives the weight's.
  for name, rule, wanted in (('yw_to_w', rules.yw_to_w, states),
                             ('solve_drtrl', rules.solve_drtrl, weights)):
    out = None if rule is None else _traced(
        lambda g, t, rule=rule: rule(g, t, **rule_params), g, states)
    if out is None:
      continue
    ctx.check_keys(name, out, weights.keys())
    for k in weights:
      if tuple(out[k].shape) != tuple(wanted[k].shape):
        raise RuleFailure(name, f'returned shape {tuple(out[k].shape)} for '
                          f'a trace of shape {tuple(states[k].shape)}: it '
                          f'must return {tuple(wanted[k].shape)}', key=k)


def _term_scales(ctx, rules, runs):
  """Per run, ``jax.grad`` of the loop on absolute values (operands, inputs
  and coefficients): the size of the products that both sides add up in
  different orders, the scale of their rounding where the gradient cancels
  (see ``CheckContext.compare``).  ``None`` if it cannot run.

  A small case runs the check's own program again (same shapes: nothing
  new to compile) and keeps its autodiff half.  A large one compiles the
  autodiff half alone: there the rules' half, with its traces, is the cost
  (on conv 64->64, 6.6 s of the check's 13 s here).
  """
  with_fns = tuple(r[2] for r in runs)
  x_kept = ctx.primitive.x_invar_index in ctx.nonaffine_operands()
  # (operands, xs, A, Bf, C): the loop is linear in the coefficients, and
  # in the inputs xs wherever the bind is affine in x.
  magnitudes = [(ctx.magnitudes(ops), xs if x_kept else absolute(xs),
                 *absolute(rest)) for ops, xs, *rest in (r[3] for r in runs)]
  try:
    if ctx.small:
      return [want for _, want in
              _all_drtrl_gradients(ctx, rules, with_fns)(magnitudes)]
    return _all_autodiff_gradients(ctx, with_fns)(magnitudes)
  except Exception:  # pylint: disable=broad-except
    return None


@check('drtrl.exact')
def check_drtrl_exact(ctx):
  """The reference D-RTRL executor's gradient equals ``jax.grad`` of the
  unrolled recurrence, per weight, for every ``n_state``."""
  if not ctx.weights:
    ctx.skip(f'{ctx.name} has no trainable operands')
  # Float32 first: half-precision operands' traces are built in float32.
  # Every run holds about 3 traces per state at once (measured).
  ctx = ctx.in_float32_for_composed_rules('drtrl').for_traces(
      copies=3, per_state=True)
  rules = guarded_rules(ctx.rules)
  runs = []
  for label, operands, transforms in _variants(ctx):
    # The batch of one is there for rules right only for one batch size; the
    # number of states is the other runs' business, so it runs the largest.
    n_states = (ctx.n_states[-1:] if label == 'batch of one'
                else ctx.n_states)
    for n_state in n_states:
      args = (list(operands),) + _recurrence(ctx, operands, n_state,
                                            f'drtrl.{label}.{n_state}')
      runs.append((label, n_state, transforms is not None, args))
  try:
    results = _all_drtrl_gradients(ctx, rules, tuple(r[2] for r in runs))(
        [r[3] for r in runs])
  except RuleFailure:
    raise
  except Exception:  # pylint: disable=broad-except
    results = None   # run them one by one, so the failure names its run
  terms = _term_scales(ctx, rules, runs) if results is not None else None
  first = len(ctx.findings)
  for i, (label, n_state, with_fn, args) in enumerate(runs):
    got, want = (results[i] if results is not None
                 else _gradients(ctx, rules, *args, with_fn))
    ctx.check_keys('drtrl', got, want.keys())
    for k in want:
      ctx.compare(got[k], want[k], rule='drtrl', key=k,
                  approximate=k in ctx.rules.approximate,
                  term_scale=None if terms is None else terms[i].get(k),
                  what=f'D-RTRL vs jax.grad ({label}, steps={ctx.steps}, '
                  f'n_state={n_state}'
                  + (', declared approximate)' if k in ctx.rules.approximate
                     else ')'))
  failed = [f for f in ctx.findings[first:] if not f.passed and f.key]
  if failed and results is not None:
    _say_where_it_fails(ctx, rules, runs, failed)


# What a failed drtrl.exact adds to its message, by whether the runs over
# their first step alone (where no trace is carried) match jax.grad.
ONE_STEP_PASSES = (
    'over its first step alone, where no trace is carried from one step to '
    'the next, D-RTRL matches jax.grad: carrying the trace, yw_to_w, is the '
    'likely culprit')
# Over the first step alone, an error above this share of the bound is no
# rounding (a correct increment takes a few thousandths of it) but a small
# error of the increment itself, which adds up over the steps past the
# bound: a layer norm's xy_to_dw without its eps passed one step and failed
# three, and was blamed on a right yw_to_w.
ONE_STEP_NEAR_SHARE = 0.1
ONE_STEP_NEAR = (
    'over its first step alone, where no trace is carried, D-RTRL passes but '
    'takes {share} of the bound: a small error in the trace increment '
    '({increment}) that adds up over the steps is as likely as one in '
    'carrying the trace (yw_to_w); the xy_to_dw and yw_to_w checks judge '
    'each alone')
ONE_STEP_FAILS = (
    'it fails over its first step alone too, where no trace is carried: look '
    'at the trace increment ({increment}), its contraction with the learning '
    'signal ({contraction}) and init_drtrl')


def _say_where_it_fails(ctx, rules, runs, failed) -> None:
  """Adds to each failed finding whether D-RTRL also fails over the runs'
  first step alone: there the trace starts at zero and ``yw_to_w`` carries
  nothing, so a rule wrong only in carrying it is told apart from one wrong
  in the increment (a wrong ``yw_to_w`` on a trace that keeps output
  positions fails nowhere else: its weight is not anchored).  Runs only on
  a failure: a program for one step is one more compilation."""
  first_step = [(label, n_state, with_fn,
                 (ops, None if xs is None else xs[:1], a[:1], bf[:1], c[:1]))
                for label, n_state, with_fn, (ops, xs, a, bf, c) in runs]
  try:
    results = _all_drtrl_gradients(ctx, rules, tuple(
        r[2] for r in first_step))([r[3] for r in first_step])
  except Exception:  # pylint: disable=broad-except
    return   # the failure already says what is wrong
  terms = _term_scales(ctx, rules, first_step) or [{}] * len(first_step)
  increment = 'instant_drtrl' if rules.instant_drtrl else 'xy_to_dw'
  contraction = 'solve_drtrl' if rules.solve_drtrl else 'yw_to_w'
  for finding in failed:
    k = finding.key
    share = max(
        (_share_of_bound(
            ctx, got[k], want[k], np.asarray(want[k]).dtype,
            max(float(np.max(np.abs(want[k]), initial=0.0)),
                float(np.max(term.get(k, 0.0), initial=0.0))))
         if k in got else math.inf)
        for (got, want), term in zip(results, terms))
    if share > 1:
      hint = ONE_STEP_FAILS
    elif share >= ONE_STEP_NEAR_SHARE:
      hint = ONE_STEP_NEAR.replace('{share}', f'{share:.2g}')
    else:
      hint = ONE_STEP_PASSES
    finding.message += '; ' + hint.format(increment=increment,
                                          contraction=contraction)


@check('drtrl.instant')
def check_drtrl_instant(ctx):
  """``solve_drtrl(c, instant_drtrl(x, g, w)) == xy_to_dw(x, c * g, w)``."""
  if ctx.rules.instant_drtrl is None:
    ctx.skip('no instant_drtrl/solve_drtrl: the defaults (xy_to_dw, yw_to_w) '
             'are used, and drtrl.exact covers them')
  # Float32 first, as for the recurrences: each side chains about four
  # roundings, and in bfloat16 the correct LoRA pair came to 1.02 of the
  # table's bound (soak seed 70, etp_lora_mv).
  wide = ctx.in_float32_for_composed_rules('solve_drtrl')
  if wide is not ctx:   # half precision
    _check_rules_in_half_precision(ctx, wide)
  ctx = wide.for_traces(copies=2)   # the increment and its solve (measured)
  y = ctx.y_aval()
  g = ctx.normal('drtrl.instant.g', y.shape, y.dtype)
  c = ctx.normal('drtrl.instant.c', y.shape, y.dtype)
  trace = ctx.call_rule('instant_drtrl', ctx.x, g, ctx.weights)
  ctx.check_keys('instant_drtrl', trace, ctx.weights.keys())
  solved = ctx.call_rule('solve_drtrl', c, trace)
  ctx.check_keys('solve_drtrl', solved, ctx.weights.keys())
  cg = np.asarray(c) * np.asarray(g)
  want = ctx.call_rule('xy_to_dw', ctx.x, cg, ctx.weights)
  ctx.check_keys('xy_to_dw', want, ctx.weights.keys())
  # The two sides sum the same products in different orders (per example,
  # then over the batch with c); where they cancel, rounding is relative to
  # the terms: jax.vjp of the bind on absolute values gives their size.
  terms = xy_to_dw_checks.term_sizes(ctx, cg)
  for k in ctx.weights:
    # Either rule of the pair may be the wrong one: the finding names both.
    ctx.compare(solved[k], want[k], rule='instant_drtrl/solve_drtrl', key=k,
                term_scale=terms.get(k),
                what='solve_drtrl(c, instant_drtrl(x, g, w)) vs '
                'xy_to_dw(x, c*g, w)')


def _check_rules_in_half_precision(half, wide) -> None:
  """Where operands are float16 or bfloat16: ``instant_drtrl``,
  ``solve_drtrl`` and ``yw_to_w`` each give in that precision what they give
  on float32 copies of the same values, within its bound (one rule's
  roundings, not the composed chains the float32 checks avoid).  Nothing
  else calls these rules in half precision where a weight is not anchored:
  three rules wrong only for bfloat16 passed the whole battery (a depthwise
  conv's instant_drtrl ignoring its dilation; second red-team audit).  The
  float32 results are judged by drtrl.exact and the check this is part of.
  ``|values|`` through the float32 rule size the terms each one sums.
  ``solve_drtrl`` and ``yw_to_w`` take random traces shaped like
  ``instant_drtrl``'s, so that each rule is judged on inputs no other rule
  made."""
  dtype = tolerances.coarsest(*(o.dtype for o in half.operands
                                if jnp.issubdtype(o.dtype, jnp.inexact)))
  y = half.y_aval()
  g = np.asarray(half.normal('drtrl.half.g', y.shape, y.dtype))
  c = np.asarray(half.normal('drtrl.half.c', y.shape, y.dtype))
  wide32 = lambda v: np.asarray(v, np.float32)
  x_mag, w_mag, _ = wide.primitive.split_operands(
      wide.magnitudes(wide.operands), wide.params)
  trace = half.call_rule('instant_drtrl', half.x, g, half.weights)
  half.check_keys('instant_drtrl', trace, half.weights.keys())
  traces = yw_to_w_checks.random_traces(
      half, 'drtrl.half.T', {k: np.shape(v) for k, v in trace.items()},
      {k: v.dtype for k, v in trace.items()})
  runs = (   # rule, half-precision arguments, float32 ones, their magnitudes
      ('instant_drtrl', (half.x, g, half.weights), (wide.x, wide32(g),
                                                   wide.weights),
       (x_mag, np.abs(wide32(g)), w_mag)),
      # Random traces, not instant_drtrl's: a right solve_drtrl was blamed
      # with it where instant_drtrl overflowed float16.
      ('solve_drtrl', (c, traces), (wide32(c), jax.tree.map(wide32, traces)),
       (np.abs(wide32(c)), jax.tree.map(lambda v: np.abs(wide32(v)),
                                        traces))),
      ('yw_to_w', (g, traces), (wide32(g), jax.tree.map(wide32, traces)),
       (np.abs(wide32(g)), jax.tree.map(lambda v: np.abs(wide32(v)),
                                        traces))))
  for rule, args, args32, magnitudes in runs:
    got = half.call_rule(rule, *args)
    want = wide.call_rule(rule, *args32)
    terms = terms_or_none(lambda *a, rule=rule: wide.call_rule(rule, *a),
                          *magnitudes) or {}
    half.check_keys(rule, got, want.keys())
    for k in want:
      half.compare(got[k], want[k], rule=rule, key=k, dtype=dtype,
                   term_scale=terms.get(k),
                   what=f'{rule} in {jnp.dtype(dtype).name} vs on float32 '
                   'copies of the same values')


def _share_of_bound(ctx, a, b, dtype, scale=None) -> float:
  """``max |a - b|`` over the table's bound for ``dtype``, relative to
  ``scale`` (by default the larger side's): above 1, ``a != b``."""
  rtol, atol = ctx.tolerance(dtype)
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if scale is None:
    scale = max(float(np.max(np.abs(b), initial=0.0)),
                float(np.max(np.abs(a), initial=0.0)))
  error = float(np.max(np.abs(a - b), initial=0.0))
  return error / (atol + rtol * scale) if np.isfinite(error) else math.inf


def _close(ctx, a, b, dtype, scale=None, slack=1) -> bool:
  """``a == b`` within ``slack`` times the table's bound, relative to
  ``scale``."""
  return _share_of_bound(ctx, a, b, dtype, scale) <= slack


@check('pp.exact')
def check_pp_exact(ctx):
  """pp-prop's factorised gradient is exact for a primitive linear in ``x``
  (uniform decay, one state), for keys whose true weight gradient
  (``jax.vjp``) is linear in ``x`` along the loop's inputs: pp-prop with
  ``jax.vjp`` for ``xy_to_dw`` matches ``jax.grad`` there (an affine
  primitive's bias does not).  The oracle decides where pp-prop applies, so
  a rule that is wrong by a term not linear in ``x`` is compared, not
  excused."""
  if ctx.x is None:
    ctx.skip(f'{ctx.name} has no input x (pp-prop factorises over x)')
  if not ctx.weights:
    ctx.skip(f'{ctx.name} has no trainable operands')
  ctx = ctx.in_float32_for_composed_rules('xy_to_dw')
  x, y = ctx.x, ctx.y_aval()
  # pp-prop's input trace alpha eps + x_t is a float whatever x is (spikes
  # given as booleans): the factorisation is about x as a real number.
  x_floating = jnp.issubdtype(x.dtype, jnp.inexact)
  x_dtype = x.dtype if x_floating else y.dtype
  # Host arrays: combining them compiles nothing.
  x1 = np.asarray(ctx.normal('pp.x1', x.shape, x_dtype))
  x2 = np.asarray(ctx.normal('pp.x2', x.shape, x_dtype))
  # primitive.jit's program (context.jitted_bind): compiled once a signature.
  bind = jitted_bind(ctx)
  p = lambda v: np.asarray(executor.y_of_outputs(ctx.primitive, bind(
      executor.with_x(ctx.primitive, ctx.operands, v))), np.float64)
  try:
    p1, p2, p0 = p(x1), p(x2), p(np.zeros_like(x1))
  except Exception as e:  # pylint: disable=broad-except
    if x_floating:
      raise
    ctx.skip(f'x is {x.dtype}: the pp-prop input trace is a float, and '
             f'{ctx.name} does not take a float x ({type(e).__name__}: '
             f'{str(e).splitlines()[0] if str(e) else ""})')
  # Affine in x: P(x1 + x2) - P(x1) == P(x2) - P(0) and P(x1) + P(-x1) ==
  # 2 P(0), up to rounding of P.  The second sees relu(x) @ W, which passes
  # the first wherever x1 and x2 share their signs (likely for a small x).
  scale = 4 * float(np.max(np.abs(p1))) + 4 * float(np.max(np.abs(p2)))
  if not (_close(ctx, p(x1 + x2) - p1, p2 - p0, x_dtype, scale) and
          _close(ctx, p1 + p(-x1), 2 * p0, x_dtype, scale)):
    ctx.skip(f'{ctx.name} is not affine in x: the pp-prop factorisation '
             'does not apply')
  g = ctx.normal('pp.g', y.shape, y.dtype)
  dw = ctx.call_rule('xy_to_dw', x1, g, ctx.weights)
  ctx.check_keys('xy_to_dw', dw, ctx.weights.keys())
  for k, w in ctx.weights.items():
    if np.shape(dw[k]) != w.shape:
      raise RuleFailure('xy_to_dw', f'returned shape {np.shape(dw[k])} for '
                        f'weight shape {w.shape}', key=k)
    if not np.all(np.isfinite(dw[k])):
      raise RuleFailure('xy_to_dw', 'returned non-finite values (finite '
                        'operands and cotangent)', key=k)
  xs = ctx.values_like('pp.xs', ctx.primitive.x_invar_index, (ctx.steps,))
  c = ctx.normal('pp.C', (ctx.steps,) + y.shape, y.dtype)
  pp = _pp_gradients(ctx, guarded_rules(ctx.rules))
  try:
    got, oracle, want = pp(list(ctx.operands), xs, c)
  except RuleFailure:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise RuleFailure('xy_to_dw', f'pp-prop could not compose the rules: '
                      f'{type(e).__name__}: {e}') from e
  # Both sides add the products x_t[i] c_s[j] alpha^(s-t) in different
  # orders: jax.grad of the loop on absolute values (alpha > 0) is the size
  # of those terms, the scale of their rounding where the sum cancels or is
  # long (seen on an H200: a 64 -> 64 conv's 24,576-term sums differed by
  # 2.1e-5 of the result, the correct rule failing at rtol 2e-5).
  sized = terms_or_none(pp, ctx.magnitudes(ctx.operands),
                        np.abs(np.asarray(xs)), np.abs(np.asarray(c)))
  terms = {} if sized is None else sized[2]
  judged = 0
  for k in ctx.weights:
    # pp-prop carries the input trace in x's dtype, jax.grad the loop in
    # y's: judged at the coarser of x's and the weight's.
    dtype = tolerances.coarsest(x_dtype, ctx.weights[k].dtype,
                                np.asarray(want[k]).dtype)
    # Where pp-prop applies is the oracle's to say, on these very inputs
    # (the rule under test must not decide where it is judged): pp-prop
    # with jax.vjp for xy_to_dw matches jax.grad of the loop.  Probes of
    # their own passed clip(x) @ W wherever they fell inside [-1, 1], and
    # the loop's inputs, outside it, failed a correct rule.
    scale = max(float(np.max(np.abs(want[k]), initial=0.0)),
                float(np.max(np.abs(terms.get(k, 0.0)), initial=0.0)))
    if not _close(ctx, oracle[k], want[k], dtype, scale, slack=AFFINE_SLACK):
      miss = float(np.max(np.abs(np.asarray(oracle[k], np.float64)
                                 - np.asarray(want[k], np.float64))))
      ctx.record_pass('xy_to_dw', key=k, message=(
          'pp.exact does not apply: with jax.vjp for xy_to_dw, pp-prop '
          f'misses jax.grad of the loop by {miss:.3g} (of {scale:.3g}): the '
          "true gradient is not linear in x (an affine primitive's bias)"))
      continue
    judged += 1
    ctx.compare(got[k], want[k], rule='xy_to_dw', key=k, dtype=dtype,
                term_scale=terms.get(k),
                what=f'pp-prop factorised gradient vs jax.grad (alpha='
                f'{PP_ALPHA}, steps={ctx.steps})')
  if not judged:
    ctx.skip('no weight has a true gradient linear in x along the loop\'s '
             'inputs: pp-prop does not apply')


@compiled
def _pp_gradients(primitive, params, rules):
  """``(operands, xs, C) -> (pp-prop's gradient from the rules, pp-prop's
  gradient with jax.vjp for xy_to_dw, jax.grad of the loop)``, per weight.
  The second is pp-prop where it applies: equal to the third where the true
  gradient is linear in x along the inputs."""
  vjp = xy_to_dw_checks.vjp_oracle.builder(primitive, params)

  def all_three(operands, xs, c):
    got = executor.pp_gradient(primitive, operands, params, xs, c, PP_ALPHA,
                               rules=rules)
    _, weights, _ = primitive.split_operands(operands, params)
    # No rule of the user's in it, init_pp's shape of the df trace included.
    oracle = executor.pp_factorised(
        lambda eps_x, g: vjp(executor.with_x(primitive, operands, eps_x), g),
        weights, xs, c, 1., PP_ALPHA)
    want = jax.grad(lambda w: executor.pp_loss(
        primitive, operands, params, {**weights, **w}, xs, c, PP_ALPHA))(
            dict(weights))
    return got, oracle, want
  return all_three
