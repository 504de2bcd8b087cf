"""Timestep respacing: run a diffusion on a subset of the original timesteps.

Same convention as improved-diffusion/DiT, so that e.g. "50 respaced steps" means the same
timesteps here as in the papers: {0, 20, 41, 61, 82, ..., 958, 979, 999}, not range(0, 1000, 20).
"""

import numpy as np
import torch

from ditsweep.diffusion.gaussian import GaussianDiffusion, Model


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> set[int]:
    """The original timesteps to keep.

    `section_counts` splits [0, num_timesteps) into equal sections and takes that many evenly
    spaced steps (first and last included) from each: "10,15,20" or [10, 15, 20] for three
    sections, "50" or 50 for one. "ddimN" takes the integer stride of the DDIM paper that gives
    exactly N steps.
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} of {num_timesteps} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start = 0
    steps = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)  # the first `extra` sections are one longer
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Python's round() (half to even) on an accumulated float, as the reference does: other
        # rounding gives different timesteps.
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


class OriginalTimesteps:
    """Calls `model(x, timestep_map[t])`: a respaced diffusion indexes its own steps 0..len-1,
    while the network was trained on (and conditions on) the original timesteps."""

    def __init__(self, model: Model, timestep_map: list[int]):
        self.model = model
        self.timestep_map = timestep_map

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mapping = torch.tensor(self.timestep_map, device=t.device, dtype=t.dtype)
        return self.model(x, mapping[t])


class SpacedDiffusion(GaussianDiffusion):
    """The process of `base_betas` observed only at `use_timesteps`.

    New betas are chosen so that alphas_cumprod at the kept steps equals the original one:
    beta_i = 1 - abar(s_i) / abar(s_{i-1}).
    """

    def __init__(self, use_timesteps, base_betas: np.ndarray):
        use_timesteps = set(use_timesteps)
        base = GaussianDiffusion(base_betas)
        self.original_num_steps = base.num_timesteps
        timestep_map, betas = [], []
        last_abar = 1.0
        for i, abar in enumerate(base.alphas_cumprod):
            if i in use_timesteps:
                betas.append(1.0 - abar / last_abar)
                last_abar = abar
                timestep_map.append(i)
        super().__init__(np.array(betas))
        self.timestep_map = timestep_map

    def wrap_model(self, model: Model) -> Model:
        if isinstance(model, OriginalTimesteps):  # never map twice
            return model
        return OriginalTimesteps(model, self.timestep_map)
