"""Reproduction snippets: Python source that re-runs a failing case.

Small operands are written inline at full precision; larger ones are saved to
an ``.npz`` file in the temporary directory and loaded by the snippet.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import sys
import tempfile

import jax.numpy as jnp
import numpy as np

INLINE_LIMIT = 64  # elements; larger operands go to an .npz file


def _registering_code(primitive) -> "tuple[str, str] | None":
  """``(source, what)``: the line that registers ``primitive`` in a fresh
  process, and the words for it.  ``import <module>`` of the module that
  called ``register_primitive`` (not the impl's: that may be a library's,
  or ``functools``' for a partial); a ``conftest.py``, or a module that was
  run from a file under a name no import finds (``etp-check --conftest
  PATH``), is run from its path.  ``None`` for a script, a session, or a
  built-in."""
  module, path = getattr(primitive, 'registered_by', None) or (None, None)
  if module is None:   # made without register_primitive
    impl = getattr(primitive, 'impl_fn', None)
    module = getattr(impl, '__module__', None)
    path = getattr(sys.modules.get(module), '__file__', None) or getattr(
        getattr(impl, '__code__', None), 'co_filename', None)
  if not module or module == '__main__' or module.startswith('etp.'):
    return None
  conftest = module.rpartition('.')[2] == 'conftest'
  if path and (conftest or not _importable(module)):
    path = os.path.abspath(path)
    return f'import runpy; runpy.run_path({path!r})', f'running {path}'
  return f'import {module}', f'importing {module}'


def _importable(module: str) -> bool:
  """Whether an import finder (``sys.path``'s, an editable install's)
  finds ``module``'s top package; not just the loaded module, which
  ``importlib.util.find_spec`` returns from ``sys.modules``."""
  top = module.partition('.')[0]
  for finder in sys.meta_path:
    try:
      if getattr(finder, 'find_spec', lambda *a: None)(top, None):
        return True
    except Exception:  # pylint: disable=broad-except
      continue   # a finder that cannot look for it does not have it
  return False


def _is_numpy_dtype(dtype) -> bool:
  """Whether ``np.<name>`` spells ``dtype`` (bfloat16 and the other
  ml_dtypes types are not NumPy's: the snippet names them ``jnp.<name>``)."""
  return getattr(np, dtype.name, None) is dtype.type


def _dtype_source(dtype) -> str:
  return f'{"np" if _is_numpy_dtype(dtype) else "jnp"}.{dtype.name}'


def value_source(value) -> "str | None":
  """Python source that evaluates to ``value`` in a snippet (which imports
  ``np`` and ``jnp``), or ``None`` where there is no such literal (an enum,
  a dataclass, a function).  ``repr`` is not it: it writes ``nan``,
  ``dtype('float32')`` and ``<class 'numpy.float32'>``."""
  kind = type(value)
  if kind in (bool, int, str, bytes, type(None)):
    return repr(value)
  if kind is float:
    return repr(value) if math.isfinite(value) else f'float({str(value)!r})'
  if isinstance(value, np.generic) and value.dtype.kind in 'biuf':
    inner = value_source(value.item())
    return None if inner is None else f'{_dtype_source(value.dtype)}({inner})'
  if isinstance(value, np.dtype):
    return f'np.dtype({_dtype_source(value)})'
  if isinstance(value, type):   # np.float32, jnp.bfloat16 (not the same)
    name = getattr(value, '__name__', '')
    for prefix, module in (('np', np), ('jnp', jnp)):
      if name and getattr(module, name, None) is value:
        return f'{prefix}.{name}'
    return None
  if kind in (tuple, list):
    items = [value_source(v) for v in value]
    if any(i is None for i in items):
      return None
    inner = ', '.join(items) + (',' if kind is tuple and len(items) == 1
                                else '')
    return f'({inner})' if kind is tuple else f'[{inner}]'
  if kind is dict:
    items = [(value_source(k), value_source(v)) for k, v in value.items()]
    if any(k is None or v is None for k, v in items):
      return None
    return '{' + ', '.join(f'{k}: {v}' for k, v in items) + '}'
  return None


def _array_literal(a: np.ndarray) -> str:
  values = a.tolist()   # Python numbers, bfloat16's too
  source = value_source(values) or repr(values)   # (complex: refused anyway)
  return f'np.array({source}, dtype={_dtype_source(a.dtype)})'


def _params_source(params, option_names=()) -> tuple:
  """``(kwargs, setup)``: the bind params as keyword arguments, each a
  literal where one exists (:func:`value_source`); the rest (an enum, a
  dataclass, a function) pickled to a file the snippet loads, or, where
  they do not pickle either, a line that says which to set by hand.  Where
  a param is named like an option of ``assert_rule_consistent``
  (``option_names``: ``seed``, ``steps``...), all go in ``params=``."""
  literal, other = {}, {}
  for k, v in params.items():
    source = value_source(v)
    if source is None:
      other[k] = v
    else:
      literal[k] = source
  if set(params) & set(option_names):
    kwargs = ', params={' + ', '.join(f'{k!r}: {v}' for k, v in
                                      literal.items())
    kwargs += ', **params}' if other else '}'
  else:
    kwargs = ''.join(f', {k}={v}' for k, v in literal.items())
    kwargs += ', **params' if other else ''
  if not other:
    return kwargs, []
  by_hand = lambda why: [f'raise NotImplementedError({why!r})']
  names = ', '.join(f'{k} = {v!r}' for k, v in other.items())
  cannot = by_hand(f'the snippet cannot write the bind params {names}: put '
                   'them here by hand')
  # Pickled by reference, what a script defined is not there in a fresh
  # process (as a primitive a script registered is not).
  if any('__main__' in (getattr(v, '__module__', None),
                        type(v).__module__) for v in other.values()):
    return kwargs, cannot
  try:
    data = pickle.dumps(other)
  except Exception:  # pylint: disable=broad-except  (a lambda, a closure)
    return kwargs, cannot
  path = os.path.join(tempfile.gettempdir(), 'etp_testing_params_'
                      f'{hashlib.sha1(data).hexdigest()[:12]}.pkl')
  try:
    with open(path, 'wb') as f:
      f.write(data)
  except OSError as e:
    return kwargs, by_hand(f'the bind params {", ".join(other)} could not '
                           f'be saved ({e}): put them here by hand')
  return kwargs, [
      'import pickle', f'with open({path!r}, "rb") as params_file:',
      '  params = pickle.load(params_file)  # ' + ', '.join(other)]


def _operand_source(operands):
  arrays = [np.asarray(o) for o in operands]
  if all(a.size <= INLINE_LIMIT for a in arrays):
    return [_array_literal(a) for a in arrays], []
  signature = repr([(a.shape, a.dtype.name) for a in arrays]).encode()
  digest = hashlib.sha1(b''.join([signature] + [a.tobytes() for a in arrays])
                        ).hexdigest()[:12]
  path = os.path.join(tempfile.gettempdir(), f'etp_testing_case_{digest}.npz')
  # np.savez writes an ml_dtypes array as raw void bytes, which JAX refuses:
  # such an array is saved as unsigned integers of its width and viewed back.
  saved = [a if _is_numpy_dtype(a.dtype) else a.view(f'u{a.dtype.itemsize}')
           for a in arrays]
  try:
    np.savez(path, *saved)
    return [f'case["arr_{i}"]' + (
        '' if _is_numpy_dtype(a.dtype) else f'.view({_dtype_source(a.dtype)})')
            for i, a in enumerate(arrays)], [f'case = np.load({path!r})']
  except OSError:
    return [f'np.zeros({a.shape!r}, {_dtype_source(a.dtype)})  # data not saved'
            for a in arrays], []


def reproduction(primitive, operands, params, *, seed, checks, steps, n_state,
                 devices='all', fast=None, rtol=None, atol=None,
                 x64=False, option_names=()) -> str:
  """Source that re-runs ``assert_rule_consistent`` on this case, with the
  options it ran with (a case failed in fast mode re-runs in fast mode) and
  ``jax_enable_x64`` on where it was (``x64``) or an operand is float64."""
  name = getattr(primitive, 'name', str(primitive))
  lines = ['import jax', 'import numpy as np', 'import etp', 'import etp_testing']
  kwargs, params_setup = _params_source(params, option_names)
  if not all(_is_numpy_dtype(np.asarray(o).dtype) for o in operands) or (
      'jnp.' in kwargs):
    lines.insert(1, 'import jax.numpy as jnp  # bfloat16')
  registering = _registering_code(primitive)
  if registering:
    lines.append(f'{registering[0]}  # registers {name}')
  where = ('where the code that registers it has run' + (
      f' ({registering[1]} did not)' if registering else
      ' (in your script or session)'))
  if x64 or any(np.asarray(o).dtype == np.float64 for o in operands):
    lines.append("jax.config.update('jax_enable_x64', True)")
  ops, setup = _operand_source(operands)
  lines.extend(setup)
  # A primitive registered in a script or inside a function is not there
  # in a fresh process: say so, instead of a bare StopIteration.
  lines.append(f'prim = next((p for p in etp.primitives() '
               f'if p.name == {name!r}), None)')
  lines.append('if prim is None:')
  missing = f'{name} is not registered: run this {where}'
  lines.append(f'  raise LookupError({missing!r})')
  lines.append('operands = [' + ', '.join(ops) + ']')
  lines.extend(params_setup)
  # (value, default): only what differs from the default is written.
  options = {'devices': (devices, 'all'), 'fast': (fast, None),
             'rtol': (rtol, None), 'atol': (atol, None)}
  options_arg = ''.join(f', {k}={v!r}' for k, (v, default) in options.items()
                        if v != default)
  lines.append(
      f'etp_testing.assert_rule_consistent(prim, *operands, '
      f'checks={list(checks)!r}, seed={seed}, steps={steps}, '
      f'n_state={tuple(n_state)!r}{options_arg}{kwargs})')
  return '\n'.join(lines)
