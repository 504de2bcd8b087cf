"""GPU settings of a training process: matmul precision, the local attention kernel, and a
persistent torch.compile cache. Free of Ray and MLflow; CPU-testable.
"""

import contextlib
import logging
import os
import tempfile

import torch

log = logging.getLogger(__name__)
CACHE_ENV = "DITSWEEP_COMPILE_CACHE"  # root of the per-node compile cache (default: under /tmp)
BACKEND_ENV = "DITSWEEP_COMPILE_BACKEND"  # torch.compile backend (default inductor; tests: aot_eager)


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile with the node's persistent cache; the backend from $DITSWEEP_COMPILE_BACKEND."""
    setup_compile_cache()
    return torch.compile(model, backend=os.environ.get(BACKEND_ENV) or "inductor")


def tf32_flags(precision: str) -> dict[str, bool]:
    """TF32 switches for a precision: tf32 turns on TF32 tensor cores for fp32 matmuls and
    convolutions (as facebookresearch/DiT's train.py); fp32 and bf16 turn them off (cuDNN's default
    is on, which would make fp32 convolutions TF32 behind the config's back)."""
    if precision not in ("tf32", "fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; known: tf32, fp32, bf16")
    on = precision == "tf32"
    return {"matmul": on, "cudnn": on}


@contextlib.contextmanager
def precision_scope(precision: str):
    """Set the TF32 switches for `precision` inside the block and restore them after.

    Scoped rather than set once, so two Trainers in one process (tests, benches) cannot leak
    their precision into each other; setting two flags costs nothing next to a step.
    """
    flags = tf32_flags(precision)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn"]
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def compile_cache_dir() -> str:
    """Node-local root of the compile cache: $DITSWEEP_COMPILE_CACHE, else <tmp>/ditsweep-compile-<uid>."""
    return os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), f"ditsweep-compile-{os.getuid()}")


def setup_compile_cache() -> str:
    """Point Inductor's FX-graph/AOT-autograd caches and Triton's kernel cache at one node-local
    folder, so the trials of a node compile a model once (later trials load it in seconds).
    Variables already set in the environment win. Returns Inductor's cache folder."""
    root = compile_cache_dir()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(root, "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(root, "triton"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    os.makedirs(os.environ["TORCHINDUCTOR_CACHE_DIR"], exist_ok=True)
    try:  # Inductor reads these variables when its config is imported; set the config too
        import torch._inductor.config as inductor_config
        inductor_config.fx_graph_cache = os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"
        if hasattr(inductor_config, "autograd_cache"):
            inductor_config.autograd_cache = os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    except ImportError:  # pragma: no cover - a torch without Inductor
        pass
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]
