"""etp: eligibility-trace-propagation primitives for online learning in JAX.

An ETP primitive is a JAX primitive plus the rules an eligibility-trace compiler
composes (D-RTRL, pp-prop).  See the README for the rule contract.
"""

from etp._src.dense import etp_mm_p, etp_mv_p, matmul
from etp._src.primitive import ETPPrimitive, register_primitive
from etp._src.registry import EtpRules, is_etp_primitive, primitives, rules_of

__all__ = [
    'ETPPrimitive', 'EtpRules', 'register_primitive', 'primitives', 'rules_of',
    'is_etp_primitive',
    'etp_mv_p', 'etp_mm_p', 'matmul',
]
__version__ = '0.1.0'
