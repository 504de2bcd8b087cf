"""The training loop of one trial, free of Ray and MLflow so it can be tested on its own.

One `Trainer` holds everything a checkpoint must restore for an exact resume: model, EMA copy,
optimizer, step, and the generator that draws batches, timesteps and noise. On CPU the same seed
gives the same loss sequence, with or without a checkpoint/restore in between.

On a GPU a step never waits for the device: batches, timesteps and noise are drawn there by a
generator on the training device, losses are summed there, and the host reads them (and checks
that they are finite) every `log_every` steps through `read_loss`.
"""

import copy
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ditsweep.config import TrialConfig
from ditsweep.diffusion import create_diffusion
from ditsweep.models import build_model, set_pca_components
from ditsweep.models.attention import choose_local_kernel, has_libnatten, prepare_flex
from ditsweep.models.presets import has_local_blocks
from ditsweep.train.gpu import compile_model, precision_scope

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the trial cannot continue."""


def pick_device(gpus: float) -> torch.device:
    return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")


def build_trial_model(cfg: TrialConfig, device: torch.device,
                      pca: torch.Tensor | None = None) -> tuple[torch.nn.Module, dict[str, str]]:
    """The trial's model, initialised from its seed exactly as every run of the trial does, and
    the MLflow tags that say which local attention kernel it uses (and why, after a fallback)."""
    tags: dict[str, str] = {}
    kernel, note = choose_local_kernel(cfg.train.attention_backend, device.type, cfg.train.precision,
                                       device.type == "cuda" and has_libnatten())
    if has_local_blocks(cfg.layout):
        if note:  # once per trial: the trial's log and an MLflow tag
            log.warning("trial %s: %s", cfg.trial, note)
            tags["ditsweep.attention_fallback"] = note
        tags["ditsweep.local_attention_kernel"] = kernel
    else:  # all-global or a UNet: no neighborhood blocks, so no kernel to choose
        kernel = "torch"
    torch.manual_seed(cfg.seed)  # model initialisation
    model = build_model(cfg.model, image_size=cfg.data.resolution, in_channels=3,
                        layout=None if cfg.arch != "dit" else cfg.layout,
                        weight_sharing=cfg.variant == "weight-sharing",
                        attention_backend=kernel,
                        pca_attention=None if pca is None else tuple(pca.shape[:2])).to(device)
    if pca is not None:
        set_pca_components(model, pca)
    if kernel == "flex" and hasattr(model, "grid"):
        prepare_flex(model, model.grid, device)  # masks built before compile
    return model, tags


class Trainer:
    def __init__(self, cfg: TrialConfig, train_images: torch.Tensor | None,
                 device: torch.device | None = None, pca: torch.Tensor | None = None):
        """`train_images` float [N, C, H, W] in [-1, 1]; None when batches are streamed: then set
        `self.batches` to an iterator of such batches before training. `pca`: stage 1's
        [blocks, K, N, N] components for a pca-attention trial (Appendix C stage 2)."""
        self.cfg = cfg
        self.device = device or pick_device(cfg.resources.gpus_per_trial)
        self.precision = cfg.train.precision
        self.model, self.tags = build_trial_model(cfg, self.device, pca)  # tags: see pop_tags
        # EMA starts as an exact copy and is updated after every step (as the reference DiT).
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self._ema_params, self._params = list(self.ema.parameters()), list(self.model.parameters())
        # fused AdamW on CUDA: one kernel for all parameters (CPU keeps torch's default)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, weight_decay=0.0,
                                     fused=True if self.device.type == "cuda" else None)
        self.diffusion = create_diffusion()
        # compiled with a per-node cache: the trials of one node compile a model once
        self.forward = compile_model(self.model) if cfg.train.compile else self.model
        self.images = train_images.to(self.device) if train_images is not None else None
        self.batches: Iterator[torch.Tensor] | None = None
        # One generator, on the training device, for batches, timesteps and noise: its state goes
        # into the checkpoint. On CPU it draws the same numbers as before the GPU work.
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.step = 0
        self.first_step_seconds: float | None = None
        self._reset_window()

    def _reset_window(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_count = 0
        self._bad_step = torch.zeros((), dtype=torch.long, device=self.device)  # 0: none yet
        self._bad_loss = torch.zeros((), device=self.device)

    def train_step(self) -> torch.Tensor:
        """One optimisation step; returns the loss, a 0-d tensor on the training device (reading
        it is the caller's host sync). A NaN/inf loss raises TrainingDiverged at the next check
        (every log_every steps, read_loss, save), naming the first step where it happened."""
        first = self.first_step_seconds is None
        started = time.perf_counter()
        if self.batches is not None:
            x0 = next(self.batches).to(self.device, non_blocking=True)
        else:
            idx = torch.randint(len(self.images), (self.cfg.train.batch_size,), generator=self.gen,
                                device=self.device)
            x0 = self.images[idx]
        t = torch.randint(self.diffusion.num_timesteps, (len(x0),), generator=self.gen, device=self.device)
        noise = torch.randn(x0.shape, generator=self.gen, device=self.device)
        with precision_scope(self.precision), torch.autocast(
                self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            losses = self.diffusion.training_losses(self.forward, x0, t, noise=noise)
            loss = losses["loss"].float().mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        self._update_ema()
        self.step += 1
        loss = loss.detach()
        self._track(loss)
        if first:  # includes torch.compile's first compilation; one sync, once per process
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.first_step_seconds = time.perf_counter() - started
            self.tags["ditsweep.first_step_s"] = f"{self.first_step_seconds:.2f}"
            log.info("trial %s: first step took %.2f s", self.cfg.trial, self.first_step_seconds)
        if self.step % self.cfg.train.log_every == 0:
            self._check_finite()
        return loss

    def _track(self, loss: torch.Tensor) -> None:
        """Sum the loss and remember the first non-finite one, all on the device."""
        first_bad = (self._bad_step == 0) & ~torch.isfinite(loss)
        self._bad_step = torch.where(first_bad, self.step, self._bad_step)
        self._bad_loss = torch.where(first_bad, loss, self._bad_loss)
        self._loss_sum = self._loss_sum + loss
        self._loss_count += 1

    def _check_finite(self) -> None:
        bad_step = self._bad_step.item()  # the host sync of a check
        if bad_step:
            raise TrainingDiverged(f"training diverged: loss is {self._bad_loss.item()} at step "
                                   f"{bad_step} (trial {self.cfg.trial}, lr {self.cfg.train.lr})")

    def read_loss(self) -> float:
        """Mean loss of the steps since the last read (one host sync); raises TrainingDiverged if
        any of them was NaN/inf."""
        self._check_finite()
        mean = (self._loss_sum / self._loss_count).item() if self._loss_count else float("nan")
        self._reset_window()
        return mean

    def pop_tags(self) -> dict[str, str]:
        """Tags for the trial's MLflow run that appeared since the last call (local attention
        kernel, fallback note, first-step time); empty on most steps."""
        tags, self.tags = self.tags, {}
        return tags

    @torch.no_grad()
    def _update_ema(self) -> None:
        torch._foreach_lerp_(self._ema_params, self._params, 1.0 - self.cfg.train.ema_decay)

    def eval_model(self) -> torch.nn.Module:
        return self.ema if self.cfg.eval.use_ema else self.model

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(), "step": self.step,
                "gen": self.gen.get_state(), "gen_device": self.device.type,
                "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.step = state["step"]
        # Generator states are CPU byte tensors whatever the device (map_location may have moved
        # them). A CUDA generator's state does not fit a CPU one: a trial resumed on another kind
        # of device reseeds from (seed, step) instead, so it goes on, no longer bit-identical.
        if state.get("gen_device", "cpu") == self.device.type:
            self.gen.set_state(state["gen"].cpu())
        else:
            log.warning("trial %s: checkpoint drawn on %s, resumed on %s: data order reseeded",
                        self.cfg.trial, state.get("gen_device", "cpu"), self.device.type)
            self.gen.manual_seed(self.cfg.seed * 1_000_003 + self.step)
        torch.set_rng_state(state["torch_rng"].cpu())

    def save(self, directory: Path, extra: dict | None = None) -> Path:
        self._check_finite()  # never checkpoint a diverged model
        path = Path(directory) / "checkpoint.pt"
        torch.save({**self.state_dict(), "extra": extra or {}}, path)
        return path

    def load(self, directory: Path) -> dict:
        """Restore from a checkpoint directory; returns the `extra` dict saved with it."""
        state = torch.load(Path(directory) / "checkpoint.pt", map_location=self.device,
                           weights_only=False)
        self.load_state_dict(state)
        return state.get("extra", {})
