"""Sweep files: reading, validation and the expansion of the grid into trials.

Everything in a sweep file is checked here before any trial starts, and every problem is reported
as `FILE: FIELD: what is wrong (value)` so a researcher can fix it at once. The schema itself is
ditsweep/config/schema.py.
"""

import difflib
import itertools
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ditsweep.config.schema import SpecError, Sweep, TrialConfig
from ditsweep.data import dataset_size, parse_dataset_uri
from ditsweep.models import PRESETS, LayoutError, layout_to_str, resolve_layout


def load_sweep(path: str | Path, check_data: bool = True) -> Sweep:
    """Read and validate a sweep file (schema, then every trial it expands to).

    With check_data=False datasets are not opened (a dry run needs no S3 credentials)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such sweep file") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a sweep file must be a mapping of fields, got {type(raw).__name__}")
    try:
        sweep = Sweep.model_validate(_expand_env(raw, path, ()), context={"check_files": check_data})
    except ValidationError as e:
        raise SpecError(_explain(path, e)) from None
    _check_eval(sweep, path)
    expand(sweep, path, check_data)  # checks presets, layouts, datasets and N for every trial
    return sweep


def expand(sweep: Sweep, path: str | Path = "<sweep>", check_data: bool = True) -> list[TrialConfig]:
    """The grid's cartesian product, then each `include` grid's, as trial configs (UNets ignore
    the layout axis; a trial in several products is kept once)."""
    tracking_uri = resolve_tracking_uri(sweep.tracking.uri)
    trials, seen = [], set()
    grids = [sweep.grid, *sweep.include]
    all_lrs = {lr for g in grids for lr in (g.lr or [sweep.train.lr])}
    all_datasets = {d for g in grids for d in g.dataset}
    for model, layout, variant, dataset, lr, n_train, seed in (
            p for g in grids for p in itertools.product(
                g.model, g.layout, g.variant, g.dataset, g.lr or [sweep.train.lr], g.n_train, g.seed)):
        arch, layout_name, layout_str = _resolve_model(path, model, layout, sweep.data.resolution)
        key = (model, layout_str, variant, dataset, lr, n_train, seed)
        if key in seen:  # a UNet repeated once per layout of the grid
            continue
        seen.add(key)
        _check_dataset(path, dataset, n_train, sweep, check_data)
        if variant == "pca-attention" and (arch != "dit" or "pca_components" not in sweep.inputs):
            raise SpecError(f"{path}: grid.variant: 'pca-attention' needs a DiT preset (not {model!r}) "
                            "and inputs.pca_components (stage 1's artifact)")
        if variant == "pca-attention" and set(layout_str.split(",")[:3]) != {"G"}:
            raise SpecError(f"{path}: grid.layout: 'pca-attention' composes the maps of the first "
                            f"three blocks, which must be global, not {layout_str!r}")
        if variant == "weight-sharing" and arch != "dit":
            raise SpecError(f"{path}: grid.variant: 'weight-sharing' applies to DiT presets only, "
                            f"not {model!r}")
        name_parts = [model.replace("/", "-"), layout_name, variant if variant != "standard" else "",
                      _dataset_tag(dataset) if len(all_datasets) > 1 else "",
                      f"lr{lr:g}" if len(all_lrs) > 1 else "", f"N{n_train}", f"s{seed}"]
        trials.append(TrialConfig(
            sweep=sweep.name, trial=f"{len(trials):03d}_" + "_".join(p for p in name_parts if p),
            model=model, arch=arch, layout_name=layout_name, layout=layout_str, variant=variant,
            n_train=n_train, seed=seed, dataset=dataset, data=sweep.data,
            train=sweep.train.model_copy(update={"lr": lr}),
            eval=sweep.eval, resources=sweep.resources, tracking_uri=tracking_uri,
            inputs=sweep.inputs if variant == "pca-attention" else {},
            experiment=sweep.tracking.experiment or sweep.name))
    return trials


JACOBIAN_CPU_MAX_RESOLUTION = 16  # 768 backward passes and a 768x768 eigh at 16x16 RGB


def _check_eval(sweep: Sweep, path) -> None:
    """Limits that depend on several sections: a Jacobian above 16x16 needs GPU evaluators
    (3072 backward passes at 32x32 take too long on a CPU)."""
    r, e = sweep.data.resolution, sweep.eval
    if e.jacobian.enabled and not e.actors.gpus and r > JACOBIAN_CPU_MAX_RESOLUTION:
        raise SpecError(f"{path}: eval.jacobian.enabled: Jacobians of {r}x{r} images need GPU "
                        f"evaluators (eval.actors.gpus > 0); on CPU the limit is "
                        f"{JACOBIAN_CPU_MAX_RESOLUTION}x{JACOBIAN_CPU_MAX_RESOLUTION} (data.resolution: {r})")


def resolve_tracking_uri(configured: str | None) -> str:
    """YAML value, else $MLFLOW_TRACKING_URI, else a SQLite store in the working directory."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _resolve_model(path, model: str, layout, resolution: int) -> tuple[str, str, str]:
    if model not in PRESETS:
        raise SpecError(f"{path}: grid.model: unknown preset {model!r}; known: "
                        + ", ".join(sorted(PRESETS)))
    preset = PRESETS[model]
    if preset["arch"] != "dit":
        return preset["arch"], "unet", "-"
    grid = resolution // preset["patch_size"]
    try:
        resolved = resolve_layout(layout, preset["depth"], grid)
    except LayoutError as e:
        raise SpecError(f"{path}: grid.layout: {e} (model {model}, {grid}x{grid} token grid)") from None
    name = layout if isinstance(layout, str) and "," not in layout else "custom"
    return "dit", name, layout_to_str(resolved)


def _check_dataset(path, uri: str, n_train: int, sweep: Sweep, check_data: bool) -> None:
    try:
        parse_dataset_uri(uri)
        if not check_data:
            return
        size = dataset_size(uri, sweep.data.resolution)
    except ValueError as e:
        raise SpecError(f"{path}: grid.dataset: {e}") from None
    n_test = min(sweep.eval.psnr_gap.num_images, n_train) if sweep.eval.psnr_gap.enabled else 0
    if n_train < 1 or n_train + n_test > size:
        raise SpecError(f"{path}: grid.n_train: {n_train} is larger than dataset {uri!r} allows "
                        f"({size} images, of which {n_test} are kept for testing)")


def _dataset_tag(uri: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", uri.rstrip("/").split("/")[-1].split(":")[-1]).strip("-")


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, path, loc: tuple) -> Any:
    """Replace ${VAR} (or ${VAR:-default}) in strings by the environment variable; an unset
    variable without a default is an error."""
    if isinstance(value, dict):
        return {k: _expand_env(v, path, loc + (k,)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, path, loc + (i,)) for i, v in enumerate(value)]
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group(1) not in os.environ and m.group(2) is not None:
                return m.group(2)
            if m.group(1) not in os.environ:
                raise SpecError(f"{path}: {_loc(loc)}: environment variable {m.group(1)} is not set "
                                f"(value {value!r})")
            return os.environ[m.group(1)]
        return _ENV.sub(sub, value)
    return value


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not isinstance(p, int)) + "".join(
        f"[{p}]" for p in loc[-1:] if isinstance(p, int))


def _explain(path, error: ValidationError) -> str:
    """Turn pydantic's errors into `FILE: FIELD: problem` lines, with spelling suggestions."""
    lines = []
    for err in error.errors():
        loc = tuple(p for p in err["loc"] if not str(p).startswith(("function-", "str", "list[")))
        where = _loc(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = _model_at(Sweep, loc[:-1])
            known = sorted(parent.model_fields) if parent else []
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            lines.append(f"{path}: {where}: unknown key"
                         + (f" (did you mean {'.'.join(map(str, loc[:-1] + (hint[0],)))!r}?)" if hint
                            else f"; allowed here: {', '.join(known)}"))
        elif err["type"] == "missing":
            lines.append(f"{path}: {where}: required field is missing")
        else:
            lines.append(f"{path}: {where}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(dict.fromkeys(lines))


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type)
                                 and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model
