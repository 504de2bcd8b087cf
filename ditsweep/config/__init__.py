"""The sweep file and its trials: what every other layer agrees a sweep is.

    schema.py    the YAML's schema (pydantic) and TrialConfig, one resolved trial
    load.py      reading a sweep file, `FILE: FIELD: problem (value)` errors, grid expansion
    identity.py  a trial's identity: the hash of everything that decides its trained weights
    weights.py   local weight files a sweep names (InceptionV3 for FID), never downloaded

The driver (ditsweep/sweep/) loads and expands sweeps; the trials (ditsweep/train/), the
evaluation actors (ditsweep/eval/) and the benches read TrialConfigs.
"""

from ditsweep.config.load import expand, load_sweep, resolve_tracking_uri
from ditsweep.config.schema import (
                                  ArtifactInput,
                                  DataSettings,
                                  EvalActorSettings,
                                  EvalSettings,
                                  SpecError,
                                  Sweep,
                                  TrainSettings,
                                  TrialConfig,
)

__all__ = ["ArtifactInput", "DataSettings", "EvalActorSettings", "EvalSettings", "SpecError", "Sweep",
           "TrainSettings", "TrialConfig", "expand", "load_sweep", "resolve_tracking_uri"]
