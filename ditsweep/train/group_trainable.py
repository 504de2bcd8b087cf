"""The Ray Tune trainable of a fused group: k trials trained as one model (train/fused.py).

The group is one Tune trial, and each member stays a trial everywhere a user looks: its own
MLflow run (the same run it has when trained alone), metric history, checkpoints under its
identity, evaluation jobs, and its own entry under "members" in every result the group reports
(the progress view and the summary table read those). A Tune checkpoint of the group is a folder
per active member holding that member's ordinary checkpoint, plus group.json with the final
results of the members already done.

Failures, as for a single trial (train/trainable.py): a member that diverges, or whose data or
run cannot be set up for a deterministic reason, is recorded as failed (not retried) and dropped;
the others go on. A transient error stops the group and Tune restarts it from its checkpoint:
every member resumes from its own.
"""

import json
import logging
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from ray import tune

from ditsweep.config import TrialConfig
from ditsweep.data import load_split, to_model_range
from ditsweep.eval.actors import submit_group
from ditsweep.eval.jobs import metrics_due
from ditsweep.train.continuity import beat, restore_from_storage, store_checkpoint, twin_to_link
from ditsweep.train.failures import Failure, classify, count_attempt
from ditsweep.train.fused import MEMBERS, FusedTrainer, Member
from ditsweep.train.loop import TrainingDiverged
from ditsweep.train.trainable import FLUSH_SECONDS, TRIAL_KEY, evaluator_for, open_run, record_failure, train_trial

log = logging.getLogger(__name__)
DONE_FILE = "group.json"


def train_group(config: dict) -> None:
    """Tune function trainable for sweeps with fused groups; a single trial's entry goes to
    train_trial unchanged."""
    if MEMBERS not in config[TRIAL_KEY]:
        return train_trial(config)
    group = Group([TrialConfig.model_validate(m) for m in config[TRIAL_KEY][MEMBERS]])
    try:
        group.train()
    except Exception as e:  # the whole group stopped: each member judged as a single trial is
        failure = classify(e)
        max_failures = group.cfgs[0].resources.max_failures
        for run, member in group.active():
            final = record_failure(run, failure, member.step, group.attempt, max_failures)
            if final is not None:
                group.done[member.cfg.trial] = final
        if failure.transient:
            raise
        log.error("fused group failed (%s, not retried): %s", failure.kind, failure.reason)
        tune.report({"step": 0, MEMBERS: group.done})


class Group:
    """The members of one fused Tune trial, with their runs, evaluators and results."""

    def __init__(self, cfgs: list[TrialConfig]):
        self.cfgs = cfgs
        self.done: dict[str, dict] = {}      # trial -> final result (finished, failed or linked)
        self.runs: dict[str, object] = {}
        self.evaluators: dict[str, object] = {}
        self.last: dict[str, dict] = {}      # trial -> latest result, for the progress view
        self.trainer: FusedTrainer | None = None
        self.attempt = 1

    def active(self) -> list[tuple[object, Member]]:
        members = self.trainer.members if self.trainer else []
        return [(self.runs[m.cfg.trial], m) for m in members]

    def train(self) -> None:
        torch.set_num_threads(max(1, int(self.cfgs[0].resources.cpus_per_trial)))
        checkpoint = tune.get_checkpoint()
        with checkpoint.as_directory() if checkpoint else nullcontext() as d:
            saved = Path(d) if d else None
            if saved:
                self.done = json.loads((saved / DONE_FILE).read_text())
            cfgs, images = self._set_up(saved)
            if cfgs:
                self.trainer = FusedTrainer(cfgs, images)
                for run, member in self.active():
                    own = saved / member.cfg.trial if saved else None
                    if own and own.exists():
                        member.load(own)
                        log.info("trial %s resumed at step %d", member.cfg.trial, member.step)
                        run.set_tags({"ditsweep.resumed_from_step": str(member.step)})
                    else:  # an attempt under another driver or Ray cluster (continuity.py)
                        restore_from_storage(member.cfg, member, run)
        if self.trainer:
            # stored its final checkpoint, then stopped before its run said FINISHED
            ready = [m for _, m in self.active() if m.step >= m.cfg.train.steps]
            if ready:
                self._finish(ready)
            self._loop()
        tune.report({"step": max((r.get("step", 0) for r in self.done.values()), default=0),
                     MEMBERS: self.done})

    def _set_up(self, saved: Path | None) -> tuple[list[TrialConfig], list[torch.Tensor]]:
        """Open each member's run and load its data; members that are done, linked to a twin,
        or fail deterministically here are left out."""
        cfgs, images = [], []
        for cfg in self.cfgs:
            if cfg.trial in self.done:
                continue
            run = None
            try:
                run = open_run(cfg)
                self.attempt = max(self.attempt, count_attempt(run))
                has_checkpoint = bool(saved and (saved / cfg.trial).exists())
                linked = twin_to_link(cfg, run, has_checkpoint=has_checkpoint)
                if linked is not None:
                    self.done[cfg.trial] = linked
                    continue
                train_u8, _ = load_split(cfg.dataset, cfg.data.resolution, cfg.n_train, 0)
                evaluator = evaluator_for(cfg, run)
            except Exception as e:
                failure = classify(e)
                if failure.transient:
                    raise
                self.done[cfg.trial] = record_failure(run, failure, 0, self.attempt, cfg.resources.max_failures)
                continue
            self.runs[cfg.trial], self.evaluators[cfg.trial] = run, evaluator
            cfgs.append(cfg)
            images.append(to_model_range(train_u8))
        return cfgs, images

    def _loop(self) -> None:
        trainer, last_flush = self.trainer, time.monotonic()
        try:
            while trainer.k:
                trainer.train_step()  # no host sync: losses are read at log_every
                logged, checkpoint, finished, failed = False, False, [], {}
                for run, member in self.active():
                    cfg, step = member.cfg, member.step
                    tags = member.pop_tags()  # local attention kernel, fallback note
                    if tags:
                        run.set_tags(tags)
                    if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                        try:
                            loss = member.read_loss()
                        except TrainingDiverged as e:
                            failed[cfg.trial] = classify(e)
                            continue
                        run.log_metrics({"loss": loss}, step)
                        self.last[cfg.trial] = {"step": step, "loss": loss}
                        logged = True
                    evaluator = self.evaluators[cfg.trial]
                    if evaluator and step < cfg.train.steps and metrics_due(cfg.eval, step, False, cfg.n_train):
                        evaluator.submit(member.eval_model(), step)
                    if step == cfg.train.steps:
                        finished.append(member)
                    elif step % cfg.train.checkpoint_every == 0:
                        checkpoint = True
                if failed:
                    self._drop_failed(failed)
                if finished:
                    self._finish(finished)
                if checkpoint and trainer.k:
                    self._report(checkpoint=True)
                    last_flush = time.monotonic()
                elif logged:
                    self._report(checkpoint=False)
                if time.monotonic() - last_flush > FLUSH_SECONDS:
                    for run, member in self.active():
                        run.flush()
                        beat(member.cfg, run)
                    last_flush = time.monotonic()
        except Exception:  # judged by train_group; keep the losses before it
            for run, _ in self.active():
                run.flush()
            raise

    def _drop_failed(self, failed: dict[str, Failure]) -> None:
        """Diverged members: recorded as deterministic failures, masked out of the group."""
        indices = []
        for run, member in self.active():
            failure = failed.get(member.cfg.trial)
            if failure:
                log.error("trial %s failed (deterministic, not retried): %s", member.cfg.trial, failure.reason)
                run.flush()
                self.done[member.cfg.trial] = record_failure(run, failure, member.step, self.attempt,
                                                             member.cfg.resources.max_failures)
                indices.append(self.trainer.index(member))
        self._drop(indices)

    def _finish(self, members: list[Member]) -> None:
        """Final evaluation (all members' jobs queued first, then waited for), final checkpoint
        under the identity, run FINISHED; then the members leave the group."""
        evaluated = [m for m in members if self.evaluators[m.cfg.trial]]
        # FID of members that finish together is sampled batched over them (eval/actors.py)
        submitted = submit_group([self.evaluators[m.cfg.trial] for m in evaluated],
                                 [m.eval_model() for m in evaluated], evaluated[0].step) if evaluated else []
        for member, queued in zip(evaluated, submitted):
            member.submitted = queued
        if any(submitted):
            self._report(checkpoint=False)  # the progress view shows them evaluating meanwhile
        for member in members:
            cfg, run = member.cfg, self.runs[member.cfg.trial]
            metrics = {"step": member.step, "loss": self.last.get(cfg.trial, {}).get("loss", float("nan"))}
            evaluator = self.evaluators[cfg.trial]
            result = evaluator.wait(member.step, member.submitted) if evaluator else None
            if result is not None:
                if result.failures:
                    log.warning("final evaluation of %s: %s", cfg.trial, result.failures)
                metrics.update(result.scalars)
            run.flush()
            with tempfile.TemporaryDirectory() as d:
                store_checkpoint(cfg, run, member.save(Path(d), extra={"mlflow_run_id": run.run_id}),
                                 member.step, final=True)
            run.finish("FINISHED")
            self.done[cfg.trial] = {**metrics, "mlflow_run_id": run.run_id}
        self._drop([self.trainer.index(m) for m in members])

    def _drop(self, indices: list[int]) -> None:
        if indices:
            self.trainer.drop(indices)

    def _report(self, checkpoint: bool) -> None:
        """One Tune result for the group: every member's latest values under MEMBERS."""
        members = {m.cfg.trial: {**self.last.get(m.cfg.trial, {}), "step": m.step}
                   for _, m in self.active()}
        members.update(self.done)
        result = {"step": min((m.step for _, m in self.active()), default=0), MEMBERS: members}
        if not checkpoint:
            tune.report(result)
            return
        with tempfile.TemporaryDirectory() as d:
            for run, member in self.active():
                own = Path(d) / member.cfg.trial
                own.mkdir()
                member.save(own, extra={"mlflow_run_id": run.run_id})
                run.flush()
                store_checkpoint(member.cfg, run, own / "checkpoint.pt", member.step)
            (Path(d) / DONE_FILE).write_text(json.dumps(self.done))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))
