"""Turning an implementation function into an ETP primitive.

:func:`register_primitive` takes a plain JAX function ``impl(*operands, **params)``
and derives every rule JAX needs from it:

* eager evaluation: ``impl`` itself;
* abstract evaluation: ``jax.eval_shape`` of ``impl``;
* lowering (``jax.jit``): ``impl`` traced into MLIR with ``mlir.lower_fun``;
* JVP: the primal output binds the primitive again (so it stays visible in
  the jaxpr) and the tangent is ``jax.jvp`` of ``impl`` over the operands that
  can carry a tangent; integer and boolean operands (sparse indices) are closed
  over, so their tangents are ``float0`` as JAX expects;
* transpose: ``jax.linear_transpose`` of ``impl`` in the operands that are
  undefined primals, so ``jax.linear_transpose`` of a function that binds the
  primitive works; ``jax.grad``/``jax.vjp`` never need it, because the tangent
  of the JVP is written in JAX's own linear primitives;
* batching: ``jax.vmap`` of ``impl`` for any mix of mapped operands and axes,
  except where the ETP primitive can stay in the jaxpr: a batched primitive
  mapped over ``x`` alone folds the new axis into its batch axis, and an
  unbatched primitive with a batched counterpart (``mv`` -> ``mm``) binds the
  counterpart.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir

from etp._src import registry
from etp._src.arrays import to_jax
from etp._src.registry import ERROR_PREFIX, EtpRules

__all__ = ['ETPPrimitive', 'register_primitive']


def _no_invars(params) -> dict:
  del params
  return {}


def _is_differentiable(x) -> bool:
  dtype = getattr(x, 'dtype', None)
  if dtype is None:
    dtype = np.result_type(x)
  return jnp.issubdtype(dtype, jnp.inexact)


def _check_rule(prim_name: str, rule_name: str, rule) -> None:
  if rule is not None and not callable(rule):
    raise TypeError(f'{ERROR_PREFIX}rule {rule_name!r} of primitive {prim_name!r} '
                    f'must be callable, got {type(rule).__name__}: {rule!r}.')


class ETPPrimitive(jex_core.Primitive):
  """A JAX primitive that carries ETP rules.

  Create one with :func:`register_primitive`; attach the rules with
  :meth:`register_etp_rules`.  It binds like any JAX primitive:
  ``p.bind(*operands, **params)``.
  """

  def __init__(self, name: str, impl_fn: Callable[..., Any], *, batched: bool,
               gradient_enabled: bool,
               trainable_invars_fn: Callable[..., Mapping[str, int]],
               x_invar_index: Optional[int], y_outvar_index: int,
               multiple_results: bool,
               aux_invars_fn: Callable[..., Mapping[str, int]]):
    super().__init__(name)
    self.aux_invars_fn = aux_invars_fn
    self.multiple_results = multiple_results
    self.impl_fn = impl_fn
    self.batched = batched
    self.gradient_enabled = gradient_enabled
    self.trainable_invars_fn = trainable_invars_fn
    self.x_invar_index = x_invar_index
    self.y_outvar_index = y_outvar_index
    self.batched_counterpart: Optional[ETPPrimitive] = None
    self._custom_batching_rule = None

  # ---------------------------------------------------------------- binding
  def bind(self, *args, **params):
    self._validate_bind(len(args), params)
    return super().bind(*args, **params)

  def _validate_bind(self, n_args: int, params) -> None:
    if self.x_invar_index is not None and not 0 <= self.x_invar_index < n_args:
      raise ValueError(
          f'{ERROR_PREFIX}primitive {self.name!r}: x_invar_index='
          f'{self.x_invar_index} is out of range for {n_args} operands.')
    try:
      trainable = self.trainable_invars_fn(params)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{ERROR_PREFIX}primitive {self.name!r}: '
                       f'trainable_invars_fn({params}) raised {e!r}.') from e
    for key, index in dict(trainable).items():
      if not isinstance(index, (int, np.integer)) or not 0 <= index < n_args:
        raise ValueError(
            f'{ERROR_PREFIX}primitive {self.name!r}: trainable_invars_fn says '
            f'{key!r} is operand {index!r}, out of range for {n_args} operands.')
      if index == self.x_invar_index:
        raise ValueError(
            f'{ERROR_PREFIX}primitive {self.name!r}: trainable operand {key!r} '
            f'is also the input x (operand {index}).')

  def trainable_invars(self, params) -> dict:
    """``{key: invar index}`` of the trainable operands for these params."""
    return dict(self.trainable_invars_fn(params))

  def split_operands(self, operands, params):
    """Splits bind operands into what the rules see.

    Returns:
      ``(x, weights, rule_params)``: ``x`` the input (``None`` without one),
      ``weights`` ``{key: operand}`` for the trainable operands, and
      ``rule_params`` the bind params plus the non-trainable operands named by
      ``aux_invars_fn`` (sparse indices), which every rule receives as keywords.
    """
    x = None if self.x_invar_index is None else operands[self.x_invar_index]
    weights = {k: operands[i] for k, i in self.trainable_invars(params).items()}
    rule_params = dict(params)
    for name, i in dict(self.aux_invars_fn(params)).items():
      rule_params[name] = operands[i]
    return x, weights, rule_params

  # ------------------------------------------------------------------ rules
  def register_etp_rules(self, *, yw_to_w, xy_to_dw, init_drtrl, init_pp,
                         instant_drtrl=None, solve_drtrl=None,
                         approximate: Iterable[str] = (),
                         replace: bool = False) -> 'ETPPrimitive':
    """Attaches the ETP rules (see the rule contract in the README).

    Args:
      yw_to_w: ``(g, trace, **params) -> trace``.
      xy_to_dw: ``(x, g, weights, **params) -> {key: grad}``.
      init_drtrl: ``(x_var, y_var, weight_vars, n_state) -> {key: zeros}``.
      init_pp: ``(x_var, y_var, weight_vars, n_state) -> zeros``.
      instant_drtrl: optional; trace increment for weights that are not anchored.
      solve_drtrl: optional; contracts a learning signal with such a trace.
      approximate: weight keys whose D-RTRL trace is knowingly approximate.
      replace: allow replacing rules that are already registered.

    Returns:
      The primitive, so registration can be chained.
    """
    current = registry.rules_of(self)
    if current.has_rules and not replace:
      raise ValueError(
          f'{ERROR_PREFIX}primitive {self.name!r} already has ETP rules; pass '
          'replace=True to register_etp_rules to overwrite them.')
    rules = dict(yw_to_w=yw_to_w, xy_to_dw=xy_to_dw, init_drtrl=init_drtrl,
                 init_pp=init_pp, instant_drtrl=instant_drtrl,
                 solve_drtrl=solve_drtrl)
    for rule_name, rule in rules.items():
      if rule is None and rule_name in registry.SEED_RULES:
        raise TypeError(f'{ERROR_PREFIX}primitive {self.name!r}: the seed rule '
                        f'{rule_name!r} is required, got None.')
      _check_rule(self.name, rule_name, rule)
    if (instant_drtrl is None) != (solve_drtrl is None):
      raise TypeError(
          f'{ERROR_PREFIX}primitive {self.name!r}: instant_drtrl and solve_drtrl '
          'come as a pair (one shapes the trace, the other reads it).')
    if isinstance(approximate, str):
      approximate = (approximate,)
    registry._store(self, EtpRules(
        **rules, approximate=frozenset(approximate),
        trainable_invars_fn=self.trainable_invars_fn,
        x_invar_index=self.x_invar_index, y_outvar_index=self.y_outvar_index,
        batched=self.batched, gradient_enabled=self.gradient_enabled,
        aux_invars_fn=self.aux_invars_fn))
    return self

  @property
  def rules(self) -> EtpRules:
    """This primitive's :class:`EtpRules` record."""
    return registry.rules_of(self)

  def set_batched_counterpart(self, counterpart: 'ETPPrimitive') -> None:
    """Under ``vmap`` over ``x`` alone, bind ``counterpart`` instead of inlining.

    ``counterpart`` must take the same operands and params, with one leading
    batch axis on ``x`` and ``y`` (``mv`` -> ``mm``).
    """
    if self.batched or not counterpart.batched:
      raise ValueError(f'{ERROR_PREFIX}{self.name!r} -> {counterpart.name!r}: '
                       'a batched counterpart maps an unbatched primitive to a '
                       'batched one.')
    self.batched_counterpart = counterpart

  def def_batching_rule(self, rule) -> None:
    """Overrides the derived batching rule (e.g. for shape-agnostic markers)."""
    self._custom_batching_rule = rule

  # ---------------------------------------------------- derived JAX rules
  def _abstract_eval(self, *avals, **params):
    structs = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals)
    out = jax.eval_shape(functools.partial(self.impl_fn, **params), *structs)
    to_aval = lambda s: jax.core.ShapedArray(s.shape, s.dtype)
    if self.multiple_results:
      return [to_aval(s) for s in out]
    return to_aval(out)

  def _jvp(self, primals, tangents, **params):
    primal_out = self.bind(*primals, **params)
    diff = [i for i, (p, t) in enumerate(zip(primals, tangents))
            if _is_differentiable(p) and type(t) is not ad.Zero]
    if not diff:
      zeros = lambda o: jnp.zeros_like(o)
      tangent_out = ([zeros(o) for o in primal_out] if self.multiple_results
                     else zeros(primal_out))
      return primal_out, tangent_out

    def impl_of_diff(*diff_args):
      full = list(primals)
      for i, a in zip(diff, diff_args):
        full[i] = a
      return self.impl_fn(*full, **params)

    _, tangent_out = jax.jvp(impl_of_diff, [primals[i] for i in diff],
                             [tangents[i] for i in diff])
    if self.multiple_results:
      tangent_out = list(tangent_out)
    return primal_out, tangent_out

  def _transpose(self, cts, *args, **params):
    undefined = [i for i, a in enumerate(args) if ad.is_undefined_primal(a)]
    if type(cts) is ad.Zero or (self.multiple_results and
                                all(type(c) is ad.Zero for c in cts)):
      return [ad.Zero(args[i].aval) if i in undefined else None
              for i in range(len(args))]
    if self.multiple_results:
      cts = [c.instantiate() if type(c) is ad.Zero else c for c in cts]

    def impl_of_linear(*lin_args):
      full = list(args)
      for i, a in zip(undefined, lin_args):
        full[i] = a
      return self.impl_fn(*full, **params)

    structs = [jax.ShapeDtypeStruct(args[i].aval.shape, args[i].aval.dtype)
               for i in undefined]
    try:
      transposed = jax.linear_transpose(impl_of_linear, *structs)(cts)
    except Exception as e:  # pylint: disable=broad-except
      raise TypeError(
          f'{ERROR_PREFIX}primitive {self.name!r} cannot be transposed in '
          f'operands {undefined}: its impl is not linear in them ({e}).') from e
    out = [None] * len(args)
    for i, ct in zip(undefined, transposed):
      out[i] = ct
    return out

  def _batch(self, args, dims, **params):
    if self._custom_batching_rule is not None:
      return self._custom_batching_rule(args, dims, **params)
    xi = self.x_invar_index
    only_x_mapped = (xi is not None and dims[xi] is not None and
                     all(d is None
                         for i, d in enumerate(dims) if i != xi))
    if only_x_mapped and not self.multiple_results:
      x = jnp.moveaxis(args[xi], dims[xi], 0)
      new_args = list(args)
      if self.batched:
        # Examples are independent: fold the vmapped axis into the batch axis.
        v, b = x.shape[:2]
        new_args[xi] = x.reshape((v * b,) + x.shape[2:])
        y = self.bind(*new_args, **params)
        return y.reshape((v, b) + y.shape[1:]), 0
      if self.batched_counterpart is not None:
        new_args[xi] = x
        return self.batched_counterpart.bind(*new_args, **params), 0
    # Mapped axes go first: some libraries (BCOO indices) only batch there.
    args = [a if d is None else jnp.moveaxis(a, d, 0)
            for a, d in zip(args, dims)]
    in_axes = tuple(None if d is None else 0 for d in dims)
    out = jax.vmap(functools.partial(self.impl_fn, **params),
                   in_axes=in_axes)(*args)
    if self.multiple_results:
      return out, [0] * len(out)
    return out, 0


def _eager_impl(impl_fn, *args, **params):
  """``impl_fn`` on JAX arrays: an eager bind may get NumPy arrays, and an impl
  written in JAX (``x @ bcoo``, ``x.at[...]``) must not see them."""
  return impl_fn(*(to_jax(a) if isinstance(a, np.ndarray) else a
                   for a in args), **params)


def _caller_module() -> tuple:
  """``(module name, file)`` of the code that called ``register_primitive``
  (a reproduction snippet imports or runs it, to register the primitive in
  a fresh process; the impl's own module may be a library's)."""
  frame = sys._getframe(2)   # pylint: disable=protected-access
  return (frame.f_globals.get('__name__'), frame.f_globals.get('__file__'))


def register_primitive(name: str, impl_fn: Callable[..., Any], *,
                       batched: bool = False, gradient_enabled: bool = False,
                       trainable_invars_fn: Optional[
                           Callable[..., Mapping[str, int]]] = None,
                       x_invar_index: Optional[int] = 0,
                       y_outvar_index: int = 0,
                       multiple_results: bool = False,
                       aux_invars_fn: Optional[
                           Callable[..., Mapping[str, int]]] = None
                       ) -> ETPPrimitive:
  """Creates an ETP primitive with every JAX rule derived from ``impl_fn``.

  Args:
    name: a name unique among ETP primitives (it names the jaxpr equation).
    impl_fn: ``impl_fn(*operands, **params) -> y``, written in plain JAX.
    batched: ``x`` and ``y`` carry a leading batch axis of independent examples.
    gradient_enabled: an identity-like marker whose operand's own VJP is used.
    trainable_invars_fn: ``params -> {key: operand index}`` of the weights.
    x_invar_index: operand index of the input ``x``, or ``None``.
    y_outvar_index: output index of ``y`` (0 for single-output primitives).
    multiple_results: ``impl_fn`` returns a tuple of arrays.
    aux_invars_fn: ``params -> {name: operand index}`` of non-trainable
      operands (sparse indices, masks) that the rules need; every rule gets
      them as keyword arguments beside the bind params.

  Returns:
    The new :class:`ETPPrimitive`, already in ``etp.primitives()``.

  Raises:
    ValueError: the name is taken or holds ``:``, ``[``, ``]`` or white
      space, or an index is invalid.
    TypeError: ``impl_fn`` or ``trainable_invars_fn`` is not callable.
  """
  if not isinstance(name, str) or not name:
    raise TypeError(f'{ERROR_PREFIX}a primitive name must be a non-empty str, '
                    f'got {name!r}.')
  # The name is a part of pytest's node ids (etp::<name>::<check>), where
  # these characters split or end a part: --lf lost such a primitive's
  # failures, and its printed id did not select it.
  unsafe = sorted({c for c in name if c in ':[]' or c.isspace()})
  if unsafe:
    raise ValueError(f'{ERROR_PREFIX}primitive name {name!r}: {unsafe} are '
                     'not allowed in a name (the battery\'s test ids, '
                     'etp::<name>::<check>, are split on them).')
  if registry.primitive_by_name(name) is not None:
    raise ValueError(f'{ERROR_PREFIX}an ETP primitive named {name!r} is already '
                     'registered; choose another name.')
  if not callable(impl_fn):
    raise TypeError(f'{ERROR_PREFIX}primitive {name!r}: impl_fn must be '
                    f'callable, got {type(impl_fn).__name__}.')
  if trainable_invars_fn is None:
    trainable_invars_fn = _no_invars
  if not callable(trainable_invars_fn):
    raise TypeError(f'{ERROR_PREFIX}primitive {name!r}: trainable_invars_fn '
                    f'must be callable, got {type(trainable_invars_fn).__name__}.')
  if x_invar_index is not None and (not isinstance(x_invar_index, int) or
                                    x_invar_index < 0):
    raise ValueError(f'{ERROR_PREFIX}primitive {name!r}: x_invar_index must be '
                     f'a non-negative int or None, got {x_invar_index!r}.')
  if not isinstance(y_outvar_index, int) or y_outvar_index < 0 or (
      not multiple_results and y_outvar_index != 0):
    raise ValueError(f'{ERROR_PREFIX}primitive {name!r}: y_outvar_index must be '
                     '0 for a single-output primitive (a non-negative int with '
                     f'multiple_results=True), got {y_outvar_index!r}.')

  prim = ETPPrimitive(name, impl_fn, batched=batched,
                      gradient_enabled=gradient_enabled,
                      trainable_invars_fn=trainable_invars_fn,
                      x_invar_index=x_invar_index,
                      y_outvar_index=y_outvar_index,
                      multiple_results=multiple_results,
                      aux_invars_fn=aux_invars_fn or _no_invars)
  prim.registered_by = _caller_module()
  prim.def_impl(functools.partial(_eager_impl, impl_fn))
  prim.def_abstract_eval(prim._abstract_eval)
  mlir.register_lowering(
      prim, mlir.lower_fun(impl_fn, multiple_results=multiple_results))
  ad.primitive_jvps[prim] = prim._jvp
  ad.primitive_transposes[prim] = prim._transpose
  batching.primitive_batchers[prim] = prim._batch
  registry._store(prim, EtpRules(
      yw_to_w=None, xy_to_dw=None, init_drtrl=None, init_pp=None,
      instant_drtrl=None, solve_drtrl=None, approximate=frozenset(),
      trainable_invars_fn=trainable_invars_fn, x_invar_index=x_invar_index,
      y_outvar_index=y_outvar_index, batched=batched,
      gradient_enabled=gradient_enabled, aux_invars_fn=prim.aux_invars_fn))
  return prim
