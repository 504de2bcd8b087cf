"""Attention locality on hand-built maps whose answers are known, and on a real tiny DiT."""

import math

import pytest
import torch

from ditsweep.eval.attention import locality, measure, token_distances, window_mask
from ditsweep.models import build_model
from ditsweep.models.attention import neighborhood_attention

GRID = (8, 8)
N = 64


def test_identity_attention_is_perfectly_local():
    attn = torch.eye(N).expand(2, 4, N, N)  # every query attends only to itself
    result = locality(attn, GRID)
    assert result["distance"] == 0.0
    assert result["mass3"] == pytest.approx(1.0) and result["mass7"] == pytest.approx(1.0)


def test_uniform_attention_has_the_mean_pairwise_distance_and_k2_over_n_mass():
    attn = torch.full((1, 1, N, N), 1.0 / N)
    positions = [(r, c) for r in range(8) for c in range(8)]
    mean_distance = sum(math.dist(a, b) for a in positions for b in positions) / N**2
    result = locality(attn, GRID)
    assert result["distance"] == pytest.approx(mean_distance, rel=1e-5)
    # Clamped windows: every query has exactly k*k keys, also at the borders.
    assert result["mass3"] == pytest.approx(9 / N, rel=1e-5)
    assert result["mass7"] == pytest.approx(49 / N, rel=1e-5)


def test_attention_to_the_right_neighbour_is_one_token_away():
    attn = torch.zeros(N, N)
    for i in range(N):
        attn[i, i + 1 if i % 8 < 7 else i - 1] = 1.0  # the last column looks left instead
    result = locality(attn, GRID)
    assert result["distance"] == pytest.approx(1.0)
    assert result["mass3"] == pytest.approx(1.0)


def test_windows_are_the_clamped_natten_windows():
    mask = window_mask(GRID, 3)
    assert mask.sum(1).tolist() == [9] * N  # corners too: shifted inward, not cut off
    corner = mask[0].reshape(8, 8)
    assert corner[:3, :3].all() and corner.sum() == 9
    assert window_mask((4, 4), 7).all()  # a window larger than the grid covers all of it
    assert token_distances((2, 2))[0, 3] == pytest.approx(math.sqrt(2))


def test_neighborhood_attention_maps_have_all_their_mass_inside_their_window():
    q, k, v = torch.randn(3, 2, 4, N, 16).unbind(0)
    _, maps3 = neighborhood_attention(q, k, v, GRID, 3, return_map=True)
    _, maps7 = neighborhood_attention(q, k, v, GRID, 7, return_map=True)
    assert locality(maps3, GRID)["mass3"] == pytest.approx(1.0, abs=1e-5)
    assert locality(maps7, GRID)["mass7"] == pytest.approx(1.0, abs=1e-5)
    assert locality(maps7, GRID)["mass3"] < 0.9


def test_measure_a_dit_with_local_and_global_blocks():
    torch.manual_seed(0)
    model = build_model("DiT-T/1", image_size=8, layout="3,5,7,G,G,G").eval()
    for p in model.parameters():  # adaLN-Zero starts every block as the identity: perturb it
        torch.nn.init.normal_(p, std=0.05)
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    result = measure(model, images, [100, 900], seed=0, chunk=2)
    assert len(result.locality) == 6 and set(result.examples) == {100, 900}
    assert result.examples[100][0].shape == (1, 4, N, N)
    assert result.locality[0]["mass3"] == pytest.approx(1.0, abs=1e-5)  # 3x3 block
    assert result.locality[2]["mass7"] == pytest.approx(1.0, abs=1e-5)  # 7x7 block
    assert result.locality[0]["distance"] < result.locality[2]["distance"] < result.locality[3]["distance"]
