"""A broken ETP primitive defined at module level, importable by name.

The harness's reproduction snippet re-imports the module that defines a
primitive's impl (``import _broken_prims``) and looks the primitive up by name
in ``etp.primitives()``; ``tests/test_harness_robustness.py`` runs such a
snippet in a fresh namespace.  Importing this module registers
``broken_sign_mm_p``: a copy of ``etp_mm`` whose ``xy_to_dw`` has the wrong
sign.  The test imports it lazily and takes it out of ``etp.primitives()``
again at teardown, so no other test meets it.
"""

import etp
from etp._src import dense

NAME = 'tests_broken_prims_sign_mm'


def _impl(x, weight, *bias, has_bias):
  # Defined here (not reused from etp._src.dense) so that the snippet knows
  # which module to import: it reads the impl's __module__.
  return dense._impl(x, weight, *bias, has_bias=has_bias)


def _xy_to_dw_wrong_sign(x, g, weights, *, has_bias):
  return {k: -v for k, v in
          dense._xy_to_dw(x, g, weights, has_bias=has_bias).items()}


_base = etp.rules_of(etp.etp_mm_p)
broken_sign_mm_p = etp.register_primitive(
    NAME, _impl, batched=True, trainable_invars_fn=dense._trainable)
broken_sign_mm_p.register_etp_rules(
    yw_to_w=_base.yw_to_w, xy_to_dw=_xy_to_dw_wrong_sign,
    init_drtrl=_base.init_drtrl, init_pp=_base.init_pp)
