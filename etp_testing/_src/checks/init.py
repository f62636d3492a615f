r"""Checks of ``init_drtrl`` and ``init_pp``: keys, shapes, zeros and dtypes.

Both rules receive real jaxpr variables, from tracing one bind of the
primitive, and are traced into one program per case (for every
``n_state``; on a small case both rules in the same program, which the
other init check reuses), as the ETP compiler's ``jit`` traces them.  Each
case runs twice: on the operands as given, and on float32 copies with
``jax_enable_x64`` on, so a rule that follows the global default dtype
(``jnp.zeros(shape)``, ``jnp.float_``) instead of the operands' avals
returns float64 there and is caught.  The rules are also traced (nothing
compiled) with ``x`` in another dtype than the weights, and with one
weight wider than the other operands (``CheckContext.other_dtype_avals``),
whatever dtypes the case was drawn in: a rule that makes its zeros in the
weights', ``x``'s or one weight's dtype, instead of ``result_type``, is
right whenever they agree.

* ``init.drtrl``: per trainable key, zeros of shape
  ``(*lead, *weight_shape, n_state)`` (``lead = (B,)`` for batched
  primitives) or, where the primitive has ``instant_drtrl``, of the increment's
  shape plus ``n_state``; dtype ``result_type`` of the ``x``/``y``/weight avals.
* ``init.pp``: zeros ``(*y_shape, n_state)`` in ``y``'s dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from etp._src.registry import call_init_rule
from etp._src.arrays import to_jax
from etp_testing._src import executor
from etp_testing._src.checks.registry import check
from etp_testing._src.context import compiled, traced_shapes, x64_enabled
from etp_testing._src.errors import RuleFailure, raised


def _as_float32(operands):
  return tuple(o.astype(jnp.float32) if jnp.issubdtype(o.dtype, jnp.floating)
               else o for o in operands)


def _variants(ctx):
  """``(label, operands, x64)``: as given, and float32 under x64."""
  yield 'operands as given', ctx.operands, bool(jax.config.jax_enable_x64)
  yield 'float32 operands with x64 on', _as_float32(ctx.operands), True


def _check_mixed_dtypes(ctx, rule_name, expected_dtype):
  """Traces ``rule_name`` on each of the context's ``other_dtype_avals``
  (x in another dtype than the weights; one weight wider) and checks the
  dtype of every leaf it returns against ``expected_dtype(avals, y)``
  (shapes only: nothing compiled)."""
  rule = getattr(ctx.rules, rule_name)
  n_states = tuple(ctx.n_states)
  for label, avals, y in ctx.other_dtype_avals():
    with x64_enabled(True):
      outputs = _output_shapes(ctx, rule_name, rule, avals, n_states)
      dtype = expected_dtype(avals, y)
    for n_state, out in zip(n_states, outputs):
      leaves = out.items() if isinstance(out, dict) else [(None, out)]
      for key, leaf in leaves:
        where = f'{label}, n_state={n_state}'
        if leaf.dtype != dtype:
          ctx.fail(rule_name, f'{where}: dtype {leaf.dtype} != expected '
                   f'{dtype}', key=key, dtype=str(leaf.dtype))
        else:
          ctx.record_pass(rule_name, key=key, message=f'{where}: {dtype}')


def _rule_outputs(primitive, params, operands, name, rule, n_states):
  """``[rule(x_var, y_var, weight_vars, n) for n in n_states]``, with the
  jaxpr variables of one bind on ``operands`` (arrays or tracers); a rule
  that raises becomes :class:`RuleFailure`."""
  x_var, y_var, weight_vars = executor.jaxpr_vars(primitive, operands, params)
  _, _, rule_params = primitive.split_operands(operands, params)
  out = []
  for n_state in n_states:
    try:
      out.append(call_init_rule(rule, x_var, y_var, weight_vars, n_state,
                                rule_params))
    except Exception as e:  # pylint: disable=broad-except
      raise RuleFailure(name, raised(name, e,
                                        f'n_state={n_state}')) from e
  return out


@compiled
def _init_program(primitive, params, rules, n_states):
  """``operands -> {name: outputs}`` with :func:`_rule_outputs` of each
  ``(name, rule)`` in ``rules``.

  One program per signature for every ``n_state`` (as the ETP compiler's
  ``jit`` traces the rule): called eagerly, each ``jnp.zeros`` of a rule
  compiled a program of its own per shape, a third of the programs a new
  signature compiled."""
  def program(operands):
    return {name: _rule_outputs(primitive, params, operands, name, rule,
                                n_states) for name, rule in rules}
  return program


def _output_shapes(ctx, name, rule, operands, n_states):
  """What :func:`_rule_outputs` gives, as shapes (traced once per
  signature, nothing compiled); raises :class:`RuleFailure` where the rule
  raises or returns something that is no array."""
  try:
    return traced_shapes(_rule_outputs, ctx.primitive, operands, ctx.params,
                         name, rule, n_states)
  except RuleFailure:
    raise
  except TypeError as e:
    # Tracing the output failed: a leaf the rule returned is no array.
    raise RuleFailure(name, f'{name} returned no arrays: '
                      f'{type(e).__name__}: {e}') from e


def _partner_traces(ctx, name, operands, n_states) -> bool:
  """Whether the other init rule ``name`` is registered and traces here."""
  rule = getattr(ctx.rules, name)
  if rule is None:
    return False
  try:
    _output_shapes(ctx, name, rule, operands, n_states)
  except Exception:  # pylint: disable=broad-except
    return False   # its own check reports it
  return True


def _call_init(ctx, rule_name, operands):
  """``(outputs, y_aval, dtype)``: ``rule_name``'s output for each of
  ``ctx.n_states``, ``y``'s aval and the ``result_type`` of ``x``, ``y``
  and the weights.

  For a small case (compiling costs more than running) both init rules go
  into one program, which the other init check then reuses: one compile
  per signature and x64 setting, not two.  The other rule joins only where
  it traces, so its failure stays its own check's.  Not in fast mode, where
  ``init.drtrl`` may run on a batch of one."""
  rule = getattr(ctx.rules, rule_name)
  if rule is None:
    raise RuleFailure(rule_name, f'rule {rule_name!r} is not registered')
  n_states = tuple(ctx.n_states)
  _output_shapes(ctx, rule_name, rule, operands, n_states)
  names = [rule_name]
  if ctx.small and not ctx.fast:
    names = [n for n in executor.INIT_RULES if n == rule_name or
             _partner_traces(ctx, n, operands, n_states)]
  program = _init_program(ctx, tuple((n, getattr(ctx.rules, n))
                                     for n in names), n_states)
  outputs = program(list(operands))[rule_name]
  y = ctx.y_aval(operands)
  return outputs, y, _result_dtype(ctx, operands, y)


def _result_dtype(ctx, operands, y):
  """``result_type`` of ``x``, ``y`` and the weights (the traces' dtype)."""
  x, weights, _ = ctx.primitive.split_operands(operands, ctx.params)
  return jnp.result_type(*[v.dtype for v in (x, y, *weights.values())
                           if v is not None])


def _expect_zeros(ctx, rule, key, value, shape, dtype, label):
  """``value`` is zeros of ``shape`` and ``dtype`` (an abstract value: the
  shape and dtype alone)."""
  abstract = isinstance(value, jax.ShapeDtypeStruct)
  value = value if abstract else to_jax(value)
  problems = []
  if tuple(value.shape) != tuple(shape):
    problems.append(f'shape {tuple(value.shape)} != expected {tuple(shape)}')
  if value.dtype != dtype:
    problems.append(f'dtype {value.dtype} != expected {dtype}')
  if not abstract and value.size and np.any(np.asarray(value) != 0):
    problems.append(f'{int(np.count_nonzero(np.asarray(value)))} non-zero '
                    'entries (a trace starts at zero)')
  if problems:
    ctx.fail(rule, f'{label}: ' + '; '.join(problems), key=key,
             actual_shape=tuple(value.shape), expected_shape=tuple(shape),
             dtype=str(value.dtype))
  else:
    ctx.record_pass(rule, key=key, message=f'{label}: '
                    + ('' if abstract else 'zeros ') + f'{tuple(shape)} {dtype}')


def _increment_shapes(ctx, operands):
  """Leaf shapes of one trace increment (``instant_drtrl`` or the default)."""
  x, weights, rule_params = ctx.primitive.split_operands(operands, ctx.params)
  y = ctx.y_aval(operands)
  g = jax.ShapeDtypeStruct(y.shape, y.dtype)
  try:
    # Shapes only: traced, never compiled.
    inc = jax.eval_shape(lambda x, g, w: executor.instant_term(
        ctx.primitive, ctx.rules, x, g, w, rule_params), x, g, weights)
  except Exception as e:  # pylint: disable=broad-except
    rule = 'instant_drtrl' if ctx.rules.instant_drtrl else 'xy_to_dw'
    raise RuleFailure(rule, raised(rule, e)) from e
  shapes = {k: tuple(np.shape(v)) for k, v in inc.items()}
  require_per_example_increments(ctx, shapes, y.shape)
  return shapes


def require_per_example_increments(ctx, shapes, y_shape) -> None:
  """Raises a :class:`RuleFailure` naming ``instant_drtrl`` where a batched
  primitive's increment (leaf ``shapes``) does not lead with the batch:
  the D-RTRL trace is per example, each carried by its own ``A_t``.  An
  increment summed over the batch, with an ``init_drtrl`` to match, was
  otherwise blamed on ``yw_to_w``, whose result the batch broadcast into."""
  if not ctx.batched or ctx.rules.instant_drtrl is None or not y_shape:
    return
  batch = y_shape[0]
  for k, shape in shapes.items():
    if tuple(shape[:1]) != (batch,):
      raise RuleFailure('instant_drtrl', (
          f'returned shape {tuple(shape)} for a batch of {batch}: a batched '
          "primitive's D-RTRL trace is per example, so the increment's "
          'leading axis is the batch'), key=k)


def _trace_shapes(ctx, operands) -> dict:
  """Per key, the shape of ``init_drtrl``'s trace without its state axis."""
  if ctx.rules.instant_drtrl is not None:
    return _increment_shapes(ctx, operands)
  _, weights, _ = ctx.primitive.split_operands(operands, ctx.params)
  y = ctx.y_aval(operands)
  lead = tuple(y.shape[:1]) if ctx.batched else ()
  return {k: lead + tuple(w.shape) for k, w in weights.items()}


# Numbers of states every init check also traces (shapes only, nothing
# allocated), beside the run's own: with n_state=(1,) alone, an init rule
# that ignores n_state (a state axis of 1 always) passed; 3 also catches one
# that always makes 2.
SHAPE_ONLY_N_STATES = (1, 2, 3)


def _shape_only_n_states(ctx) -> tuple:
  """The run's ``n_state`` values and :data:`SHAPE_ONLY_N_STATES`."""
  return tuple(sorted(set(ctx.n_states) | set(SHAPE_ONLY_N_STATES)))


def _whole_case_avals(ctx) -> tuple:
  """The case's operands as shapes and dtypes (to trace on, not allocate)."""
  return tuple(jax.ShapeDtypeStruct(np.shape(o), np.result_type(o))
               for o in ctx.operands)


def _check_whole_case_shapes(ctx) -> None:
  """``init_drtrl``'s keys, shapes and dtype on the whole case, for every
  ``n_state`` of the run and of :data:`SHAPE_ONLY_N_STATES`, traced
  (nothing allocated): where fast mode ran the zeros on a smaller case, an
  ``init_drtrl`` that ignores ``n_state`` or the batch passed there."""
  avals = _whole_case_avals(ctx)
  trace_shapes = _trace_shapes(ctx, avals)
  n_states = _shape_only_n_states(ctx)
  outputs = _output_shapes(ctx, 'init_drtrl', ctx.rules.init_drtrl, avals,
                           n_states)
  _expect_traces(ctx, outputs, trace_shapes,
                 _result_dtype(ctx, avals, ctx.y_aval(avals)),
                 'the whole case (shapes only)', n_states)


def _expect_traces(ctx, outputs, trace_shapes, dtype, label,
                   n_states=None) -> None:
  """``init_drtrl``'s ``outputs`` (one per ``n_states``, by default
  ``ctx.n_states``): the keys of ``trace_shapes``, each zeros of its shape
  plus ``n_state``, in ``dtype``."""
  for n_state, traces in zip(n_states or ctx.n_states, outputs):
    ctx.check_keys('init_drtrl', traces, trace_shapes.keys())
    for k, shape in trace_shapes.items():
      _expect_zeros(ctx, 'init_drtrl', k, traces[k], shape + (n_state,),
                    dtype, f'{label}, n_state={n_state}')


@check('init.drtrl')
def check_init_drtrl(ctx):
  """``init_drtrl``: the trainable keys, zeros, the trace's shape plus
  ``n_state``, and the operands' result dtype (with x64 on and off; traced
  with ``x`` in another dtype than the weights, and with each weight in
  float64 among float32 operands)."""
  if not ctx.weights:
    ctx.skip(f'{ctx.name} has no trainable operands')
  # Zeros per state, with x64 on and off: 2 traces per state (measured).
  whole = ctx
  ctx = ctx.for_traces(copies=2, per_state=True)
  for label, operands, x64 in _variants(ctx):
    with x64_enabled(x64):
      operands = tuple(to_jax(o) for o in operands)
      trace_shapes = _trace_shapes(ctx, operands)
      outputs, _, dtype = _call_init(ctx, 'init_drtrl', operands)
      _expect_traces(ctx, outputs, trace_shapes, dtype, label)
  _check_whole_case_shapes(whole)
  x_index = ctx.primitive.x_invar_index
  trained = ctx.primitive.trainable_invars(ctx.params).values()
  _check_mixed_dtypes(ctx, 'init_drtrl', lambda avals, y: jnp.result_type(
      avals[x_index].dtype, y.dtype, *(avals[i].dtype for i in trained)))


@check('init.pp')
def check_init_pp(ctx):
  """``init_pp``: zeros ``(*y_shape, n_state)`` in ``y``'s dtype (x64 on/off)."""
  for label, operands, x64 in _variants(ctx):
    with x64_enabled(x64):
      operands = tuple(to_jax(o) for o in operands)
      outputs, y, _ = _call_init(ctx, 'init_pp', operands)
      for n_state, trace in zip(ctx.n_states, outputs):
        if isinstance(trace, dict):
          raise RuleFailure('init_pp', 'init_pp returned a dict; it returns '
                            'one array shaped (*y_shape, n_state)')
        _expect_zeros(ctx, 'init_pp', None, trace,
                      tuple(y.shape) + (n_state,), y.dtype,
                      f'{label}, n_state={n_state}')
  _check_pp_shapes_for_more_states(ctx)
  _check_mixed_dtypes(ctx, 'init_pp', lambda avals, y: y.dtype)


def _check_pp_shapes_for_more_states(ctx) -> None:
  """``init_pp``'s shape and dtype for each of :data:`SHAPE_ONLY_N_STATES`
  the run did not ask for (traced: nothing allocated)."""
  extra = tuple(n for n in _shape_only_n_states(ctx) if n not in ctx.n_states)
  if not extra:
    return
  avals = _whole_case_avals(ctx)
  y = ctx.y_aval(avals)
  outputs = _output_shapes(ctx, 'init_pp', ctx.rules.init_pp, avals, extra)
  for n_state, trace in zip(extra, outputs):
    _expect_zeros(ctx, 'init_pp', None, trace, tuple(y.shape) + (n_state,),
                  y.dtype, f'shapes only, n_state={n_state}')
