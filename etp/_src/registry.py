"""The ETP rule registry: which primitives are ETP primitives, and their rules.

The registry is a plain module-level dict from primitive to an immutable
:class:`EtpRules` record.  Registration goes through
:meth:`etp.ETPPrimitive.register_etp_rules`; this module only stores and answers
queries, so that tools (the compiler, the harness) never reach into a primitive's
private state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

ERROR_PREFIX = '[etp] '

# The four seed rules every primitive must provide.
SEED_RULES = ('yw_to_w', 'xy_to_dw', 'init_drtrl', 'init_pp')
# The two optional rules for weights that are not anchored.
OPTIONAL_RULES = ('instant_drtrl', 'solve_drtrl')


@dataclasses.dataclass(frozen=True)
class EtpRules:
  """Everything a tool needs to know about one ETP primitive.

  Attributes:
    yw_to_w: ``(g, trace, **params) -> trace``, the y -> w link of D-RTRL.
    xy_to_dw: ``(x, g, weights, **params) -> {key: grad}``, the VJP w.r.t. weights.
    init_drtrl: ``(x_var, y_var, weight_vars, n_state) -> {key: zeros}``.
    init_pp: ``(x_var, y_var, weight_vars, n_state) -> zeros``.
    instant_drtrl: optional ``(x, g, weights, **params) -> trace increment``.
    solve_drtrl: optional ``(c, trace, **params) -> {key: weight-shaped grad}``.
    approximate: names of weights whose D-RTRL trace is declared approximate.
    trainable_invars_fn: ``params -> {key: invar index}``.
    x_invar_index: position of the input ``x`` (``None``: no input).
    y_outvar_index: position of the output ``y``.
    batched: whether ``x`` and ``y`` carry a leading batch axis.
    gradient_enabled: whether the primitive is an identity-like marker.
    aux_invars_fn: ``params -> {name: invar index}`` of non-trainable operands
      the rules receive as keyword arguments (sparse indices).
  """

  yw_to_w: Optional[Callable[..., Any]]
  xy_to_dw: Optional[Callable[..., Any]]
  init_drtrl: Optional[Callable[..., Any]]
  init_pp: Optional[Callable[..., Any]]
  instant_drtrl: Optional[Callable[..., Any]]
  solve_drtrl: Optional[Callable[..., Any]]
  approximate: frozenset
  trainable_invars_fn: Callable[..., Mapping[str, int]]
  x_invar_index: Optional[int]
  y_outvar_index: int
  batched: bool
  gradient_enabled: bool
  aux_invars_fn: Callable[..., Mapping[str, int]] = lambda params: {}

  @property
  def has_rules(self) -> bool:
    """Whether the seed rules have been registered."""
    return all(getattr(self, name) is not None for name in SEED_RULES)


# primitive -> EtpRules.  Insertion order is registration order.
_RULES: dict = {}


def _store(primitive, rules: EtpRules) -> None:
  _RULES[primitive] = rules


def _forget(primitive) -> None:
  """Removes a primitive from the registry (used by tests and the harness)."""
  _RULES.pop(primitive, None)


def primitives() -> tuple:
  """Every registered ETP primitive, built-in and user, in registration order."""
  return tuple(_RULES)


def is_etp_primitive(primitive) -> bool:
  """Whether ``primitive`` was made by :func:`etp.register_primitive`."""
  try:
    return primitive in _RULES
  except TypeError:  # unhashable
    return False


def rules_of(primitive) -> EtpRules:
  """The immutable :class:`EtpRules` record of an ETP primitive.

  Raises:
    KeyError: ``primitive`` is not an ETP primitive.
  """
  if not is_etp_primitive(primitive):
    raise KeyError(f'{ERROR_PREFIX}{primitive!r} is not a registered ETP '
                   'primitive; create it with etp.register_primitive.')
  return _RULES[primitive]


def primitive_by_name(name: str):
  """The registered ETP primitive called ``name``, or ``None``."""
  for p in _RULES:
    if p.name == name:
      return p
  return None


def call_init_rule(rule: Callable, x_var, y_var, weight_vars, n_state: int,
                   params: Mapping):
  """Calls ``init_drtrl``/``init_pp``, passing on the bind params it accepts.

  The contract's signature is ``(x_var, y_var, weight_vars, n_state)``; a rule
  that also needs a param (conv needs its layout to find the kernel's output
  axis) names it as a keyword-only argument or takes ``**params``.
  """
  import inspect
  try:
    sig = inspect.signature(rule)
  except (TypeError, ValueError):
    return rule(x_var, y_var, weight_vars, n_state)
  accepts_all = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
  named = {n for n, p in sig.parameters.items()
           if p.kind is inspect.Parameter.KEYWORD_ONLY}
  kwargs = {k: v for k, v in params.items() if accepts_all or k in named}
  return rule(x_var, y_var, weight_vars, n_state, **kwargs)
