"""AstroM3 network: encoder shapes, the padding mask inside ProbSparse attention, the trimodal
CLIP loss on a hand-computed case, logit-scale clamping and every classification mode."""

from __future__ import annotations

import math

import pytest
import torch

from fmb.models.astrom3.model import (
    AstroM3,
    AstroM3ModelConfig,
    GalSpecNet,
    InformerEncoder,
    ProbSparseAttention,
    symmetric_clip_loss,
    trimodal_clip_loss,
)


def tiny(**kw) -> AstroM3ModelConfig:
    base = dict(embed_dim=16, seq_len=32, d_model=16, n_heads=2, n_layers=2, d_ff=32, factor=2,
                conv_channels=[4, 4, 4, 4], m_hidden=16)
    base.update(kw)
    return AstroM3ModelConfig(**base)


def inputs(batch: int = 3, seq_len: int = 32, n_valid: tuple[int, ...] = (32, 20, 7)) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    for i, n in enumerate(n_valid):
        mask[i, :n] = True
    return {
        "photometry": torch.randn(batch, seq_len, 5, generator=gen),
        "photometry_mask": mask,
        "spectra": torch.randn(batch, 3, 2575, generator=gen),
        "metadata": torch.randn(batch, 38, generator=gen),
    }


def test_published_encoder_sizes():
    cfg = AstroM3ModelConfig()
    assert GalSpecNet(cfg).out_dim == 1184  # 32 channels x 37 positions, as upstream's spectra_proj
    assert InformerEncoder(cfg, 9).out_dim == 200 * 128
    out = GalSpecNet(cfg)(torch.randn(2, 3, 2575))
    assert out.shape == (2, 1184)


def test_clip_outputs_are_normalised_embeddings_and_clamped_scales():
    model = AstroM3(tiny(), num_classes=10).eval()
    with torch.no_grad():
        model.logit_scale.copy_(torch.log(torch.tensor([0.5, 2.0, 500.0])))
        out = model(**inputs())
    for name in ("photometry", "spectra", "metadata"):
        assert out[name].shape == (3, 16)
        torch.testing.assert_close(out[name].norm(dim=-1), torch.ones(3))
    # exp(log_scale), clamped to [1, 100]: not log_scale used as a multiplier.
    torch.testing.assert_close(out["scales"], torch.tensor([1.0, 2.0, 100.0]))


def test_padding_does_not_change_outputs_and_is_zeroed():
    encoder = InformerEncoder(tiny(), 9).eval()
    x = inputs()
    steps = torch.randn(3, 32, 9)
    mask = x["photometry_mask"]
    torch.manual_seed(1)
    first = encoder(steps, mask)
    changed = steps.clone()
    changed[~mask] = 1e3 * torch.randn(int((~mask).sum()), 9)
    torch.manual_seed(1)
    second = encoder(changed, mask)
    torch.testing.assert_close(first, second)
    per_step = first.view(3, 32, 16)
    assert per_step[~mask].abs().max() == 0
    assert per_step[mask].abs().sum(-1).min() > 0
    assert torch.isfinite(first).all()


def test_probsparse_attention_ignores_padded_keys_and_queries():
    # Hidden states at padded steps are not zero inside the encoder (positions are added), so
    # the mask must act inside attention: change them and nothing at valid steps may move.
    attention = ProbSparseAttention(16, 2, factor=2, dropout=0.0).eval()
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[0, :12] = True
    mask[1, :] = True
    h = torch.randn(2, 32, 16)
    torch.manual_seed(3)
    a = attention(h, mask)
    h[0, 12:] = 50 * torch.randn(20, 16)
    torch.manual_seed(3)
    b = attention(h, mask)
    torch.testing.assert_close(a[0, :12], b[0, :12])
    torch.testing.assert_close(a[1], b[1])


def test_attention_sees_the_light_curve_not_only_the_step():
    # Changing one valid step changes the outputs of other valid steps (attention mixes steps).
    encoder = InformerEncoder(tiny(factor=10), 9).eval()
    steps = torch.randn(1, 32, 9)
    mask = torch.ones(1, 32, dtype=torch.bool)
    torch.manual_seed(0)
    a = encoder(steps, mask).view(32, 16)
    steps[0, 5] += 3.0
    torch.manual_seed(0)
    b = encoder(steps, mask).view(32, 16)
    assert not torch.allclose(a[20], b[20])


def test_trimodal_loss_hand_computed():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scales = torch.tensor([2.0, 3.0, 5.0])
    parts = trimodal_clip_loss({"photometry": p, "spectra": s, "metadata": m}, scales)
    # p.s: [[0.6, 0.8], [0.8, 0.6]] -> each row and column: log(1 + exp(0.2 * scale)).
    ps = math.log(1 + math.exp(0.2 * 2.0))
    sm = math.log(1 + math.exp(0.2 * 3.0))
    # m.p = identity -> log(1 + exp(-scale)).
    mp = math.log(1 + math.exp(-5.0))
    assert parts["phot_spec"].item() == pytest.approx(ps, rel=1e-5)
    assert parts["spec_meta"].item() == pytest.approx(sm, rel=1e-5)
    assert parts["meta_phot"].item() == pytest.approx(mp, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(ps + sm + mp, rel=1e-5)


@pytest.mark.parametrize("mode,fusion,modalities", [
    ("photo", "avg", {"photometry"}),
    ("spectra", "avg", {"spectra"}),
    ("meta", "avg", {"metadata"}),
    ("all", "avg", {"photometry", "spectra", "metadata"}),
    ("all", "concat", {"photometry", "spectra", "metadata"}),
])
def test_classification_modes(mode, fusion, modalities):
    model = AstroM3(tiny(mode=mode, fusion=fusion), num_classes=10)
    out = model(**inputs())
    assert out["logits"].shape == (3, 10)
    assert {k for k in out if k != "logits"} == modalities
    assert model.head.in_features == 16 * (3 if fusion == "concat" else 1)
    # Only the encoders a mode uses exist (no unused parameters under DDP).
    encoders = {n.split("_")[0] for n, _ in model.named_children() if n.endswith("_encoder")}
    assert encoders == modalities
    out["logits"].sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_metadata_statistics_are_saved_with_the_weights():
    model = AstroM3(tiny(), num_classes=10)
    model.set_metadata_stats(torch.arange(38.0), torch.full((38,), 2.0))
    state = model.state_dict()
    assert torch.equal(state["meta_mean"], torch.arange(38.0)) and torch.equal(state["meta_std"], torch.full((38,), 2.0))
    # The standardisation is applied: shifting the metadata by the mean gives the same result.
    x = inputs()
    moved = {**x, "metadata": x["metadata"] * 2.0 + torch.arange(38.0)}
    fresh = AstroM3(tiny(), num_classes=10)
    fresh.load_state_dict(state)
    model.eval()
    fresh.eval()
    base = AstroM3(tiny(), num_classes=10)
    base.load_state_dict({**state, "meta_mean": torch.zeros(38), "meta_std": torch.ones(38)})
    base.eval()
    torch.manual_seed(0)
    a = fresh(**moved)["metadata"]
    torch.manual_seed(0)
    b = base(**x)["metadata"]
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- incomplete data


def test_clip_loss_over_the_objects_of_each_pair():
    gen = torch.Generator().manual_seed(3)
    emb = {m: torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1).requires_grad_()
           for m in ("photometry", "spectra", "metadata")}
    scales = torch.tensor([4.0, 4.0, 4.0])
    present = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=torch.bool)
    parts = trimodal_clip_loss(emb, scales, present)
    # Each pair equals the plain loss over the rows that have both modalities.
    for (a, b, name), rows in zip((("photometry", "spectra", "phot_spec"), ("spectra", "metadata", "spec_meta"),
                                   ("metadata", "photometry", "meta_phot")), ([0, 4], [0, 3], [0, 1, 2]), strict=True):
        expected = symmetric_clip_loss(emb[a][rows], emb[b][rows], scales[0])
        torch.testing.assert_close(parts[name], expected)
    parts["loss"].backward()
    assert emb["spectra"].grad[[1, 2]].abs().sum() == 0  # objects without a spectrum give it no gradient
    assert emb["metadata"].grad[[1, 2]].abs().sum() > 0  # but still teach the metadata-photometry pair
    one = torch.tensor([True, False, False, False, False])
    assert symmetric_clip_loss(emb["photometry"], emb["spectra"], scales[0], one).item() == 0.0


def test_missing_metadata_imputed_flagged_and_unused_columns_ignored():
    model = AstroM3(tiny(mode="meta"), num_classes=10).eval()
    model.set_metadata_stats(torch.zeros(38), torch.ones(38), torch.arange(38) != 5)
    x = inputs()
    x["metadata"][0, 3] = float("nan")
    out = model(**x)
    assert torch.isfinite(out["logits"]).all()
    moved = {**x, "metadata": x["metadata"].clone()}
    moved["metadata"][:, 5] += 7.0  # column 5 had no finite training value: left out
    torch.testing.assert_close(model(**moved)["logits"], out["logits"])
    imputed = {**x, "metadata": x["metadata"].clone()}
    imputed["metadata"][0, 3] = 0.0  # missing = the training mean (0 here) while the flag map is zero
    torch.testing.assert_close(model(**imputed)["logits"], out["logits"])
    with torch.no_grad():
        model.metadata_encoder.missing.weight.fill_(1.0)  # the model sees the flag once it learns to
    assert not torch.allclose(model(**imputed)["logits"][0], model(**x)["logits"][0])


def test_all_mode_fuses_the_modalities_present():
    model = AstroM3(tiny(mode="all"), num_classes=10).eval()
    x = inputs()
    present = torch.tensor([[True, False, True], [True, True, True], [False, True, False]])
    torch.manual_seed(0)
    out = model(**x, present=present)
    other = {**x, "spectra": torch.randn(3, 3, 2575)}
    torch.manual_seed(0)
    again = model(**other, present=present)
    torch.testing.assert_close(again["logits"][0], out["logits"][0])  # object 0 has no spectrum
    assert not torch.allclose(again["logits"][1], out["logits"][1])
    fused = (out["photometry"][0] + out["metadata"][0]) / 2
    torch.testing.assert_close(out["logits"][0], model.head(fused))
