"""Sweep files: the YAML schema, its validation, and the expansion of the grid into trials.

A sweep YAML is data. Everything in it is checked here before any trial starts, and every
problem is reported as `FILE: FIELD: what is wrong (value)` so a researcher can fix it at once.
"""

import difflib
import itertools
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator

from ditsweep.data import dataset_size, parse_dataset_uri
from ditsweep.models import PRESETS, LayoutError, layout_to_str, resolve_layout
from ditsweep.weights import INCEPTION_ENV, check_weights_path


class SpecError(Exception):
    """A sweep file is invalid. The message names the file, the field and the value."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Grid(Strict):
    """The axes whose cartesian product makes the trials."""
    model: list[str] = Field(min_length=1)
    layout: list[str | list[int | str]] = ["global"]
    # weight-sharing: Appendix C's blocks 2, 4 reuse blocks 1, 3; pca-attention: the first blocks
    # compose their maps from another trial's principal components (Eq. 7, see `inputs`)
    variant: list[Literal["standard", "weight-sharing", "pca-attention"]] = ["standard"]
    n_train: list[int] = Field(min_length=1)
    seed: list[int] = [0]
    dataset: list[str] = ["builtin:photos"]
    lr: list[PositiveFloat] | None = None  # overrides train.lr per trial when given


class DataSettings(Strict):
    resolution: int = Field(32, gt=0)
    # Stream the training shards through a shuffle buffer instead of holding the training set
    # in memory: for sets larger than RAM. A resumed trial then sees other batches than it
    # would have (the in-memory default resumes exactly).
    stream: bool = False
    shuffle_buffer: int = Field(1000, gt=0)
    loader_workers: int = Field(0, ge=0)


class TrainSettings(Strict):
    steps: int = Field(gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-4, gt=0)
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    log_every: int = Field(50, gt=0)
    checkpoint_every: int = Field(1000, gt=0)
    checkpoints_to_keep: int = Field(2, gt=0)
    # auto: NATTEN's fused kernels on CUDA when libnatten is built, else the fastest exact
    # fallback (see ditsweep.models.attention.choose_local_kernel); flex: compiled FlexAttention
    attention_backend: Literal["auto", "torch", "natten", "flex"] = "auto"
    # tf32: fp32 tensors, TF32 tensor-core matmuls/convs (the reference DiT code; the paper's runs);
    # fp32: TF32 off everywhere; bf16: autocast to bfloat16 (fastest, drifts from the paper)
    precision: Literal["tf32", "fp32", "bf16"] = "fp32"
    compile: bool = False  # torch.compile the model (worth it on GPU only)


class PsnrGapSettings(Strict):
    enabled: bool = True
    num_images: int = Field(300, gt=0)  # K; the trial uses min(K, N)
    steps: int = Field(50, gt=0)        # S respaced timesteps
    every: int = Field(0, ge=0)         # also evaluate every this many steps (0: at the end only)
    batch_size: int = Field(256, gt=0)


class FidSettings(Strict):
    """FID (torch-fidelity) of samples from the EMA weights vs min(N, reference_images) training
    images. Off by default: it needs a local InceptionV3 weights file and is slow on a CPU."""
    enabled: bool = False
    num_samples: int = Field(50000, gt=1)          # generated images
    sampling_steps: int = Field(250, gt=0)         # respaced sampler steps (paper: 250)
    reference_images: int = Field(50000, gt=1)     # the trial uses min(N, this) training images
    batch_size: int = Field(256, gt=0)             # for sampling and for the Inception network
    every: int = Field(0, ge=0)                    # also every this many steps (0: at the end only)
    min_n_train: int = Field(0, ge=0)              # only trials with N >= this (paper: 10^4)
    # Local path or file:// URI of torch-fidelity's weights-inception-2015-12-05-6726825d.pth;
    # default $DITSWEEP_INCEPTION_WEIGHTS (set by the Docker images). Never downloaded.
    feature_extractor_weights_path: str | None = Field(None, validate_default=True)

    def due_for(self, n_train: int) -> bool:
        """Whether a trial of `n_train` training images computes FID (the paper: N >= 10^4)."""
        return self.enabled and n_train >= self.min_n_train

    @field_validator("feature_extractor_weights_path")
    @classmethod
    def _weights_file(cls, value: str | None, info) -> str | None:
        value = value or os.environ.get(INCEPTION_ENV) or None
        # A dry run (load_sweep(check_data=False)) plans on a machine without the weights file.
        if info.data.get("enabled") and (info.context or {}).get("check_files", True):
            check_weights_path(value)  # ValueError naming eval.fid.feature_extractor_weights_path
        return value


class AttentionSettings(Strict):
    """Attention maps and locality of every DiT block (UNets are skipped)."""
    enabled: bool = True
    num_images: int = Field(8, gt=0)                # noisy training images per timestep
    timesteps: list[int] = Field([100, 500, 900], min_length=1)  # original diffusion timesteps
    every: int = Field(0, ge=0)

    @field_validator("timesteps")
    @classmethod
    def _in_range(cls, value: list[int]) -> list[int]:
        return _check_timesteps(value)


class JacobianSettings(Strict):
    """Eigenvectors of the denoiser's Jacobian (Figs. 1, 3). On CPU evaluators (actors.gpus: 0)
    images up to 16x16; on GPU evaluators 32x32 and larger, as memory allows."""
    enabled: bool = False
    chunk: int | None = Field(None, gt=0)           # rows per backward pass; None: from free memory
    timesteps: list[int] = Field([100], min_length=1)
    num_eigenvalues: int = Field(64, gt=0)          # logged as the series jacobian_eigenvalue_t{t}
    num_eigenvectors: int = Field(16, gt=0)         # shown in the image grid
    every: int = Field(0, ge=0)

    @field_validator("timesteps")
    @classmethod
    def _in_range(cls, value: list[int]) -> list[int]:
        return _check_timesteps(value)


def _check_timesteps(value: list[int]) -> list[int]:
    bad = [t for t in value if not 0 <= t < 1000]
    if bad:
        raise ValueError(f"timesteps must lie in 0..999 (the training diffusion's steps), not {bad}")
    return value


class SampleSettings(Strict):
    """A grid of generated samples per evaluation."""
    enabled: bool = True
    num_images: int = Field(16, gt=0)
    sampling_steps: int = Field(250, gt=0)
    every: int = Field(0, ge=0)


class AttentionPcaSettings(Strict):
    """Stage 1 of Appendix C's PCA attention: principal components of the attention maps of the
    first `blocks` blocks, on `num_images` test images noised to respaced `steps` of `respaced`;
    stored as the artifact attention_pca/components.pt of the trial's run (DiT only)."""
    enabled: bool = False
    num_images: int = Field(2048, gt=0)
    steps: list[int] = Field([10, 25, 40], min_length=1)
    respaced: int = Field(50, gt=0)
    blocks: int = Field(3, gt=0)
    components: int = Field(50, gt=0)
    every: int = Field(0, ge=0)


class ArtifactInput(Strict):
    """An artifact of another sweep's trial that this sweep needs (a sweep refuses to start
    while it is missing)."""
    experiment: str                 # the MLflow experiment of the sweep that made it
    trial: str                      # that sweep's trial name, e.g. 000_DiT-XS-1_global_N100000_s43
    artifact: str                   # path in the trial's run, e.g. attention_pca/components.pt


class EvalActorSettings(Strict):
    """The pool of evaluation actors. `cpus: 0` reserves nothing, so on a laptop the actors share
    the trials' cores and can never keep a trial from being scheduled; on a cluster reserve real
    CPUs or a GPU fraction so Tune fits the trials into what is left."""
    count: int = Field(2, gt=0)
    cpus: float = Field(0, ge=0)
    gpus: float = Field(0, ge=0)
    max_retries: int = Field(2, ge=0)               # re-runs of a job whose actor died or hung
    # A job's deadline: max(deadline_min_s, deadline_scale x its estimated time, from its images,
    # steps and metrics; see ditsweep/eval/deadline.py); past it the actor is killed and replaced.
    # 0 turns deadlines off.
    deadline_scale: float = Field(3.0, ge=0)
    deadline_min_s: float = Field(300.0, gt=0)


class EvalSettings(Strict):
    use_ema: bool = True
    psnr_gap: PsnrGapSettings = PsnrGapSettings()
    fid: FidSettings = Field(default_factory=FidSettings)
    attention: AttentionSettings = AttentionSettings()
    jacobian: JacobianSettings = JacobianSettings()
    samples: SampleSettings = SampleSettings()
    attention_pca: AttentionPcaSettings = AttentionPcaSettings()
    actors: EvalActorSettings = EvalActorSettings()


class Resources(Strict):
    cpus_per_trial: float = Field(1, gt=0)
    gpus_per_trial: float = Field(0, ge=0)
    max_concurrent_trials: int = Field(0, ge=0)  # 0: as many as the resources allow
    max_failures: int = Field(2, ge=0)  # restarts of a crashed trial, each from its last checkpoint
    steps_per_second: float | None = Field(None, gt=0)  # measured speed, for --dry-run's estimate
    # GPU model the trials run on (e.g. "NVIDIA H100 80GB HBM3"): picks --dry-run's calibration file
    gpu: str | None = None


class Tracking(Strict):
    uri: str | None = None         # default: $MLFLOW_TRACKING_URI, else ./mlflow.db
    experiment: str | None = None  # default: the sweep name


class Sweep(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    grid: Grid
    # More grids whose products are added to grid's: for a sweep that is not one product, e.g.
    # Table 5 (global, local, and global with weight sharing or PCA attention; no local+sharing)
    include: list[Grid] = []
    data: DataSettings = DataSettings()
    train: TrainSettings
    eval: EvalSettings = EvalSettings()
    resources: Resources = Resources()
    tracking: Tracking = Tracking()
    storage_path: str | None = None  # Tune storage; default ./ray_results
    # Artifacts of other sweeps' trials, by role: `pca_components` (variant pca-attention)
    inputs: dict[Literal["pca_components"], ArtifactInput] = {}

    @field_validator("name")
    @classmethod
    def _no_spaces(cls, v: str) -> str:
        return v.strip()


class TrialConfig(Strict):
    """One fully resolved trial: everything the trainable needs, and what MLflow records."""
    sweep: str
    trial: str
    model: str
    arch: str
    layout_name: str
    layout: str  # e.g. "3,5,7,G,G,G"; "-" for a UNet
    variant: str
    n_train: int
    seed: int
    dataset: str
    data: DataSettings
    train: TrainSettings
    eval: EvalSettings
    resources: Resources
    tracking_uri: str
    experiment: str
    parent_run_id: str | None = None
    inputs: dict[str, ArtifactInput] = {}
    # Set by ditsweep.run: the trial identity (ditsweep.identity) and the sweep's storage path,
    # under which the trial keeps its checkpoints (ditsweep.checkpoints).
    identity: str | None = None
    storage: str | None = None
    reuse: bool = True  # False (--no-reuse): train even when a twin trained or trains it


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
