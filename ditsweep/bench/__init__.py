"""Measuring tools: what the code costs on this machine, and what --dry-run's estimate reads.

    __main__.py      `python -m ditsweep.bench [--gpu]`
    cpu.py           attention layer, training and data-loader speed on a CPU
    attention.py     one attention layer's forward+backward time
    gpu.py           `--gpu`: a GPU's training and evaluation speeds, written as a calibration file
    calibration.py   reading calibration files (calibration/<gpu>.json) for the cost estimate
    mlflow_load.py   `python -m ditsweep.loadtest`: many trials' MLflow writes at once
"""
