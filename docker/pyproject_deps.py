"""pyproject.toml's dependencies for the image builds (docker/ray.Dockerfile).

    python pyproject_deps.py requirements pyproject.toml   # print [project].dependencies, one a line
    python pyproject_deps.py check pyproject.toml          # every one installed, in its range

`requirements` feeds `pip install -r`, so the images install the very list the project
declares. `check` runs at the end of the build: an exact pin (torch==2.14.1) must be met by the
installed version (a local label such as +cu130 or +cpu is allowed, as PEP 440 allows), and so
must every range. It needs only the standard library and `packaging` (a dependency of ray).
"""

import sys
import tomllib
from importlib import metadata


def dependencies(pyproject: str) -> list[str]:
    with open(pyproject, "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def check(pyproject: str) -> list[str]:
    """Problems with the installed distributions, one line each (empty: all satisfied)."""
    from packaging.requirements import Requirement

    problems = []
    for line in dependencies(pyproject):
        req = Requirement(line)
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name}: not installed (pyproject.toml: {line})")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            problems.append(f"{req.name}: {installed} installed, pyproject.toml asks {line}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("requirements", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    command, pyproject = argv
    if command == "requirements":
        print("\n".join(dependencies(pyproject)))
        return 0
    problems = check(pyproject)
    for problem in problems:
        print(f"pyproject_deps: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
