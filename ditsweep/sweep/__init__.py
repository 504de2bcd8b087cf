"""The driver: what `python -m ditsweep.run SWEEP.yaml` does in its own process, in order.

    main.py             the command: validate and expand the sweep (ditsweep/config), then one of
                        --dry-run, --check or a run
    estimate.py         --dry-run: what the sweep will cost (GPU-hours, from calibration files)
    eval_plan.py        --dry-run: which evaluations each trial gets
    reuse_plan.py       which trials train, which reuse a finished run, which are done already
    preflight.py        --check (and before every cluster run): every node type can run a trial
    tune.py             the run: evaluation pool, Ray Tune, the sweep's MLflow run and report
    progress.py         the console while it runs
    failure_summary.py  the trials' end states and the failures several trials share
    distinct.py         `python -m ditsweep.identity`: distinct trials across sweeps

The trials it starts run ditsweep/train/ on the Ray workers; nothing below imports this package.
"""
