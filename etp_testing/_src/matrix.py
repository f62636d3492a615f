"""The primitive x check matrix printed by the plugin and the CLI.

A cell is ``pass``, ``FAIL``, ``ERR``, ``skip``, ``meas`` (measured: an
approximate weight's error is reported, not judged) or ``-`` (not run), with
the worst relative error over the examples when there is one.
"""

from __future__ import annotations

SYMBOLS = {'passed': 'pass', 'failed': 'FAIL', 'error': 'ERR',
           'skipped': 'skip', 'measured': 'meas'}


def cell(status: str, max_rel_err=None) -> str:
  text = SYMBOLS.get(status, status)
  if max_rel_err is not None and status in ('passed', 'failed', 'measured'):
    text += f' {max_rel_err:.0e}' if max_rel_err else ' 0'
  return text


def render(results: dict, checks) -> str:
  """``results[(primitive, check)] = (status, max_rel_err)`` as a table with
  a row per check and a column per primitive."""
  primitives = list(dict.fromkeys(p for p, _ in results))
  checks = [c for c in checks if any((p, c) in results for p in primitives)]
  checks += sorted({c for _, c in results} - set(checks))
  if not primitives:
    return '(no ETP checks ran)'
  cells = {k: cell(*v) for k, v in results.items()}
  first = max(len(c) for c in checks) + 1
  col = {p: max(len(p), *(len(cells.get((p, c), '-')) for c in checks))
         for p in primitives}
  lines = [' ' * first + ' '.join(p.ljust(col[p]) for p in primitives)]
  for c in checks:
    lines.append(c.ljust(first) + ' '.join(
        cells.get((p, c), '-').ljust(col[p]) for p in primitives))
  counts = {}
  for status, _ in results.values():
    counts[status] = counts.get(status, 0) + 1
  lines.append(', '.join(f'{n} {s}' for s, n in sorted(counts.items())))
  return '\n'.join(lines)
