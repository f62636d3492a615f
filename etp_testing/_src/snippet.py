"""Reproduction snippets: Python source that re-runs a failing case.

Small operands are written inline at full precision; larger ones are saved to
an ``.npz`` file in the temporary directory and loaded by the snippet.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile

import numpy as np

INLINE_LIMIT = 64  # elements; larger operands go to an .npz file


def _registering_code(primitive) -> "tuple[str, str] | None":
  """``(source, what)``: the line that registers ``primitive`` in a fresh
  process, and the words for it.  ``import <module>`` of the module its
  impl was defined in; a module that was run from a file under a name no
  import finds (``etp-check --conftest PATH``) is run from its path.
  ``None`` for a script, a session, or a built-in."""
  impl = getattr(primitive, 'impl_fn', None)
  module = getattr(impl, '__module__', None)
  if not module or module == '__main__' or module.startswith('etp.'):
    return None
  path = getattr(sys.modules.get(module), '__file__', None) or getattr(
      getattr(impl, '__code__', None), 'co_filename', None)
  if path and not _importable(module):
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


def _operand_source(operands):
  arrays = [np.asarray(o) for o in operands]
  if all(a.size <= INLINE_LIMIT for a in arrays):
    return [f'np.array({a.tolist()!r}, dtype={_dtype_source(a.dtype)})'
            for a in arrays], []
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
                 devices='all', fast=None, rtol=None, atol=None) -> str:
  """Source that re-runs ``assert_rule_consistent`` on this case, with the
  options it ran with (a case failed in fast mode re-runs in fast mode)."""
  name = getattr(primitive, 'name', str(primitive))
  lines = ['import jax', 'import numpy as np', 'import etp', 'import etp_testing']
  if not all(_is_numpy_dtype(np.asarray(o).dtype) for o in operands):
    lines.insert(1, 'import jax.numpy as jnp  # bfloat16')
  registering = _registering_code(primitive)
  if registering:
    lines.append(f'{registering[0]}  # registers {name}')
  where = ('where the code that registers it has run' + (
      f' ({registering[1]} did not)' if registering else
      ' (in your script or session)'))
  if any(np.asarray(o).dtype == np.float64 for o in operands):
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
  kwargs = ''.join(f', {k}={v!r}' for k, v in params.items())
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
