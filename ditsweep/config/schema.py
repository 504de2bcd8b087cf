"""The sweep file's schema: every section and field a sweep YAML may hold, and the resolved
config of one trial (`TrialConfig`), which the driver hands to each Tune trial.

A sweep YAML is data. pydantic checks every field here; ditsweep/config/load.py reads the file,
turns pydantic's errors into `FILE: FIELD: what is wrong (value)` lines and expands the grid.
"""

import os
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator

from ditsweep.config.weights import INCEPTION_ENV, check_weights_path


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
    # On CUDA evaluators only (CPU evaluators always run float32 at the metrics' batch sizes):
    # precision bf16 runs the denoiser of the PSNR gap and of FID/sample-grid sampling under
    # bfloat16 autocast (within 0.01 dB of fp32 on a tiny DiT, tests/test_psnr_gap.py; not yet
    # measured at paper scale); gpu_batch_size images per network call there (per member: a fused
    # group's FID sampling calls the network on k times as many); compile: torch.compile the
    # denoiser (pays off for FID's 50k samples x 250 steps, not for one PSNR gap).
    precision: Literal["fp32", "bf16"] = "fp32"
    gpu_batch_size: int = Field(512, gt=0)
    compile: bool = False
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
    # Trials trained as one process holding k member models (ditsweep/train/fused.py): trials
    # that differ only in N, seed or dataset are grouped up to k; 1 trains each trial alone;
    # "auto": the k with the most trial-steps/s in the calibration file (1 without one)
    fuse: Annotated[int, Field(ge=1)] | Literal["auto"] = 1


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
    # Set by the driver (ditsweep/sweep/): the trial identity (ditsweep/config/identity.py) and the
    # sweep's storage path, under which the trial keeps its checkpoints (train/checkpoints.py).
    identity: str | None = None
    storage: str | None = None
    reuse: bool = True  # False (--no-reuse): train even when a twin trained or trains it
