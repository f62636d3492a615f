"""Counting XLA compilations, to prove that compiled oracles are reused.

Every backend compilation JAX performs (a ``jax.jit`` of a new shape, and every
eager op on a shape it has not seen) is reported through ``jax.monitoring`` as
a ``backend_compile`` duration event.  :func:`counting` listens to them:

    with counting() as c:
      ...
    print(c.count, c.loaded, c.seconds)

JAX reports the same event when a program comes from the persistent
compilation cache (``--etp-compile-cache``) instead of XLA, after a
``cache_hits`` event; those are counted apart, as ``loaded``: ``count`` is
what XLA actually compiled.

The listener is registered once per process and counts for every open
:func:`counting` block, and for :func:`release_if_over`.

Why release: every compiled XLA CPU program keeps memory mappings alive
(three per object file XLA emits for it: 12 to 18 per program of the
battery with ``COMPILER_OPTIONS``, 18 to 32 without), and a long run
(the soak, a nightly battery) compiles programs per new shape.  Kept
forever, they reach the kernel's ``vm.max_map_count`` (65,530 by default) and
LLVM fails with "Cannot allocate memory", then the process crashes.  So
:func:`release_if_over` drops every cached program once the process holds
more than half of ``vm.max_map_count`` mappings (Linux; elsewhere, once
``MAX_LIVE_COMPILATIONS`` programs have been compiled since the last drop).
A run's repeated shapes are then compiled once more: seconds, not the run.

Why :func:`jit`: the checks build many small programs and run each a few
times, so compile time is most of what they cost.  For small cases, on a CPU
backend, the harness compiles its own programs with ``COMPILER_OPTIONS``:

* ``xla_cpu_use_fusion_emitters=False``: XLA:CPU's fusion emitters (its
  default code generator in recent JAX) take about twice as long to compile
  such programs as its older elemental emitters;
* ``xla_backend_optimization_level=0``: LLVM's optimisation of the emitted
  code, another third of what is left (a small jitted VJP: 39 -> 22-26 ms
  to compile), for code whose run time does not matter at these sizes.
  Numerics are unchanged: XLA:CPU does not enable fast-math, so no level
  may reassociate float arithmetic;
* ``xla_cpu_parallel_codegen_split_count=1``: one object file per program
  part instead of several for parallel LLVM compilation, which these small
  programs do not need: each file holds three memory mappings, so a program
  holds a third to a half fewer (a small VJP: 21 -> 15; LoRA's battery:
  32 -> 18 per program), and a long run releases its programs less often
  (see "Why release").  Only with the elemental emitters: the fusion
  emitters' programs held 21 mappings with or without it (jax 0.10.2 and
  0.12), so where XLA has no elemental emitters it is not asked for.

Cases whose operands hold more than ``SMALL_CASE_ELEMENTS`` elements compile
with XLA's defaults: a large layer's programs run long enough for their run
time to matter, and there the older emitters are sometimes slower (the
fast-mode projections of the sparse 4096 x 4096 layer ran 1.2 to 2.3x
slower, the dense 4096 x 4096 jax.vjp oracle 1.4x; measured on this 2-core
machine, jax 0.10).  Other backends (a GPU) compile with their defaults.
Each option is probed once: where this XLA does not know one, :func:`jit`
leaves that one out (jax 0.11's XLA no longer has the fusion-emitter option,
"No such compile option") and keeps the rest.  :func:`options_in_effect`
says which applied (the battery's JSON report records it).  Programs a
user's code compiles (eager ops included) are not affected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import jax
import numpy as np

# The event JAX records for each backend compilation (stable since jax 0.4),
# whether XLA compiled the program or the persistent cache had it.
BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
# The event JAX records, inside the above, when the persistent cache had it.
CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'

# XLA options of the programs the harness compiles itself for small cases
# on a CPU backend (see :func:`jit`).
COMPILER_OPTIONS = {'xla_cpu_use_fusion_emitters': False,
                    'xla_backend_optimization_level': 0,
                    'xla_cpu_parallel_codegen_split_count': 1}
# Options asked for only where the option they name is in effect too.
ONLY_WITH = {'xla_cpu_parallel_codegen_split_count':
             'xla_cpu_use_fusion_emitters'}
# The backend on which COMPILER_OPTIONS apply.
OPTIONS_BACKEND = 'cpu'
# Operand elements (all operands together) up to which a case is small.
# The generated cases hold at most a few thousand; the large layers millions.
SMALL_CASE_ELEMENTS = 65_536

# Where mappings cannot be counted: compilations after which
# release_if_over drops every cached program.
MAX_LIVE_COMPILATIONS = 2000
# The share of vm.max_map_count a process may hold before the drop.
MAPPINGS_SHARE = 0.5
# Compilations between two counts of the mappings (a count reads a file).
PROBE_EVERY = 50

_open: list = []
_registered = False
_hit_pending = False   # a cache hit seen, its backend_compile event not yet
_probing = False       # the options probe runs: its compilation is not counted
_since_release = 0
_probed_at = 0
releases = 0           # calls of release(), for benchmarks that must know
# cache_clear callables of the harness's caches of jitted functions.
_caches: list = []


@dataclasses.dataclass(eq=False)   # nested blocks are told apart by identity
class CompileCount:
  """What a :func:`counting` block saw.

  Attributes:
    count: programs XLA compiled.
    loaded: programs loaded from the persistent compilation cache instead.
    seconds: time in both.
  """
  count: int = 0
  loaded: int = 0
  seconds: float = 0.0


def _hit_listener(event: str, **_):
  global _hit_pending
  if event == CACHE_HIT_EVENT:
    _hit_pending = True


def _listener(event: str, duration_secs: float, **_):
  global _since_release, _hit_pending
  if event == BACKEND_COMPILE_EVENT and not _probing:
    hit, _hit_pending = _hit_pending, False
    _since_release += 1
    for c in _open:
      if hit:
        c.loaded += 1
      else:
        c.count += 1
      c.seconds += duration_secs


def _listen():
  global _registered
  if not _registered:
    jax.monitoring.register_event_listener(_hit_listener)
    jax.monitoring.register_event_duration_secs_listener(_listener)
    _registered = True


def _accepted(name, value) -> bool:
  """Whether this XLA compiles with option ``name=value`` (probed on a
  one-element program, which no count includes: where XLA rejects the
  option, the failed attempt still reports a compilation)."""
  global _probing
  _probing = True
  try:
    jax.jit(lambda x: x + 1, compiler_options={name: value})(np.int32(0))
  except Exception:  # pylint: disable=broad-except
    return False   # an older or newer XLA without it: its default
  finally:
    _probing = False
  return True


@functools.lru_cache(maxsize=None)
def _supported_options() -> tuple:
  """The ``COMPILER_OPTIONS`` this XLA accepts, each probed on its own,
  less those whose ``ONLY_WITH`` partner it does not; ``()`` where the
  default backend is not ``OPTIONS_BACKEND``."""
  if jax.default_backend() != OPTIONS_BACKEND:
    return ()
  accepted = {k: v for k, v in sorted(COMPILER_OPTIONS.items())
              if _accepted(k, v)}
  return tuple((k, v) for k, v in accepted.items()
               if ONLY_WITH.get(k, k) in accepted)


def options_in_effect() -> dict:
  """The compiler options :func:`jit` passes for small cases in this
  process (large cases: none)."""
  return dict(_supported_options())


def is_small(operands) -> bool:
  """Whether a case with ``operands`` (arrays or avals) is small (see
  ``SMALL_CASE_ELEMENTS``)."""
  return sum(o.size for o in operands) <= SMALL_CASE_ELEMENTS


def jit(fn, small: bool = True, **kwargs):
  """``jax.jit(fn, **kwargs)`` compiled with ``COMPILER_OPTIONS`` for a
  small case, with XLA's defaults otherwise (see the module docstring)."""
  options = dict(_supported_options()) if small else {}
  return jax.jit(fn, compiler_options=options, **kwargs)


def planned_bytes(compiled) -> "int | None":
  """What XLA plans to hold for one call of ``compiled`` (a
  ``jax.stages.Compiled``) beyond its arguments: its scratch plus its
  outputs, from the program's memory analysis; ``None`` where this backend
  does not say."""
  try:
    memory = compiled.memory_analysis()
    return int(memory.temp_size_in_bytes) + int(memory.output_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None   # no analysis (None, or a backend that raises for it)


def register_cache(cache_clear):
  """Registers the ``cache_clear`` of a cache that holds jitted functions,
  so that :func:`release` empties it."""
  _caches.append(cache_clear)
  return cache_clear


def release() -> None:
  """Drops every compiled program: the harness's caches of jitted functions
  and JAX's own compilation caches."""
  global _since_release, _probed_at, releases
  releases += 1
  for cache_clear in _caches:
    cache_clear()
  jax.clear_caches()
  _since_release = _probed_at = 0


def _mapping_cap():
  """Half (``MAPPINGS_SHARE``) of ``vm.max_map_count``, or ``None``."""
  try:
    with open('/proc/sys/vm/max_map_count') as f:
      return int(int(f.read().strip()) * MAPPINGS_SHARE)
  except (OSError, ValueError):
    return None


def _mappings():
  """The memory mappings this process holds, or ``None``."""
  try:
    with open('/proc/self/maps', 'rb') as f:
      return sum(1 for _ in f)
  except OSError:
    return None


def release_if_over(limit: int = None) -> bool:
  """:func:`release` when the process holds too many mappings (see the
  module docstring), or, with ``limit``, when more than ``limit`` programs
  have been compiled since the last release; returns whether it did.
  Counting starts at the first call."""
  global _probed_at
  _listen()
  if limit is not None:
    over = _since_release > limit
  elif _since_release - _probed_at < PROBE_EVERY:
    return False
  else:
    _probed_at = _since_release
    cap, held = _mapping_cap(), _mappings()
    over = (held > cap if cap is not None and held is not None
            else _since_release > MAX_LIVE_COMPILATIONS)
  if over:
    release()
  return over


def use_persistent_cache(choice: str, auto_dir) -> "str | None":
  """Points JAX's persistent compilation cache at ``choice`` (a directory,
  created if need be; ``'auto'``: ``auto_dir()``, none where that gives
  ``None``; ``'off'``: none), for every program however small or quick to
  compile (the battery's are both).  A cache directory the user already
  configured for JAX wins, over ``'off'`` too (JAX uses it whatever the
  choice).  Returns the directory in use, or ``None``."""
  if jax.config.jax_compilation_cache_dir:   # the user's own: keep it
    return jax.config.jax_compilation_cache_dir
  word = choice.strip().lower()   # OFF is off, not a directory named OFF
  if word == 'off':
    return None
  if not word:
    raise OSError(f"{choice!r} is not a directory: give one, 'auto' or "
                  "'off'")
  directory = auto_dir() if word == 'auto' else choice
  if directory is None:
    return None
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise OSError(f'cannot keep the cache in {directory!r}: '
                  f'{e.strerror or e}') from e
  jax.config.update('jax_compilation_cache_dir', str(directory))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  try:   # a cache JAX already initialised (without a directory) starts over
    from jax.experimental.compilation_cache import compilation_cache
    compilation_cache.reset_cache()
  except (ImportError, AttributeError):
    pass
  return str(directory)


def programs_line(compiled: int, loaded: int, cache) -> str:
  """A run's closing line: the XLA programs it compiled, and those it
  loaded from the persistent compilation cache ``cache`` (its directory,
  or ``None`` where none is in use)."""
  line = (f'XLA programs: {compiled} compiled, {loaded} loaded from the '
          'persistent compilation cache'
          + (f' ({cache})' if cache else ' (none in use)'))
  floor = jax.config.jax_persistent_cache_min_compile_time_secs
  if cache and floor > 0:
    # A cache the user configured keeps the user's (or JAX's default)
    # threshold, and the battery's programs compile in milliseconds.
    line += (f'; it keeps only programs that took {floor:g} s or more to '
             'compile (jax_persistent_cache_min_compile_time_secs), so the '
             "battery's are compiled again next run")
  return line


@contextlib.contextmanager
def counting():
  """Counts XLA compilations, and programs loaded from the persistent
  cache, inside the block (a :class:`CompileCount`)."""
  _listen()
  c = CompileCount()
  _open.append(c)
  try:
    yield c
  finally:
    _open.remove(c)
