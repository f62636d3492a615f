"""etp: eligibility-trace-propagation primitives for online learning in JAX.

An ETP primitive is a JAX primitive plus the rules an eligibility-trace compiler
composes (D-RTRL, pp-prop).  See the README for the rule contract.
"""

from etp._src.primitive import ETPPrimitive, register_primitive
from etp._src.registry import EtpRules, is_etp_primitive, primitives, rules_of

from etp._src.dense import etp_mm_p, etp_mv_p, matmul
from etp._src.elemwise import etp_elemwise_p, element_wise
from etp._src.sparse import etp_sp_mm_p, etp_sp_mv_p, sparse_matmul
from etp._src.conv import etp_conv_p, conv
from etp._src.lora import etp_lora_mm_p, etp_lora_mv_p, lora_matmul
from etp import rule_util

__all__ = [
    'ETPPrimitive', 'EtpRules', 'register_primitive', 'primitives', 'rules_of',
    'is_etp_primitive', 'rule_util',
    'etp_elemwise_p', 'element_wise',
    'etp_mv_p', 'etp_mm_p', 'matmul',
    'etp_sp_mv_p', 'etp_sp_mm_p', 'sparse_matmul',
    'etp_conv_p', 'conv',
    'etp_lora_mv_p', 'etp_lora_mm_p', 'lora_matmul',
]
__version__ = '0.1.0'
