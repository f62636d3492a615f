r"""A catalog of deliberately broken ETP primitives: the harness's own test.

A check is only worth having if it can fail.  Each :class:`Mutant` here is a
real ETP primitive, registered with :func:`etp.register_primitive`, made from
a built-in family's own pieces (its ``_impl``, ``_trainable``, its rules) with
exactly ONE thing wrong: a sign, a missing derivative factor, a broadcast on
the wrong axis, a trace of the wrong shape, a JVP or batching rule that lies,
an impl that changes under ``jit``...  The record says what is wrong
(``description``), which checks must notice it (``expected_checks``: globs of
check names whose failure counts as catching the REAL cause), and ``case()``
gives operands that expose the bug (a non-square weight for a square-only axis
bug, ``batch > 1`` for a batch bug, float32 operands for a float64-only rule).

Nothing is registered at import: ``etp_testing`` lists ``etp.primitives()``,
so a mutant is registered only when :meth:`Mutant.primitive` is first called
(then cached).  ``python -m etp_testing.selftest`` runs the whole harness on
every mutant and reports which checks killed it.

Every mutant is off by ``O(1)`` relative error (or a wrong shape, key or
dtype) on its case, far outside the tolerance table, except the deliberately
precision-limited ones, whose error (``~1e-3`` relative in float32) is still
two orders of magnitude above the float32 bound.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import importlib
import threading
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad
from jax.interpreters import batching

import etp
from etp._src import registry
from etp._src import rule_util
from etp._src.registry import call_init_rule
from etp_testing._src.errors import PREFIX

__all__ = ['NAME_PREFIX', 'Mutant', 'catalog', 'get', 'families',
           'bug_classes', 'builtin', 'built', 'forget_built']

# The name every mutant primitive starts with (so a plugin can tell them apart).
NAME_PREFIX = 'mutant_'


@dataclasses.dataclass(frozen=True, eq=False)
class Mutant:
  """One deliberately broken variant of a built-in ETP primitive.

  Attributes:
    name: the registered primitive's name (``mutant_<family>_<bug>``).
    family: the built-in family it breaks (dense, sparse, elemwise, conv, lora).
    description: one line: the bug.
    expected_checks: globs of check names; a failure of a matching check
      counts as catching the real cause.
    case: ``() -> (operands, params)`` that exposes the bug.
    build: ``() -> ETPPrimitive``; registers the broken primitive.  Call
      :meth:`primitive` instead, which builds once and caches.
    bug_class: the kind of bug (``sign``, ``wrong_axis``, ``jvp``, ...).
    base: the name of the correct built-in primitive it was made from; it
      takes the same operands and params, so it can run on ``case()`` too.
  """

  name: str
  family: str
  description: str
  expected_checks: tuple
  case: Callable[[], tuple]
  build: Callable[[], Any]
  bug_class: str = ''
  base: str = ''

  def primitive(self):
    """The registered broken primitive (registered on the first call)."""
    with _LOCK:
      prim = _BUILT.get(self.name)
      if prim is None or not etp.is_etp_primitive(prim):
        # Not built yet, or taken out of the registry by someone else.
        prim = registry.primitive_by_name(self.name)
        if prim is None:
          prim = self.build()
        _BUILT[self.name] = prim
      return prim

  def forget(self) -> bool:
    """Takes this mutant out of ``etp.primitives()`` (if it was built)."""
    with _LOCK:
      prim = _BUILT.pop(self.name, None)
      if prim is None:
        return False
      registry._forget(prim)  # pylint: disable=protected-access
      return True

  def base_primitive(self):
    """The correct built-in primitive this mutant was made from."""
    return builtin(self.base)

  def matches(self, check_name: str) -> bool:
    """Whether a failure of ``check_name`` catches this mutant's real cause."""
    return any(fnmatch.fnmatchcase(check_name, pattern)
               for pattern in self.expected_checks)

  def __repr__(self) -> str:
    return f'Mutant({self.name!r}: {self.description})'


_LOCK = threading.RLock()
_BUILT: dict = {}
_CATALOG: list = []

# The built-in family modules and the primitives they define.
_FAMILY_MODULES = {
    'dense': 'etp._src.dense', 'sparse': 'etp._src.sparse',
    'elemwise': 'etp._src.elemwise', 'conv': 'etp._src.conv',
    'lora': 'etp._src.lora',
}
_BUILTIN_OWNER = {
    'etp_mv': ('dense', 'etp_mv_p'), 'etp_mm': ('dense', 'etp_mm_p'),
    'etp_sp_mv': ('sparse', 'etp_sp_mv_p'),
    'etp_sp_mm': ('sparse', 'etp_sp_mm_p'),
    'etp_elemwise': ('elemwise', 'etp_elemwise_p'),
    'etp_conv': ('conv', 'etp_conv_p'),
    'etp_lora_mv': ('lora', 'etp_lora_mv_p'),
    'etp_lora_mm': ('lora', 'etp_lora_mm_p'),
}


def _module(family: str):
  return importlib.import_module(_FAMILY_MODULES[family])


def builtin(name: str):
  """The built-in primitive called ``name`` (e.g. ``'etp_mm'``)."""
  family, attr = _BUILTIN_OWNER[name]
  return getattr(_module(family), attr)


def catalog(family: Optional[str] = None, pattern: str = '*') -> list:
  """The mutants (records only; nothing is registered), in catalog order.

  Args:
    family: only this family's mutants.
    pattern: a glob on the mutant name (``'mutant_dense_*'``), or on the name
      without the ``mutant_`` prefix.
  """
  return [m for m in _CATALOG
          if (family is None or m.family == family) and (
              fnmatch.fnmatchcase(m.name, pattern) or
              fnmatch.fnmatchcase(m.name[len(NAME_PREFIX):], pattern))]


def get(name: str) -> Mutant:
  """The mutant called ``name`` (with or without the ``mutant_`` prefix)."""
  for m in _CATALOG:
    if name in (m.name, m.name[len(NAME_PREFIX):]):
      return m
  raise KeyError(f'{PREFIX}no mutant named {name!r}; known: '
                 f'{", ".join(m.name for m in _CATALOG)}')


def families() -> tuple:
  """The catalog's mutant families (the built-in each one breaks), in
  catalog order."""
  return tuple(dict.fromkeys(m.family for m in _CATALOG))


def bug_classes() -> tuple:
  """The catalog's bug classes (what kind of mistake each mutant makes), in
  catalog order."""
  return tuple(dict.fromkeys(m.bug_class for m in _CATALOG))


def built() -> list:
  """The mutants registered so far in this process."""
  with _LOCK:
    return [m for m in _CATALOG if m.name in _BUILT]


def forget_built() -> int:
  """Takes every registered mutant out of ``etp.primitives()`` again.

  Tests that build mutants call this at teardown, so that code listing the
  registered primitives (the pytest plugin, "every primitive passes" sweeps)
  never meets a deliberately broken one.  A later :meth:`Mutant.primitive`
  registers a fresh copy.  Returns how many were forgotten.
  """
  with _LOCK:
    for prim in _BUILT.values():
      registry._forget(prim)  # pylint: disable=protected-access
    n = len(_BUILT)
    _BUILT.clear()
    return n


def _mutant(bug: str, family: str, *, base: str, bug_class: str,
            expected, case: Callable[[], tuple], description: str):
  """Decorator: ``build(name) -> primitive`` becomes a catalog entry."""
  if isinstance(expected, str):
    expected = (expected,)
  name = f'{NAME_PREFIX}{family}_{bug}'

  def register(build):
    if any(m.name == name for m in _CATALOG):
      raise ValueError(f'{PREFIX}mutant {name!r} is defined twice')
    _CATALOG.append(Mutant(
        name=name, family=family, description=description,
        expected_checks=tuple(expected), case=case,
        build=functools.partial(build, name), bug_class=bug_class, base=base))
    return build
  return register


# ------------------------------------------------------------ building blocks
def _clone(name: str, base: str, *, impl=None, approximate=None,
           jvp=None, batcher=None, **rule_overrides):
  """Registers ``name`` as a copy of the built-in ``base`` with some parts
  replaced: ``impl``, any rule (``xy_to_dw=...``; ``instant_drtrl=None`` and
  ``solve_drtrl=None`` drop the optional pair), the declared ``approximate``
  keys, or the JAX ``jvp`` / ``batcher`` (``f(prim) -> rule``) installed
  after registration."""
  base_prim = builtin(base)
  r = etp.rules_of(base_prim)
  prim = etp.register_primitive(
      name, impl or base_prim.impl_fn, batched=base_prim.batched,
      gradient_enabled=base_prim.gradient_enabled,
      trainable_invars_fn=base_prim.trainable_invars_fn,
      x_invar_index=base_prim.x_invar_index,
      y_outvar_index=base_prim.y_outvar_index,
      multiple_results=base_prim.multiple_results,
      aux_invars_fn=base_prim.aux_invars_fn)
  rules = dict(yw_to_w=r.yw_to_w, xy_to_dw=r.xy_to_dw,
               init_drtrl=r.init_drtrl, init_pp=r.init_pp,
               instant_drtrl=r.instant_drtrl, solve_drtrl=r.solve_drtrl)
  rules.update(rule_overrides)
  prim.register_etp_rules(
      **rules, approximate=r.approximate if approximate is None
      else approximate)
  if jvp is not None:
    ad.primitive_jvps[prim] = jvp(prim)
  if batcher is not None:
    batching.primitive_batchers[prim] = batcher(prim)
  return prim


def _rules(base: str):
  return etp.rules_of(builtin(base))


def _map_keys(result: dict, fn, keys=None) -> dict:
  """``fn`` applied to the leaves of ``keys`` (all keys by default)."""
  return {k: (fn(v) if keys is None or k in keys else v)
          for k, v in result.items()}


def _xy_with(base: str, fn, keys=None):
  """``xy_to_dw`` of ``base`` with ``fn`` applied to some keys' gradients."""
  def xy_to_dw(x, g, weights, **params):
    return _map_keys(_rules(base).xy_to_dw(x, g, weights, **params), fn, keys)
  return xy_to_dw


def _yw_with(base: str, fn, keys=None):
  def yw_to_w(g, trace, **params):
    return _map_keys(_rules(base).yw_to_w(g, trace, **params), fn, keys)
  return yw_to_w


def _init_with(base: str, fn, keys=None):
  """``init_drtrl`` of ``base`` with ``fn`` applied to some keys' zeros."""
  def init_drtrl(x_var, y_var, weight_vars, n_state, **params):
    zeros = call_init_rule(_rules(base).init_drtrl, x_var, y_var, weight_vars,
                           n_state, params)
    return _map_keys(zeros, fn, keys)
  return init_drtrl


def _global_float(v):
  """The same zeros in the GLOBAL default float dtype (float64 under x64)."""
  return jnp.zeros(v.shape, dtype=float)


def _state_axis_first(v):
  """The trailing n_state axis moved to the front."""
  return jnp.moveaxis(v, -1, 0)


def _ones(v):
  return jnp.ones_like(v)


def _scaled_jvp(factor):
  """A JVP rule whose tangent is ``factor`` times the true one."""
  def make(prim):
    def jvp(primals, tangents, **params):
      y, t = prim._jvp(primals, tangents, **params)
      return y, jax.tree.map(lambda v: factor * v, t)
    return jvp
  return make


def _flipping_batcher(prim):
  """A batching rule that returns the mapped examples in reverse order."""
  def batch(args, dims, **params):
    out, out_dim = prim._batch(args, dims, **params)
    return jnp.flip(out, out_dim), out_dim
  return batch


def _offset_when_traced(impl, offset=1.0):
  """``impl`` plus ``offset`` only when traced (``isinstance(x, Tracer)``).

  The eager impl (concrete arrays) is right; the lowering traces ``impl`` and
  so adds the offset, and so does the derived batching rule (``jax.vmap`` of
  ``impl``).  The offset is a constant, so every tangent and cotangent stays
  exact: only ``jit`` and ``vmap`` of the primitive see the bug.
  """
  def traced_impl(*operands, **params):
    y = impl(*operands, **params)
    if any(isinstance(o, jax.core.Tracer) for o in operands):
      # The JVP traces impl too; a constant offset leaves tangents exact.
      return y + jnp.asarray(offset, y.dtype)
    return y
  return traced_impl


# Catastrophic cancellation: (a + BIG) * b - BIG * b == a * b in exact
# arithmetic; in float32 the sum rounds a to a multiple of ~1e-2.
_BIG = 1e5


# --------------------------------------------------------------------- cases
def _rng(seed: int):
  return np.random.default_rng(seed)


def _normal(rng, shape, dtype=np.float32):
  return rng.standard_normal(shape).astype(dtype)


def _dense_case(*, batch=None, n_in=3, n_out=5, bias=False,
                dtype=np.float32, x_dtype=None, seed=0):
  def case():
    rng = _rng(seed)
    lead = () if batch is None else (batch,)
    ops = [_normal(rng, lead + (n_in,), x_dtype or dtype),
           _normal(rng, (n_in, n_out), dtype)]
    if bias:
      ops.append(_normal(rng, (n_out,), dtype))
    return ops, {'has_bias': bias}
  return case


# Shared cases (one correct built-in run covers every mutant on a case).
# Non-square weights, a batch > 1 and a bias, so that no shape coincidence
# hides a bug; float32 where a bug shows only in float32.
DENSE_MM = _dense_case(batch=3, n_in=3, n_out=5, bias=True)
DENSE_MV = _dense_case(n_in=4, n_out=3, bias=True, dtype=np.float64)
DENSE_SQUARE = _dense_case(n_in=4, n_out=4, bias=True)
# Mixed precision: bfloat16 activations, float32 weights; and a float64
# input over float32 weights.
DENSE_MIXED = _dense_case(batch=3, n_in=3, n_out=5, bias=True,
                          x_dtype=jnp.bfloat16)
DENSE_WIDE_X = _dense_case(batch=3, n_in=3, n_out=5, bias=True,
                           x_dtype=np.float64)


# --------------------------------------------------------------------- dense
@_mutant('yw_square_axis', 'dense', base='etp_mm', bug_class='wrong_axis',
         expected=('yw_to_w.*', 'drtrl.exact'),
         case=DENSE_MM,
         description='yw_to_w broadcasts g over the input axis (g[..., :, '
         'None]): only fits a square weight, and picks the wrong element')
def _(name):
  def yw_to_w(g, trace, *, has_bias):
    out = {'weight': g[..., :, None] * trace['weight']}
    if has_bias:
      out['bias'] = g * trace['bias']
    return out
  return _clone(name, 'etp_mm', yw_to_w=yw_to_w)


@_mutant('yw_passthrough', 'dense', base='etp_mv', bug_class='passthrough',
         expected=('yw_to_w.anchor', 'yw_to_w.linear'),
         case=DENSE_MV,
         description='yw_to_w returns the trace unchanged (g never applied)')
def _(name):
  return _clone(name, 'etp_mv', yw_to_w=lambda g, trace, **p: dict(trace))


@_mutant('xy_sign', 'dense', base='etp_mv', bug_class='sign',
         expected=('xy_to_dw.*',),
         case=DENSE_MV,
         description="xy_to_dw returns -x^T g for 'weight'")
def _(name):
  return _clone(name, 'etp_mv', xy_to_dw=_xy_with('etp_mv', jnp.negative,
                                                  ('weight',)))


@_mutant('bias_scale', 'dense', base='etp_mm', bug_class='scale',
         expected=('xy_to_dw.*',),
         case=DENSE_MM,
         description="xy_to_dw returns 2 * sum(g) for 'bias'")
def _(name):
  return _clone(name, 'etp_mm', xy_to_dw=_xy_with('etp_mm', lambda v: 2 * v,
                                                  ('bias',)))


@_mutant('xy_transposed', 'dense', base='etp_mv', bug_class='transposed',
         expected=('xy_to_dw.*',),
         case=DENSE_SQUARE,
         description="xy_to_dw returns (x^T g)^T for a square 'weight' "
         '(right shape, wrong elements)')
def _(name):
  return _clone(name, 'etp_mv', xy_to_dw=_xy_with('etp_mv', jnp.transpose,
                                                  ('weight',)))


@_mutant('drop_bias', 'dense', base='etp_mm', bug_class='dropped_key',
         expected=('xy_to_dw.*',),
         case=DENSE_MM,
         description="xy_to_dw forgets the 'bias' key")
def _(name):
  def xy_to_dw(x, g, weights, **params):
    out = _rules('etp_mm').xy_to_dw(x, g, weights, **params)
    out.pop('bias', None)
    return out
  return _clone(name, 'etp_mm', xy_to_dw=xy_to_dw)


@_mutant('extra_key', 'dense', base='etp_mv', bug_class='extra_key',
         expected=('xy_to_dw.*',),
         case=DENSE_MV,
         description="xy_to_dw also returns the input's gradient under an "
         "'x' key (x is not a weight)")
def _(name):
  def xy_to_dw(x, g, weights, **params):
    out = _rules('etp_mv').xy_to_dw(x, g, weights, **params)
    out['x'] = g @ weights['weight'].T
    return out
  return _clone(name, 'etp_mv', xy_to_dw=xy_to_dw)


@_mutant('init_x64_dtype', 'dense', base='etp_mm', bug_class='init_dtype',
         expected=('init.drtrl',),
         case=DENSE_MM,
         description='init_drtrl makes zeros in the global default float '
         'dtype (float64 under x64) instead of the operands\' float32')
def _(name):
  return _clone(name, 'etp_mm', init_drtrl=_init_with('etp_mm', _global_float))


@_mutant('init_weight_dtype', 'dense', base='etp_mm', bug_class='init_dtype',
         expected=('init.drtrl',),
         case=DENSE_MM,
         description="init_drtrl makes zeros in each weight's dtype, not the "
         "result_type of x, y and the weights: right while they share one "
         "(the check also traces it with x in another dtype)")
def _(name):
  def init_drtrl(x_var, y_var, weight_vars, n_state, **params):
    zeros = call_init_rule(_rules('etp_mm').init_drtrl, x_var, y_var,
                           weight_vars, n_state, params)
    return {k: v.astype(weight_vars[k].aval.dtype) for k, v in zeros.items()}
  return _clone(name, 'etp_mm', init_drtrl=init_drtrl)


@_mutant('init_pp_x_dtype', 'dense', base='etp_mm', bug_class='init_dtype',
         expected=('init.pp',),
         case=DENSE_MM,
         description="init_pp makes zeros in x's dtype, not y's: right while "
         'x and the weights share one (the check also traces it with x in '
         'another dtype)')
def _(name):
  def init_pp(x_var, y_var, weight_vars, n_state, **params):
    zeros = call_init_rule(_rules('etp_mm').init_pp, x_var, y_var,
                           weight_vars, n_state, params)
    return zeros.astype(x_var.aval.dtype)
  return _clone(name, 'etp_mm', init_pp=init_pp)


@_mutant('init_state_axis_first', 'dense', base='etp_mv',
         bug_class='state_axis', expected=('init.drtrl',),
         case=DENSE_MV,
         description='init_drtrl puts the n_state axis first, not last')
def _(name):
  return _clone(name, 'etp_mv',
                init_drtrl=_init_with('etp_mv', _state_axis_first))


@_mutant('init_nonzero', 'dense', base='etp_mm', bug_class='nonzero_init',
         expected=('init.drtrl',),
         case=DENSE_MM,
         description='init_drtrl starts the traces at ones, not zeros')
def _(name):
  return _clone(name, 'etp_mm', init_drtrl=_init_with('etp_mm', _ones))


@_mutant('batch_not_summed', 'dense', base='etp_mm',
         bug_class='batch_not_summed', expected=('xy_to_dw.*',),
         case=DENSE_MM,
         description="xy_to_dw keeps the batch axis of 'weight' "
         '((B, in, out) per-example gradients instead of their sum)')
def _(name):
  def xy_to_dw(x, g, weights, *, has_bias):
    out = _rules('etp_mm').xy_to_dw(x, g, weights, has_bias=has_bias)
    out['weight'] = jnp.einsum('...i,...o->...io', x, g).astype(
        weights['weight'].dtype)
    return out
  return _clone(name, 'etp_mm', xy_to_dw=xy_to_dw)


@_mutant('batch_mean', 'dense', base='etp_mm', bug_class='batch_one_only',
         expected=('xy_to_dw.*',),
         case=DENSE_MM,
         description='xy_to_dw averages over the batch instead of summing '
         '(right only for batch size 1)')
def _(name):
  def xy_to_dw(x, g, weights, **params):
    n = x.shape[0] if x.ndim > 1 else 1
    return _map_keys(_rules('etp_mm').xy_to_dw(x, g, weights, **params),
                     lambda v: v / n)
  return _clone(name, 'etp_mm', xy_to_dw=xy_to_dw)


@_mutant('yw_first_example', 'dense', base='etp_mm',
         bug_class='batch_one_only',
         expected=('yw_to_w.anchor', 'yw_to_w.vmap'),
         case=DENSE_MM,
         description="yw_to_w applies the first example's g to every example "
         '(right only for batch size 1)')
def _(name):
  def yw_to_w(g, trace, *, has_bias):
    g0 = g[..., :1, :] if g.ndim >= 2 else g
    out = {'weight': g0[..., None, :] * trace['weight']}
    if has_bias:
      out['bias'] = g0 * trace['bias']
    return out
  return _clone(name, 'etp_mm', yw_to_w=yw_to_w)


@_mutant('yw_fixed_rank', 'dense', base='etp_mm', bug_class='vmap',
         expected=('yw_to_w.vmap',),
         case=DENSE_MM,
         description="yw_to_w hard-codes one batch axis (einsum 'bo,bio->bio'):"
         ' breaks under vmap or with extra leading axes')
def _(name):
  def yw_to_w(g, trace, *, has_bias):
    out = {'weight': jnp.einsum('bo,bio->bio', g, trace['weight'])}
    if has_bias:
      out['bias'] = jnp.einsum('bo,bo->bo', g, trace['bias'])
    return out
  return _clone(name, 'etp_mm', yw_to_w=yw_to_w)


@_mutant('jvp_sign', 'dense', base='etp_mm', bug_class='jvp',
         expected=('primitive.jvp',),
         case=DENSE_MM,
         description="the primitive's JVP rule returns the negated tangent")
def _(name):
  return _clone(name, 'etp_mm', jvp=_scaled_jvp(-1.0))


@_mutant('batcher_flip', 'dense', base='etp_mv', bug_class='batcher',
         expected=('primitive.vmap',),
         case=DENSE_MV,
         description="the primitive's batching rule returns the mapped "
         'examples in reverse order')
def _(name):
  return _clone(name, 'etp_mv', batcher=_flipping_batcher)


def _x_axis_ignored_batcher(prim):
  """A batching rule that folds a mapped ``x`` alone into the batch without
  moving its mapped axis to the front: right for ``in_axes`` 0 only."""
  def batch(args, dims, **params):
    if dims[0] is not None and all(d is None for d in dims[1:]):
      x = args[0]   # the bug: jnp.moveaxis(args[0], dims[0], 0) is missing
      v, b = x.shape[:2]
      y = prim.bind(x.reshape((v * b,) + x.shape[2:]), *args[1:], **params)
      return y.reshape((v, b) + y.shape[1:]), 0
    return prim._batch(args, dims, **params)
  return batch


@_mutant('batcher_x_axis_ignored', 'dense', base='etp_mm',
         bug_class='batcher', expected=('primitive.vmap',), case=DENSE_MM,
         description="the primitive's batching rule folds a mapped x into "
         "the batch without moving its mapped axis first: right for "
         'in_axes=0, wrong for x mapped at axis 1 (a sequence\'s time axis)')
def _(name):
  return _clone(name, 'etp_mm', batcher=_x_axis_ignored_batcher)


@_mutant('impl_default_dtype', 'dense', base='etp_mm', bug_class='dtype',
         expected=('primitive.abstract_eval',), case=DENSE_MM,
         description='impl mixes in jnp.zeros(shape) with no dtype: float64 '
         'outputs for float32 operands whenever jax_enable_x64 is on')
def _(name):
  from etp._src import dense

  def impl(*operands, **params):
    y = dense._impl(*operands, **params)
    return jnp.where(y > -1e30, y, jnp.zeros(y.shape))
  return _clone(name, 'etp_mm', impl=impl)


@_mutant('jit_offset', 'dense', base='etp_mm', bug_class='jit',
         expected=('primitive.jit', 'primitive.vmap'),
         case=DENSE_MM,
         description='impl adds 1 when its operands are tracers '
         '(isinstance(x, jax.core.Tracer)): jit disagrees with eager')
def _(name):
  from etp._src import dense
  return _clone(name, 'etp_mm', impl=_offset_when_traced(dense._impl))


def _on_first_device(v):
  """``v`` put on (committed to) the default device, wherever it was."""
  return jax.device_put(v, jax.devices()[0])


@_mutant('xy_pinned', 'dense', base='etp_mm', bug_class='device_pin',
         expected=('device.consistency',),
         case=DENSE_MM,
         description='xy_to_dw puts its gradients on the first device '
         '(jax.device_put(v, jax.devices()[0])), wherever the operands are')
def _(name):
  return _clone(name, 'etp_mm', xy_to_dw=_xy_with('etp_mm', _on_first_device))


@_mutant('yw_pinned', 'dense', base='etp_mm', bug_class='device_pin',
         expected=('device.consistency',),
         case=DENSE_MM,
         description='yw_to_w puts its result on the first device '
         '(jax.device_put(v, jax.devices()[0])); only the D-RTRL compiler '
         'calls it, on one device under jit, where nothing else shows it')
def _(name):
  return _clone(name, 'etp_mm', yw_to_w=_yw_with('etp_mm', _on_first_device))


@_mutant('yw_sharding_pinned', 'dense', base='etp_mm', bug_class='device_pin',
         expected=('device.consistency',),
         case=DENSE_MM,
         description='yw_to_w constrains its result to the first device '
         '(jax.lax.with_sharding_constraint with a SingleDeviceSharding): '
         'no device_put in its jaxpr, and only the D-RTRL compiler calls it')
def _(name):
  def pin(v):
    return jax.lax.with_sharding_constraint(
        v, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  return _clone(name, 'etp_mm', yw_to_w=_yw_with('etp_mm', pin))


@_mutant('xy_in_x_dtype', 'dense', base='etp_mm', bug_class='mixed_precision',
         expected=('xy_to_dw.vjp',),
         case=DENSE_MIXED,
         description="xy_to_dw returns its gradients in x's dtype, not each "
         "weight's: right while they share one; bfloat16 gradients for "
         'float32 weights under mixed precision')
def _(name):
  def xy_to_dw(x, g, weights, **params):
    out = _rules('etp_mm').xy_to_dw(x, g, weights, **params)
    return {k: v.astype(x.dtype) for k, v in out.items()}
  return _clone(name, 'etp_mm', xy_to_dw=xy_to_dw)


@_mutant('xy_promoted_dtype', 'dense', base='etp_mm',
         bug_class='mixed_precision', expected=('xy_to_dw.vjp',),
         case=DENSE_WIDE_X,
         description="xy_to_dw returns its gradients in the wider of x's and "
         "the weights' dtypes (an einsum of x and g, uncast): float64 "
         'gradients for float32 weights under a float64 input')
def _(name):
  def xy_to_dw(x, g, weights, **params):
    out = _rules('etp_mm').xy_to_dw(x, g, weights, **params)
    dtype = jnp.result_type(x, *weights.values())
    return {k: v.astype(dtype) for k, v in out.items()}
  return _clone(name, 'etp_mm', xy_to_dw=xy_to_dw)


@_mutant('xy_g_in_x_dtype', 'dense', base='etp_mm',
         bug_class='mixed_precision', expected=('xy_to_dw.vjp',),
         case=DENSE_MIXED,
         description="xy_to_dw rounds g to x's dtype before contracting it: "
         'nothing changes while x and the weights share a dtype (and no '
         'dtype is wrong); bfloat16 precision in the float32 gradients '
         'under bfloat16 activations')
def _(name):
  def xy_to_dw(x, g, weights, **params):
    return _rules('etp_mm').xy_to_dw(x, g.astype(x.dtype), weights, **params)
  return _clone(name, 'etp_mm', xy_to_dw=xy_to_dw)


@_mutant('xy_cancellation', 'dense', base='etp_mm', bug_class='float64_only',
         expected=('xy_to_dw.vjp', 'xy_to_dw.jacrev'),
         case=DENSE_MM,
         description="xy_to_dw computes (x + 1e5)^T g - 1e5 sum(g): right "
         'in float64, ~1e-3 off in float32 (catastrophic cancellation)')
def _(name):
  def xy_to_dw(x, g, weights, *, has_bias):
    out = _rules('etp_mm').xy_to_dw(x, g, weights, has_bias=has_bias)
    big = jnp.asarray(_BIG, x.dtype)
    shifted = jnp.einsum('...i,...o->io', x + big, g)
    g_sum = g.reshape((-1, g.shape[-1])).sum(0)
    out['weight'] = (shifted - big * g_sum[None, :]).astype(
        weights['weight'].dtype)
    return out
  return _clone(name, 'etp_mm', xy_to_dw=xy_to_dw)


@_mutant('init_pp_no_state_axis', 'dense', base='etp_mv',
         bug_class='state_axis', expected=('init.pp',),
         case=DENSE_MV,
         description='init_pp returns y-shaped zeros without the trailing '
         'n_state axis')
def _(name):
  def init_pp(x_var, y_var, weight_vars, n_state, **params):
    return call_init_rule(_rules('etp_mv').init_pp, x_var, y_var, weight_vars,
                          n_state, params)[..., 0]
  return _clone(name, 'etp_mv', init_pp=init_pp)


# ------------------------------------------------------------------ elemwise
def _elemwise_case(*, shape=(3, 4), dtype=np.float32, seed=2):
  def case():
    return [_normal(_rng(seed), shape, dtype)], {}
  return case


ELEMWISE_F32 = _elemwise_case(shape=(3, 4))
ELEMWISE_F64 = _elemwise_case(shape=(3, 4), dtype=np.float64)


@_mutant('impl_tanh', 'elemwise', base='etp_elemwise',
         bug_class='missing_factor', expected=('xy_to_dw.*', 'drtrl.exact'),
         case=ELEMWISE_F32,
         description="impl applies tanh (not the identity) but xy_to_dw "
         "still returns g: the impl's derivative factor 1 - tanh^2 is missing")
def _(name):
  return _clone(name, 'etp_elemwise', impl=lambda weight: jnp.tanh(weight))


@_mutant('xy_sign', 'elemwise', base='etp_elemwise', bug_class='sign',
         expected=('xy_to_dw.*',), case=ELEMWISE_F64,
         description='xy_to_dw returns -g')
def _(name):
  return _clone(name, 'etp_elemwise',
                xy_to_dw=_xy_with('etp_elemwise', jnp.negative))


@_mutant('yw_scale', 'elemwise', base='etp_elemwise', bug_class='scale',
         expected=('yw_to_w.anchor',), case=ELEMWISE_F32,
         description='yw_to_w returns 2 g T')
def _(name):
  return _clone(name, 'etp_elemwise',
                yw_to_w=_yw_with('etp_elemwise', lambda v: 2 * v))


@_mutant('yw_passthrough', 'elemwise', base='etp_elemwise',
         bug_class='passthrough',
         expected=('yw_to_w.anchor', 'yw_to_w.linear'),
         case=ELEMWISE_F32,
         description='yw_to_w returns the trace unchanged')
def _(name):
  return _clone(name, 'etp_elemwise', yw_to_w=lambda g, trace: dict(trace))


@_mutant('init_x64_dtype', 'elemwise', base='etp_elemwise',
         bug_class='init_dtype', expected=('init.drtrl',),
         case=ELEMWISE_F32,
         description='init_drtrl makes zeros in the global default float '
         'dtype (float64 under x64), not the operand\'s')
def _(name):
  return _clone(name, 'etp_elemwise',
                init_drtrl=_init_with('etp_elemwise', _global_float))


@_mutant('init_pp_x64_dtype', 'elemwise', base='etp_elemwise',
         bug_class='init_dtype', expected=('init.pp',),
         case=ELEMWISE_F32,
         description="init_pp makes zeros in the global default float dtype, "
         "not y's")
def _(name):
  def init_pp(x_var, y_var, weight_vars, n_state):
    return _global_float(_rules('etp_elemwise').init_pp(
        x_var, y_var, weight_vars, n_state))
  return _clone(name, 'etp_elemwise', init_pp=init_pp)


@_mutant('init_nonzero', 'elemwise', base='etp_elemwise',
         bug_class='nonzero_init', expected=('init.drtrl',),
         case=ELEMWISE_F32,
         description='init_drtrl starts the trace at ones')
def _(name):
  return _clone(name, 'etp_elemwise',
                init_drtrl=_init_with('etp_elemwise', _ones))


@_mutant('extra_key', 'elemwise', base='etp_elemwise', bug_class='extra_key',
         expected=('xy_to_dw.*',), case=ELEMWISE_F32,
         description="xy_to_dw also returns a 'bias' key the primitive does "
         'not have')
def _(name):
  def xy_to_dw(x, g, weights):
    out = _rules('etp_elemwise').xy_to_dw(x, g, weights)
    out['bias'] = jnp.zeros_like(out['weight'])
    return out
  return _clone(name, 'etp_elemwise', xy_to_dw=xy_to_dw)


@_mutant('jvp_scale', 'elemwise', base='etp_elemwise', bug_class='jvp',
         expected=('primitive.jvp',), case=ELEMWISE_F32,
         description="the primitive's JVP rule returns twice the tangent")
def _(name):
  return _clone(name, 'etp_elemwise', jvp=_scaled_jvp(2.0))


@_mutant('batcher_flip', 'elemwise', base='etp_elemwise',
         bug_class='batcher', expected=('primitive.vmap',),
         case=ELEMWISE_F32,
         description="the primitive's batching rule returns the mapped "
         'examples in reverse order')
def _(name):
  return _clone(name, 'etp_elemwise', batcher=_flipping_batcher)


@_mutant('yw_cancellation', 'elemwise', base='etp_elemwise',
         bug_class='float64_only', expected=('yw_to_w.*',),
         case=ELEMWISE_F32,
         description='yw_to_w computes (g + 1e5) T - 1e5 T: right in float64, '
         '~1e-3 off in float32 (catastrophic cancellation)')
def _(name):
  def yw_to_w(g, trace):
    big = jnp.asarray(_BIG, g.dtype)
    t = trace['weight']
    return {'weight': (g + big) * t - big * t}
  return _clone(name, 'etp_elemwise', yw_to_w=yw_to_w)


# -------------------------------------------------------------------- sparse
def _sparse_case(*, batch=None, n_in=4, n_out=3, nnz=7, bias=False,
                 dtype=np.float32, seed=3):
  def case():
    rng = _rng(seed)
    flat = np.sort(rng.choice(n_in * n_out, nnz, replace=False))
    indices = np.stack([flat // n_out, flat % n_out], axis=1).astype(np.int32)
    lead = () if batch is None else (batch,)
    ops = [_normal(rng, lead + (n_in,), dtype), _normal(rng, (nnz,), dtype),
           indices]
    if bias:
      ops.append(_normal(rng, (n_out,), dtype))
    return ops, {'shape': (n_in, n_out), 'has_bias': bias}
  return case


SPARSE_MM = _sparse_case(batch=3, n_in=4, n_out=3, nnz=7, bias=True)
SPARSE_MV = _sparse_case(n_in=4, n_out=3, nnz=7, bias=True, dtype=np.float64)
SPARSE_SQUARE = _sparse_case(n_in=4, n_out=4, nnz=9, bias=True)


@_mutant('yw_row_index', 'sparse', base='etp_sp_mm', bug_class='wrong_axis',
         expected=('yw_to_w.anchor',),
         case=SPARSE_MM,
         description="yw_to_w picks g at each stored value's ROW "
         '(indices[:, 0]) instead of its column')
def _(name):
  def yw_to_w(g, trace, *, indices, shape, has_bias):
    out = _rules('etp_sp_mm').yw_to_w(g, trace, indices=indices, shape=shape,
                                      has_bias=has_bias)
    out['weight'] = g[..., indices[:, 0]] * trace['weight']
    return out
  return _clone(name, 'etp_sp_mm', yw_to_w=yw_to_w)


def _index_tangent_jvp(prim):
  """A JVP rule that treats the integer indices as differentiable: their
  symbolic-zero tangent is taken as a unit step of every index, and the
  resulting change of the output is added to the tangent."""
  def jvp(primals, tangents, **params):
    y, t = prim._jvp(primals, tangents, **params)
    x, data, indices, *rest = primals
    stepped = (indices + 1) % jnp.asarray(params['shape'], indices.dtype)
    moved = (prim.impl_fn(x, data, stepped, *rest, **params) -
             prim.impl_fn(x, data, indices, *rest, **params))
    return y, t + moved.astype(t.dtype)
  return jvp


@_mutant('jvp_index_tangent', 'sparse', base='etp_sp_mv',
         bug_class='int_tangent', expected=('primitive.jvp',),
         case=SPARSE_MV,
         description='the JVP rule gives the integer indices a unit tangent '
         '(instead of float0/zero) and adds the output change it implies')
def _(name):
  return _clone(name, 'etp_sp_mv', jvp=_index_tangent_jvp)


@_mutant('drop_bias', 'sparse', base='etp_sp_mm', bug_class='dropped_key',
         expected=('xy_to_dw.*',),
         case=SPARSE_MM,
         description="xy_to_dw forgets the 'bias' key")
def _(name):
  def xy_to_dw(x, g, weights, **params):
    out = _rules('etp_sp_mm').xy_to_dw(x, g, weights, **params)
    out.pop('bias', None)
    return out
  return _clone(name, 'etp_sp_mm', xy_to_dw=xy_to_dw)


@_mutant('xy_sign', 'sparse', base='etp_sp_mv', bug_class='sign',
         expected=('xy_to_dw.*',),
         case=SPARSE_MV,
         description="xy_to_dw returns the negated gradient of the stored "
         'values')
def _(name):
  return _clone(name, 'etp_sp_mv',
                xy_to_dw=_xy_with('etp_sp_mv', jnp.negative, ('weight',)))


@_mutant('xy_transposed_pattern', 'sparse', base='etp_sp_mv',
         bug_class='transposed', expected=('xy_to_dw.*',),
         case=SPARSE_SQUARE,
         description='xy_to_dw pairs x at the column and g at the row of each '
         'stored value (the pattern transposed)')
def _(name):
  def xy_to_dw(x, g, weights, *, indices, shape, has_bias):
    out = _rules('etp_sp_mv').xy_to_dw(x, g, weights, indices=indices,
                                       shape=shape, has_bias=has_bias)
    rows, cols = indices[:, 0], indices[:, 1]
    out['weight'] = jnp.einsum('...k,...k->k', x[..., cols],
                               g[..., rows]).astype(weights['weight'].dtype)
    return out
  return _clone(name, 'etp_sp_mv', xy_to_dw=xy_to_dw)


@_mutant('batch_not_summed', 'sparse', base='etp_sp_mm',
         bug_class='batch_not_summed', expected=('xy_to_dw.*',),
         case=SPARSE_MM,
         description='xy_to_dw keeps the batch axis of the stored values\' '
         'gradient ((B, nnz) instead of the sum over examples)')
def _(name):
  def xy_to_dw(x, g, weights, *, indices, shape, has_bias):
    out = _rules('etp_sp_mm').xy_to_dw(x, g, weights, indices=indices,
                                       shape=shape, has_bias=has_bias)
    rows, cols = indices[:, 0], indices[:, 1]
    out['weight'] = (x[..., rows] * g[..., cols]).astype(
        weights['weight'].dtype)
    return out
  return _clone(name, 'etp_sp_mm', xy_to_dw=xy_to_dw)


@_mutant('init_state_axis_first', 'sparse', base='etp_sp_mm',
         bug_class='state_axis', expected=('init.drtrl',),
         case=SPARSE_MM,
         description='init_drtrl puts the n_state axis first, not last')
def _(name):
  return _clone(name, 'etp_sp_mm',
                init_drtrl=_init_with('etp_sp_mm', _state_axis_first))


@_mutant('yw_fixed_rank', 'sparse', base='etp_sp_mm', bug_class='vmap',
         expected=('yw_to_w.vmap',), case=SPARSE_MM,
         description='yw_to_w indexes g[:, cols] (exactly one leading axis): '
         'breaks under vmap or with extra leading axes')
def _(name):
  def yw_to_w(g, trace, *, indices, shape, has_bias):
    out = {'weight': g[:, indices[:, 1]] * trace['weight']}
    if has_bias:
      out['bias'] = g * trace['bias']
    return out
  return _clone(name, 'etp_sp_mm', yw_to_w=yw_to_w)


@_mutant('jit_offset', 'sparse', base='etp_sp_mv', bug_class='jit',
         expected=('primitive.jit', 'primitive.vmap'),
         case=SPARSE_MV,
         description='impl adds 1 when its operands are tracers: jit '
         'disagrees with eager')
def _(name):
  return _clone(name, 'etp_sp_mv',
                impl=_offset_when_traced(builtin('etp_sp_mv').impl_fn))


@_mutant('xy_cancellation', 'sparse', base='etp_sp_mm',
         bug_class='float64_only', expected=('xy_to_dw.vjp', 'xy_to_dw.jacrev'),
         case=SPARSE_MM,
         description='xy_to_dw computes sum (x + 1e5) g - 1e5 sum g: right in '
         'float64, ~1e-3 off in float32 (catastrophic cancellation)')
def _(name):
  def xy_to_dw(x, g, weights, *, indices, shape, has_bias):
    out = _rules('etp_sp_mm').xy_to_dw(x, g, weights, indices=indices,
                                       shape=shape, has_bias=has_bias)
    rows, cols = indices[:, 0], indices[:, 1]
    big = jnp.asarray(_BIG, x.dtype)
    gc = g[..., cols]
    shifted = jnp.einsum('...k,...k->k', x[..., rows] + big, gc)
    out['weight'] = (shifted - big * gc.reshape((-1, gc.shape[-1])).sum(0)
                     ).astype(weights['weight'].dtype)
    return out
  return _clone(name, 'etp_sp_mm', xy_to_dw=xy_to_dw)


@_mutant('yw_first_example', 'sparse', base='etp_sp_mm',
         bug_class='batch_one_only',
         expected=('yw_to_w.anchor', 'yw_to_w.vmap'),
         case=SPARSE_MM,
         description="yw_to_w applies the first example's g to every example "
         '(right only for batch size 1)')
def _(name):
  def yw_to_w(g, trace, **params):
    g0 = g[..., :1, :] if g.ndim >= 2 else g
    return _rules('etp_sp_mm').yw_to_w(g0, trace, **params)
  return _clone(name, 'etp_sp_mm', yw_to_w=yw_to_w)


# ---------------------------------------------------------------------- conv
def _conv_case(*, batch=2, c_in=2, c_out=3, length=5, window=3,
               padding='SAME', bias=False, dtype=np.float32, seed=4):
  """A 1-D convolution in the default layout: x (N, C, L), kernel (O, I, K)."""
  def case():
    rng = _rng(seed)
    ops = [_normal(rng, (batch, c_in, length), dtype),
           _normal(rng, (c_out, c_in, window), dtype)]
    if bias:
      ops.append(_normal(rng, (c_out,), dtype))
    return ops, {'window_strides': (1,), 'padding': padding,
                 'rhs_dilation': (1,), 'dimension_numbers': None,
                 'has_bias': bias}
  return case


CONV = _conv_case(batch=3, c_in=2, c_out=3, length=5, window=3,
                  padding='SAME', bias=True)
# VALID padding: L_out = 5 - 3 + 1 = 3 = C_out.
CONV_VALID = _conv_case(batch=2, c_in=2, c_out=3, length=5, window=3,
                        padding='VALID', bias=True)


@_mutant('kernel_weight_shaped', 'conv', base='etp_conv',
         bug_class='weight_shaped_trace',
         expected=('yw_to_w.anchor', 'drtrl.exact'),
         case=CONV,
         description='no instant/solve rules: a kernel-shaped trace whose '
         'yw_to_w sums g over positions, claimed exact for a kernel shared '
         'across positions')
def _(name):
  def yw_to_w(g, trace, *, window_strides, has_bias, **unused):
    # Default layout: g is (..., N, O, *spatial); sum the positions away.
    n_spatial = len(window_strides)
    g_sum = g.sum(axis=tuple(range(-n_spatial, 0)))        # (..., N, O)
    out = {'weight': g_sum.reshape(g_sum.shape + (1,) * (n_spatial + 1)) *
           trace['weight']}
    if has_bias:
      out['bias'] = g_sum * trace['bias']
    return out
  init = lambda x, y, w, n: rule_util.weight_shaped_traces(x, y, w, n, True)
  return _clone(name, 'etp_conv', yw_to_w=yw_to_w, init_drtrl=init,
                instant_drtrl=None, solve_drtrl=None)


@_mutant('bias_wrong_axis', 'conv', base='etp_conv', bug_class='bias_axis',
         expected=('xy_to_dw.*',),
         case=CONV_VALID,
         description='impl adds the bias on the last (spatial) axis instead '
         'of the feature axis: fits only because L_out == C_out')
def _(name):
  def impl(x, kernel, *bias, has_bias, **params):
    y = builtin('etp_conv').impl_fn(x, kernel, has_bias=False, **params)
    return y + bias[0] if has_bias else y
  return _clone(name, 'etp_conv', impl=impl)


@_mutant('solve_sign', 'conv', base='etp_conv', bug_class='sign',
         expected=('drtrl.instant',), case=CONV,
         description="solve_drtrl returns the negated kernel gradient")
def _(name):
  def solve_drtrl(c, trace, **params):
    return _map_keys(_rules('etp_conv').solve_drtrl(c, trace, **params),
                     jnp.negative, ('weight',))
  return _clone(name, 'etp_conv', solve_drtrl=solve_drtrl)


@_mutant('instant_batch_mean', 'conv', base='etp_conv',
         bug_class='batch_one_only',
         expected=('drtrl.instant',),
         case=CONV,
         description='instant_drtrl takes the patches of the batch-mean input '
         'for every example (right only for batch size 1)')
def _(name):
  def instant_drtrl(x, g, weights, **params):
    x_mean = jnp.broadcast_to(x.mean(axis=0, keepdims=True), x.shape)
    return _rules('etp_conv').instant_drtrl(x_mean, g, weights, **params)
  return _clone(name, 'etp_conv', instant_drtrl=instant_drtrl)


@_mutant('xy_flipped_window', 'conv', base='etp_conv',
         bug_class='transposed', expected=('xy_to_dw.*',),
         case=CONV,
         description='xy_to_dw returns the kernel gradient flipped along the '
         'window (convolution vs correlation)')
def _(name):
  return _clone(name, 'etp_conv', xy_to_dw=_xy_with(
      'etp_conv', lambda v: jnp.flip(v, axis=tuple(range(2, v.ndim))),
      ('weight',)))


@_mutant('init_x64_dtype', 'conv', base='etp_conv', bug_class='init_dtype',
         expected=('init.drtrl',), case=CONV,
         description='init_drtrl makes zeros in the global default float '
         'dtype (float64 under x64), not the operands\'')
def _(name):
  return _clone(name, 'etp_conv',
                init_drtrl=_init_with('etp_conv', _global_float))


@_mutant('init_state_axis_first', 'conv', base='etp_conv',
         bug_class='state_axis', expected=('init.drtrl',),
         case=CONV,
         description='init_drtrl puts the n_state axis first, not last')
def _(name):
  return _clone(name, 'etp_conv',
                init_drtrl=_init_with('etp_conv', _state_axis_first))


@_mutant('jit_offset', 'conv', base='etp_conv', bug_class='jit',
         expected=('primitive.jit', 'primitive.vmap'),
         case=CONV,
         description='impl adds 1 when its operands are tracers: jit '
         'disagrees with eager')
def _(name):
  return _clone(name, 'etp_conv',
                impl=_offset_when_traced(builtin('etp_conv').impl_fn))


@_mutant('batcher_flip', 'conv', base='etp_conv', bug_class='batcher',
         expected=('primitive.vmap',), case=CONV,
         description="the primitive's batching rule returns the mapped "
         'examples in reverse order')
def _(name):
  return _clone(name, 'etp_conv', batcher=_flipping_batcher)


@_mutant('yw_rank_from_g', 'conv', base='etp_conv', bug_class='vmap',
         expected=('yw_to_w.vmap',), case=CONV,
         description='yw_to_w takes the kernel trace rank from g.ndim - 1 '
         '(right only with exactly one batch axis): breaks under vmap or '
         'with extra leading axes')
def _(name):
  def yw_to_w(g, trace, *, has_bias, **unused):
    n_kappa = g.ndim - 1
    out = {'weight': g.reshape(g.shape + (1,) * n_kappa) * trace['weight']}
    if has_bias:
      out['bias'] = g * trace['bias']
    return out
  return _clone(name, 'etp_conv', yw_to_w=yw_to_w)


@_mutant('yw_passthrough', 'conv', base='etp_conv', bug_class='passthrough',
         expected=('yw_to_w.linear', 'drtrl.exact'),
         case=CONV,
         description='yw_to_w returns the per-position traces unchanged')
def _(name):
  return _clone(name, 'etp_conv', yw_to_w=lambda g, trace, **p: dict(trace))


# ---------------------------------------------------------------------- lora
def _lora_case(*, batch=None, n_in=4, rank=2, n_out=3, alpha=2.0,
               bias=False, dtype=np.float32, seed=5):
  def case():
    rng = _rng(seed)
    lead = () if batch is None else (batch,)
    ops = [_normal(rng, lead + (n_in,), dtype),
           _normal(rng, (n_in, rank), dtype),
           _normal(rng, (rank, n_out), dtype)]
    if bias:
      ops.append(_normal(rng, (n_out,), dtype))
    return ops, {'alpha': alpha, 'has_bias': bias}
  return case


LORA_MM = _lora_case(batch=3, n_in=4, rank=2, n_out=3, alpha=2.0, bias=True)
LORA_MV = _lora_case(n_in=3, rank=2, n_out=4, alpha=0.5, bias=True)
# rank == out, so that an axis mix-up between them keeps the right shape.
LORA_SQUARE = _lora_case(n_in=4, rank=3, n_out=3, alpha=2.0, bias=True,
                         dtype=np.float64)


@_mutant('xy_missing_alpha', 'lora', base='etp_lora_mm',
         bug_class='missing_factor', expected=('xy_to_dw.*',),
         case=LORA_MM,
         description="xy_to_dw forgets the factor alpha in lora_b's gradient")
def _(name):
  def xy_to_dw(x, g, weights, *, alpha, has_bias):
    out = _rules('etp_lora_mm').xy_to_dw(x, g, weights, alpha=alpha,
                                         has_bias=has_bias)
    out['lora_b'] = out['lora_b'] / alpha
    return out
  return _clone(name, 'etp_lora_mm', xy_to_dw=xy_to_dw)


@_mutant('instant_missing_alpha', 'lora', base='etp_lora_mm',
         bug_class='missing_factor',
         expected=('drtrl.instant',),
         case=LORA_MM,
         description="instant_drtrl forgets the factor alpha in lora_a's "
         'trace increment')
def _(name):
  def instant_drtrl(x, g, weights, *, alpha, has_bias):
    out = _rules('etp_lora_mm').instant_drtrl(x, g, weights, alpha=alpha,
                                              has_bias=has_bias)
    out['lora_a'] = out['lora_a'] / alpha
    return out
  return _clone(name, 'etp_lora_mm', instant_drtrl=instant_drtrl)


@_mutant('b_weight_shaped', 'lora', base='etp_lora_mv',
         bug_class='weight_shaped_trace',
         expected=('yw_to_w.anchor', 'drtrl.exact'),
         case=LORA_MV,
         description="no instant/solve rules: a B-shaped trace for lora_b "
         '(yw_to_w scales it by sum(g)), claimed exact although B reaches '
         'every output')
def _(name):
  def yw_to_w(g, trace, *, alpha, has_bias):
    del alpha
    out = {'lora_b': g.sum(-1)[..., None, None] * trace['lora_b'],
           'lora_a': g[..., None, :] * trace['lora_a']}
    if has_bias:
      out['bias'] = g * trace['bias']
    return out
  init = lambda x, y, w, n: rule_util.weight_shaped_traces(x, y, w, n, False)
  return _clone(name, 'etp_lora_mv', yw_to_w=yw_to_w, init_drtrl=init,
                instant_drtrl=None, solve_drtrl=None)


@_mutant('yw_b_square_axis', 'lora', base='etp_lora_mv',
         bug_class='wrong_axis', expected=('drtrl.exact',),
         case=LORA_SQUARE,
         description="yw_to_w broadcasts g over lora_b's rank axis instead of "
         'its output axis: fits only when rank == out, and picks the wrong g')
def _(name):
  def yw_to_w(g, trace, *, alpha, has_bias):
    out = _rules('etp_lora_mv').yw_to_w(g, trace, alpha=alpha,
                                        has_bias=has_bias)
    out['lora_b'] = g[..., None, None, :] * trace['lora_b']
    return out
  return _clone(name, 'etp_lora_mv', yw_to_w=yw_to_w)


@_mutant('solve_a_scale', 'lora', base='etp_lora_mv', bug_class='scale',
         expected=('drtrl.instant',),
         case=LORA_MV,
         description="solve_drtrl returns twice lora_a's gradient")
def _(name):
  def solve_drtrl(c, trace, **params):
    return _map_keys(_rules('etp_lora_mv').solve_drtrl(c, trace, **params),
                     lambda v: 2 * v, ('lora_a',))
  return _clone(name, 'etp_lora_mv', solve_drtrl=solve_drtrl)


@_mutant('instant_b_sign', 'lora', base='etp_lora_mm', bug_class='sign',
         expected=('drtrl.instant',),
         case=LORA_MM,
         description="instant_drtrl returns lora_b's trace increment negated")
def _(name):
  def instant_drtrl(x, g, weights, **params):
    return _map_keys(_rules('etp_lora_mm').instant_drtrl(x, g, weights,
                                                         **params),
                     jnp.negative, ('lora_b',))
  return _clone(name, 'etp_lora_mm', instant_drtrl=instant_drtrl)


@_mutant('drop_lora_a', 'lora', base='etp_lora_mv', bug_class='dropped_key',
         expected=('xy_to_dw.*',), case=LORA_MV,
         description="xy_to_dw forgets the 'lora_a' key")
def _(name):
  def xy_to_dw(x, g, weights, **params):
    out = _rules('etp_lora_mv').xy_to_dw(x, g, weights, **params)
    out.pop('lora_a')
    return out
  return _clone(name, 'etp_lora_mv', xy_to_dw=xy_to_dw)


@_mutant('extra_key', 'lora', base='etp_lora_mm', bug_class='extra_key',
         expected=('xy_to_dw.*',), case=LORA_MM,
         description="xy_to_dw also returns a gradient for the static "
         "'alpha' (a bind param, not a weight)")
def _(name):
  def xy_to_dw(x, g, weights, *, alpha, has_bias):
    out = _rules('etp_lora_mm').xy_to_dw(x, g, weights, alpha=alpha,
                                         has_bias=has_bias)
    y_over_alpha = (x @ weights['lora_b']) @ weights['lora_a']
    out['alpha'] = jnp.sum(g * y_over_alpha)
    return out
  return _clone(name, 'etp_lora_mm', xy_to_dw=xy_to_dw)


@_mutant('xy_a_transposed', 'lora', base='etp_lora_mv',
         bug_class='transposed', expected=('xy_to_dw.*',),
         case=LORA_SQUARE,
         description="xy_to_dw returns lora_a's gradient transposed (right "
         'shape only because rank == out)')
def _(name):
  return _clone(name, 'etp_lora_mv', xy_to_dw=_xy_with(
      'etp_lora_mv', jnp.transpose, ('lora_a',)))


@_mutant('jvp_half', 'lora', base='etp_lora_mv', bug_class='jvp',
         expected=('primitive.jvp',), case=LORA_MV,
         description="the primitive's JVP rule returns half the tangent")
def _(name):
  return _clone(name, 'etp_lora_mv', jvp=_scaled_jvp(0.5))


@_mutant('instant_first_example', 'lora', base='etp_lora_mm',
         bug_class='batch_one_only',
         expected=('drtrl.instant',),
         case=LORA_MM,
         description="instant_drtrl uses the first example's x for every "
         'example (right only for batch size 1)')
def _(name):
  def instant_drtrl(x, g, weights, **params):
    x0 = jnp.broadcast_to(x[..., :1, :], x.shape) if x.ndim >= 2 else x
    return _rules('etp_lora_mm').instant_drtrl(x0, g, weights, **params)
  return _clone(name, 'etp_lora_mm', instant_drtrl=instant_drtrl)


@_mutant('init_state_axis_first', 'lora', base='etp_lora_mm',
         bug_class='state_axis', expected=('init.drtrl',),
         case=LORA_MM,
         description='init_drtrl puts the n_state axis first, not last')
def _(name):
  return _clone(name, 'etp_lora_mm',
                init_drtrl=_init_with('etp_lora_mm', _state_axis_first))


@_mutant('abstract_eval_float32', 'lora', base='etp_lora_mv',
         bug_class='abstract_eval', expected=('primitive.abstract_eval',),
         case=LORA_SQUARE,
         description='the abstract evaluation rule always claims a float32 '
         'output (the float64 impl returns float64)')
def _(name):
  prim = _clone(name, 'etp_lora_mv')
  derived = prim._abstract_eval  # pylint: disable=protected-access

  def abstract_eval(*avals, **params):
    out = derived(*avals, **params)
    return jax.core.ShapedArray(out.shape, jnp.float32)
  prim.def_abstract_eval(abstract_eval)
  return prim
