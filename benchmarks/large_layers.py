"""Large-layer checks: time and peak memory of the battery on layers people train.

Each case runs in a fresh subprocess (so its peak resident memory is its own)
and prints, per case: the battery's wall time (``check_rules`` with its
defaults; fast mode, chosen automatically at these sizes), the bare cost of
one jitted forward plus one VJP of the same primitive measured in the same
process, their ratio, the peak resident memory (``peak GiB``), what the
process held before the checks (``at start``: the runtime, on a GPU machine
CUDA's libraries, the operands and the bare run's copies) and, on a GPU, the
device's peak memory (``device``), then each check's time and ratio (with
its status, and why where it was skipped), and the warm cost of the
fast-mode gradient check (random projections; compiled, run again) as a
ratio to one forward plus VJP timed in the same interleaved rounds: of the
whole ``check_rules`` call with the operands already on the device (as JAX
arrays, like the bare run's) and with NumPy operands (copied to the
device by every call), and of its compiled work alone (its one program; for
layers whose forward takes well under a millisecond the harness's fixed
Python cost weighs on the whole call).  The bare forward plus VJP
(``bare.py``) runs with its operands already on the device and at JAX's
default precision, as a user trains (TF32 products on a GPU): the least it
can cost.  The check's products run at full float32 precision
(``runner.MATMUL_PRECISION``), so on a GPU part of its ratio is that
precision's cost.  Last, that program's scratch memory (as XLA reports
it) and the page faults per call of it and of the bare run: on a CPU,
scratch above 32 MiB is mapped afresh, and the kernel zeroes every page of
it, on every call (the batched dense layer's fast-mode ratio on the 2-core
machine is mostly that).

    python benchmarks/large_layers.py                # every case
    python benchmarks/large_layers.py dense conv     # some cases
    python benchmarks/large_layers.py --checks xy_to_dw.vjp,drtrl.exact

Targets (issue 6): each large-layer check <= 20 s and <= 4 GiB peak;
fast-mode cost <= 5x one forward plus VJP.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import bare   # benchmarks/bare.py: the bare cost and how it is timed

CASES = ('dense', 'dense_b8', 'conv', 'lora', 'sparse')


def _build(name):
  import jax
  import numpy as np
  import etp
  rng = np.random.default_rng(0)
  f32 = lambda *s: rng.standard_normal(s, dtype=np.float32)
  if name == 'dense':      # 4096 x 4096, one example
    return etp.etp_mv_p, (f32(4096), f32(4096, 4096) / 64, f32(4096)), \
        {'has_bias': True}
  if name == 'dense_b8':   # 2048 x 2048, batch 8 (per-example traces)
    return etp.etp_mm_p, (f32(8, 2048), f32(2048, 2048) / 45, f32(2048)), \
        {'has_bias': True}
  if name == 'conv':       # 64 -> 64 channels, 32 x 32, 3 x 3 kernel, batch 8
    x = f32(8, 64, 32, 32)
    kernel = f32(64, 64, 3, 3) / 24
    eqn = [e for e in jax.make_jaxpr(lambda a, b, c: etp.conv(a, b, c))(
        x, kernel, np.zeros(64, np.float32)).jaxpr.eqns
           if e.primitive is etp.etp_conv_p][0]
    return etp.etp_conv_p, (x, kernel, f32(64)), dict(eqn.params)
  if name == 'lora':       # rank 16 on 4096 x 4096
    return etp.etp_lora_mv_p, (f32(4096), f32(4096, 16) / 64,
                               f32(16, 4096) / 4), \
        {'alpha': 0.5, 'has_bias': False}
  if name == 'sparse':     # 4096 x 4096 at 1% density
    n, nnz = 4096, int(0.01 * 4096 * 4096)
    flat = rng.choice(n * n, size=nnz, replace=False)
    indices = np.stack([flat // n, flat % n], axis=1).astype(np.int32)
    return etp.etp_sp_mv_p, (f32(n), f32(nnz) / 8, indices), \
        {'shape': (n, n), 'has_bias': False}
  raise ValueError(name)


# The fast-mode gradient checks whose warm cost (compiled, second run) is
# compared with one forward plus VJP: the projections of xy_to_dw.jacrev.
FAST_CHECKS = 'xy_to_dw.jacrev'


def run_case(name: str, checks: str) -> dict:
  """Runs one case in this process; returns its figures."""
  import resource
  import jax
  import etp_testing
  prim, operands, params = _build(name)
  bare_s = bare.seconds(prim, operands, params)
  # What the process holds before the checks: the runtime (on a GPU
  # machine, CUDA's libraries), the operands and the bare run's copies.
  start_gib = _rss_gib()
  t = time.perf_counter()
  # As a user runs it: check_rules' defaults (steps=3, n_state=(1, 2)).
  report = etp_testing.check_rules(prim, *operands, checks=checks, seed=0,
                                   **params)
  wall = time.perf_counter() - t
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  stats = jax.devices()[0].memory_stats() or {}   # None on a CPU
  device_peak = stats.get('peak_bytes_in_use')
  # Warm: everything compiled by the run above (or by a first call here).
  # The fast-mode figures and their own bare cost, interleaved (built after
  # the peak is read: the bare run holds a device copy of the operands, and
  # the device-resident call one of every operand).
  on_device = jax.device_put(operands)
  fast = lambda ops: (lambda: etp_testing.check_rules(
      prim, *ops, checks=FAST_CHECKS, seed=0, fast=True, **params))
  work, scratch = _fast_device_work(prim, on_device, params)
  bare_fn = bare.forward_vjp(prim, operands, params)
  warm = bare.best_interleaved({'bare': bare_fn, 'fast': fast(on_device),
                                'fast_host': fast(operands), 'work': work})
  return {
      'case': name, 'primitive': prim.name, 'battery_s': wall,
      'bare_fwd_vjp_s': bare_s, 'ratio': wall / bare_s if bare_s else None,
      'peak_gib': peak_kib / 2**20, 'start_gib': start_gib,
      'device_peak_gib': (None if device_peak is None
                          else device_peak / 2**30),
      'fast_warm_s': warm['fast'],
      'fast_host_s': warm['fast_host'],
      'fast_device_s': warm['work'], 'fast_bare_s': warm['bare'],
      'fast_scratch_mib': None if scratch is None else scratch / 2**20,
      'page_faults': {'work': _page_faults_per_call(work),
                      'bare': _page_faults_per_call(bare_fn)},
      'per_check': {o.name: [o.status, round(o.duration_s, 3),
                             o.reason if o.status != 'passed' else '']
                    for o in report.outcomes},
      'passed': report.passed,
  }


def _fast_device_work(prim, operands, params):
  """A function running the compiled work of the fast-mode gradient check
  alone: its one program (cotangent and directions drawn, the xy_to_dw rule,
  the JVPs and the float64 dot products), without the harness's Python
  around it (context, checking the rule's shapes, comparing).  Traced and
  run at the harness's matrix-product precision, as the check runs it: on a
  GPU the default (TF32) program is faster, and not what is checked.

  Returns ``(work, scratch)``: the function, and the bytes of scratch
  (temporary) memory XLA gives the program (``None`` where the backend does
  not say).  XLA:CPU allocates that scratch afresh on every call; above
  glibc's largest mmap threshold (32 MiB) it is mapped and zeroed by the
  kernel each time, which shows as page faults per call."""
  import jax
  from etp_testing._src.checks import xy_to_dw
  from etp_testing._src.context import CheckContext
  from etp_testing._src.runner import MATMUL_PRECISION
  ctx = CheckContext(prim, operands, params, seed=0, steps=2,
                     n_states=((1,),), rtol=None, atol=None,
                     devices=jax.devices()[:1], fast=True)
  program, args = xy_to_dw.projection_call(ctx, tuple(ctx.weight_avals))

  def work():
    with jax.default_matmul_precision(MATMUL_PRECISION):
      return jax.block_until_ready(program(*args))
  with jax.default_matmul_precision(MATMUL_PRECISION):
    memory = program.lower(*args).compile().memory_analysis()
  return work, getattr(memory, 'temp_size_in_bytes', None)


def _page_faults_per_call(fn, calls=5) -> "float | None":
  """Minor page faults per warm call of ``fn`` (``None`` where the OS does
  not count them): fresh pages the process touched."""
  import resource
  fn()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(calls):
    fn()
  after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  return (after - before) / calls if before or after else None


def _rss_gib() -> float:
  """This process's resident memory now, in GiB (Linux; 0 elsewhere)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return 0.0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('cases', nargs='*', default=list(CASES))
  parser.add_argument('--checks', default='all')
  parser.add_argument('--child', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(run_case(args.child, args.checks)))
    return 0
  print(f'{"case":8} {"primitive":14} {"battery s":>10} {"fwd+vjp s":>10} '
        f'{"ratio":>9} {"peak GiB":>9} {"at start":>9} {"device":>7}  result')
  failed = False
  for name in args.cases:
    proc = subprocess.run(
        [sys.executable, __file__, '--child', name, '--checks', args.checks],
        capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
      failed = True
      print(f'{name:8} crashed:\n{proc.stderr[-2000:]}')
      continue
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    failed |= not r['passed']
    print(f'{r["case"]:8} {r["primitive"]:14} {r["battery_s"]:10.2f} '
          f'{r["bare_fwd_vjp_s"]:10.4f} {r["ratio"]:9.0f} '
          f'{r["peak_gib"]:9.2f} {r["start_gib"]:9.2f} '
          + (f'{r["device_peak_gib"]:7.2f}' if r['device_peak_gib'] is not None
             else f'{"-":>7}')
          + f'  {"pass" if r["passed"] else "FAIL"}')
    bare_s = r['bare_fwd_vjp_s']
    for check, (status, secs, reason) in r['per_check'].items():
      print(f'         {check:24} {status:8} {secs:7.2f} s  '
            f'{secs / bare_s:8.0f}x' + (f'  {reason[:90]}' if reason else ''))
    fb = r['fast_bare_s']
    print(f'         fast-mode {FAST_CHECKS}, warm, as a ratio to one '
          f'forward + VJP ({fb * 1e3:.3f} ms, timed interleaved): whole call '
          f'{r["fast_warm_s"] * 1e3:.2f} ms = {r["fast_warm_s"] / fb:.1f}x '
          f'(operands on the device), {r["fast_host_s"] * 1e3:.2f} ms = '
          f'{r["fast_host_s"] / fb:.1f}x (NumPy operands); compiled work '
          f'{r["fast_device_s"] * 1e3:.2f} ms = '
          f'{r["fast_device_s"] / fb:.1f}x')
    faults = r['page_faults']
    if r['fast_scratch_mib'] is not None or faults['work'] is not None:
      print('         its program: '
            + (f'{r["fast_scratch_mib"]:.0f} MiB of XLA scratch; '
               if r['fast_scratch_mib'] is not None else '')
            + (f'{faults["work"]:.0f} page faults per call (forward + VJP: '
               f'{faults["bare"]:.0f})' if faults['work'] is not None
               else ''))
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
