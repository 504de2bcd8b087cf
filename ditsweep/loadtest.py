"""`python -m ditsweep.loadtest`: the entry point; the code is ditsweep/bench/mlflow_load.py."""

import sys

from ditsweep.bench.mlflow_load import main

if __name__ == "__main__":
    sys.exit(main())
