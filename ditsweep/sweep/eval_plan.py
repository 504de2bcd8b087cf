"""Which evaluations each trial of a sweep gets, for `--dry-run`: per metric, the N it runs at
and how many trials, so that e.g. FID at the paper's N = 10^4 and 10^5 only can be seen (and
tested) before anything starts. The rule is the one the evaluators follow (FidSettings.due_for)."""

from ditsweep.config import Sweep, TrialConfig


def evaluation_plan(sweep: Sweep, trials: list[TrialConfig]) -> str:
    e = sweep.eval
    lines = ["evaluations at the end of each trial (and every `every` steps):"]
    for name, setting, applies in (
            ("psnr_gap", e.psnr_gap, lambda t: True),
            ("fid", e.fid, lambda t: e.fid.due_for(t.n_train)),
            ("attention", e.attention, lambda t: t.arch == "dit"),
            ("jacobian", e.jacobian, lambda t: True),
            ("samples", e.samples, lambda t: True),
            ("attention_pca", e.attention_pca, lambda t: t.arch == "dit")):
        if not setting.enabled:
            continue
        due = [t for t in trials if applies(t)]
        ns = sorted({t.n_train for t in due})
        what = (f" ({e.fid.num_samples} samples x {e.fid.sampling_steps} steps vs min(N, "
                f"{e.fid.reference_images}) training images)" if name == "fid" else "")
        lines.append(f"  {name}{what}: {len(due)} of {len(trials)} trials, at N in "
                     f"{{{', '.join(map(str, ns))}}}" if due else f"  {name}: no trial")
    return "\n".join(lines)
