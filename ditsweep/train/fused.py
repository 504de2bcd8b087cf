"""k trials trained as one model (HFTA-style horizontal fusion), free of Ray and MLflow.

Trials that differ only in their data (N, seed, dataset) train models of one shape. On a GPU one
such model leaves most of the device idle; `FusedTrainer` stacks the k members' weights
(ditsweep/models/fused.py) so every layer is one batched op over the members, and keeps for each
member exactly what its own Trainer would: its initialisation from its seed, its generator
drawing batch indices, timesteps and noise in the same order, its optimizer state and step
count, its EMA. The loss is the sum of the members' mean losses, so each member's gradient is
the one it gets alone. On CPU a member's loss history and weights equal an unfused run's to
float rounding (tests/test_fused.py).

`members[i]` is a `Member`: a Trainer-shaped view of one member (cfg, step, read_loss,
eval_model, save/load of an ordinary unfused checkpoint), so checkpoints, the identity store and
evaluation treat it as a trial of its own. A member that diverges or finishes is dropped with
`drop`; the others go on.
"""

import copy
from pathlib import Path

import torch

from ditsweep.config import TrialConfig
from ditsweep.diffusion import create_diffusion
from ditsweep.models.fused import fuse, keep_members, load_member_state_dict, member_state_dict
from ditsweep.train.gpu import compile_model, precision_scope
from ditsweep.train.loop import TrainingDiverged, build_trial_model, pick_device
from ditsweep.train.stacked_adam import StackedAdamW

# A group's entry in a Tune config, {"trial": group name, MEMBERS: [TrialConfig dicts]}, and in
# its results, {..., MEMBERS: {trial: that member's latest values}}
MEMBERS = "members"
# What members of one group must share: everything that shapes the model, the step or the
# update. They may differ in N, seed and dataset (and names, identities, evaluation settings).
FUSION_FIELDS = ("model", "arch", "layout", "variant", "data.resolution", "train.batch_size",
                 "train.precision", "train.steps", "train.lr", "train.ema_decay", "train.compile",
                 "train.attention_backend", "train.log_every", "train.checkpoint_every")


def unfusable(cfg: TrialConfig) -> str | None:
    """Why this trial must train alone, or None if it can be fused."""
    if cfg.arch != "dit":
        # Measured: a grouped convolution rounds differently from k separate ones, and AdamW
        # turns that, on the near-zero gradients of zero-initialised layers, into 1e-4 relative
        # weight differences within 6 steps: over the 1e-5 a fused member must keep.
        return f"{cfg.model} is a UNet: only DiT trials can be fused (exactness, see train/fused.py)"
    if cfg.data.stream:
        return "streamed data (data.stream) is drawn outside the member's generator"
    if cfg.variant == "pca-attention" or cfg.inputs:
        return "PCA attention holds per-trial components"
    return None


def fusion_key(cfg: TrialConfig) -> tuple | None:
    """Trials with equal keys can train fused; None for one that trains alone (`unfusable`)."""
    if unfusable(cfg):
        return None
    values = []
    for field in FUSION_FIELDS:
        value = cfg
        for part in field.split("."):
            value = getattr(value, part)
        values.append(value)
    return tuple(values)


class FusedTrainer:
    def __init__(self, cfgs: list[TrialConfig], train_images: list[torch.Tensor],
                 device: torch.device | None = None):
        """`train_images[i]`: member i's float [N_i, C, H, W] in [-1, 1]."""
        for c in cfgs:
            if unfusable(c):
                raise ValueError(f"trial {c.trial} cannot be fused: {unfusable(c)}")
        if len({fusion_key(c) for c in cfgs}) != 1:
            raise ValueError("trials can be fused only when they share " + ", ".join(FUSION_FIELDS))
        first = cfgs[0]
        self.device = device or pick_device(first.resources.gpus_per_trial)
        self.precision = first.train.precision
        built = [build_trial_model(c, self.device) for c in cfgs]
        self.tags = [tags for _, tags in built]  # per member, for its MLflow run
        # one unfused shell per member: its checkpoints and its evaluation copy are filled in there
        self._shells = [model.requires_grad_(False) for model, _ in built]
        self.model = fuse(self._shells)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = StackedAdamW(list(self.model.parameters()), len(cfgs), lr=first.train.lr)
        self._opt_template = torch.optim.AdamW(self._shells[0].parameters(), lr=first.train.lr,
                                               weight_decay=0.0).state_dict()["param_groups"][0]
        self.diffusion = create_diffusion()
        self.forward = compile_model(self.model) if first.train.compile else self.model
        self.images = [x.to(self.device) for x in train_images]
        self.gens = [torch.Generator(device=self.device).manual_seed(c.seed) for c in cfgs]
        self.members = [Member(self, c) for c in cfgs]
        self._reset_window()

    @property
    def k(self) -> int:
        return len(self.members)

    def _reset_window(self, members: list[int] | None = None) -> None:
        k, dev = self.k, self.device
        if members is None:
            self._loss_sum = torch.zeros(k, device=dev)
            self._bad_step = torch.zeros(k, dtype=torch.long, device=dev)  # 0: none yet
            self._bad_loss = torch.zeros(k, device=dev)
            self._loss_count = [0] * k
        else:
            for i in members:
                self._loss_sum[i] = 0.0
                self._loss_count[i] = 0

    def train_step(self) -> torch.Tensor:
        """One step of every member; returns their losses [k] on the device (no host sync)."""
        batch = self.members[0].cfg.train.batch_size
        x0, t, noise = [], [], []
        for images, gen in zip(self.images, self.gens):  # each member draws as it would alone
            idx = torch.randint(len(images), (batch,), generator=gen, device=self.device)
            x0.append(images[idx])
            t.append(torch.randint(self.diffusion.num_timesteps, (batch,), generator=gen, device=self.device))
            noise.append(torch.randn(x0[-1].shape, generator=gen, device=self.device))
        x0, t, noise = torch.cat(x0), torch.cat(t), torch.cat(noise)   # member-major [k*B, ...]
        with precision_scope(self.precision), torch.autocast(
                self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            losses = self.diffusion.training_losses(self.forward, x0, t, noise=noise)
            loss = losses["loss"].float().view(self.k, batch).mean(1)   # [k]: each member's mean
            self.opt.zero_grad()
            loss.sum().backward()  # members share no weight: d(sum)/d(member) = d(its loss)
            self.opt.step()
        with torch.no_grad():
            decay = self.members[0].cfg.train.ema_decay
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1.0 - decay)
        loss = loss.detach()
        steps = torch.tensor(self.opt.steps, device=self.device)
        first_bad = (self._bad_step == 0) & ~torch.isfinite(loss)
        self._bad_step = torch.where(first_bad, steps, self._bad_step)
        self._bad_loss = torch.where(first_bad, loss, self._bad_loss)
        self._loss_sum = self._loss_sum + loss
        self._loss_count = [c + 1 for c in self._loss_count]
        return loss

    def diverged(self) -> dict[int, str]:
        """{member index: reason} for members whose loss became NaN/inf (one host sync)."""
        bad = self._bad_step.tolist()
        return {i: f"training diverged: loss is {self._bad_loss[i].item()} at step {s} "
                   f"(trial {self.members[i].cfg.trial}, lr {self.members[i].cfg.train.lr})"
                for i, s in enumerate(bad) if s}

    def drop(self, indices: list[int]) -> None:
        """Remove members (diverged or finished); the others go on unchanged."""
        keep = [i for i in range(self.k) if i not in set(indices)]
        if not keep:  # the group is done
            self.members = []
            return
        keep_members(self.model, keep)
        keep_members(self.ema, keep)
        self.opt.keep_members(keep, list(self.model.parameters()))
        self.forward = compile_model(self.model) if self.members[0].cfg.train.compile else self.model
        index = torch.tensor(keep, device=self.device)
        self._loss_sum = self._loss_sum.index_select(0, index)
        self._bad_step = self._bad_step.index_select(0, index)
        self._bad_loss = self._bad_loss.index_select(0, index)
        self._loss_count = [self._loss_count[i] for i in keep]
        for name in ("images", "gens", "members", "_shells", "tags"):
            setattr(self, name, [getattr(self, name)[i] for i in keep])

    def index(self, member: "Member") -> int:
        return self.members.index(member)


class Member:
    """One member of a FusedTrainer, shaped like a Trainer for the code around a trial."""

    def __init__(self, group: FusedTrainer, cfg: TrialConfig):
        self.group, self.cfg = group, cfg

    @property
    def step(self) -> int:
        return self.group.opt.steps[self.group.index(self)]

    def pop_tags(self) -> dict[str, str]:
        i = self.group.index(self)
        tags, self.group.tags[i] = self.group.tags[i], {}
        return tags

    def read_loss(self) -> float:
        """Mean loss of this member's steps since its last read; raises TrainingDiverged."""
        g, i = self.group, self.group.index(self)
        reason = g.diverged().get(i)
        if reason:
            raise TrainingDiverged(reason)
        count = g._loss_count[i]
        mean = (g._loss_sum[i] / count).item() if count else float("nan")
        g._reset_window([i])
        return mean

    def eval_model(self) -> torch.nn.Module:
        """An unfused copy of the weights evaluation uses (EMA unless eval.use_ema is false)."""
        g, i = self.group, self.group.index(self)
        source = g.ema if self.cfg.eval.use_ema else g.model
        shell = g._shells[i]
        shell.load_state_dict(member_state_dict(source, i))
        return shell.eval()

    def state_dict(self) -> dict:
        """The checkpoint a Trainer of this trial would write (model, EMA, AdamW, step, RNG)."""
        g, i = self.group, self.group.index(self)
        return {"model": member_state_dict(g.model, i), "ema": member_state_dict(g.ema, i),
                "opt": g.opt.member_state(i, {**g._opt_template}), "step": self.step,
                "gen": g.gens[i].get_state(), "gen_device": g.device.type,
                "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        g, i = self.group, self.group.index(self)
        load_member_state_dict(g.model, i, state["model"])
        load_member_state_dict(g.ema, i, state["ema"])
        g.opt.load_member_state(i, state["opt"])
        if int(state["step"]) != self.step:
            raise ValueError(f"checkpoint of {self.cfg.trial}: step {state['step']} but optimizer "
                             f"state of step {self.step}")
        if state.get("gen_device", "cpu") == g.device.type:
            g.gens[i].set_state(state["gen"].cpu())
        else:  # as Trainer.load_state_dict: another kind of device reseeds from (seed, step)
            g.gens[i].manual_seed(self.cfg.seed * 1_000_003 + self.step)

    def save(self, directory: Path, extra: dict | None = None) -> Path:
        reason = self.group.diverged().get(self.group.index(self))
        if reason:  # never checkpoint a diverged model
            raise TrainingDiverged(reason)
        path = Path(directory) / "checkpoint.pt"
        torch.save({**self.state_dict(), "extra": extra or {}}, path)
        return path

    def load(self, directory: Path) -> dict:
        state = torch.load(Path(directory) / "checkpoint.pt", map_location=self.group.device,
                           weights_only=False)
        self.load_state_dict(state)
        return state.get("extra", {})
