"""Jacobians of maps whose Jacobian is known, and its eigendecomposition."""

import pytest
import torch

from ditsweep.diffusion import create_diffusion
from ditsweep.eval.jacobian import (
    asymmetry,
    chunk_for_memory,
    denoiser_jacobian,
    eigendecomposition,
    jacobian,
    plot_eigenvectors,
)
from ditsweep.models import build_model


def random_dit() -> torch.nn.Module:
    """DiT-T/1 with every weight drawn (the zero-initialised adaLN would make it trivial)."""
    model = build_model("DiT-T/1", image_size=8, layout="3,5,7,G,G,G").eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model

def test_jacobian_of_a_linear_map_is_its_matrix():
    torch.manual_seed(0)
    a = torch.randn(12, 12)
    jac = jacobian(lambda x: x.reshape(len(x), -1) @ a.T, torch.randn(3, 2, 2), chunk=5)
    assert torch.allclose(jac, a, atol=1e-6)
    assert asymmetry(jac) > 0.1 and asymmetry(a + a.T) == 0.0


def test_eigendecomposition_of_a_known_symmetric_matrix():
    torch.manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    values = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, -1.0], dtype=torch.float64)
    jac = (q @ torch.diag(values) @ q.T).float()
    got_values, vectors = eigendecomposition(jac)
    assert torch.allclose(got_values, values.float(), atol=1e-5)  # descending
    for k in range(6):  # each eigenvector up to sign
        assert abs(torch.dot(vectors[:, k].double(), q[:, k]).item()) == pytest.approx(1.0, abs=1e-5)
    # A non-symmetric Jacobian is decomposed through its symmetric part.
    skew = torch.randn(6, 6)
    skewed_values, _ = eigendecomposition(jac + skew - skew.T)
    assert torch.allclose(skewed_values, values.float(), atol=1e-5)


class LinearEps(torch.nn.Module):
    """eps_theta(x, t) = M x for every t, plus zero variance channels."""

    def __init__(self, m: torch.Tensor):
        super().__init__()
        self.m = torch.nn.Parameter(m)

    def forward(self, x, t):
        eps = (x.reshape(len(x), -1) @ self.m.T).reshape(x.shape)
        return torch.cat([eps, torch.zeros_like(x)], dim=1)


def test_denoiser_jacobian_of_a_linear_noise_predictor():
    torch.manual_seed(2)
    d = 3 * 4 * 4
    m = torch.randn(d, d) * 0.1
    t = 300
    abar = float(create_diffusion().alphas_cumprod[t])
    expected = (torch.eye(d) - (1 - abar) ** 0.5 * m) / abar**0.5  # d x0_hat / d x_t
    jac = denoiser_jacobian(LinearEps(m), torch.rand(3, 4, 4) * 2 - 1, t, chunk=16)
    assert torch.allclose(jac, expected, atol=1e-4)


def test_chunked_jacobian_of_a_dit_matches_autograd():
    torch.manual_seed(3)
    model = random_dit()
    diffusion = create_diffusion()
    x_t = torch.randn(3, 8, 8)

    def x0_hat(x):
        tt = torch.full((len(x),), 100, dtype=torch.long)
        return diffusion.predict_xstart_from_eps(x, tt, model(x, tt)[:, :3])

    ours = jacobian(x0_hat, x_t, chunk=50)
    reference = torch.autograd.functional.jacobian(lambda x: x0_hat(x[None])[0], x_t).reshape(192, 192)
    assert torch.allclose(ours, reference, atol=1e-4)


def test_32x32_rows_in_forced_small_chunks_equal_the_matrix():
    """The 32x32 path (3072 rows, as on a GPU) on a CPU: a linear noise predictor at 32x32 with
    a chunk of 500 rows per pass (7 passes, the last one partial) gives exactly its Jacobian."""
    torch.manual_seed(4)
    d = 3 * 32 * 32
    m = torch.randn(d, d) * 0.01
    t = 250
    abar = float(create_diffusion().alphas_cumprod[t])
    diffusion = create_diffusion()
    model = LinearEps(m)
    x_t = torch.randn(3, 32, 32)

    def x0_hat(x):
        tt = torch.full((len(x),), t, dtype=torch.long)
        return diffusion.predict_xstart_from_eps(x, tt, model(x, tt)[:, :3])

    jac = jacobian(x0_hat, x_t, chunk=500)
    expected = (torch.eye(d) - (1 - abar) ** 0.5 * m) / abar**0.5
    assert jac.shape == (3072, 3072)
    assert torch.allclose(jac, expected, atol=1e-4)


def test_dit_jacobian_in_small_or_memory_chosen_chunks_equals_the_full_computation():
    torch.manual_seed(5)
    model = random_dit()
    x0 = torch.rand(3, 8, 8) * 2 - 1
    full = denoiser_jacobian(model, x0, 100, chunk=192)   # one pass: every row at once
    assert torch.allclose(denoiser_jacobian(model, x0, 100, chunk=23), full, atol=1e-5)
    assert torch.allclose(denoiser_jacobian(model, x0, 100, chunk=None), full, atol=1e-5)


def test_a_chunk_that_runs_out_of_memory_is_halved_and_retried():
    a = torch.randn(48, 48)
    sizes = []

    def fn(x):  # a device with room for 16 copies at once
        sizes.append(len(x))
        if len(x) > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return x.reshape(len(x), -1) @ a.T

    jac = jacobian(fn, torch.randn(3, 4, 4), chunk=40)
    assert torch.allclose(jac, a, atol=1e-6)
    assert 40 in sizes and 20 in sizes and max(s for s in sizes if s <= 16) == 10


def test_chunk_for_memory():
    # 3072 rows at 40 MB each with 80 GB free: 60% of it -> 1200 rows per pass
    assert chunk_for_memory(40e6, 80e9, 3072) == 1200
    assert chunk_for_memory(40e6, 1e9, 3072) == 15
    assert chunk_for_memory(40e6, 1e6, 3072) == 1        # never below one row
    assert chunk_for_memory(1.0, 80e9, 3072) == 3072     # never above the row count


def test_larger_images_are_refused_with_the_limit():
    model = build_model("UNet-T", image_size=32)
    with pytest.raises(ValueError, match="on a CPU .* up to 16x16.*not 32x32"):
        denoiser_jacobian(model, torch.zeros(3, 32, 32), 100)


def test_sweep_refuses_a_cpu_jacobian_above_16x16_naming_the_field(tmp_path):
    from conftest import tiny_sweep, write_sweep

    from ditsweep.config import SpecError, load_sweep

    sweep = tiny_sweep(data={"resolution": 32}, eval={"jacobian": {"enabled": True}})
    with pytest.raises(SpecError, match=r"eval\.jacobian\.enabled: Jacobians of 32x32 images need GPU "
                                        r"evaluators \(eval\.actors\.gpus > 0\).*data\.resolution: 32"):
        load_sweep(write_sweep(tmp_path, sweep), check_data=False)
    sweep["eval"]["actors"] = {"gpus": 0.5}
    assert load_sweep(write_sweep(tmp_path, sweep), check_data=False).eval.jacobian.enabled


def test_eigenvector_figure(tmp_path):
    values, vectors = eigendecomposition(torch.randn(48, 48))
    plot_eigenvectors(values, vectors, (3, 4, 4), 6, "test", tmp_path / "eig.png")
    assert (tmp_path / "eig.png").stat().st_size > 1000
