"""``device.consistency``: the same answers on every device and when sharded.

First, the jaxprs of the impl and of every rule (traced on the operands'
shapes; nothing runs) must not pin a value to a fixed device: with a
``jax.device_put`` naming a device or a sharding, with a sharding naming
devices on any other equation (``jnp.asarray(v, device=d)`` and
``jax.lax.with_sharding_constraint`` leave a ``sharding_constraint``, a
nested ``jax.jit`` its ``out_shardings``), or by closing over an array
committed to a device (``jax.device_put(v, device)`` made outside the trace:
a const of the jaxpr).  That sees a pin to any device, on a machine with a
single device too.  What leaves no trace is not seen: ``jnp.zeros(shape,
device=d)`` traces to a plain ``broadcast_in_dim`` (under ``jax.jit`` JAX
drops the device; only an eager call with operands elsewhere raises).  The
impl and ``xy_to_dw`` are traced alone; the other rules as the reference
executor composes them (one step of D-RTRL with one state, and of pp-prop
where there is an ``x``), each under a ``jax.named_scope`` of its name, so
that a pin is blamed on the rule it sits in; each is also traced alone on
its abstract arguments (the init rules on their jaxpr variables), so that
the arrays it closes over are its own consts.  The device comparisons below
run the impl and ``xy_to_dw`` only: for ``yw_to_w``, the init rules and
``instant_drtrl``/``solve_drtrl`` the scan is the whole check.

Then the operands and a random cotangent ``g`` are placed on the first
device of the run's device list (``devices='all'|'cpu'|'gpu'|[...]``) and
three things are computed there under ``jax.jit``: the bind, the
``jax.vjp`` of the bind w.r.t. the weights, and the ``xy_to_dw`` rule.
That is the reference (computed eagerly where ``jax.jit`` fails there;
``primitive.jit`` reports that).

The same three are then computed under ``jax.jit`` on the last device of
the first device's platform and on the first device of every other
platform (see ``_compared_devices``) and compared with the reference
(within the tolerance of the dtype); each result must stay on its device.
These comparisons catch code whose answer depends on the device
(``lax.platform_dependent``, a GPU-only kernel); pins are the scan's
business.  They ran eagerly until the scan saw every way a value is pinned
(a ``jax.device_put`` to a device, a closed-over committed array; under
``jax.jit`` JAX moves both silently, eagerly they show): eager evaluation
compiles every op of the impl and ``xy_to_dw`` once per device, 170 of the
703 programs of the default battery, where jit compiles one program per
device (54 in all; the battery 41 -> 34 s here).

For a batched primitive the batch axis of ``x`` (and of ``g``) is then
sharded over a 1-D mesh of as many devices (of the first device's platform)
as divide the batch (``NamedSharding(mesh, P('batch'))``, every other operand
replicated), and the same three computations, each under ``jax.jit``, are
compared with the reference (so that only the sharding differs; jit against
eager is ``primitive.jit``'s business).

What this can catch, and what it cannot: ``jax.jit`` with shardings is
semantically transparent (XLA's partitioner inserts the collectives), so even
an impl that couples the examples of a batch (a batch mean) gives the same
answer sharded.  The sharded comparison catches code that tells the
partitioner something false (``custom_partitioning`` or ``shard_map`` that
computes per shard what is defined on the whole batch) and code that fails
under sharding; the scan catches device-pinned values; the per-device
comparisons, with devices of several platforms (``devices='all'`` on a GPU
machine), catch platform-dependent code (``lax.platform_dependent``, a
GPU-only kernel) that disagrees with the CPU.  Like every check, it runs
under the runner's full float32 matmul precision
(``runner.MATMUL_PRECISION``), so that a GPU's TF32 default is not reported
as a disagreement with the CPU.

With nothing to compare the check is skipped with the reason, never
passed: with no device of the requested kind; or with one device and no
batch to shard, unless the scan found a pin (then it fails).
"""

from __future__ import annotations

import functools
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import etp
from etp_testing._src import executor
from etp_testing._src.checks.registry import check
from etp_testing._src.context import compiled
from etp_testing._src.errors import RuleFailure, raised


def _step(primitive, params, rule):
  """``(operands, g) -> result`` of one of ``_compute``'s steps: the bind,
  ``jax.vjp`` of the bind w.r.t. the weights, or the ``xy_to_dw`` rule."""
  xy_to_dw = etp.rules_of(primitive).xy_to_dw

  def step(operands, g):
    if rule == 'impl':
      return executor.bind_y(primitive, operands, params)
    x, weights, rule_params = primitive.split_operands(operands, params)
    if rule == 'vjp':
      y_of = lambda w: executor.bind_y(
          primitive, executor.with_weights(primitive, operands, params, w),
          params)
      return jax.vjp(y_of, weights)[1](g)[0]
    return xy_to_dw(x, g, weights, **rule_params)
  return step


def _steps(primitive, params, rules):
  """``(operands, g) -> {rule: result}`` for every step in ``rules``."""
  steps = [_step(primitive, params, rule) for rule in rules]
  return lambda operands, g: {rule: step(operands, g)
                              for rule, step in zip(rules, steps)}


# Under jit: cached per primitive and params, so every example of a seen
# shape (and sharding) reuses its compilation.  All steps go in one program;
# one program per step only names the failing step when that one fails.
_jitted_step = compiled(_step)
_jitted_steps = compiled(_steps)


def _compute(ctx, operands, g, *, jit: bool, where: str) -> dict:
  """``{'impl': y, 'vjp': {key: ...}, 'xy_to_dw': {key: ...}}`` on these
  (placed) operands: eager (as a user calls them: a result committed to
  another device shows), or under ``jax.jit`` (all steps in one program, or,
  when that fails, each in its own, so that the failure names its step)."""
  steps = [('impl', 'bind')]
  if ctx.weights:
    steps += [('vjp', 'jax.vjp w.r.t. the weights'), ('xy_to_dw', 'xy_to_dw')]
  if jit:
    try:
      results = _jitted_steps(ctx, tuple(r for r, _ in steps))(
          list(operands), g)
    except Exception:  # pylint: disable=broad-except
      results = None   # step by step below, so the failure names its step
    if results is not None:
      if 'xy_to_dw' in results:
        try:
          ctx.check_keys('xy_to_dw', results['xy_to_dw'], ctx.weights.keys())
        except RuleFailure as e:
          raise RuleFailure(e.rule, f'{where}: {e.message}', key=e.key) from e
      return results
  results = {}
  for rule, what in steps:
    # jax.vjp runs JAX's own JVP and transpose of the bind: eagerly that is
    # every op compiled once more per device, and a pin in it would come
    # from the impl, which runs eagerly here.  So it runs jitted (on the
    # same device) in the eager pass too.
    fn = (_jitted_step(ctx, rule) if jit or rule == 'vjp' else
          _step(ctx.primitive, ctx.params, rule))
    try:
      results[rule] = fn(list(operands), g)
      if rule == 'xy_to_dw':
        ctx.check_keys('xy_to_dw', results[rule], ctx.weights.keys())
    except RuleFailure as e:
      raise RuleFailure(e.rule, f'{where}: {e.message}', key=e.key) from e
    except Exception as e:  # pylint: disable=broad-except
      shapes = [tuple(np.shape(a)) for a in operands]
      raise RuleFailure(rule, f'{where}: ' + raised(
          what, e, f'operand shapes {shapes}, g {tuple(np.shape(g))}')) from e
  return results


# A rule name in a jaxpr equation's name stack (transforms wrap it, as in
# 'vmap(yw_to_w)'; '_' is a word character, so init_pp is not part of
# init_pp_x).
_RULE_IN_STACK = re.compile(
    r'\b(' + '|'.join(executor.RULE_NAMES) + r')\b')


# What pins a value, as _fixed_devices reports it.
DEVICE_PUT = 'device_put'   # jax.device_put(v, device) in the trace
SHARDING = 'sharding'       # a sharding naming devices, on another equation
CONSTANT = 'constant'       # a closed-over array committed to a device


def _committed_to(value) -> list:
  """The devices a concrete array is committed to (``[]``: not committed,
  or not a concrete array)."""
  try:
    if getattr(value, 'committed', False) is not True:
      return []
  except Exception:  # pylint: disable=broad-except
    return []   # a tracer (an operand closed over): no placement of its own
  return [str(d) for d in value.devices()]


def _named_devices(target) -> list:
  """The devices a ``device_put`` target or an equation's sharding param
  names (``[]``: none, as for an abstract mesh's sharding)."""
  if isinstance(target, jax.Device):
    return [str(target)]
  if isinstance(target, jax.sharding.Sharding):
    try:
      return [str(d) for d in target.device_set]
    except Exception:  # pylint: disable=broad-except
      return []   # no concrete devices to pin to
  return []


def _fixed_devices(fn, *avals) -> dict:
  """``{scope: {kind: [device, ...]}}``: the devices that the trace of
  ``fn`` on ``avals`` pins values to, by the innermost rule whose
  ``jax.named_scope`` they sit in (``None`` outside every rule): through
  ``jax.device_put`` naming a device or a sharding (``DEVICE_PUT``), a
  sharding naming devices on any other equation (``SHARDING``:
  ``jnp.asarray(v, device=d)`` or ``jax.lax.with_sharding_constraint``
  leave a ``sharding_constraint``, a nested ``jax.jit`` its
  ``out_shardings``), or by closing over an array committed to one
  (``CONSTANT``; such arrays are the consts of the traced jaxpr, or of a
  nested ``jax.jit``'s, or literals)."""
  found = {}
  add = lambda scope, kind, devices: found.setdefault(scope, {}).setdefault(
      kind, set()).update(devices)
  closed = jax.make_jaxpr(fn)(*avals)
  for value in closed.consts:
    add(None, CONSTANT, _committed_to(value))
  for eqn, stack in executor.eqns_with_name_stacks(closed.jaxpr):
    names = _RULE_IN_STACK.findall(stack)
    scope = names[-1] if names else None
    for v in eqn.invars:
      if hasattr(v, 'val'):   # a literal
        add(scope, CONSTANT, _committed_to(v.val))
    kind = DEVICE_PUT if eqn.primitive.name == 'device_put' else SHARDING
    for item in executor.param_items(eqn):
      for value in getattr(item, 'consts', ()):   # a nested jit's consts
        add(scope, CONSTANT, _committed_to(value))
      add(scope, kind, _named_devices(item))
  return {scope: {k: sorted(v) for k, v in kinds.items() if v}
          for scope, kinds in found.items()}


def _scoped(name, rule, constants: dict):
  """``rule`` traced under a ``jax.named_scope`` of its name; the devices
  of committed arrays it closes over go to ``constants[name]``."""
  @functools.wraps(rule)
  def call(*args, **kwargs):
    with jax.named_scope(name):
      # In the whole program the arrays a rule closes over are hoisted to
      # its top, where no scope says whose they are; traced alone (on these
      # abstract arguments: nothing runs) they are its own consts.  The init
      # rules' jaxpr variables are no JAX values: closed over, not traced.
      if name in executor.INIT_RULES:
        alone, avals = functools.partial(rule, *args, **kwargs), ()
      else:
        alone, avals = functools.partial(rule, **kwargs), args
      try:
        closed = jax.make_jaxpr(alone)(*avals)
      except Exception:  # pylint: disable=broad-except
        closed = None   # the call below, or another check, reports it
      for value in getattr(closed, 'consts', ()):
        constants.setdefault(name, set()).update(_committed_to(value))
      return rule(*args, **kwargs)
  return call


def _composed(primitive, rules, params, operands, y, constants: dict):
  """``[(rule names, fn, avals)]``: the reference executor's compositions of
  the rules other than ``xy_to_dw`` (one step of D-RTRL with one state, and
  of pp-prop where there is an ``x``) on the ``operands`` avals, and the
  rules each one calls; tracing them fills ``constants`` (see
  :func:`_scoped`)."""
  x, weights, _ = primitive.split_operands(operands, params)
  if not weights:
    return []
  scoped = executor.map_rules(
      rules, lambda name, rule: _scoped(name, rule, constants))
  xs = None if x is None else jax.ShapeDtypeStruct((1,) + x.shape, x.dtype)
  per_step = lambda *tail: jax.ShapeDtypeStruct((1,) + tuple(y.shape) + tail,
                                                y.dtype)
  drtrl = lambda ops, xs, a, bf, c: executor.drtrl_gradient(
      primitive, ops, params, xs, a, bf, c, rules=scoped)
  out = [([n for n in executor.registered_rules(rules)
           if n not in ('xy_to_dw', 'init_pp')], drtrl,
          (list(operands), xs, per_step(1, 1), per_step(1), per_step(1)))]
  if x is not None:
    pp = lambda ops, xs, c: executor.pp_gradient(
        primitive, ops, params, xs, c, 0.5, rules=scoped)
    out.append((['init_pp'], pp, (list(operands), xs, per_step())))
  return out


def _scan(primitive, rules, params, operands) -> tuple:
  """``((rule, ((kind, devices), ...)), ...)`` for the impl and every rule,
  on the ``operands`` avals: the fixed devices its jaxpr pins values to, by
  kind (``DEVICE_PUT``, ``CONSTANT``; empty: none).  A program that cannot
  be traced is left out: the other checks report what cannot run."""
  y = jax.eval_shape(lambda ops: executor.bind_y(primitive, ops, params),
                     list(operands))
  g = jax.ShapeDtypeStruct(y.shape, y.dtype)
  impl = lambda ops, g: primitive.impl_fn(*ops, **params)
  traced = [(['impl'], impl, (list(operands), g))]
  if primitive.trainable_invars(params):
    traced.append((['xy_to_dw'], _step(primitive, params, 'xy_to_dw'),
                   (list(operands), g)))
  constants = {}
  traced += _composed(primitive, rules, params, operands, y, constants)
  out = []
  for names, fn, args in traced:
    try:
      found = _fixed_devices(fn, *args)
    except Exception:  # pylint: disable=broad-except
      continue
    if names in (['impl'], ['xy_to_dw']):
      # Traced alone, it owns every pin in its jaxpr.
      merged = {}
      for kinds in found.values():
        for kind, devices in kinds.items():
          merged[kind] = sorted(set(merged.get(kind, ())) | set(devices))
      found = {names[0]: merged}
    for rule in names:
      if constants.get(rule):
        kinds = found.setdefault(rule, {})
        kinds[CONSTANT] = sorted(set(kinds.get(CONSTANT, ())) |
                                 constants[rule])
    out += [(rule, tuple(sorted(found.get(rule, {}).items())))
            for rule in names]
  return tuple(out)


@functools.lru_cache(maxsize=1024)
def _cached_scan(primitive, rules, params_key, avals, x64):
  del x64   # part of the key: the avals' dtypes under it
  return _scan(primitive, rules, dict(params_key), avals)


def _check_no_fixed_devices(ctx) -> None:
  """Fails the impl or a rule where its jaxpr puts a value on a fixed
  device.  Read off the traces, so it sees a pin to any device, the one it
  is evaluated on included (which no result placement shows) and on a
  machine with one device; nothing is compiled, and every example of a
  signature reuses the first one's scan."""
  avals = tuple(jax.ShapeDtypeStruct(o.shape, o.dtype) for o in ctx.operands)
  if ctx.params_key is None:
    scanned = _scan(ctx.primitive, ctx.rules, ctx.params, avals)
  else:
    scanned = _cached_scan(ctx.primitive, ctx.rules, ctx.params_key, avals,
                           bool(jax.config.jax_enable_x64))
  for rule, pins in scanned:
    for kind, devices in pins:
      where = ', '.join(devices)
      if kind == DEVICE_PUT:
        ctx.fail(rule, f'{rule} puts a value on the fixed device {where} '
                 '(jax.device_put with a device or sharding, in its jaxpr): '
                 'eager, with operands on another device, it returns results '
                 'committed there or mixes devices; let the operands decide '
                 'where it runs')
      elif kind == SHARDING:
        ctx.fail(rule, f'{rule} fixes a value\'s placement to {where} (a '
                 'sharding in its jaxpr: jnp.asarray/jnp.array with '
                 'device=, jax.lax.with_sharding_constraint, or a nested '
                 'jax.jit\'s shardings): with operands on another device it '
                 'raises "incompatible devices"; let the operands decide '
                 'where it runs')
      else:
        ctx.fail(rule, f'{rule} closes over an array committed to {where} '
                 '(made with jax.device_put(v, device) outside the trace): '
                 'eager, with operands on another device, mixing it in '
                 'raises; make it inside the rule, or leave it uncommitted '
                 '(jnp.asarray)')
    if not pins:
      ctx.record_pass(rule, f'{rule}: no jax.device_put to a fixed device, '
                      'no sharding naming devices and no committed constant '
                      'in its jaxpr')


def _committed_elsewhere(value, device) -> list:
  """The devices a result is committed to, when that is not ``device``."""
  bad = set()
  for leaf in jax.tree.leaves(value):
    if getattr(leaf, 'committed', False) and device not in leaf.devices():
      bad |= set(leaf.devices())
  return sorted(str(d) for d in bad)


def _check_placement(ctx, results, device) -> None:
  for rule, value in results.items():
    leaves = value.items() if isinstance(value, dict) else [(None, value)]
    for key, leaf in leaves:
      elsewhere = _committed_elsewhere(leaf, device)
      if elsewhere:
        ctx.fail(rule, f'{rule} with operands on {device} returned a result '
                 f'committed to {", ".join(elsewhere)}', key=key)


def _compare(ctx, got, want, where: str) -> None:
  ctx.compare(got['impl'], want['impl'], rule='impl', what=f'bind {where}')
  for rule, name in (('vjp', 'jax.vjp'), ('xy_to_dw', 'xy_to_dw')):
    for k in want.get(rule, {}):
      ctx.compare(got[rule][k], want[rule][k], rule=rule, key=k,
                  what=f'{name} {where}')


def _on_device(ctx, g, device, where, jit: bool = True):
  """Results with everything on ``device``, under ``jax.jit`` (or eager);
  a failure is recorded (naming the device) and gives ``None``."""
  operands = jax.device_put(list(ctx.operands), device)
  try:
    results = _compute(ctx, operands, jax.device_put(g, device), jit=jit,
                       where=where)
  except RuleFailure as e:
    ctx.fail(e.rule, e.message, key=e.key)
    return None
  _check_placement(ctx, results, device)
  return results


def _reference(ctx, g, first):
  """``(results, description)`` on the first device: under ``jax.jit`` (a
  cached program), or eagerly where jit fails; ``results`` is ``None`` when
  both fail (the failure is recorded)."""
  try:
    return _compute(ctx, jax.device_put(list(ctx.operands), first),
                    jax.device_put(g, first), jit=True,
                    where=f'under jax.jit on {first}'), \
        f'under jax.jit on {first}'
  except RuleFailure:
    pass
  results = _on_device(ctx, g, first, f'on {first}', jit=False)
  return results, f'eager on {first}'


def _shard_count(batch: int, n_devices: int) -> int:
  """The most devices (>= 2) that divide the batch, or 0."""
  return max((k for k in range(2, n_devices + 1) if batch % k == 0),
             default=0)


def _shard_devices(ctx, devices) -> list:
  """The devices the batch is sharded over (all of the first device's
  platform, as many as divide the batch), or ``[]``."""
  xi = ctx.primitive.x_invar_index
  if not devices or not ctx.batched or xi is None or np.ndim(ctx.x) == 0:
    return []
  batch = int(np.shape(ctx.x)[0])
  same_kind = [d for d in devices if d.platform == devices[0].platform]
  return same_kind[:_shard_count(batch, len(same_kind))]


def _can_shard(ctx, devices) -> bool:
  return bool(_shard_devices(ctx, devices))


def _sharded(ctx, g, devices, reference, against: str) -> int:
  """Compares jit results with the batch sharded against ``reference`` (jit
  on the first device alone, so that only the sharding differs); returns 1
  if it ran."""
  shard_over = _shard_devices(ctx, devices)
  if not shard_over:
    _note_not_sharded(ctx, devices)
    return 0
  xi = ctx.primitive.x_invar_index
  batch = int(np.shape(ctx.x)[0])
  n = len(shard_over)
  mesh = Mesh(np.array(shard_over), ('batch',))
  by_batch = NamedSharding(mesh, PartitionSpec('batch'))
  replicated = NamedSharding(mesh, PartitionSpec())
  operands = [jax.device_put(o, by_batch if i == xi else replicated)
              for i, o in enumerate(ctx.operands)]
  where = f'with the batch ({batch}) sharded over {n} devices'
  try:
    got = _compute(ctx, operands, jax.device_put(g, by_batch), jit=True,
                   where=where)
  except RuleFailure as e:
    ctx.fail(e.rule, e.message, key=e.key)
    return 1
  _compare(ctx, got, reference, f'under jax.jit {where} vs {against}')
  return 1


def _note_not_sharded(ctx, devices):
  """Records, as a passed finding, why the sharded comparison did not run,
  so that a report never implies a sharding it did not try (a batch of 5 on
  4 devices: no count of two or more divides it)."""
  xi = ctx.primitive.x_invar_index
  if not ctx.batched or xi is None or np.ndim(ctx.x) == 0:
    why = f'{ctx.name} has no batch to shard'
  else:
    batch = int(np.shape(ctx.x)[0])
    n = sum(d.platform == devices[0].platform for d in devices)
    why = (f'no count of 2 to {n} {devices[0].platform} devices divides the '
           f'batch ({batch})' if n >= 2 else
           f'one {devices[0].platform} device: nothing to shard over')
  ctx.record_pass('sharding', f'sharded comparison not run: {why}')


def _compared_devices(devices) -> list:
  """The devices compared with the first: the last one of the first
  device's platform and the first of every other platform.

  Each compiles the program once more; one more device of the same platform
  is a second placement of the same code, and one of each other platform
  catches platform-dependent code.  Every device of the platform still takes
  part in the sharded comparison.
  """
  first = devices[0]
  same = [d for d in devices[1:] if d.platform == first.platform]
  chosen = same[-1:]
  for d in devices[1:]:
    if d.platform != first.platform and all(
        c.platform != d.platform for c in chosen):
      chosen.append(d)
  return chosen


@check('device.consistency')
def check_device_consistency(ctx):
  """Results agree on every device, and with the batch sharded over a mesh."""
  devices = list(ctx.devices)
  if not devices:
    ctx.skip('no gpu device: no device of the requested kind is visible '
             '(devices resolved to an empty list)')
  y = ctx.y_aval()
  _check_no_fixed_devices(ctx)
  if len(devices) < 2 and not _can_shard(ctx, devices):
    _skip_nothing_to_compare(ctx, devices)
    return   # not skipped: the scan found a pin
  g = ctx.normal('device.g', y.shape, y.dtype)
  first = devices[0]
  reference, against = _reference(ctx, g, first)
  if reference is None:
    return  # the first device already failed; recorded
  compared = 0
  for d in _compared_devices(devices):
    got = _on_device(ctx, g, d, f'under jax.jit on {d}')
    if got is not None:
      _compare(ctx, got, reference, f'on {d} vs {against}')
    compared += 1
  compared += _sharded(ctx, g, devices, reference, against)
  if not compared:
    _skip_nothing_to_compare(ctx, devices)


def _skip_nothing_to_compare(ctx, devices):
  """Skips, saying why, unless a fixed device was found (a failure)."""
  if any(not f.passed for f in ctx.findings):
    return
  ctx.skip(f'{len(devices)} device visible; set XLA_FLAGS=--xla_force_'
           'host_platform_device_count=N before JAX starts (or pass '
           'devices=[...]) to compare devices ('
           + (f'and the batch of {ctx.name} cannot be sharded over one'
              if ctx.batched else f'{ctx.name} has no batch to shard')
           + ')')
