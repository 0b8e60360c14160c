"""AstroCLIP family: encoders, CLIP loss, fine-tune modes, HDF5 / Euclid+DESI reading, retrieval, SpecFormer."""

from __future__ import annotations

import copy
import json
import math

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmb.data.synth import astroclip as synth
from fmb.data.synth import euclid_desi as synth_euclid
from fmb.errors import CheckpointError, ConfigError, DataError
from fmb.models.astroclip.data import AstroClipHDF5, EuclidDesiPairs, augment, legacy_survey_rgb
from fmb.models.astroclip.model import (
    AstroCLIP,
    CrossAttentionHead,
    SpecFormer,
    SpecFormerShape,
    ViT,
    ViTShape,
    chunk_mask,
    clip_logits,
    clip_loss,
    masked_modelling_loss,
    retrieval_hits,
    spectrum_tokens,
)
from fmb.models.astroclip.trainer import (
    AstroCLIPConfig,
    AstroCLIPTrainer,
    SpecFormerConfig,
    SpecFormerTrainer,
)
from fmb.train import checkpoint as ckpt
from fmb.train.losses import masked_clip_loss

TINY_VIT = ViTShape(width=32, depth=3, heads=2, patch_size=8, image_size=32, drop_path=0.1)
TINY_SPEC = SpecFormerShape(width=32, depth=2, heads=2)


@pytest.fixture(scope="module")
def h5_file(tmp_path_factory):
    return synth.write(tmp_path_factory.mktemp("astroclip"), 120, seed=1, image_size=40)


def tiny_config(out, h5, **model) -> AstroCLIPConfig:
    cfg = AstroCLIPConfig()
    cfg.model.image_preset, cfg.model.patch_size, cfg.model.spectrum_preset = "demo", 8, "demo"
    cfg.model.embed_dim, cfg.model.spectrum_slice, cfg.model.spectrum_stride = 32, 80, 40
    for key, value in model.items():
        setattr(cfg.model, key, value)
    cfg.data.path, cfg.data.image_size = str(h5), 32
    train = cfg.train
    train.out, train.device, train.batch_size, train.max_steps, train.num_workers = str(out), "cpu", 16, 2, 0
    train.eval_every, train.log_every, train.progress, train.optim.lr = 100, 1, False, 1e-2
    return cfg


# ----------------------------------------------------------------------------- encoders


def test_vit_tokens_and_position_interpolation():
    torch.manual_seed(0)
    vit = ViT(TINY_VIT).eval()
    assert vit.pos_embed.shape == (1, 1 + 16, 32)
    out = vit(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 17, 32)
    assert vit.positions(4, 4) is vit.pos_embed  # stored grid: no resampling
    bigger = vit(torch.rand(2, 3, 48, 48))  # 6 x 6 grid from the stored 4 x 4
    assert bigger.shape == (2, 37, 32) and torch.isfinite(bigger).all()
    assert torch.equal(vit.positions(6, 6)[:, 0], vit.pos_embed[:, 0])  # CLS position kept
    bare = vit(torch.rand(2, 3, 32, 32), with_positions=False)  # published AstroCLIP head input
    assert bare.shape == (2, 16, 32)
    layerscale = vit.blocks[0].ls1.gamma
    assert torch.allclose(layerscale, torch.full_like(layerscale, 1e-5))


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    vit = ViT(ViTShape(width=32, depth=2, heads=2, patch_size=8, image_size=32, drop_path=0.5, layerscale=1.0))
    x = torch.rand(8, 3, 32, 32)
    vit.eval()
    assert torch.equal(vit(x), vit(x))
    vit.train()
    assert not torch.equal(vit(x), vit(x))


def test_spectrum_tokens_by_hand():
    gen = torch.Generator().manual_seed(0)
    flux = 3.0 + 2.0 * torch.randn(2, 7781, 1, generator=gen)
    flux[1] = 5.0  # flat: the std floor applies
    tokens = spectrum_tokens(flux)
    assert tokens.shape == (2, 778, 22)  # 777 overlapping slices of 20 (stride 10) + the statistics token
    x = flux[0, :, 0]
    mean, std = x.mean(), x.std()
    assert torch.allclose(tokens[0, 0, :2], torch.stack([(mean - 2) / 2, (std - 2) / 8]))
    assert torch.equal(tokens[0, 0, 2:], torch.zeros(20))
    assert torch.equal(tokens[0, 1:, :2], torch.zeros(777, 2))
    assert torch.allclose(tokens[0, 1 + 5, 2:], (x[50:70] - mean) / std, atol=1e-6)
    assert torch.allclose(tokens[0, 777, 2:], (x[7760:7780] - mean) / std, atol=1e-6)
    assert torch.allclose(tokens[1, 0, :2], torch.tensor([(5.0 - 2) / 2, (0.2 - 2) / 8]))
    assert torch.equal(tokens[1, 1:], torch.zeros(777, 22))


def test_specformer_shapes_and_masked_loss():
    torch.manual_seed(0)
    model = SpecFormer(TINY_SPEC)
    tokens = spectrum_tokens(torch.randn(3, 7781))
    embedding, reconstruction = model(tokens)
    assert embedding.shape == (3, 778, 32) and reconstruction.shape == (3, 778, 22)
    masked = chunk_mask(3, 778, chunks=6, width=50)
    assert masked.sum(dim=1).tolist() == [300, 300, 300]  # six disjoint runs of 50
    for row in masked:
        starts = torch.nonzero(row[1:] & ~row[:-1]).flatten().tolist() + ([0] if row[0] else [])
        assert len(starts) == 6
    # The loss only sees masked tokens' non-zero targets.
    target = tokens.clone()
    guess = target.clone()
    guess[~masked] += 100.0
    assert masked_modelling_loss(guess, target, masked).item() == 0.0
    guess = target.clone()
    guess[masked] += 1.0
    assert torch.isclose(masked_modelling_loss(guess, target, masked), torch.tensor(1.0))


def test_heads_residual_only_for_spectra():
    torch.manual_seed(0)
    image_head = CrossAttentionHead(16, 8, heads=4, dropout=0.0, residual=False).eval()
    spectrum_head = CrossAttentionHead(16, 8, heads=4, dropout=0.0, residual=True).eval()
    spectrum_head.load_state_dict(image_head.state_dict())
    tokens = torch.randn(2, 5, 8)
    for head in (image_head, spectrum_head):
        torch.nn.init.zeros_(head.mlp.fc2.weight)
        torch.nn.init.zeros_(head.mlp.fc2.bias)
    assert torch.equal(image_head(tokens), torch.zeros(2, 16))  # MLP output only
    normed = spectrum_head.norm(spectrum_head.out_proj(
        F.scaled_dot_product_attention(*[t.reshape(2, -1, 4, 4).transpose(1, 2) for t in (
            spectrum_head.q_proj(spectrum_head.query).expand(2, -1, -1), spectrum_head.k_proj(tokens),
            spectrum_head.v_proj(tokens))]).transpose(1, 2).reshape(2, 1, 16)))[:, 0]
    assert torch.allclose(spectrum_head(tokens), normed, atol=1e-6)  # residual keeps the attention output


def test_cross_attention_head_matches_torch_multihead_attention():
    torch.manual_seed(0)
    head = CrossAttentionHead(16, 12, heads=4, dropout=0.0).eval()
    reference = torch.nn.MultiheadAttention(16, 4, batch_first=True, kdim=12, vdim=12).eval()
    with torch.no_grad():
        reference.q_proj_weight.copy_(head.q_proj.weight)
        reference.k_proj_weight.copy_(head.k_proj.weight)
        reference.v_proj_weight.copy_(head.v_proj.weight)
        reference.in_proj_bias.copy_(torch.cat([head.q_proj.bias, head.k_proj.bias, head.v_proj.bias]))
        reference.out_proj.load_state_dict(head.out_proj.state_dict())
    tokens = torch.randn(3, 7, 12)
    expected, _ = reference(head.query.expand(3, -1, -1), tokens, tokens)
    expected = head.norm(expected)[:, 0]
    assert torch.allclose(head.mlp(expected), head(tokens), atol=1e-5)


# ----------------------------------------------------------------------------- loss and retrieval


def test_clip_loss_hand_computed():
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    spectrum = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    scale = 2.0
    c = 1 / math.sqrt(2)  # cosine of 45 degrees
    # logits = 2 * [[1, c], [0, c]]; rows (image -> spectrum) and columns (spectrum -> image)
    row0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(2 * c)))
    row1 = -math.log(math.exp(2 * c) / (math.exp(0) + math.exp(2 * c)))
    col0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
    col1 = -math.log(math.exp(2 * c) / (math.exp(2 * c) + math.exp(2 * c)))
    expected = 0.5 * ((row0 + row1) / 2 + (col0 + col1) / 2)
    assert math.isclose(clip_loss(image, spectrum, scale).item(), expected, rel_tol=1e-6)
    assert torch.isclose(masked_clip_loss(clip_logits(image, spectrum, scale), torch.tensor([True, True])),
                         torch.tensor(expected))


def test_masked_clip_loss_is_the_loss_of_the_valid_pairs():
    gen = torch.Generator().manual_seed(0)
    image, spectrum = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    valid = torch.tensor([True, False, True, True, False, True])
    full = masked_clip_loss(clip_logits(image, spectrum, 15.5), valid)
    assert torch.isclose(full, clip_loss(image[valid], spectrum[valid], 15.5), atol=1e-6)


def test_learnable_scale_is_exp_of_log_scale_clamped():
    model = AstroCLIP(TINY_VIT, TINY_SPEC, embed_dim=16, logit_scale=15.5, learnable_scale=True)
    assert torch.isclose(model.scale(), torch.tensor(15.5))
    gen = torch.Generator().manual_seed(0)
    clip_loss(torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen), model.scale()).backward()
    assert model.log_scale.grad is not None and model.log_scale.grad.abs() > 0  # trained through exp()
    with torch.no_grad():
        model.log_scale.fill_(math.log(500.0))
    assert model.scale().item() == 100.0
    fixed = AstroCLIP(TINY_VIT, TINY_SPEC, embed_dim=16, logit_scale=15.5)
    assert fixed.scale().item() == 15.5 and "log_scale" not in dict(fixed.named_parameters())


def test_retrieval_hits_by_hand_and_in_chunks():
    keys = torch.eye(4)
    query = torch.tensor([[1.0, 0, 0, 0], [0.9, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0.5, 1.0]])
    # ranks of the partners (key i for query i): 0, 0, 1 (key 3 beats key 2), 0
    hits = retrieval_hits(query, keys)
    assert hits[1].item() == 3 and hits[5].item() == 4
    chunked = {k: sum(retrieval_hits(query[i : i + 2], keys, offset=i)[k].item() for i in (0, 2)) for k in (1, 5)}
    assert chunked == {1: 3, 5: 4}


# ----------------------------------------------------------------------------- data


def test_legacy_survey_rgb_by_hand():
    image = np.zeros((1, 1, 3), np.float32)
    image[0, 0] = [0.1, 0.2, 0.3]  # g, r, z nanomaggies
    rgb = legacy_survey_rgb(image)
    scaled = np.array([0.1 * 6.0, 0.2 * 3.4, 0.3 * 2.2]) + 0.03
    intensity = scaled.mean()
    expected = scaled * np.arcsinh(20 * intensity) / np.sqrt(20) / intensity
    # z -> red (plane 0), r -> green (1), g -> blue (2), clipped to [0, 1]
    assert np.allclose(rgb[:, 0, 0].numpy(), np.clip(expected[::-1], 0, 1), atol=1e-6)


def test_hdf5_schema_split_and_augmentation(h5_file):
    with h5py.File(h5_file) as handle:
        groups = sorted(handle)
        assert len(groups) == 1 and handle["0/image"].shape == (120, 40, 40, 3)
        assert handle["0/spectrum"].shape == (120, 7781, 1) and handle["0/image"].dtype == np.float32
        assert handle["0/targetid"].dtype == np.int64
        redshift = handle["0/redshift"][:]
    train = AstroClipHDF5(str(h5_file), (0.0, 0.8), 32, augment=True, seed=3)
    val = AstroClipHDF5(str(h5_file), (0.8, 1.0), 32)
    assert len(train) == 96 and len(val) == 24
    item = val[0]
    assert item["image"].shape == (3, 32, 32) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["spectrum"].shape == (7781,) and bool(item["valid"])
    assert math.isclose(item["targets"]["redshift"].item(), redshift[96], rel_tol=1e-6)
    assert torch.equal(val[0]["image"], val[0]["image"])  # no augmentation at evaluation
    plain = AstroClipHDF5(str(h5_file), (0.0, 0.8), 32)
    views = []
    for epoch in range(6):
        train.set_epoch(epoch)
        first = train[5]["image"]
        assert torch.equal(first, train[5]["image"])  # same (seed, epoch, index): same view
        views.append(first)
    assert any(not torch.equal(v, plain[5]["image"]) for v in views)
    assert len({tuple(v.flatten()[:50].tolist()) for v in views}) > 1


def test_augment_is_a_symmetry_of_the_square():
    image = torch.arange(16.0).reshape(1, 4, 4)
    for seed in range(8):
        out = augment(image, np.random.default_rng(seed))
        assert sorted(out.flatten().tolist()) == list(range(16))
        assert out[0, 1:3, 1:3].sum() == image[0, 1:3, 1:3].sum()  # the centre stays the centre


def test_bad_hdf5_input_names_file_and_field(tmp_path):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as handle:
        group = handle.create_group("0")
        group["image"] = np.zeros((2, 40, 40, 4), np.float32)  # four bands
        group["spectrum"] = np.zeros((2, 7000, 1), np.float32)  # wrong length
        group["redshift"] = np.zeros(2, np.float32)
        group["targetid"] = np.arange(2)
        handle.create_group("1")["image"] = np.zeros((2, 40, 40, 3), np.float32)
    with pytest.raises(DataError, match="group '1' has no field.*spectrum"):
        AstroClipHDF5(str(path), (0.0, 1.0), 32)
    del_path = tmp_path / "bad2.h5"
    with h5py.File(path) as src, h5py.File(del_path, "w") as dst:
        src.copy("0", dst)
    dataset = AstroClipHDF5(str(del_path), (0.0, 1.0), 32)
    with pytest.raises(DataError, match=r"bad2.h5 group '0' row 0: field 'spectrum' has shape \(7000, 1\)"):
        dataset[0]
    bands_path = tmp_path / "bad3.h5"
    with h5py.File(path) as src, h5py.File(bands_path, "w") as dst:
        src.copy("0", dst)
        del dst["0/spectrum"]
        dst["0/spectrum"] = np.zeros((2, 7781, 1), np.float32)
    with pytest.raises(DataError, match="bad3.h5 group '0' row 1: field 'image' has shape .*bands g, r, z"):
        AstroClipHDF5(str(bands_path), (0.0, 1.0), 32)[1]


def test_euclid_desi_pairs_keep_objects_without_spectra(tmp_path):
    from fmb.data.surveys.euclid_desi import open_split

    synth_euclid.write(tmp_path, 60, seed=2, image_size=24)
    rows = open_split(str(tmp_path / "data"), "train", ["object_id", "targetid", "redshift", "RGB_image", "spectrum"],
                      None, 0.0, 0)
    dataset = EuclidDesiPairs(rows, image_size=32, augment=True, seed=0)
    items = [dataset[i] for i in range(len(dataset))]
    assert all(item["image"].shape == (3, 32, 32) and item["spectrum"].shape == (7781,) for item in items)
    valid = torch.stack([item["valid"] for item in items])
    assert 0 < (~valid).sum() < len(items) // 3  # ~8% of synthetic rows have no spectrum, kept as invalid
    assert all(torch.equal(item["spectrum"], torch.zeros(7781)) for item in items if not item["valid"])


# ----------------------------------------------------------------------------- fine-tune modes


class RecordingTrainer(AstroCLIPTrainer):
    def build_model(self):
        model = super().build_model()
        self.initial = copy.deepcopy(model.state_dict())
        return model


@pytest.mark.parametrize("mode,blocks,expected", [
    ("full", 0, None),
    ("heads", 0, ("image_encoder.head.", "spectrum_encoder.head.")),
    ("heads+image", 1, ("image_encoder.head.", "spectrum_encoder.head.", "image_encoder.backbone.blocks.1.",
                        "image_encoder.backbone.norm.")),
    ("heads+image+spectrum", 1, ("image_encoder.head.", "spectrum_encoder.head.", "image_encoder.backbone.blocks.1.",
                                 "image_encoder.backbone.norm.", "spectrum_encoder.backbone.")),
])
def test_finetune_modes_train_exactly_their_parameters(tmp_path, h5_file, mode, blocks, expected):
    cfg = tiny_config(tmp_path / mode, h5_file, finetune=mode, image_blocks=blocks, image_lr=3e-3, head_dropout=0.1)
    trainer = RecordingTrainer(cfg)
    trainer.fit()
    model = trainer.model
    final = model.state_dict()
    names = dict(model.named_parameters())
    for name, before in trainer.initial.items():
        if name not in names:
            continue
        # SpecFormer's reconstruction head serves pre-training only: alignment never trains it.
        trained = (expected is None or name.startswith(expected)) and not name.startswith("spectrum_encoder.backbone.head.")
        assert names[name].requires_grad == trained, name
        if trained:
            assert not torch.equal(before, final[name]), f"{name} should have changed in mode {mode}"
        else:
            assert torch.equal(before, final[name]), f"{name} must stay bitwise frozen in mode {mode}"
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}
    image_lrs = {group["base_lr"] for group in trainer.optimizer.param_groups
                 for p in group["params"] if any(p is q for n, q in names.items() if n.startswith("image_encoder.backbone."))}
    if mode.startswith("heads+image"):
        assert image_lrs == {3e-3}
    # Frozen backbones stay in eval mode during training (set_train_mode after validation too).
    backbone = model.image_encoder.backbone
    assert model.image_encoder.head.training
    assert backbone.blocks[0].training == (mode == "full")
    assert model.spectrum_encoder.backbone.training == (mode in ("full", "heads+image+spectrum"))


# ----------------------------------------------------------------------------- training and evaluation


def test_validation_covers_the_whole_split(tmp_path, h5_file):
    cfg = tiny_config(tmp_path, h5_file, finetune="full")
    cfg.train.batch_size, cfg.train.max_steps = 10, 1  # 24 validation objects: batches of 10, 10, 4
    result = AstroCLIPTrainer(cfg).fit()
    metrics = result.metrics
    assert metrics["val/n_pairs"] == 24
    for key in ("img2spec_top1", "img2spec_top5", "spec2img_top1", "spec2img_top5"):
        value = metrics[f"val/{key}"] * 24
        assert abs(value - round(value)) < 1e-6 and 0 <= value <= 24
    assert metrics["val/img2spec_top5"] >= metrics["val/img2spec_top1"]
    assert math.isfinite(metrics["val/loss"])
    with pytest.raises(CheckpointError, match="'astroclip' family, not 'specformer'"):
        spec_cfg = SpecFormerConfig()
        spec_cfg.model.init_from = str(ckpt.find_checkpoint(tmp_path))
        spec_cfg.model.preset = "demo"
        SpecFormerTrainer(spec_cfg).build_model()


def test_specformer_pretraining_runs_and_feeds_alignment(tmp_path, h5_file):
    cfg = SpecFormerConfig()
    cfg.model.preset, cfg.model.slice, cfg.model.stride = "demo", 80, 40
    cfg.model.mask_chunks, cfg.model.mask_width = 4, 10
    cfg.data.path = str(h5_file)
    train = cfg.train
    train.out, train.device, train.batch_size, train.max_steps, train.num_workers = str(tmp_path / "spec"), "cpu", 16, 3, 0
    train.eval_every, train.progress = 3, False
    result = SpecFormerTrainer(cfg).fit()
    assert math.isfinite(result.metrics["val/loss"])
    trainer = AstroCLIPTrainer(tiny_config(tmp_path / "clip", h5_file, spectrum_init_from=str(tmp_path / "spec")))
    model = trainer.build_model()
    saved = ckpt.read_safetensors(ckpt.find_checkpoint(tmp_path / "spec") / ckpt.MODEL_FILE)
    assert torch.equal(model.spectrum_encoder.backbone.data_embed.weight, saved["data_embed.weight"])

    # `fmb embed specformer`: spectrum embeddings of the validation part; --set reaches the config
    import pyarrow.parquet as pq

    from fmb.models import get_family
    from fmb.train.embed import EmbedOptions, run_embed

    family = get_family("specformer")
    out = run_embed(family, tmp_path / "spec", tmp_path / "s.parquet",
                    EmbedOptions(split="validation", device="cpu", batch_size=8)).out
    table = pq.read_table(out)
    assert table.num_rows == 24 and set(table.column("split").to_pylist()) == {"validation"}
    assert table.schema.field("embedding_spectrum").type.list_size == 64  # the demo preset's width
    with pytest.raises(ConfigError, match="one of train, validation"):
        run_embed(family, tmp_path / "spec", tmp_path / "t.parquet", EmbedOptions(split="test", device="cpu"))
    with pytest.raises(CheckpointError, match="does not fit"):  # --set model.preset reaches the architecture
        run_embed(family, tmp_path / "spec", tmp_path / "u.parquet",
                  EmbedOptions(device="cpu", sets=["model.preset=small"]))


# ----------------------------------------------------------------------------- conversion and embeddings


class Armed:
    """Unpickling this would run a shell command: conversion must never do it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def upstream_vit(vit_state: dict, chunks: int) -> dict:
    """fmb ViT keys -> DINOv2 keys with `chunks` block chunks (blocks.C.N.) and an iBOT mask token."""
    depth = 1 + max(int(k.split(".")[1]) for k in vit_state if k.startswith("blocks."))
    per_chunk = depth // chunks
    out = {"mask_token": torch.zeros(1, vit_state["pos_embed"].shape[-1])}
    for key, value in vit_state.items():
        if key.startswith("blocks.") and chunks > 1:
            index = int(key.split(".")[1])
            key = f"blocks.{index // per_chunk}.{index}." + key.split(".", 2)[2]
        out[key] = value.clone()
    return out


def upstream_specformer(state: dict) -> dict:
    rules = [(".norm1.", ".layernorm1."), (".norm2.", ".layernorm2."), (".attn.qkv.", ".attention.attention."),
             (".attn.proj.", ".attention.projection."), (".mlp.fc1.", ".mlp.encoder."), (".mlp.fc2.", ".mlp.decoder.")]
    out = {}
    for key, value in state.items():
        for mine, theirs in rules:
            key = key.replace(mine, theirs)
        out[key] = value.clone()
    return out


def upstream_head(head: CrossAttentionHead) -> dict:
    """A head's weights in the upstream layout, keyed through a real torch MultiheadAttention."""
    dim, backbone_dim = head.q_proj.weight.shape[0], head.k_proj.weight.shape[1]
    mha = torch.nn.MultiheadAttention(dim, head.heads, batch_first=True, kdim=backbone_dim, vdim=backbone_dim)
    weights = torch.cat([head.q_proj.weight, head.k_proj.weight, head.v_proj.weight]) if dim == backbone_dim else None
    mha_state = {}
    for key, value in mha.state_dict().items():
        if key == "in_proj_weight":
            value = weights
        elif key.endswith("_proj_weight"):
            value = getattr(head, f"{key[0]}_proj").weight
        elif key == "in_proj_bias":
            value = torch.cat([head.q_proj.bias, head.k_proj.bias, head.v_proj.bias])
        else:
            value = getattr(head.out_proj, key.split(".")[1])
        mha_state[f"cross_attention.multihead_attn.{key}"] = value.detach().clone()
    return {**mha_state, "cross_attention.query": head.query.detach().clone(),
            "cross_attention.layernorm.weight": head.norm.weight.detach().clone(),
            "cross_attention.layernorm.bias": head.norm.bias.detach().clone(),
            "mlp.encoder.weight": head.mlp.fc1.weight.detach().clone(), "mlp.encoder.bias": head.mlp.fc1.bias.detach().clone(),
            "mlp.decoder.weight": head.mlp.fc2.weight.detach().clone(), "mlp.decoder.bias": head.mlp.fc2.bias.detach().clone()}


def test_convert_astroclip_lightning_checkpoint(tmp_path):
    torch.manual_seed(0)
    from fmb.models.astroclip.convert import convert
    from fmb.models.astroclip.trainer import build_astroclip

    cfg = tiny_config(tmp_path, "unused", image_positions=False, embed_dim=64, learnable_scale=True).model
    original = build_astroclip(cfg, 32).eval()
    state = {f"image_encoder.backbone.{k}": v for k, v in upstream_vit(original.image_encoder.backbone.state_dict(), 2).items()}
    state.update({f"spectrum_encoder.backbone.{k}": v
                  for k, v in upstream_specformer(original.spectrum_encoder.backbone.state_dict()).items()})
    for encoder in ("image_encoder", "spectrum_encoder"):
        state.update({f"{encoder}.{k}": v for k, v in upstream_head(getattr(original, encoder).head).items()})
    state["logit_scale"] = original.log_scale.detach().clone()
    marker = tmp_path / "pwned"
    src = tmp_path / "astroclip.ckpt"
    torch.save({"state_dict": state, "epoch": 7, "hyper_parameters": {"image_encoder": Armed(str(marker))}}, src)
    out = convert(src, tmp_path / "converted")
    assert not marker.exists()
    assert '"family": "astroclip"' in (out / "meta.json").read_text()
    converted = build_astroclip(cfg, 32)
    ckpt.load_state_strict(converted, ckpt.read_safetensors(out / "model.safetensors"), "converted")
    converted.eval()
    images, spectra = torch.rand(2, 3, 32, 32), torch.randn(2, 7781)
    for a, b in zip(original(images, spectra), converted(images, spectra), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    # A missing key is reported by name.
    del state["spectrum_encoder.cross_attention.layernorm.bias"]
    torch.save({"state_dict": state}, src)
    with pytest.raises(CheckpointError, match=r"missing keys: spectrum_encoder\.head\.norm\.bias"):
        convert(src, tmp_path / "broken")


def test_convert_astrodino_and_specformer_then_initialise(tmp_path, h5_file):
    from fmb.models.astroclip.convert import convert

    torch.manual_seed(1)
    vit = ViT(ViTShape(width=64, depth=2, heads=4, patch_size=8, image_size=32))
    teacher = {f"backbone.{k}": v for k, v in upstream_vit(vit.state_dict(), 2).items()}
    teacher["dino_head.mlp.0.weight"] = torch.zeros(4, 64)
    torch.save({"teacher": teacher}, tmp_path / "astrodino.pth")
    image_dir = convert(tmp_path / "astrodino.pth", tmp_path / "astrodino")

    spec = SpecFormer(SpecFormerShape(width=64, depth=2, heads=4, slice_length=80, slice_stride=40))
    torch.save({"state_dict": upstream_specformer(spec.state_dict()),
                "hyper_parameters": {"input_dim": 82, "embed_dim": 64, "num_layers": 2, "num_heads": 4, "max_len": 800,
                                     "slice_section_length": 80, "slice_overlap": 40}}, tmp_path / "specformer.ckpt")
    spec_dir = convert(tmp_path / "specformer.ckpt", tmp_path / "specformer")
    assert '"family": "specformer"' in (spec_dir / "meta.json").read_text()

    cfg = tiny_config(tmp_path / "run", h5_file, image_init_from=str(image_dir), spectrum_init_from=str(spec_dir),
                      finetune="heads")
    model = AstroCLIPTrainer(cfg).build_model()
    assert torch.equal(model.image_encoder.backbone.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    assert torch.equal(model.spectrum_encoder.backbone.blocks[0].mlp.fc2.weight, spec.blocks[0].mlp.fc2.weight)
    with pytest.raises(CheckpointError, match="holds image_backbone, not a whole model"):
        AstroCLIPTrainer(tiny_config(tmp_path / "run2", h5_file, init_from=str(image_dir))).build_model()
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="is none of AstroCLIP"):
        convert(tmp_path / "other.ckpt", tmp_path / "other")


def test_embed_and_cli_round_trip(tmp_path, h5_file):
    import pyarrow.parquet as pq

    from fmb import cli

    run = tmp_path / "run"
    cfg = tiny_config(run, h5_file)
    AstroCLIPTrainer(cfg).fit()
    out = tmp_path / "emb.parquet"
    with pytest.raises(SystemExit) as exit_info:
        cli.app(["embed", "astroclip", "--checkpoint", str(run), "--out", str(out), "--device", "cpu",
                 "--batch-size", "10"], standalone_mode=True)
    assert exit_info.value.code == 0
    splits = pq.read_table(out).column("split").to_pylist()  # every object by default
    assert len(splits) == 120 and splits.count("train") == 96 and splits.count("validation") == 24
    with pytest.raises(SystemExit) as exit_info:
        cli.app(["embed", "astroclip", "--checkpoint", str(run), "--out", str(out), "--device", "cpu",
                 "--batch-size", "10", "--split", "validation"], standalone_mode=True)
    assert exit_info.value.code == 0
    table = pq.read_table(out)
    assert table.num_rows == 24  # the validation part (last 20%) of the 120 objects
    assert {"object_id", "targetid", "redshift", "embedding_image", "embedding_spectrum", "embedding_joint"} <= set(table.column_names)
    image = np.stack(table.column("embedding_image").to_numpy(zero_copy_only=False))
    assert image.shape == (24, 32) and np.allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)
    with h5py.File(h5_file) as handle:
        assert np.allclose(table.column("redshift").to_numpy(), handle["0/redshift"][96:])


def test_validation_under_two_gloo_ranks_matches_one_process(tmp_path, h5_file):
    import json
    import os
    import subprocess
    import sys

    from tests.astroclip_ddp_worker import run_config
    from tests.test_ddp import ROOT, free_port

    def first_validation(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines if "val/n_pairs" in x][0]  # step 0: identical weights

    port, procs = free_port(), []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "SLURM_", "LOCAL_RANK"))}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}:{ROOT}",
                   RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.astroclip_ddp_worker", str(tmp_path / "ddp"), str(h5_file)],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    AstroCLIPTrainer(run_config(tmp_path / "single", h5_file)).fit()  # meanwhile, one process
    for proc in procs:
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, output
    ddp, single = first_validation(tmp_path / "ddp"), first_validation(tmp_path / "single")
    # 24 validation objects split 12 / 12 over the ranks, in batches of 5: all gathered.
    assert ddp["val/n_pairs"] == single["val/n_pairs"] == 24
    for key in ("img2spec_top1", "img2spec_top5", "spec2img_top1", "spec2img_top5"):
        assert ddp[f"val/{key}"] == pytest.approx(single[f"val/{key}"], abs=1e-9), key


@pytest.mark.parametrize("model", ["astroclip", "specformer"])
def test_recipes_and_demo_overlays_resolve(model, tmp_path):
    from fmb.models import get_family
    from fmb.recipes import RunRequest, load_run_config

    paths = tmp_path / "paths_local.yaml"
    paths.write_text("runs: runs\nastroclip_h5: /data/astroclip.h5\nastrodino_backbone: /w/a\nspecformer_backbone: /w/s\n")
    trainer = get_family(model).trainer_class()
    published, _ = load_run_config(RunRequest(model, [], [], {}, paths=str(paths)), trainer.config_cls)
    demo, _ = load_run_config(RunRequest(model, [], [], {}, demo=True, paths=str(paths)), trainer.config_cls)
    assert published.data.path == "/data/astroclip.h5" and published.train.optim.lr in (1e-4, 1e-5)
    assert demo.data.path is None and demo.data.synthetic > 0 and demo.train.eval_at_start
    if model == "astroclip":
        assert published.model.finetune == "heads" and published.model.image_preset == "large"
        assert demo.model.finetune == "full" and demo.model.image_init_from is None


# ----------------------------------------------------------------------------- incomplete data


def test_incomplete_objects_train_on_complete_pairs_and_embed_what_they_have(tmp_path):
    """AstroCLIP's contrastive loss needs both modalities; single-modality objects still embed."""
    import pyarrow.parquet as pq

    from fmb.models import get_family
    from fmb.train.embed import EmbedOptions, run_embed

    h5 = synth.write(tmp_path / "data", 60, seed=4, image_size=40, missing={"image": 0.3, "spectrum": 0.3})
    with h5py.File(h5) as handle:
        no_image = np.concatenate([np.isnan(handle[f"{g}/image"][:]).all((1, 2, 3)) for g in sorted(handle, key=int)])
        no_spectrum = np.concatenate([np.isnan(handle[f"{g}/spectrum"][:]).all((1, 2)) for g in sorted(handle, key=int)])
    assert 0 < no_image.sum() < 30 and 0 < no_spectrum.sum() < 30
    dataset = AstroClipHDF5(str(h5), (0.0, 1.0), crop=32)
    valid = np.array([bool(dataset[i]["valid"]) for i in range(len(dataset))])
    assert np.array_equal(valid, ~no_image & ~no_spectrum)
    run = tmp_path / "run"
    result = AstroCLIPTrainer(tiny_config(run, h5)).fit()
    losses = [json.loads(line)["train/loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert result.status == "completed" and losses and all(math.isfinite(x) and x > 0 for x in losses)
    out = tmp_path / "emb.parquet"
    run_embed(get_family("astroclip"), run, out, EmbedOptions(device="cpu", batch_size=16))
    table = pq.read_table(out)
    order = np.argsort(table.column("object_id").to_numpy())  # targetids were written in object order
    assert np.array_equal(np.asarray(table.column("embedding_image").is_null())[order], no_image)
    assert np.array_equal(np.asarray(table.column("embedding_spectrum").is_null())[order], no_spectrum)
    assert np.array_equal(np.asarray(table.column("embedding_joint").is_null())[order], no_image & no_spectrum)
