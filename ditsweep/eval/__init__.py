"""Evaluation: PSNR gap (and, with later issues, FID, attention locality, Jacobians)."""
