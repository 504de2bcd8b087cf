"""Evaluation jobs: what a trial asks for, and how one job is computed.

A job names a trial (its TrialConfig as a dict, which holds the data spec), the MLflow run, the
training step, whether it is the trial's final evaluation, which metrics to compute, and the
weights to evaluate (the EMA state dict, as a Ray object reference when sent to an actor).
`run_job` computes the metrics, writes the figures and uploads them to the run as artifacts,
and returns the numbers; the coordinator logs those to MLflow once the job has succeeded, so a
job re-run after its actor died never logs a value twice.

Metrics (each enabled and scheduled in the sweep's `eval:` section):

    psnr_gap   psnr_gap_mean at the training step; at the end also the curves psnr_train_t,
               psnr_test_t, psnr_gap_t (step = diffusion timestep) and psnr_gap.png
    fid        fid (torch-fidelity, samples vs min(N, reference_images) training images)
    attention  attn_distance_layer{i}, attn_mass3_layer{i}, attn_mass7_layer{i} (i = 1..depth)
               and attention/maps_*.png, attention/query_*.png; DiT only (UNets are skipped)
    jacobian   jacobian_top_eigenvalue_t{t}, jacobian_asymmetry_t{t}, the leading eigenvectors as
               jacobian/eigenvectors_*.png; at the end the series jacobian_eigenvalue_t{t}
               (step = rank, 0 = largest) and jacobian/eigenvectors_t{t}.pt; above 16x16 on GPU
               evaluators only
    samples    samples/samples_step*.png
    attention_pca  attention_pca/components.pt (Appendix C stage 1) and attention_pca_explained
"""

import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditsweep.config import EvalSettings, TrialConfig
from ditsweep.data import load_split, to_model_range
from ditsweep.eval import attention, fid, jacobian, samples
from ditsweep.eval.psnr_gap import plot_psnr_gap, psnr_gap
from ditsweep.models import build_model
from ditsweep.models.pca_attention import pca_shape

log = logging.getLogger(__name__)

METRICS = ("psnr_gap", "fid", "attention", "jacobian", "samples", "attention_pca")


def metrics_due(settings: EvalSettings, step: int, final: bool, n_train: int | None = None) -> list[str]:
    """The enabled metrics to compute at `step`: all of them at the end, otherwise those whose
    `every` divides the step. FID only for trials with N >= fid.min_n_train (the paper reports
    it at N = 10^4 and 10^5 only)."""
    due = []
    for name in METRICS:
        s = getattr(settings, name)
        if name == "fid" and n_train is not None and not s.due_for(n_train):
            continue
        if s.enabled and (final or (s.every and step % s.every == 0)):
            due.append(name)
    return due


@dataclass
class EvalJob:
    trial: dict          # TrialConfig.model_dump(): model, data spec, eval settings, tracking
    run_id: str          # the trial's MLflow run
    step: int            # training step of the weights
    final: bool
    metrics: list[str]
    weights: Any         # EMA state dict, or a Ray ObjectRef to one

    @property
    def name(self) -> str:
        return f"{self.trial['trial']}@{self.step}{' (final)' if self.final else ''}"


@dataclass
class EvalResult:
    step: int
    final: bool
    scalars: dict[str, float] = field(default_factory=dict)  # logged at the training step
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)  # own x-axis
    artifacts: list[str] = field(default_factory=list)       # already uploaded by the worker
    failures: dict[str, str] = field(default_factory=dict)   # metric -> reason
    seconds: dict[str, float] = field(default_factory=dict)  # metric -> wall time
    evaluator: dict[str, Any] = field(default_factory=dict)  # pid and host of the actor
    attempts: int = 1


def process_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def eval_model(cfg: TrialConfig, state_dict: dict, device: torch.device) -> torch.nn.Module:
    """The trial's architecture with the given weights, in eval mode."""
    # NATTEN's CPU build has no backward (the Jacobian needs one): on CPU use the PyTorch path.
    backend = cfg.train.attention_backend if device.type == "cuda" else "torch"
    model = build_model(cfg.model, image_size=cfg.data.resolution, in_channels=3,
                        layout=None if cfg.arch != "dit" else cfg.layout,
                        weight_sharing=cfg.variant == "weight-sharing", attention_backend=backend,
                        pca_attention=pca_shape(state_dict))  # None unless variant pca-attention
    model.load_state_dict(state_dict)
    return model.to(device).eval().requires_grad_(False)


class _Context:
    """What the metric functions share within one job: model, data (loaded on first use),
    samples already generated, the output folder and the MLflow client."""

    def __init__(self, job: EvalJob, cfg: TrialConfig, model: torch.nn.Module, device: torch.device,
                 out: Path, samples: dict[int, torch.Tensor] | None = None):
        self.job, self.cfg, self.model, self.device, self.out = job, cfg, model, device, out
        self._split = None
        self._samples: dict[int, torch.Tensor] = dict(samples or {})  # sampling steps -> images
        # eval.precision / gpu_batch_size / compile apply on CUDA only; the CPU path is float32
        gpu = device.type == "cuda"
        self.bf16 = gpu and cfg.eval.precision == "bf16"
        self.gpu_batch = cfg.eval.gpu_batch_size if gpu else None
        self.denoiser = torch.compile(model) if gpu and cfg.eval.compile else model  # PSNR gap, sampling

    @property
    def tag(self) -> str:
        return f"step{self.job.step:06d}"

    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (train, test) images of the trial: the same split its training used."""
        if self._split is None:
            cfg = self.cfg
            n_test = min(cfg.eval.psnr_gap.num_images, cfg.n_train) if cfg.eval.psnr_gap.enabled else 0
            self._split = load_split(cfg.dataset, cfg.data.resolution, cfg.n_train, n_test)
        return self._split

    def samples(self, count: int, steps: int, batch_size: int = 256) -> torch.Tensor:
        """`count` samples with `steps` sampling steps. FID runs first and the sample grid then
        shows the first of its samples instead of sampling again."""
        have = self._samples.get(steps)
        if have is None or len(have) < count:
            r = self.cfg.data.resolution
            have = samples.generate(self.denoiser, count, (3, r, r), steps, seed=self.cfg.seed,
                                    batch_size=self.gpu_batch or batch_size, bf16=self.bf16)
            self._samples[steps] = have
        return have[:count]

    def title(self) -> str:
        c = self.cfg
        return f"{c.trial}: {c.model} layout {c.layout} N={c.n_train}, step {self.job.step}"


def _psnr_gap(ctx: _Context, result: EvalResult) -> list[tuple[Path, str | None]]:
    s = ctx.cfg.eval.psnr_gap
    train_u8, test_u8 = ctx.split()
    k = len(test_u8)
    gap = psnr_gap(ctx.denoiser, to_model_range(train_u8[:k]), to_model_range(test_u8),
                   num_steps=s.steps, seed=ctx.cfg.seed, batch_size=ctx.gpu_batch or s.batch_size,
                   bf16=ctx.bf16)
    result.scalars["psnr_gap_mean"] = gap.mean_gap
    if not ctx.job.final:
        return []
    result.series["psnr_train_t"] = (gap.timesteps, gap.psnr_train)
    result.series["psnr_test_t"] = (gap.timesteps, gap.psnr_test)
    result.series["psnr_gap_t"] = (gap.timesteps, gap.gap)
    png = ctx.out / "psnr_gap.png"
    c = ctx.cfg
    plot_psnr_gap(gap, f"{c.trial}: {c.model} layout {c.layout} N={c.n_train}", str(png))
    return [(png, None)]


def _fid(ctx: _Context, result: EvalResult) -> list[tuple[Path, str | None]]:
    s = ctx.cfg.eval.fid
    train_u8, _ = ctx.split()
    n_ref = min(len(train_u8), s.reference_images)
    # The paper's reference set: M = min(N, 50k) training images, chosen at random when N > M.
    pick = np.sort(np.random.default_rng(0).permutation(len(train_u8))[:n_ref])
    reference = torch.from_numpy(train_u8[pick]).permute(0, 3, 1, 2).contiguous()
    generated = fid.to_uint8_rgb(ctx.samples(s.num_samples, s.sampling_steps, s.batch_size))
    key = f"{ctx.cfg.dataset}|{ctx.cfg.data.resolution}|{ctx.cfg.n_train}|{n_ref}"
    result.scalars["fid"] = fid.fid(generated, reference, s.feature_extractor_weights_path,
                                    batch_size=s.batch_size, cuda=ctx.device.type == "cuda",
                                    reference_key=key)
    return []


def _attention(ctx: _Context, result: EvalResult) -> list[tuple[Path, str | None]]:
    if ctx.cfg.arch != "dit":
        return []  # UNet attention is not over a token grid of the image: nothing to measure
    s = ctx.cfg.eval.attention
    train_u8, _ = ctx.split()
    images = to_model_range(train_u8[: s.num_images])
    measured = attention.measure(ctx.model, images, s.timesteps, seed=ctx.cfg.seed)
    for i, layer in enumerate(measured.locality, start=1):
        result.scalars[f"attn_distance_layer{i}"] = layer["distance"]
        result.scalars[f"attn_mass3_layer{i}"] = layer["mass3"]
        result.scalars[f"attn_mass7_layer{i}"] = layer["mass7"]
    files = []
    for t, maps in measured.examples.items():
        maps_png = ctx.out / f"maps_{ctx.tag}_t{t}.png"
        query_png = ctx.out / f"query_{ctx.tag}_t{t}.png"
        attention.plot_attention_maps(maps, ctx.model.layout, f"{ctx.title()}, t={t}", maps_png)
        attention.plot_query_attention(maps, ctx.model.grid, ctx.model.layout, f"{ctx.title()}, t={t}",
                                       query_png)
        files += [(maps_png, "attention"), (query_png, "attention")]
    return files


def _jacobian(ctx: _Context, result: EvalResult) -> list[tuple[Path, str | None]]:
    s = ctx.cfg.eval.jacobian
    r = ctx.cfg.data.resolution
    jacobian.check_resolution(r, r, ctx.device)  # the schema refuses > 16x16 on CPU evaluators
    train_u8, _ = ctx.split()
    x0 = to_model_range(train_u8[:1])[0]
    files = []
    for t in s.timesteps:
        # On the evaluator's device: a GPU computes the rows and the eigh of 32x32 images.
        jac = jacobian.denoiser_jacobian(ctx.model, x0, t, seed=ctx.cfg.seed, chunk=s.chunk)
        values, vectors = (v.cpu() for v in jacobian.eigendecomposition(jac))
        result.scalars[f"jacobian_top_eigenvalue_t{t}"] = values[0].item()
        result.scalars[f"jacobian_asymmetry_t{t}"] = jacobian.asymmetry(jac)
        if ctx.job.final:
            top = values[: s.num_eigenvalues].tolist()
            result.series[f"jacobian_eigenvalue_t{t}"] = (list(range(len(top))), top)
            # The leading eigenvectors as data, for the report's DiT-vs-UNet figure (Figs. 1, 3).
            pt = ctx.out / f"eigenvectors_t{t}.pt"
            k = s.num_eigenvectors
            top_vectors = vectors[:, :k].T.reshape(-1, *x0.shape).clone()  # [k, C, H, W]
            torch.save({"values": values[:k].clone(), "vectors": top_vectors, "timestep": t,
                        "step": ctx.job.step}, pt)
            files.append((pt, "jacobian"))
        png = ctx.out / f"eigenvectors_{ctx.tag}_t{t}.png"
        jacobian.plot_eigenvectors(values, vectors, tuple(x0.shape), s.num_eigenvectors,
                                   f"{ctx.title()}, t={t}", png)
        files.append((png, "jacobian"))
    return files


def _attention_pca(ctx: _Context, result: EvalResult) -> list[tuple[Path, str | None]]:
    """Stage 1 of Appendix C: principal components of the first blocks' attention maps on test
    images, saved as attention_pca/components.pt for stage-2 sweeps (inputs.pca_components)."""
    from ditsweep.eval import pca

    if ctx.cfg.arch != "dit":
        return []
    s, c = ctx.cfg.eval.attention_pca, ctx.cfg
    _, test_u8 = load_split(c.dataset, c.data.resolution, c.n_train, s.num_images)
    found = pca.attention_components(ctx.model, to_model_range(test_u8).to(ctx.device), s.steps,
                                     s.respaced, s.blocks, s.components, seed=c.seed)
    result.scalars["attention_pca_explained"] = float(found.explained.mean())
    path = ctx.out / "components.pt"
    pca.save(found, path, source=f"{c.trial} step {ctx.job.step}")
    png = ctx.out / f"components_{ctx.tag}.png"
    pca.plot_components(found, f"{ctx.title()}: attention PCs (Fig. 13)", png)
    return [(path, "attention_pca"), (png, "attention_pca")]


def _samples(ctx: _Context, result: EvalResult) -> list[tuple[Path, str | None]]:
    s = ctx.cfg.eval.samples
    png = ctx.out / f"samples_{ctx.tag}.png"
    samples.save_grid(ctx.samples(s.num_images, s.sampling_steps), png)
    return [(png, "samples")]


METRIC_FUNCTIONS = {"psnr_gap": _psnr_gap, "fid": _fid, "attention": _attention,
                    "jacobian": _jacobian, "samples": _samples, "attention_pca": _attention_pca}


def run_job(job: EvalJob, state_dict: dict, device: torch.device | None = None,
            presampled: dict[int, torch.Tensor] | None = None) -> EvalResult:
    """Compute a job's metrics and upload its figures to the trial's MLflow run.

    A metric that raises is recorded in `failures` with its reason and the others still run:
    a broken FID setup must not cost the PSNR gap. Numbers are returned, not logged.
    `presampled`: {sampling steps: images} already generated for this job (run_group_jobs).
    """
    from mlflow.tracking import MlflowClient

    from ditsweep.tracking.mlflow_runs import retrying

    device = device or torch.device("cpu")
    cfg = TrialConfig.model_validate(job.trial)
    model = eval_model(cfg, state_dict, device)
    result = EvalResult(step=job.step, final=job.final, evaluator=process_info())
    client = MlflowClient(cfg.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="ditsweep-eval-") as d:
        ctx = _Context(job, cfg, model, device, Path(d), presampled)
        for name in job.metrics:
            start = time.perf_counter()
            try:
                for path, folder in METRIC_FUNCTIONS[name](ctx, result):
                    retrying(lambda: client.log_artifact(job.run_id, str(path), folder), "artifact")
                    result.artifacts.append(f"{folder}/{path.name}" if folder else path.name)
            except Exception as e:  # recorded in the run; the trial goes on
                log.exception("evaluation %s of %s failed", name, job.name)
                result.failures[name] = f"{type(e).__name__}: {e}"
            result.seconds[name] = time.perf_counter() - start
    return result


def run_group_jobs(jobs: list[EvalJob], state_dicts: list[dict],
                   device: torch.device | None = None) -> list[EvalResult]:
    """The jobs of a fused group's members (one job each, same step): the FID samples of all
    members that need them are drawn at once (samples.generate_fused: one network call per
    sampler step for the whole group, each member with its own seeded noise, so its samples are
    those its own job would draw), then each job runs as `run_job` on them."""
    device = device or torch.device("cpu")
    cfgs = [TrialConfig.model_validate(j.trial) for j in jobs]
    need = [i for i, j in enumerate(jobs) if "fid" in j.metrics]
    presampled: list[dict[int, torch.Tensor]] = [{} for _ in jobs]
    # members with other sampling settings (or a lone one) sample in their own job
    alike = len({(cfgs[i].eval.fid.model_dump_json(), cfgs[i].eval.precision, cfgs[i].eval.gpu_batch_size)
                 for i in need}) == 1
    if len(need) > 1 and alike:
        c = cfgs[need[0]].eval.fid
        models = [eval_model(cfgs[i], state_dicts[i], device) for i in need]
        r, gpu = cfgs[need[0]].data.resolution, device.type == "cuda"
        drawn = samples.generate_fused(
            models, c.num_samples, (3, r, r), c.sampling_steps, [cfgs[i].seed for i in need],
            # per member, as its own job would batch (the noise it draws depends on it): the
            # network sees len(need) x this many images per call
            batch_size=cfgs[need[0]].eval.gpu_batch_size if gpu else c.batch_size,
            bf16=gpu and cfgs[need[0]].eval.precision == "bf16")
        for i, images in zip(need, drawn):
            presampled[i] = {c.sampling_steps: images}
        del models
    return [run_job(j, sd, device, p) for j, sd, p in zip(jobs, state_dicts, presampled)]
