"""What a sweep will cost: trial count, resources and GPU-hours, for `--dry-run`.

`trial_cost` is the one place that turns a trial into compute time (training plus evaluation);
`trial_gpu_hours` is its total, `plan_summary` prints the sweep's. Speeds come from the sweep's
`resources.steps_per_second` when the YAML gives one, else from the calibration file of
`resources.gpu` (ditsweep/bench/calibration.py). Every figure says whether it was measured (on which
GPU, when) or assumed.

With `resources.fuse: k` the trials are priced as the groups they will train in (sweep/groups.py):
a member of a group of m costs 1/m of the group's GPU time, at the calibration's measured
trial-steps/s for fuse m; a group size that was not measured is priced as trained alone, and
the figure says so. `choose_fuse` resolves `fuse: auto`. `python -m ditsweep.sweep.estimate
SWEEP.yaml...` prints several sweeps' totals and their sum (e.g. the five paper sweeps).
"""

import argparse
from collections import defaultdict
from dataclasses import dataclass, field

from pydantic import ValidationError

from ditsweep.bench.calibration import Calibration, Figure, find_calibration
from ditsweep.config import Sweep, TrialConfig, expand, load_sweep
from ditsweep.config.schema import Resources

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
    fuse: int = 1                                             # members of its fused group

    @property
    def total(self) -> float | None:
        return None if self.train is None else self.train + sum(self.evals.values())


def _trials_per_gpu(gpus_per_trial: float) -> int:
    return max(1, round(1 / gpus_per_trial)) if 0 < gpus_per_trial < 1 else 1


def _evaluations(steps: int, every: int) -> int:
    """How many times a metric runs: every `every` steps before the end, and once at the end."""
    return (steps - 1) // every + 1 if every else 1


def train_speed(sweep: Sweep, trial: TrialConfig, cal: Calibration | None, fuse: int = 1) -> Figure | None:
    """Trial-steps/s of the trial's share of its GPU (k x a fused group's steps/s at fuse k)."""
    r, t = sweep.resources, trial.train
    if r.steps_per_second:
        return Figure(r.steps_per_second, "from the sweep's resources.steps_per_second")
    if cal is None or not r.gpus_per_trial:
        return None
    return cal.train_speed(trial.model, trial.layout, trial.data.resolution, t.batch_size, t.precision,
                           t.compile, _trials_per_gpu(r.gpus_per_trial), fuse=fuse)


def choose_fuse(resources: Resources, calibration: Calibration | None = None,
                trials: list[TrialConfig] | None = None) -> int:
    """`resources.fuse` as a number. "auto": the k among the calibration's measured fuse rows that
    trains `trials` (those that can be fused) in the fewest GPU-seconds per trial-step, i.e. the
    highest trial-steps/s; a k counts only if it was measured for every setting (model, layout
    family, precision, compile) of those trials. Without trials, the settings of the fused rows
    themselves. 1 without a calibration file or fused rows."""
    if resources.fuse != "auto":
        return resources.fuse
    cal = calibration or find_calibration(resources.gpu)
    if cal is None:
        return 1
    from ditsweep.train.fused import unfusable
    if trials is not None:
        settings = {(t.model, t.layout, t.data.resolution, t.train.batch_size, t.train.precision,
                     t.train.compile) for t in trials if not unfusable(t)}
    else:
        settings = {(r["model"], r["layout"], r["resolution"], r["batch_size"], r["precision"],
                     bool(r["compile"])) for r in cal.data.get("train", []) if int(r.get("fuse", 1)) > 1}
    best, best_cost = 1, None
    for k in cal.fused_ks():
        figures = [cal.train_speed(*s, trials_per_gpu=1, fuse=k) for s in settings]
        if not settings or any(f is None or not f.measured for f in figures):
            continue
        cost = sum(1 / f.value for f in figures)  # GPU-seconds per trial-step, summed over settings
        if best_cost is None or cost < best_cost:
            best, best_cost = k, cost
    return best


def trial_cost(sweep: Sweep, trial: TrialConfig, cal: Calibration | None = None, fuse: int = 1) -> TrialCost:
    """Training and evaluation hours of one trial (a member of a fused group of `fuse`: its share
    of the group's GPU time). Evaluation is counted for GPU sweeps only (a CPU estimate comes from
    the YAML's steps/s alone)."""
    r = sweep.resources
    if cal is None:
        cal = find_calibration(r.gpu)
    speed = train_speed(sweep, trial, cal, fuse)
    cost = TrialCost(train=None, fuse=fuse)
    if speed is None:
        return cost
    cost.figures["train"] = speed
    devices = r.gpus_per_trial or r.cpus_per_trial
    cost.train = trial.train.steps / speed.value / 3600 * devices
    if not r.gpus_per_trial:
        return cost
    e, steps, res = trial.eval, trial.train.steps, trial.data.resolution
    fast = "bf16" if e.precision == "bf16" else None  # eval.precision bf16: its own figures
    # a forward-only image-step at the trial's training speed, when sampling was not measured
    per_image_step = FORWARD_SHARE / (speed.value * trial.train.batch_size)

    def sampling(images: int, sampler_steps: int, what: str) -> Figure:
        measured = cal.eval_seconds("fid_sampling", trial.model, precision=fast, images=1000,
                                    steps=sampler_steps) if cal else None
        if measured is not None:
            return Figure(measured.value * images / 1000, measured.source + f", x{images / 1000:g}")
        return Figure(images * sampler_steps * per_image_step,
                      f"assumed: {what} sampling not measured; a sampler step = {FORWARD_SHARE:.2f} of "
                      f"a training step at {speed.value:.3g} steps/s")

    jobs: dict[str, tuple[int, Figure | None]] = {}
    if e.psnr_gap.enabled:
        k = min(e.psnr_gap.num_images, trial.n_train)
        fig = cal.eval_seconds("psnr_gap", trial.model, precision=fast, num_images=k,
                               steps=e.psnr_gap.steps) if cal else None
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


def fuse_size(sweep: Sweep, trials: list[TrialConfig], cal: Calibration | None = None) -> int:
    """resources.fuse as the k the driver groups `trials` by: "auto" on a GPU sweep is
    choose_fuse's pick; on a CPU sweep 1 (fused training is measured on GPUs only)."""
    r = sweep.resources
    if r.fuse != "auto":
        return r.fuse
    return choose_fuse(r, cal, trials) if r.gpus_per_trial else 1


def fuse_plan(sweep: Sweep, trials: list[TrialConfig], cal: Calibration | None) -> tuple[dict[str, int], str | None]:
    """{trial: size of its fused group} for resources.fuse, and the console line saying how the
    trials will be grouped (None when the sweep does not fuse)."""
    from ditsweep.sweep.groups import fuse_groups, fusion_summary
    r = sweep.resources
    k = fuse_size(sweep, trials, cal)
    groups = fuse_groups(trials, k)
    sizes = {t.trial: len(g) for g in groups for t in g}
    if r.fuse == 1:
        return sizes, None
    where = cal.path.name if cal is not None and cal.path else "the calibration"
    if r.fuse != "auto":
        why = "resources.fuse"
    elif cal is None:
        why = "auto: no calibration file, so 1"
    elif cal.fused_ks() == [1]:
        why = f"auto: {where} has no fused measurement, so 1"
    else:
        why = f"auto: the best measured trial-steps/s in {where}"
    return sizes, f"fuse: k = {k} ({why}); " + (fusion_summary(groups) or "no trials fused")


@dataclass
class Plan:
    """What plan_summary prints, and the numbers behind its total line."""
    lines: list[str]
    kind: str                  # "GPU" or "CPU": what the hours are hours of
    total: float | None = None  # device-hours, None when a trial has no speed
    fuse_line: str | None = None


def plan_summary(sweep: Sweep, trials: list[TrialConfig]) -> str:
    """Trial count, resources, and the compute the sweep will take, with every figure's source."""
    return "\n".join(plan(sweep, trials).lines)


def plan(sweep: Sweep, trials: list[TrialConfig]) -> Plan:
    """plan_summary's lines and total (see there)."""
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
    sizes, fuse_line = fuse_plan(sweep, trials, cal)
    costs = [trial_cost(sweep, t, cal, sizes[t.trial]) for t in trials]
    alone = sorted({c.fuse for c in costs if c.train is not None and "trained alone (fuse 1)" in
                    c.figures["train"].source})
    if fuse_line and alone:  # no guessed gain: such a trial costs what it costs unfused
        n = sum(1 for c in costs if c.fuse in alone and "trained alone" in c.figures["train"].source)
        fuse_line += (f"; fuse {', '.join(map(str, alone))} not measured for {n} of them"
                      f"{' in ' + cal.path.name if cal else ''}: priced as trained alone")
    if fuse_line:
        lines.append(fuse_line)
    missing = [t.trial for t, c in zip(trials, costs) if c.total is None]
    if missing:
        lines.append(f"no estimate for {len(missing)} trials (e.g. {missing[0]}): set "
                     f"resources.steps_per_second to the measured training speed")
        return Plan(lines, kind, None, fuse_line)
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
        unit = ("trial-steps/s per GPU" if "steps/s of the group" in source  # a fused figure
                else "steps/s per trial") if name == "train" else "s per evaluation"
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
    return Plan(lines, kind, total, fuse_line)


def main(argv: list[str] | None = None) -> int:
    """Several sweeps' GPU-hours and their sum, optionally as if run on another GPU, fused or at
    another precision: `python -m ditsweep.sweep.estimate sweeps/a.yaml sweeps/b.yaml --gpu ...`."""
    p = argparse.ArgumentParser(prog="python -m ditsweep.sweep.estimate", description=main.__doc__)
    p.add_argument("sweeps", nargs="+")
    p.add_argument("--gpu", help="price on this GPU's calibration file (resources.gpu)")
    p.add_argument("--fuse", help="resources.fuse: k or auto")
    p.add_argument("--precision", choices=["tf32", "fp32", "bf16"], help="train.precision")
    p.add_argument("--compile", choices=["off", "on"], help="train.compile")
    p.add_argument("--verbose", action="store_true", help="each sweep's full plan_summary")
    args = p.parse_args(argv)
    total, kind = 0.0, "GPU"
    for path in args.sweeps:
        sweep = load_sweep(path, check_data=False)
        res = {k: v for k, v in (("gpu", args.gpu), ("fuse", args.fuse)) if v is not None}
        try:  # the sweep file's own rules for these fields
            resources = Resources.model_validate({**sweep.resources.model_dump(), **res})
        except ValidationError:
            p.error(f"--fuse: {args.fuse!r} is neither a positive whole number nor auto")
        train = {k: v for k, v in (("precision", args.precision),
                                   ("compile", None if args.compile is None else args.compile == "on"))
                 if v is not None}
        sweep = sweep.model_copy(update={"resources": resources,
                                         "train": sweep.train.model_copy(update=train)})
        trials = [t.model_copy(update={"resources": sweep.resources,
                                       "train": t.train.model_copy(update=train)})
                  for t in expand(sweep, path, check_data=False)]
        est = plan(sweep, trials)
        text = "\n".join(est.lines)
        if args.verbose:
            print(f"== {path}\n{text}\n")
        if est.total is None:
            print(f"{path}: no estimate\n{text}")
            return 1
        total, kind = total + est.total, est.kind
        line = next(x for x in est.lines if x.startswith("total: "))  # the hours and their split
        print(f"{path}: {len(trials)} trials, {line.removeprefix('total: ')}"
              + (f"\n  {est.fuse_line}" if est.fuse_line else ""))
    print(f"total of {len(args.sweeps)} sweeps: {total:,.1f} {kind}-hours (a trial shared by two sweeps "
          f"counts in each; reuse trains it once)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
