"""``device.consistency``: the same answers on every device and when sharded.

For every device in the run's device list (``devices='all'|'cpu'|'gpu'|[...]``)
the primitive's ``jax.jit`` output, ``jax.vjp`` w.r.t. the weights, and
``xy_to_dw`` are computed with the operands placed there, and compared to the
first device's, within the dtype's tolerance.  For a batched primitive the
batch of ``x`` (and of the cotangent) is then sharded over a 1-D mesh of as
many devices as divide it (``NamedSharding(mesh, P('batch'))``) and the jitted
results compared to the single-device ones.  With nothing to compare (one
device and no sharding possible, or no device of the requested kind) the check
is skipped with the reason: never passed.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from etp_testing._src.checks.registry import check


def _results(ctx, operands, g):
  x, weights, _ = ctx.primitive.split_operands(operands, ctx.params)
  y = jax.jit(lambda *ops: ctx.bind(*ops))(*operands)
  index = ctx.primitive.trainable_invars(ctx.params)

  def y_of(w):
    new = list(operands)
    for k, i in index.items():
      new[i] = w[k]
    return ctx.bind(*new)

  vjp = jax.vjp(y_of, weights)[1](g)[0] if weights else {}
  dw = ctx.call_rule('xy_to_dw', x, g, weights) if weights else {}
  return y, vjp, dw


def _compare_results(ctx, got, want, where):
  y, vjp, dw = got
  ctx.compare(y, want[0], rule='impl', what=f'jit(bind) {where}')
  for k in want[1]:
    ctx.compare(vjp[k], want[1][k], rule='vjp', key=k, what=f'jax.vjp {where}')
    ctx.compare(dw[k], want[2][k], rule='xy_to_dw', key=k,
                what=f'xy_to_dw {where}')


@check('device.consistency')
def check_device_consistency(ctx):
  """Results agree on every device, and with the batch sharded over a mesh."""
  devices = list(ctx.devices)
  if not devices:
    ctx.skip('no device of the requested kind is visible (e.g. devices="gpu" '
             'on a machine without a GPU)')
  y = ctx.y()
  g = ctx.normal('device.g', y.shape, y.dtype)
  place = lambda tree, d: jax.device_put(tree, d)
  reference = _results(ctx, place(ctx.operands, devices[0]),
                       place(g, devices[0]))
  compared = 0
  for d in devices[1:]:
    got = _results(ctx, place(ctx.operands, d), place(g, d))
    _compare_results(ctx, got, reference, f'on {d} vs on {devices[0]}')
    compared += 1
  batch = ctx.x.shape[0] if ctx.batched and ctx.x is not None else 0
  same_kind = [d for d in devices if d.platform == devices[0].platform]
  n = max((k for k in range(2, len(same_kind) + 1) if batch % k == 0),
          default=0)
  if n:
    mesh = Mesh(np.array(same_kind[:n]), ('batch',))
    sharded = NamedSharding(mesh, PartitionSpec('batch'))
    replicated = NamedSharding(mesh, PartitionSpec())
    xi = ctx.primitive.x_invar_index
    ops = [jax.device_put(o, sharded if i == xi else replicated)
           for i, o in enumerate(ctx.operands)]
    got = _results(ctx, ops, jax.device_put(g, sharded))
    _compare_results(ctx, got, reference,
                     f'with the batch ({batch}) sharded over {n} devices')
    compared += 1
  if not compared:
    ctx.skip(f'nothing to compare: {len(devices)} device(s) visible and '
             + ('the batch cannot be split over them' if ctx.batched else
                f'{ctx.name} has no batch to shard')
             + '; set XLA_FLAGS=--xla_force_host_platform_device_count=N '
             'before JAX starts for several CPU devices')
