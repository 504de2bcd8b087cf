"""`python -m ditsweep.report EXPERIMENT`: see ditsweep.report."""

import sys

from ditsweep.report import main

sys.exit(main())
