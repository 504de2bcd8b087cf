"""`python -m ditsweep.run SWEEP.yaml`: the entry point; the driver is ditsweep/sweep/."""

import sys

from ditsweep.sweep.main import main

if __name__ == "__main__":
    sys.exit(main())
