"""Local weight files that a sweep names: checked when the sweep is validated, read by the
evaluations. Nothing is downloaded at run time, so a missing file must stop a sweep before it
starts, with the setting named.
"""

from pathlib import Path
from urllib.parse import unquote, urlparse

INCEPTION_ENV = "DITSWEEP_INCEPTION_WEIGHTS"
SETTING = "eval.fid.feature_extractor_weights_path"


def weights_file(value: str | None) -> Path:
    """The local file a weights setting names (a path or a file:// URI). Raises ValueError naming
    the setting when it is unset, not local, or missing."""
    path, problem = _resolve(value)
    if problem:
        raise ValueError(f"{SETTING}: {problem}")
    return path


def check_weights_path(value: str | None) -> None:
    """For the sweep schema's validator, which names the setting itself."""
    _, problem = _resolve(value)
    if problem:
        raise ValueError(problem)


def _resolve(value: str | None) -> tuple[Path | None, str | None]:
    if not value:
        return None, (f"not set, and ${INCEPTION_ENV} is empty: FID needs a local copy of "
                      f"torch-fidelity's InceptionV3 weights (weights-inception-2015-12-05-6726825d.pth); "
                      f"nothing is downloaded at run time")
    parsed = urlparse(value)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:  # "C:" is a drive, not a scheme
        return None, (f"{value!r} is a {parsed.scheme}:// URI; only local paths and file:// URIs are "
                      f"supported (put the weights on the node, e.g. in the Docker image)")
    else:
        path = Path(value).expanduser()
    if not path.is_file():
        return None, f"InceptionV3 weights file {str(path)!r} does not exist"
    return path, None
