"""Compile reuse (counted), and the release that bounds live programs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etp
import etp_testing
from etp_testing._src import compilations
from _xla_cache import xla_cache_in

# Counts of compilations: the suite's persistent cache would make some
# programs loaded instead (tests/conftest.py).
pytestmark = pytest.mark.usefixtures('no_xla_cache')

RNG = np.random.default_rng(0)


def _case(n_in=3, n_out=4):
  return (RNG.standard_normal((2, n_in)).astype(np.float32),
          RNG.standard_normal((n_in, n_out)).astype(np.float32),
          RNG.standard_normal(n_out).astype(np.float32))


def _battery(operands, seed=0):
  report = etp_testing.check_rules(etp.etp_mm_p, *operands, seed=seed,
                                   devices='cpu', has_bias=True)
  assert report.passed, report.failure_message()


def test_counting_sees_a_new_shape_and_not_a_repeated_one():
  f = jax.jit(lambda a: a * 3 + 1)
  with compilations.counting() as first:
    f(jnp.ones(17))
  with compilations.counting() as again:
    f(jnp.ones(17))
  assert first.count >= 1 and again.count == 0


def _programs_new_then_repeated(run) -> tuple:
  """Programs compiled by ``run()`` (a passing report) on a signature no
  test has used, then by the same call again."""
  counts = []
  for _ in range(2):
    with compilations.counting() as programs:
      report = run()
    assert report.passed, report.failure_message()
    counts.append(programs.count)
  return tuple(counts)


def test_fast_mode_gradient_check_is_one_program():
  # Rule, cotangent, directions, JVPs and dot products compile together:
  # one program per new signature, none when it repeats.
  operands = _case(n_in=6, n_out=7)   # a shape no other test uses
  run = lambda: etp_testing.check_rules(
      etp.etp_mm_p, *operands, checks='xy_to_dw.jacrev', fast=True,
      has_bias=True)
  counts = _programs_new_then_repeated(run)
  assert counts == (1, 0), counts


@pytest.mark.parametrize('checks,programs', [('init.*', 2), ('init.pp', 2)])
def test_init_checks_compile_one_program_per_variant(checks, programs):
  # Both init rules, for every n_state, go in one program, for the operands
  # as given and for float32 ones with x64 on: 2 programs for a new
  # signature, whichever init checks run (eagerly, each jnp.zeros compiled
  # its own; with a program per check, 4).
  n_out = 9 if checks == 'init.*' else 10   # shapes no other test uses
  operands = _case(n_in=5, n_out=n_out)
  run = lambda: etp_testing.check_rules(
      etp.etp_mm_p, *operands, checks=checks, n_state=(1, 2, 3),
      has_bias=True)
  counts = _programs_new_then_repeated(run)
  assert counts == (programs, 0), counts


@pytest.mark.parametrize('checks,n_out,programs', [
    # The batch kept (shared with yw_to_w.linear), the batch stripped under
    # vmap, and extra leading axes directly and under vmap (one program for
    # both): 3 (4 with a program per call).
    ('yw_to_w.vmap', 11, 3),
    # The Jacobian columns of the weight and the bias under one program, and
    # the yw_to_w rule's program: 2 (3 with a program of columns per weight);
    # and the bind under jit, which finds the operands whose domain is
    # restricted (CheckContext.restricted_operands: primitive.jit's program,
    # compiled here because that check does not run): 3.
    ('yw_to_w.anchor', 12, 3),
    # The rule and impl in float64; impl on absolute values too, for the
    # differences' rounding, with the same program: 2 (3 when it passed
    # its operands as a tuple, not the list the differences pass); and the
    # bind under jit, which finds the operands the bind is not affine in
    # (context.CheckContext.nonaffine_operands: primitive.jit's program,
    # compiled here because that check does not run): 3.
    ('xy_to_dw.fd', 19, 3),
    # Every quantity in one program, run again on absolute values, and the
    # bind under jit for the affinity test, as above: 2.
    ('primitive.jvp', 20, 2),
])
def test_a_check_compiles_its_programs_once_per_signature(checks, n_out,
                                                          programs):
  operands = _case(n_in=5, n_out=n_out)   # a shape no other test uses
  run = lambda: etp_testing.check_rules(
      etp.etp_mm_p, *operands, checks=checks, has_bias=True)
  counts = _programs_new_then_repeated(run)
  assert counts == (programs, 0), counts


@pytest.mark.parametrize('check,n_out', [('pp.exact', 13),
                                         ('primitive.vmap', 16)])
def test_checks_bind_with_the_program_of_primitive_jit(check, n_out):
  # pp.exact's affinity test and primitive.vmap's per-example binds run
  # primitive.jit's jitted bind, so each compiles one program fewer beside
  # primitive.jit than apart from it (each run on a signature of its own).
  run = lambda checks, n_out: (lambda: etp_testing.check_rules(
      etp.etp_mm_p, *_case(n_in=5, n_out=n_out), checks=checks,
      has_bias=True))
  together = _programs_new_then_repeated(run(f'primitive.jit,{check}', n_out))
  bind = _programs_new_then_repeated(run('primitive.jit', n_out + 1))
  alone = _programs_new_then_repeated(run(check, n_out + 2))
  assert together == (bind[0] + alone[0] - 1, 0), (together, bind, alone)


@pytest.fixture
def persistent_cache(tmp_path):
  """JAX's persistent compilation cache in ``tmp_path`` for one test, every
  program cached; the old settings are restored after."""
  with xla_cache_in(tmp_path):
    yield tmp_path


def test_a_program_from_the_persistent_cache_counts_as_loaded(
    persistent_cache):
  """JAX reports a persistent-cache hit with the same event as a
  compilation; the count tells them apart, so a warm run's figure is what
  XLA compiled."""
  f = jax.jit(lambda a: a * 5 - 2)
  with compilations.counting() as cold:
    f(np.ones(23, np.float32))
  assert (cold.count, cold.loaded) == (1, 0)
  jax.clear_caches()   # the in-memory caches: the next call asks the disk
  with compilations.counting() as warm:
    f(np.ones(23, np.float32))
  assert (warm.count, warm.loaded) == (0, 1)


@pytest.mark.parametrize('choice', ['off', 'auto', 'elsewhere'])
def test_a_jax_cache_the_user_configured_wins_and_is_reported(
    persistent_cache, tmp_path, choice):
  """``--compile-cache`` (and ``--etp-compile-cache``) never move a cache
  the user configured for JAX, and the run names that one as in use, with
  ``off`` too: JAX loads from it whatever the choice."""
  other = tmp_path / 'elsewhere'
  got = compilations.use_persistent_cache(
      str(other) if choice == 'elsewhere' else choice, lambda: str(other))
  assert got == str(persistent_cache)
  assert jax.config.jax_compilation_cache_dir == str(persistent_cache)
  assert not other.exists()


def test_a_user_cache_that_keeps_only_slow_programs_is_said_to(
    persistent_cache):
  """A cache the user configured keeps the user's compile-time threshold
  (JAX's default: 1 s), which none of the battery's programs reach: the
  closing line says so instead of implying a warm second run."""
  line = compilations.programs_line(5, 0, str(persistent_cache))
  assert 'keeps only' not in line   # the fixture caches every program
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  line = compilations.programs_line(5, 0, str(persistent_cache))
  assert ('keeps only programs that took 1 s or more to compile '
          '(jax_persistent_cache_min_compile_time_secs)') in line
  assert 'keeps only' not in compilations.programs_line(5, 0, None)


def test_without_a_jax_cache_off_is_none():
  assert compilations.use_persistent_cache('off', lambda: '/nowhere') is None
  assert not jax.config.jax_compilation_cache_dir


def test_a_new_example_of_a_seen_shape_compiles_nothing():
  """Oracles and rule calls are cached per primitive and params, and jitted:
  another example (other values) of the same shapes reuses every program,
  the device checks' included.  (The harness seed stays that of the run;
  another seed samples other vmap axes for primitive.vmap, a new program.)"""
  _battery(_case())
  with compilations.counting() as c:
    _battery(_case())
  assert c.count == 0, f'{c.count} compilations for a seen shape'


def test_release_drops_every_cached_program():
  _battery(_case(2, 5))
  assert not compilations.release_if_over(limit=10**9)
  with compilations.counting() as kept:
    _battery(_case(2, 5))
  assert kept.count == 0
  assert compilations.release_if_over(limit=0)
  with compilations.counting() as after:
    _battery(_case(2, 5))
  # Everything compiles again: nothing of the old programs was kept.
  assert after.count > 20, after.count


def test_release_when_the_mappings_reach_their_share(monkeypatch):
  """Without a limit, the trigger is the process's memory mappings against
  half of vm.max_map_count (12 to 32 mappings per program: see the module
  docstring)."""
  monkeypatch.setattr(compilations, 'PROBE_EVERY', 0)
  monkeypatch.setattr(compilations, '_mapping_cap', lambda: 10**9)
  assert not compilations.release_if_over()
  monkeypatch.setattr(compilations, '_mapping_cap', lambda: 1)
  assert compilations.release_if_over()


def test_the_mapping_count_is_read_on_linux():
  held = compilations._mappings()
  if held is None:
    pytest.skip('no /proc/self/maps on this system')
  assert held > 10 and compilations._mapping_cap() > 1000


def test_host_arrays_reach_jax_without_a_compilation():
  # jnp.asarray on a NumPy array compiles a `stage` program per new shape
  # (jax 0.10); the harness draws inputs of every generated shape, so it
  # transfers them instead.  The control (an eager op on a new shape) shows
  # that the counter sees eager compilations.
  from etp._src.arrays import to_jax
  with compilations.counting() as transferred:
    for n in range(31, 34):
      a = to_jax(np.ones((n, 2), np.float64), jnp.float32)
  assert transferred.count == 0
  assert a.dtype == jnp.float32 and a.shape == (33, 2)
  with compilations.counting() as staged:
    jnp.asarray(np.ones((35, 2), np.float32)) + 1
  assert staged.count >= 1


@pytest.fixture
def jit_options(monkeypatch):
  """The ``compiler_options`` of every ``jax.jit`` that ``compilations``
  makes from here on (the options are probed first, outside the spy), with
  the harness's jitted functions dropped so that the battery builds them."""
  compilations.options_in_effect()
  seen = []
  real_jit = jax.jit

  def spy(fn, **kwargs):
    seen.append(kwargs.get('compiler_options'))
    return real_jit(fn, **kwargs)

  monkeypatch.setattr(compilations.jax, 'jit', spy)
  compilations.release()
  return seen


def test_harness_programs_compile_with_the_harness_options(jit_options):
  """Every program a check builds goes through ``compilations.jit``, which
  passes ``COMPILER_OPTIONS`` (where this XLA knows them) to ``jax.jit``."""
  supported = compilations.options_in_effect()
  seen = jit_options
  _battery(_case(3, 7))
  assert len(seen) > 5
  assert all(options == supported for options in seen), seen


def test_a_large_case_compiles_with_xla_defaults(monkeypatch, jit_options):
  """Above ``SMALL_CASE_ELEMENTS`` operand elements the programs' run time
  matters more than their compile time: no harness options."""
  seen = jit_options
  monkeypatch.setattr(compilations, 'SMALL_CASE_ELEMENTS', 20)
  operands = _case(3, 7)   # 6 + 21 + 7 = 34 elements
  assert not compilations.is_small(operands)
  _battery(operands)
  assert len(seen) > 5
  assert all(not options for options in seen), seen


def test_an_unknown_compiler_option_is_left_out(monkeypatch):
  """An XLA without an option (older or newer) compiles with its default
  for that one instead of failing every check, and keeps the others."""
  monkeypatch.setattr(compilations, 'COMPILER_OPTIONS',
                      {'xla_no_such_option_for_etp': True,
                       'xla_backend_optimization_level': 0})
  # The probe runs on the default backend: on a GPU machine the options
  # would otherwise not apply at all (and this test asserted {} there).
  monkeypatch.setattr(compilations, 'OPTIONS_BACKEND', jax.default_backend())
  compilations._supported_options.cache_clear()
  try:
    with compilations.counting() as probe:
      assert compilations.options_in_effect() == {
          'xla_backend_optimization_level': 0}
    # XLA rejected the option; the failed attempt is not a compilation (it
    # would count in every run's report, persistent cache or not).
    assert probe.count == 0
    f = compilations.jit(lambda a: a * 2)
    np.testing.assert_array_equal(f(np.arange(3.0)), [0.0, 2.0, 4.0])
  finally:
    compilations._supported_options.cache_clear()


def test_the_split_count_is_asked_for_only_with_the_elemental_emitters(
    monkeypatch):
  """An XLA without the elemental emitters (jax 0.11 on) compiles without
  ``xla_cpu_parallel_codegen_split_count``: the fusion emitters' programs
  held as many mappings with it as without; with them, both apply."""
  split, emitters = ('xla_cpu_parallel_codegen_split_count',
                     'xla_cpu_use_fusion_emitters')
  monkeypatch.setattr(compilations, 'OPTIONS_BACKEND', jax.default_backend())
  rejected = set()
  monkeypatch.setattr(compilations, '_accepted',
                      lambda name, value: name not in rejected)
  compilations._supported_options.cache_clear()
  try:
    assert compilations.options_in_effect() == compilations.COMPILER_OPTIONS
    rejected.add(emitters)
    compilations._supported_options.cache_clear()
    assert compilations.options_in_effect() == {
        k: v for k, v in compilations.COMPILER_OPTIONS.items()
        if k not in (split, emitters)}
  finally:
    compilations._supported_options.cache_clear()


def _small_vjp(x, w):
  y, vjp = jax.vjp(lambda w: jnp.tanh(x @ w) * 2 + w.sum(), w)
  return vjp(y)


def _mappings_per_program(options, sizes) -> float:
  """Memory mappings the process gains per program compiled with
  ``options``, one program per size (the first two not counted: a thread
  pool's first use maps its stacks)."""
  kept = []   # alive, as the harness's caches keep them

  def compile_one(n):
    f = jax.jit(_small_vjp, compiler_options=options)
    f(np.ones((2, n), np.float32), np.ones((n, 3), np.float32))
    kept.append(f)
  for n in sizes[:2]:
    compile_one(n)
  before = compilations._mappings()
  for n in sizes[2:]:
    compile_one(n)
  return (compilations._mappings() - before) / len(sizes[2:])


def test_one_codegen_part_per_program_holds_fewer_mappings():
  """``xla_cpu_parallel_codegen_split_count=1``: every program the harness
  compiles holds fewer memory mappings, so long runs release less often."""
  if compilations._mappings() is None:
    pytest.skip('no /proc/self/maps on this system')
  option = 'xla_cpu_parallel_codegen_split_count'
  supported = compilations.options_in_effect()
  if option not in supported:
    pytest.skip(f'the harness does not ask for {option} here (not a CPU, or '
                'an XLA without it or without the elemental emitters)')
  assert supported[option] == 1, supported
  without = {k: v for k, v in supported.items() if k != option}
  harness = _mappings_per_program(supported, list(range(40, 52)))
  split = _mappings_per_program(without, list(range(60, 72)))
  assert harness < 0.8 * split, (harness, split)


def test_compiler_options_apply_only_on_their_backend(monkeypatch):
  """On another default backend (a GPU) the harness compiles with XLA's
  defaults: the options were chosen and measured for XLA:CPU."""
  if jax.default_backend() != 'cpu':
    pytest.skip('the default backend is not a CPU')
  compilations._supported_options.cache_clear()
  assert compilations.options_in_effect()   # this CPU machine: options
  monkeypatch.setattr(compilations, 'OPTIONS_BACKEND', 'no_such_backend')
  compilations._supported_options.cache_clear()
  try:
    assert compilations.options_in_effect() == {}
  finally:
    compilations._supported_options.cache_clear()
