"""Evaluation of trained models, run by a pool of Ray actors while the trials go on training.

    psnr_gap.py   PSNR gap of one-step denoising on train vs test images (the paper's Eq. 4)
    fid.py        FID with torch-fidelity from a local InceptionV3 weights file
    attention.py  attention maps of a DiT and their locality (Fig. 4)
    jacobian.py   eigenvectors of the denoiser's Jacobian, 8x8 and 16x16 images (Fig. 3)
    samples.py    sampling with the respaced sampler, sample grids
    jobs.py       an evaluation job: which metrics, computed on which weights, with what result
    actors.py     the actor pool: coordinator, workers, retries, logging to MLflow

Kept free of imports: a metric module is imported only where it is used.
"""
