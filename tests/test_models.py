"""Backbones: presets, layouts, DiT details (adaLN-Zero, weight sharing), FLOPs, a few train steps."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ditsweep.models import (LAYOUTS, PRESETS, LayoutError, build_model, count_flops, layout_to_str,
                             resolve_layout)
from ditsweep.models.attention import neighborhood_index

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TABLE4 = ["global", "local", "local-mix", "local-tail", "local-smaller", "local9", "local9-mix", "local9-tail",
          "local9-larger", "uniform5", "pairs357"]


def inputs(batch, size, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, channels, size, size, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


def randomize_zero_init(model):
    """Give the zero-initialised layers random weights so outputs and maps are not trivial."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


# ---------------------------------------------------------------- presets and shapes

@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("channels", [3, 1])
def test_output_shape_every_preset(preset, channels):
    model = build_model(preset, 8, in_channels=channels)
    x, t = inputs(2, 8, channels)
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == (2, 2 * channels, 8, 8)
    assert model.arch == PRESETS[preset]["arch"]


def test_paper_dit_with_local_layout_at_32():
    model = build_model("DiT-XS/1", 32, layout="local", attention_backend="torch")
    assert model.depth == 12 and model.layout == [3, 5, 7, 9, 11, 13] + [None] * 6
    x, t = inputs(1, 32)
    with torch.no_grad():
        assert model(x, t).shape == (1, 6, 32, 32)


def test_unknown_preset_lists_known_ones():
    with pytest.raises((KeyError, ValueError), match="DiT-XS/1"):
        build_model("DiT-XXL/1", 32)


def test_unet_rejects_layouts_and_weight_sharing():
    with pytest.raises(LayoutError):
        build_model("UNet-T", 8, layout="local")
    with pytest.raises(ValueError):
        build_model("UNet-T", 8, weight_sharing=True)


# ---------------------------------------------------------------- layouts

def test_table4_layouts_resolve():
    assert sorted(LAYOUTS[12]) == sorted(TABLE4)
    for name in TABLE4:
        layout = resolve_layout(name, 12, 32)
        assert len(layout) == 12
        assert all(k is None or (k % 2 == 1 and 1 <= k <= 32) for k in layout)
    assert resolve_layout("local", 12, 32) == [3, 5, 7, 9, 11, 13] + [None] * 6
    assert layout_to_str(resolve_layout("local-mix", 12, 32)) == "3,G,5,G,7,G,9,G,11,G,13,G"
    assert layout_to_str(resolve_layout("local-smaller", 12, 32)) == "3,5,7,9,11,13,15,17,19,G,G,G"


def test_tiny_layouts_and_global_at_any_depth():
    assert resolve_layout("local", 6, 8) == [3, 5, 7, None, None, None]
    assert resolve_layout("local-mix", 6, 8) == [3, None, 5, None, 7, None]
    assert resolve_layout("local-tail", 6, 8) == [None, None, None, 3, 5, 7]
    assert resolve_layout("global", 5, 4) == [None] * 5
    assert resolve_layout(None, 3, 4) == [None] * 3


def test_layout_forms_agree():
    expected = [3, 5, None, 7, None, 1]
    assert resolve_layout("3,5,G,7,g,1", 6, 8) == expected
    assert resolve_layout(" 3, 5 ,G,7,G,1 ", 6, 8) == expected
    assert resolve_layout([3, "5", "G", 7, None, 1], 6, 8) == expected
    assert layout_to_str(expected) == "3,5,G,7,G,1"


@pytest.mark.parametrize("layout,depth,grid,needle", [
    ("local-huge", 12, 32, "local-huge"),          # unknown name
    ("3,4,G,G,G,G", 6, 8, "window 4 is even"),
    ("0,G,G,G,G,G", 6, 8, "window 0"),
    ([-3, "G", "G", "G", "G", "G"], 6, 8, "window -3"),
    ("3,5,9,G,G,G", 6, 8, "window 9 is larger than the 8x8"),
    ("local", 12, 8, "window 9 is larger than the 8x8"),   # a Table-4 layout on a too small grid
    ("3,5,G", 6, 8, "3 entries"),
    ("3,x,G,G,G,G", 6, 8, "'x'"),
    ([3, 2.5, "G", "G", "G", "G"], 6, 8, "2.5"),
])
def test_bad_layouts(layout, depth, grid, needle):
    with pytest.raises(LayoutError, match=needle.replace(".", r"\.")):
        resolve_layout(layout, depth, grid)


def test_unknown_layout_lists_known_names_for_the_depth():
    with pytest.raises(LayoutError) as e:
        resolve_layout("local9", 6, 8)  # a depth-12 name
    assert "local-mix" in str(e.value) and "local9" in str(e.value)
    assert "pairs357" not in str(e.value)


# ---------------------------------------------------------------- DiT details

@pytest.mark.parametrize("preset,layout", [("DiT-T/1", "local-mix"), ("DiT-T/2", None), ("UNet-T", None)])
def test_initial_output_is_exactly_zero(preset, layout):
    model = build_model(preset, 8, layout=layout)
    x, t = inputs(4, 8)
    with torch.no_grad():
        assert torch.equal(model(x, t), torch.zeros(4, 6, 8, 8))


def test_dit_init_follows_reference():
    model = build_model("DiT-T/1", 8)
    assert not any(n.startswith("pos_embed") for n, _ in model.named_parameters())  # fixed, not trained
    assert model.pos_embed.shape == (1, 64, 64)
    for block in model.blocks:
        assert block.norm1.weight is None and block.norm1.eps == 1e-6
        assert block.attn.qkv.bias.abs().max() == 0 and block.mlp.fc1.bias.abs().max() == 0
    std = model.t_embedder.mlp[0].weight.std().item()
    assert 0.015 < std < 0.025


def test_weight_sharing_shares_parameters():
    plain = build_model("DiT-T/1", 8, layout="local")
    shared = build_model("DiT-T/1", 8, layout="local", weight_sharing=True)
    b = shared.blocks
    for dst, src in ((1, 0), (3, 2)):
        assert b[dst].attn.qkv.weight is b[src].attn.qkv.weight
        assert b[dst].attn.proj.weight is b[src].attn.proj.weight
        assert b[dst].mlp.fc1.weight is b[src].mlp.fc1.weight
        assert b[dst].adaLN_modulation[1].weight is b[src].adaLN_modulation[1].weight
    assert b[4].attn.qkv.weight is not b[0].attn.qkv.weight
    # Each block keeps its own window: sharing parameters, not the layout.
    assert [blk.attn.window for blk in b] == [3, 5, 7, None, None, None]
    block_params = sum(p.numel() for p in plain.blocks[0].parameters())
    n_plain = sum(p.numel() for p in plain.parameters())
    n_shared = sum(p.numel() for p in shared.parameters())
    assert n_plain - n_shared == 2 * block_params


def test_return_attention_maps():
    model = randomize_zero_init(build_model("DiT-T/1", 8, layout="local-mix", attention_backend="torch"))
    x, t = inputs(2, 8)
    with torch.no_grad():
        out, maps = model(x, t, return_attention=True)
        plain = model(x, t)
    assert (out - plain).abs().max() <= 1e-5
    assert len(maps) == model.depth
    for window, attn in zip(model.layout, maps):
        assert attn.shape == (2, 4, 64, 64)
        assert torch.allclose(attn.sum(-1), torch.ones(2, 4, 64), atol=1e-5)
        if window is not None:
            inside = torch.zeros(64, 64, dtype=torch.bool).scatter_(1, neighborhood_index(8, 8, window), True)
            assert attn[..., ~inside].abs().max() == 0


def test_natten_backend_matches_torch_backend_in_dit():
    model = randomize_zero_init(build_model("DiT-T/1", 8, layout="local", attention_backend="torch"))
    other = build_model("DiT-T/1", 8, layout="local", attention_backend="natten")
    other.load_state_dict(model.state_dict())
    x, t = inputs(2, 8)
    with torch.no_grad():
        assert (model(x, t) - other(x, t)).abs().max() <= 1e-5


# ---------------------------------------------------------------- FLOPs

def test_unet_xs_matches_dit_xs_flops():
    dit = count_flops(build_model("DiT-XS/1", 32, layout="global"), 32)
    unet = count_flops(build_model("UNet-XS", 32), 32)
    assert abs(unet / dit - 1) <= 0.10, (dit, unet)


def test_unet_xs_paper_matches_dit_xs_without_attention_matmuls():
    # The paper's convention (its UNet: 303.17G vs DiT-XS/1: 300.49G): SDPA uncounted.
    def raw_flops(model):
        x, t = inputs(1, 32)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, t)
        return counter.get_total_flops()
    dit = raw_flops(build_model("DiT-XS/1", 32))
    unet = raw_flops(build_model("UNet-XS-paper", 32))
    assert abs(unet / dit - 1) <= 0.05, (dit, unet)


def test_count_flops_includes_attention():
    # FlopCounterMode alone counts SDPA's CPU kernel as free; count_flops adds it back.
    model = build_model("DiT-T/1", 8)
    x, t = inputs(1, 8)
    with FlopCounterMode(display=False) as raw, torch.no_grad():
        model(x, t)
    tokens, hidden = 64, 64
    attention = model.depth * 2 * 2 * tokens * tokens * hidden  # QK^T and PV, a multiply-add = 2
    assert count_flops(model, 8) == raw.get_total_flops() + attention


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("preset,layout,sharing", [("DiT-T/1", "local-mix", False), ("DiT-T/1", "local", True),
                                                   ("UNet-T", None, False)])
def test_a_few_training_steps(preset, layout, sharing):
    torch.manual_seed(0)
    model = build_model(preset, 8, layout=layout, weight_sharing=sharing, attention_backend="torch")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
    x0, t = inputs(8, 8)
    got_grad = {name: False for name, _ in model.named_parameters()}
    for _ in range(4):
        noise = torch.randn_like(x0)
        out = model(x0 + noise, t)
        # eps prediction plus a term on the variance channels, so every output channel is trained
        loss = F.mse_loss(out[:, :3], noise) + out[:, 3:].square().mean()
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            got_grad[name] |= p.grad is not None and bool(p.grad.abs().sum() > 0)
        opt.step()
    # adaLN-Zero / zero-init residuals: deep layers only get gradients after a step or two.
    assert all(got_grad.values()), [n for n, ok in got_grad.items() if not ok]
