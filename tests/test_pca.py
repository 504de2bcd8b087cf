"""Appendix C's PCA attention: stage 1 (principal components of attention maps), stage 2 (a DiT
whose first blocks compose their maps from them, Eq. 7), and a sweep that takes another sweep's
artifact as its input. The slow test runs both stages as real tiny sweeps and builds the report's
Table 5 and Table 1's dagger rows from them."""

import subprocess

import pandas as pd
import pytest
import torch
from conftest import PYTHON, tiny_sweep, write_sweep
from mlflow.tracking import MlflowClient

from ditsweep.eval import pca
from ditsweep.models import build_model, set_pca_components


def test_streaming_pca_finds_the_components_of_pca_lowrank():
    """The streaming randomized PCA (maps regenerated per pass) and torch.pca_lowrank on the
    materialised matrix agree on data with a clear low-rank structure."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(400, 5, generator=gen)).Q            # [dim, 5]
    scales = torch.tensor([50.0, 30.0, 20.0, 10.0, 5.0])
    data = [torch.randn(64, 5, generator=gen) * scales @ basis.T + 3.0
            + 0.01 * torch.randn(64, 400, generator=gen) for _ in range(6)]    # 6 batches of rows
    rows = lambda: ([batch, 2 * batch] for batch in data)  # noqa: E731 (two "blocks")
    found = pca.streaming_pca(rows, q=5, niter=2)
    full = torch.cat(data)
    _, s_ref, v_ref = torch.pca_lowrank(full, q=5, center=True, niter=4)
    v, s, total = found[0]
    assert torch.allclose(s, s_ref, rtol=1e-3)
    assert torch.allclose((v.T @ v_ref).abs(), torch.eye(5), atol=1e-3)      # same components up to sign
    assert total == pytest.approx(float(((full - full.mean(0)) ** 2).sum()), rel=1e-4)
    assert torch.allclose(found[1][1], 2 * s_ref, rtol=1e-3)                 # second block: twice the rows


def test_stage1_components_in_memory_and_streaming_agree():
    torch.manual_seed(1)
    model = build_model("DiT-T/1", 8).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    images = torch.rand(12, 3, 8, 8) * 2 - 1
    a = pca.attention_components(model, images, [10, 25, 40], 50, blocks=3, k=4)
    b = pca.attention_components(model, images, [10, 25, 40], 50, blocks=3, k=4, memory_budget=0)
    assert a.components.shape == (3, 4, 64, 64) and a.timesteps == [204, 510, 816]
    assert torch.allclose(a.singular[:, 0], b.singular[:, 0], rtol=0.05)     # randomized: the top one
    assert ((a.components.sum(dim=-1)).abs() < 1e-4).all()                   # centred: rows sum to 0
    assert (a.explained > 0).all() and (a.explained <= 1).all()


def test_pca_attention_maps_sum_to_one_and_save_the_documented_parameters():
    base = build_model("DiT-XS/1", 32)
    model = build_model("DiT-XS/1", 32, pca_attention=(3, 50))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # per block 2 D^2 + 2 D (q, k) - (D K H + K H) (coefficients) = 76,912 for D=252, H=4, K=50
    assert count(base) - count(model) == 3 * (2 * 252 * 252 + 2 * 252 - (252 * 50 * 4 + 50 * 4)) == 230_736
    small = build_model("DiT-T/1", 8, pca_attention=(3, 6))
    set_pca_components(small, torch.randn(3, 6, 64, 64))
    _, maps = small(torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), return_attention=True)
    assert torch.allclose(maps[0].sum(-1), torch.ones(2, 4, 64), atol=1e-5)  # Eq. 7 with delta = 1/N
    assert not torch.allclose(maps[0], torch.full_like(maps[0], 1 / 64))     # the PCs do shape it
    with pytest.raises(ValueError, match="do not fit this block"):
        set_pca_components(small, torch.randn(3, 6, 16, 16))


def test_a_pca_attention_sweep_needs_its_input_and_global_first_blocks(tmp_path):
    from ditsweep.config import SpecError, expand, load_sweep

    sweep = tiny_sweep()
    sweep["grid"]["variant"] = ["pca-attention"]
    with pytest.raises(SpecError, match="grid.variant: 'pca-attention' needs a DiT preset .* and "
                                        "inputs.pca_components"):
        load_sweep(write_sweep(tmp_path, sweep), check_data=False)
    sweep["inputs"] = {"pca_components": {"experiment": "s1", "trial": "000_x", "artifact": "a/c.pt"}}
    sweep["grid"]["layout"] = ["3,5,7,G,G,G"]
    with pytest.raises(SpecError, match="grid.layout: 'pca-attention' .* must be global, not '3,5,7,G,G,G'"):
        load_sweep(write_sweep(tmp_path, sweep), check_data=False)
    sweep["grid"]["layout"] = ["G,G,G,3,5,7"]
    (trial,) = expand(load_sweep(write_sweep(tmp_path, sweep), check_data=False))
    assert trial.inputs["pca_components"].trial == "000_x" and trial.variant == "pca-attention"


def _stage_sweeps(workdir):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    stage1 = tiny_sweep(name="pca-stage1", tracking={"uri": uri})
    stage1["eval"] = {"psnr_gap": {"enabled": False}, "attention": {"enabled": False},
                      "samples": {"enabled": False},
                      "attention_pca": {"enabled": True, "num_images": 8, "components": 6}}
    stage2 = tiny_sweep(name="pca-stage2", tracking={"uri": uri})
    # Table 1 with its dagger rows (seed 143, batch 128) and Table 5's four rows, N=10.
    stage2["grid"].update(layout=["global", "local"], seed=[0, 143])
    stage2["include"] = [{"model": ["DiT-T/1"], "layout": ["global"],
                          "variant": ["weight-sharing", "pca-attention"], "n_train": [10], "seed": [0]}]
    stage2["train"]["batch_size"] = 128
    stage2["eval"] = {"psnr_gap": {"num_images": 8, "steps": 5}, "attention": {"enabled": False},
                      "samples": {"enabled": False}}
    stage2["inputs"] = {"pca_components": {"experiment": "pca-stage1", "trial": "000_DiT-T-1_global_N10_s0",
                                           "artifact": "attention_pca/components.pt"}}
    return uri, write_sweep(workdir, stage1, "stage1.yaml"), write_sweep(workdir, stage2, "stage2.yaml")


def _run(path, workdir):
    return subprocess.run([PYTHON, "-m", "ditsweep.run", str(path)], cwd=workdir, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_two_stage_pca_sweep_and_the_report_of_table5_and_dagger_rows(tmp_path):
    from ditsweep.report import write_report

    uri, stage1, stage2 = _stage_sweeps(tmp_path)
    early = _run(stage2, tmp_path)  # stage 1 has not run: refused before anything starts
    assert early.returncode == 2, early.stdout[-2000:] + early.stderr[-2000:]
    assert ("inputs.pca_components: artifact 'attention_pca/components.pt' of trial "
            "'000_DiT-T-1_global_N10_s0' in MLflow experiment 'pca-stage1'") in early.stderr

    for path in (stage1, stage2):
        proc = _run(path, tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Stage 1's artifact: [blocks, K, N, N] components of the trained DiT's maps.
    client = MlflowClient(uri)
    exp1 = client.get_experiment_by_name("pca-stage1").experiment_id
    (run1,) = client.search_runs([exp1], "tags.`ditsweep.role` = 'trial'")
    local = client.download_artifacts(run1.info.run_id, "attention_pca/components.pt", str(tmp_path))
    components = pca.load(local)
    assert components.shape == (3, 6, 64, 64)
    assert 0 < run1.data.metrics["attention_pca_explained"] <= 1

    # Stage 2's PCA trial trained with exactly those components (its checkpoint carries them).
    states = [torch.load(p, weights_only=False) for p in tmp_path.rglob("checkpoint.pt")]
    pca_states = [s["ema"] for s in states if "blocks.0.attn.components" in s["ema"]]
    assert pca_states, "no checkpoint of the pca-attention trial"
    ema = pca_states[-1]
    for b in range(3):
        expected = components[b] - components[b].mean(dim=-1, keepdim=True)
        assert torch.allclose(ema[f"blocks.{b}.attn.components"], expected, atol=1e-6)
    model = build_model("DiT-T/1", 8, pca_attention=(3, 6))
    model.load_state_dict(ema)
    _, maps = model(torch.randn(2, 3, 8, 8), torch.tensor([100, 900]), return_attention=True)
    for m in maps[:3]:
        assert torch.allclose(m.sum(-1), torch.ones(2, 4, 64), atol=1e-5)
    assert sum(p.numel() for p in build_model("DiT-T/1", 8).parameters()) - \
        sum(p.numel() for p in model.parameters()) == 3 * (2 * 64 * 64 + 2 * 64 - (64 * 6 * 4 + 6 * 4))

    # The report: Table 5's four rows and Table 1's dagger rows, from these runs.
    out = write_report("pca-stage2", uri, str(tmp_path / "report"), log_artifacts=False).parent
    exp2 = client.get_experiment_by_name("pca-stage2").experiment_id
    runs = {r.data.tags["ditsweep.trial"]: r
            for r in client.search_runs([exp2], "tags.`ditsweep.role` = 'trial'")}
    gap = lambda name: runs[name].data.metrics["psnr_gap_mean"]  # noqa: E731
    t5 = pd.read_csv(out / "table5.csv")
    t5 = t5.query("metric == 'psnr_gap_mean' and row == 'value' and model == 'DiT-T/1'")
    t5 = t5.set_index("configuration")["mean"]
    assert list(t5.index) == ["global", "local", "global+weight-sharing", "global+pca-attention"]
    assert t5["global+pca-attention"] == pytest.approx(gap("005_DiT-T-1_global_pca-attention_N10_s0"))
    assert t5["global+weight-sharing"] == pytest.approx(gap("004_DiT-T-1_global_weight-sharing_N10_s0"))
    assert t5["global"] == pytest.approx(gap("000_DiT-T-1_global_N10_s0"))
    t1 = pd.read_csv(out / "table1.csv").query("metric == 'psnr_gap_mean' and row == 'value'")
    dagger = t1[t1.model == "DiT-T/1 †"].set_index("configuration")["mean"]
    assert dagger["global"] == pytest.approx(gap("001_DiT-T-1_global_N10_s143"))
    assert dagger["local"] == pytest.approx(gap("003_DiT-T-1_local_N10_s143"))
    md = (out / "REPORT.md").read_text()
    assert "## Table 5: reducing FLOPs" in md and "| DiT-T/1 † | w/ Local |" in md
