"""The check battery: one module per group of checks, registered on import.

Run order is import order below, then definition order inside each module.
"""

from etp_testing._src.checks import registry
from etp_testing._src.checks import xy_to_dw
from etp_testing._src.checks import yw_to_w
from etp_testing._src.checks import init
from etp_testing._src.checks import drtrl
from etp_testing._src.checks import primitive
from etp_testing._src.checks import device
from etp_testing._src.checks import units

__all__ = ['registry']
