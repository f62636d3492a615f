"""``python -m etp_testing``: the same as the ``etp-check`` command."""

import sys

from etp_testing._src.cli import main

sys.exit(main())
