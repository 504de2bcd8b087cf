"""What a sweep will cost: trial count, resources and GPU-hours, for `--dry-run`.

`trial_cost` is the one place that turns a trial into compute time (training plus evaluation);
`trial_gpu_hours` is its total, `plan_summary` prints the sweep's. Speeds come from the sweep's
`resources.steps_per_second` when the YAML gives one, else from the calibration file of
`resources.gpu` (ditsweep/bench/calibration.py). Every figure says whether it was measured (on which
GPU, when) or assumed.
"""

from collections import defaultdict
from dataclasses import dataclass, field

from ditsweep.bench.calibration import Calibration, Figure, find_calibration
from ditsweep.config import Sweep, TrialConfig

# A sampling step is one forward pass: about a third of a training step's forward + backward
# (the usual 1:2 forward:backward FLOP ratio). Used only when sampling was not measured.
FORWARD_SHARE = 1 / 3


@dataclass
class TrialCost:
    """Device-hours of one trial (GPU-hours on a GPU sweep, CPU-hours otherwise)."""
    train: float | None
    evals: dict[str, float] = field(default_factory=dict)  # metric -> hours, FID included
    figures: dict[str, Figure] = field(default_factory=dict)  # what each number came from
    counts: dict[str, int] = field(default_factory=dict)      # metric -> evaluations per trial

    @property
    def total(self) -> float | None:
        return None if self.train is None else self.train + sum(self.evals.values())


def _trials_per_gpu(gpus_per_trial: float) -> int:
    return max(1, round(1 / gpus_per_trial)) if 0 < gpus_per_trial < 1 else 1


def _evaluations(steps: int, every: int) -> int:
    """How many times a metric runs: every `every` steps before the end, and once at the end."""
    return (steps - 1) // every + 1 if every else 1


def train_speed(sweep: Sweep, trial: TrialConfig, cal: Calibration | None) -> Figure | None:
    r, t = sweep.resources, trial.train
    if r.steps_per_second:
        return Figure(r.steps_per_second, "from the sweep's resources.steps_per_second")
    if cal is None or not r.gpus_per_trial:
        return None
    return cal.train_speed(trial.model, trial.layout, trial.data.resolution, t.batch_size, t.precision,
                           t.compile, _trials_per_gpu(r.gpus_per_trial))


def trial_cost(sweep: Sweep, trial: TrialConfig, cal: Calibration | None = None) -> TrialCost:
    """Training and evaluation hours of one trial. Evaluation is counted for GPU sweeps only
    (a CPU estimate comes from the YAML's steps/s alone)."""
    r = sweep.resources
    if cal is None:
        cal = find_calibration(r.gpu)
    speed = train_speed(sweep, trial, cal)
    cost = TrialCost(train=None)
    if speed is None:
        return cost
    cost.figures["train"] = speed
    devices = r.gpus_per_trial or r.cpus_per_trial
    cost.train = trial.train.steps / speed.value / 3600 * devices
    if not r.gpus_per_trial:
        return cost
    e, steps, res = trial.eval, trial.train.steps, trial.data.resolution
    # a forward-only image-step at the trial's training speed, when sampling was not measured
    per_image_step = FORWARD_SHARE / (speed.value * trial.train.batch_size)

    def sampling(images: int, sampler_steps: int, what: str) -> Figure:
        measured = cal.eval_seconds("fid_sampling", trial.model, images=1000, steps=sampler_steps) if cal else None
        if measured is not None:
            return Figure(measured.value * images / 1000, measured.source + f", x{images / 1000:g}")
        return Figure(images * sampler_steps * per_image_step,
                      f"assumed: {what} sampling not measured; a sampler step = {FORWARD_SHARE:.2f} of "
                      f"a training step at {speed.value:.3g} steps/s")

    jobs: dict[str, tuple[int, Figure | None]] = {}
    if e.psnr_gap.enabled:
        k = min(e.psnr_gap.num_images, trial.n_train)
        fig = cal.eval_seconds("psnr_gap", trial.model, num_images=k, steps=e.psnr_gap.steps) if cal else None
        if fig is None:  # 2K images through S one-step denoisings, forward only
            fig = Figure(2 * k * e.psnr_gap.steps * per_image_step,
                         "assumed: PSNR gap not measured; forward-only at the training speed")
        jobs["psnr_gap"] = (_evaluations(steps, e.psnr_gap.every), fig)
    if e.fid.enabled and trial.n_train >= getattr(e.fid, "min_n_train", 0):
        jobs["fid"] = (_evaluations(steps, e.fid.every),
                       sampling(e.fid.num_samples, e.fid.sampling_steps, "FID"))
    if e.samples.enabled:
        jobs["samples"] = (_evaluations(steps, e.samples.every),
                           sampling(e.samples.num_images, e.samples.sampling_steps, "sample-grid"))
    if e.jacobian.enabled:
        fig = cal.eval_seconds("jacobian", trial.model, resolution=res) if cal else None
        if fig is None:  # 3*H*W vector-Jacobian products, batch_size per forward+backward
            fig = Figure(3 * res * res / trial.train.batch_size / speed.value,
                         "assumed: Jacobian not measured; 3*H*W backward passes at the training speed")
        jobs["jacobian"] = (_evaluations(steps, e.jacobian.every) * len(e.jacobian.timesteps), fig)
    for metric, (count, fig) in jobs.items():
        cost.evals[metric] = count * fig.value / 3600
        cost.figures[metric] = fig
        cost.counts[metric] = count
    return cost


def trial_gpu_hours(sweep: Sweep, trial: TrialConfig) -> float | None:
    """Device-hours (GPU, or CPU when the sweep uses none) one trial takes, training and
    evaluation together, or None when no speed is known."""
    return trial_cost(sweep, trial).total


def plan_summary(sweep: Sweep, trials: list[TrialConfig]) -> str:
    """Trial count, resources, and the compute the sweep will take, with every figure's source."""
    r = sweep.resources
    kind = "GPU" if r.gpus_per_trial else "CPU"
    lines = [f"{len(trials)} trials x {sweep.train.steps} steps; per trial {r.cpus_per_trial:g} CPU, "
             f"{r.gpus_per_trial:g} GPU; at most "
             f"{r.max_concurrent_trials or 'as many as fit'} at once; {r.max_failures} restarts per trial"]
    cal = None if r.steps_per_second or not r.gpus_per_trial else find_calibration(r.gpu)
    if r.gpus_per_trial and not r.steps_per_second:
        lines.append(f"speeds: calibration file {cal.path}" if cal else
                     f"speeds: no calibration file for GPU {r.gpu!r} (set resources.gpu to a GPU "
                     f"measured by `python -m ditsweep.bench --gpu`, or resources.steps_per_second)")
    costs = [trial_cost(sweep, t, cal) for t in trials]
    missing = [t.trial for t, c in zip(trials, costs) if c.total is None]
    if missing:
        lines.append(f"no estimate for {len(missing)} trials (e.g. {missing[0]}): set "
                     f"resources.steps_per_second to the measured training speed")
        return "\n".join(lines)
    groups: dict[float, list[int]] = defaultdict(list)  # trials of equal cost, printed once
    for i, c in enumerate(costs):
        groups[round(c.total, 4)].append(i)
    lines.append(f"per trial ({kind}-hours = training + evaluation):")
    for members in groups.values():
        c, t = costs[members[0]], trials[members[0]]
        evals = "".join(f" + {m} {h:,.2f} ({c.counts[m]}x)" for m, h in c.evals.items())
        alike = f" and {len(members) - 1} alike" if len(members) > 1 else ""
        lines.append(f"  {t.trial}{alike}: {c.total:,.2f} = training {c.train:,.2f}{evals}")
    figures: dict[tuple, int] = defaultdict(int)  # (name, value, source) -> trials using it
    for c in costs:
        for name, fig in c.figures.items():
            figures[(name, fig.value, fig.source)] += 1
    lines.append("figures (value, trials using it, source):")
    for (name, value, source), n in figures.items():
        unit = "steps/s per trial" if name == "train" else "s per evaluation"
        lines.append(f"  {name}: {value:,.4g} {unit}, {n} trials: {source}")
    train = sum(c.train for c in costs)
    fid = sum(c.evals.get("fid", 0.0) for c in costs)
    other = sum(sum(v for m, v in c.evals.items() if m != "fid") for c in costs)
    total = train + fid + other
    lines.append(f"total: {total:,.1f} {kind}-hours = training {train:,.1f} + evaluation without "
                 f"FID {other:,.1f} + FID {fid:,.1f}")
    n_fid = sum(1 for c in costs if "fid" in c.evals)
    min_n = getattr(sweep.eval.fid, "min_n_train", 0)
    lines.append(f"FID: {fid:,.1f} {kind}-hours for {n_fid} of {len(trials)} trials"
                 + (" (eval.fid.enabled is false)" if not sweep.eval.fid.enabled else
                    f" (those with n_train >= eval.fid.min_n_train = {min_n})"))
    sources = [source for _, _, source in figures]
    measured = sum(1 for src in sources if src.startswith("measured"))
    yaml = sum(1 for src in sources if src.startswith("from the sweep"))
    lines.append(f"figures: {measured} measured, {yaml} from the sweep file, "
                 f"{len(sources) - measured - yaml} assumed")
    return "\n".join(lines)
