"""The training loop of one trial, free of Ray and MLflow so it can be tested on its own.

One `Trainer` holds everything a checkpoint must restore for an exact resume: model, EMA copy,
optimizer, step, and the generator that draws batches, timesteps and noise. On CPU the same seed
gives the same loss sequence, with or without a checkpoint/restore in between.
"""

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ditsweep.diffusion import create_diffusion
from ditsweep.models import build_model
from ditsweep.spec import TrialConfig


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the trial cannot continue."""


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float [N, C, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def pick_device(gpus: float) -> torch.device:
    return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")


class Trainer:
    def __init__(self, cfg: TrialConfig, train_images: torch.Tensor | None,
                 device: torch.device | None = None):
        """`train_images` float [N, C, H, W] in [-1, 1]; None when batches are streamed: then set
        `self.batches` to an iterator of such batches before training."""
        self.cfg = cfg
        self.device = device or pick_device(cfg.resources.gpus_per_trial)
        torch.manual_seed(cfg.seed)  # model initialisation
        self.model = build_model(cfg.model, image_size=cfg.data.resolution, in_channels=3,
                                 layout=None if cfg.arch != "dit" else cfg.layout,
                                 weight_sharing=cfg.variant == "weight-sharing",
                                 attention_backend=cfg.train.attention_backend).to(self.device)
        # EMA starts as an exact copy and is updated after every step (as the reference DiT).
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, weight_decay=0.0)
        self.diffusion = create_diffusion()
        self.forward = torch.compile(self.model) if cfg.train.compile else self.model
        self.images = train_images.to(self.device) if train_images is not None else None
        self.batches: Iterator[torch.Tensor] | None = None
        # One generator for batches, timesteps and noise: its state goes into the checkpoint.
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0

    def train_step(self) -> float:
        """One optimisation step; returns the loss. Raises TrainingDiverged on NaN/inf."""
        b = self.cfg.train.batch_size
        if self.batches is not None:
            x0 = next(self.batches).to(self.device)
        else:
            idx = torch.randint(len(self.images), (b,), generator=self.gen)
            x0 = self.images[idx.to(self.device)]
        t = torch.randint(self.diffusion.num_timesteps, (len(x0),), generator=self.gen)
        noise = torch.randn(x0.shape, generator=self.gen)
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.cfg.train.precision == "bf16"):
            losses = self.diffusion.training_losses(self.forward, x0, t.to(self.device),
                                                    noise=noise.to(self.device))
        loss = losses["loss"].float().mean()
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"training diverged: loss is {loss.item()} at step {self.step + 1} "
                                   f"(trial {self.cfg.trial}, lr {self.cfg.train.lr})")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self._update_ema()
        self.step += 1
        return loss.item()

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.cfg.train.ema_decay
        for ema_p, p in zip(self.ema.parameters(), self.model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - decay)

    def eval_model(self) -> torch.nn.Module:
        return self.ema if self.cfg.eval.use_ema else self.model

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(), "step": self.step,
                "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.step = state["step"]
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])

    def save(self, directory: Path, extra: dict | None = None) -> Path:
        path = Path(directory) / "checkpoint.pt"
        torch.save({**self.state_dict(), "extra": extra or {}}, path)
        return path

    def load(self, directory: Path) -> dict:
        """Restore from a checkpoint directory; returns the `extra` dict saved with it."""
        state = torch.load(Path(directory) / "checkpoint.pt", map_location=self.device,
                           weights_only=False)
        self.load_state_dict(state)
        return state.get("extra", {})
