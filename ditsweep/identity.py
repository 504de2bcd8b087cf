"""`python -m ditsweep.identity SWEEP.yaml...`: the entry point; the code is ditsweep/sweep/distinct.py
(trial identities themselves: ditsweep/config/identity.py)."""

import sys

from ditsweep.sweep.distinct import main

if __name__ == "__main__":
    sys.exit(main())
