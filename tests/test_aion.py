"""AION family: fmb's image codec, weight loading, Euclid band data, adapters, training, embeddings."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fmb.data.surveys.euclid_desi import EUCLID_BAND_COLUMNS, EUCLID_ZERO_POINTS, open_split
from fmb.data.synth import euclid_desi as synth
from fmb.data.synth import hsc
from fmb.errors import CheckpointError, ConfigError, DataError
from fmb.models.aion.data import COLUMNS, EuclidBands, band_image
from fmb.models.aion.model import (
    FSQ,
    HSC_BANDS,
    HSC_ZP_SCALE,
    LEGACY_BANDS,
    AionAdapters,
    AionImageCodec,
    CodecConfig,
    SameConv2d,
    UNet,
    winograd_conv3x3,
    winograd_weight,
)
from fmb.models.aion.samples import band_errors
from fmb.models.aion.standin import ensure_standin, pretrain, relative_round_trip_error
from fmb.models.aion.weights import build_codec, load_codec, save_codec
from fmb.train.checkpoint import find_checkpoint
from tests.cli_runner import run_cli

TINY = CodecConfig(quantizer_levels=[7, 5, 5, 5, 5], hidden_dims=8, num_consecutive=1)


def tiny_codec(seed: int = 0) -> AionImageCodec:
    torch.manual_seed(seed)
    codec = AionImageCodec(TINY).eval()
    with torch.no_grad():  # open the squeeze-excite gates so every layer matters
        for p in codec.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.randn_like(p))
    return codec


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("euclid_desi_96")
    synth.write(out, 20, seed=5, image_size=96)
    return out


# ----------------------------------------------------------------------------- codec


def test_codec_shapes_tokens_and_inputs_untouched():
    codec = tiny_codec()
    flux = torch.randn(2, 4, 100, 104) * 5
    copy = flux.clone()
    with torch.no_grad():
        latent = codec.encode(flux, LEGACY_BANDS)
        tokens = codec.indices(flux, LEGACY_BANDS)
        decoded = codec.decode_indices(tokens, LEGACY_BANDS)
    assert latent.shape == (2, 5, 24, 24)
    assert tokens.shape == (2, 576) and tokens.dtype == torch.int64
    assert 0 <= tokens.min() and tokens.max() < 7 * 5**4 and len(tokens.unique()) > 5
    assert decoded.shape == (2, 4, 96, 96)
    torch.testing.assert_close(flux, copy, rtol=0, atol=0)  # clamp and rescale never write into the input


def test_preprocessing_steps():
    codec = tiny_codec()
    flux = torch.zeros(1, 5, 98, 98)
    flux[0, 0, 1:97, 1:97] = 1000.0  # above the HSC-G clamp of 80; a 1-px frame is cropped away
    flux[0, 4, 0, 0] = 7.0  # outside the centre crop
    padded, present = codec.preprocess(flux, HSC_BANDS)
    assert padded.shape == (1, 9, 96, 96)
    assert present.tolist() == [[True] * 5 + [False] * 4]
    expected = math.asinh(80.0 / HSC_ZP_SCALE / 0.01) * 0.01 * 10.0
    torch.testing.assert_close(padded[0, 0], torch.full((96, 96), expected))
    assert padded[0, 1:].abs().max() == 0  # the pixel at (0, 0) was outside the crop


def test_compression_inverse_is_exact_for_hsc_and_legacy():
    codec = tiny_codec()
    for bands in (HSC_BANDS, LEGACY_BANDS):
        flux = torch.randn(2, len(bands), 96, 96, dtype=torch.float64) * 3
        back = codec.double().decompress(codec.double().compress(flux, bands), bands)
        torch.testing.assert_close(back, flux, rtol=1e-9, atol=1e-12)
    x = torch.full((1, 1, 1, 1), 63.0957, dtype=torch.float64)
    torch.testing.assert_close(codec.compress(x, ["HSC-G"]), codec.compress(x / HSC_ZP_SCALE, ["DES-G"]))


def test_subsampled_projection_scales_by_present_bands():
    codec = tiny_codec()
    proj = codec.subsample_in
    x = torch.randn(1, 9, 2, 2)
    present = torch.tensor([[True] * 4 + [False] * 5])
    out = proj(x, present)
    expected = (torch.einsum("oc,bchw->bohw", proj.weight[:, :4], x[:, :4]) + proj.bias[None, :, None, None]) * 1.5
    torch.testing.assert_close(out, expected)  # sqrt(9 / 4) = 1.5; absent bands contribute nothing


def test_winograd_convolution_equals_the_direct_one_and_follows_weight_updates():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 3, 6, 8), torch.randn(5, 3, 3, 3), torch.randn(5)
    expected = torch.nn.functional.conv2d(x.double(), weight.double(), bias.double(), padding=1).float()
    torch.testing.assert_close(winograd_conv3x3(x, winograd_weight(weight), bias), expected, rtol=0, atol=1e-5)
    layer = SameConv2d(256, 256, 3).eval()  # wide enough for the Winograd path
    x = torch.randn(1, 256, 4, 4)
    with torch.no_grad():
        fast = layer(x)
        assert layer._winograd is not None
        torch.testing.assert_close(fast, layer.conv(x), rtol=0, atol=1e-5)
        layer.conv.weight.mul_(2.0)  # an optimizer step or a load: the transformed weights follow
        torch.testing.assert_close(layer(x), layer.conv(x), rtol=0, atol=2e-5)
    x.requires_grad_(True)
    layer(x).sum().backward()  # with autograd the direct convolution runs
    assert x.grad is not None


def test_folded_stem_equals_the_projection_then_conv_in_for_mixed_band_masks():
    codec = tiny_codec()
    padded = torch.randn(2, 9, 96, 96)
    present = torch.tensor([[True] * 5 + [False] * 4, [False] * 5 + [True] * 4])
    with torch.no_grad():
        folded = codec.encode_preprocessed(padded, present)
        expected = codec.model.encode(codec.subsample_in(padded, present))
        torch.testing.assert_close(folded, expected, rtol=0, atol=1e-5)
        quantized = codec.quantizer.quantize(codec.pre_quant_proj(folded))
        out = codec.model.decode(codec.post_quant_proj(quantized))
        expected = codec.subsample_out(out, torch.ones(2, 9, dtype=torch.bool))[:, 5:]
        torch.testing.assert_close(codec.decode_compressed(quantized, LEGACY_BANDS), expected, rtol=0, atol=1e-5)


def test_fsq_indices_round_trip_and_bounds():
    fsq = FSQ([8, 5, 3])
    z = torch.randn(4, 3, 6, 6) * 3
    tokens = fsq.indices(z)
    assert tokens.min() >= 0 and tokens.max() < 120
    torch.testing.assert_close(fsq.lookup(tokens), fsq.quantize(z))
    every = torch.arange(120).view(1, 120)
    assert fsq.indices(fsq.lookup(every) * 0.999 + 1e-4).eq(every).float().mean() > 0  # decodable grid
    grad = torch.zeros_like(z, requires_grad=True)
    fsq.quantize(grad).sum().backward()
    assert grad.grad.abs().min() > 0  # straight-through rounding


def test_bad_codec_inputs_are_clear_errors():
    codec = tiny_codec()
    with pytest.raises(ValueError, match="at least 96"):
        codec.encode(torch.zeros(1, 4, 64, 64), LEGACY_BANDS)
    with pytest.raises(ValueError, match="4 bands"):
        codec.encode(torch.zeros(1, 3, 96, 96), LEGACY_BANDS)
    with pytest.raises(ValueError, match="unknown image bands"):
        codec.encode(torch.zeros(1, 1, 96, 96), ["VIS"])
    with pytest.raises(ValueError, match="mix surveys"):
        codec.encode(torch.zeros(1, 2, 96, 96), ["HSC-G", "DES-R"])
    with pytest.raises(ValueError, match="repeated"):
        codec.encode(torch.zeros(1, 2, 96, 96), ["DES-G", "DES-G"])


# ----------------------------------------------------------------------------- weights on disk


def test_loading_all_layouts_strictly(tmp_path):
    codec = tiny_codec(1)
    flux = torch.rand(1, 4, 96, 96)
    with torch.no_grad():
        reference = codec.indices(flux, LEGACY_BANDS)
    flat = save_codec(codec, tmp_path / "flat")
    save_codec(codec, tmp_path / "hub" / "codecs" / "image")
    cache = tmp_path / "cache" / "hub" / "models--polymathic-ai--aion-base"
    save_codec(codec, cache / "snapshots" / "abc123" / "codecs" / "image")
    save_codec(tiny_codec(2), cache / "snapshots" / "old999" / "codecs" / "image")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("abc123")
    from safetensors.torch import load_file

    assert "_quantizer.levels" in load_file(str(flat / "model.safetensors"))
    for root in (flat, flat / "model.safetensors", tmp_path / "hub", tmp_path / "cache", cache):
        loaded = load_codec(root).eval()
        with torch.no_grad():
            assert torch.equal(loaded.indices(flux, LEGACY_BANDS), reference), root


def test_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*aion_codec"):
        load_codec(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"(?s)Looked in:.*codecs/image.*aion_codec"):
        load_codec(tmp_path / "empty")
    with pytest.raises(ConfigError, match="aion_codec.*random_init"):
        build_codec(None, False, TINY)
    directory = save_codec(tiny_codec(), tmp_path / "codec")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "hidden_dims": 16}))
    with pytest.raises(CheckpointError, match=r"(?s)does not fit the model.*shape mismatch"):
        load_codec(directory)
    (directory / "config.json").write_text(json.dumps({**config, "quantizer_levels": [8, 5, 5, 5, 5]}))
    with pytest.raises(CheckpointError, match="quantizer levels"):
        load_codec(directory)
    (directory / "config.json").write_text(json.dumps({**config, "n_layers": 3}))
    with pytest.raises(CheckpointError, match="unknown image-codec settings"):
        load_codec(directory)
    (directory / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    state = load_file(str(directory / "model.safetensors"))
    del state["model.conv_in.conv.weight"]
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys: model.conv_in.conv.weight"):
        load_codec(directory)


def test_random_init_warns_loudly(caplog):
    with caplog.at_level("WARNING", logger="fmb"):
        codec = build_codec(None, True, TINY)
    assert isinstance(codec, AionImageCodec)
    assert "RANDOM WEIGHTS" in caplog.text


def test_compressed_round_trip_is_the_preprocessed_input_and_its_decoding():
    codec = tiny_codec()
    flux = torch.from_numpy(hsc.hsc_cutouts(2, np.random.default_rng(0)))
    with torch.no_grad():
        target, decoded = codec.compressed_round_trip(flux, HSC_BANDS)
        padded, _ = codec.preprocess(flux, HSC_BANDS)
        latent = codec.encode(flux, HSC_BANDS)
        flux_decoded = codec.decode(codec.quantizer.quantize(latent), HSC_BANDS)
    torch.testing.assert_close(target, padded[:, :5])
    torch.testing.assert_close(codec.decompress(decoded, HSC_BANDS), flux_decoded)


# ----------------------------------------------------------------------------- stand-in codec


def test_synthetic_hsc_cutouts_have_hsc_units_noise_and_size():
    cutouts = hsc.hsc_cutouts(120, np.random.default_rng(3))
    assert cutouts.shape == (120, 5, 96, 96) and cutouts.dtype == np.float32 and np.isfinite(cutouts).all()
    totals = cutouts.sum(axis=(2, 3))
    assert 300 < np.median(totals[:, 2]) < 3000  # i ~ 19.5 mag at zero point 27
    corners = cutouts[:, :, :6, :6].reshape(120, 5, -1)  # sky only for all but the largest galaxies
    noise = np.median(corners.std(axis=2), axis=0)
    np.testing.assert_allclose(noise, [hsc.SKY_SIGMA[b] for b in hsc.BANDS], rtol=0.25)
    # Below every band's codec clamp for the typical galaxy, so the codec sees the profile, not a plateau.
    assert (np.median(cutouts.max(axis=(2, 3)), axis=0) < [80, 110, 200, 330, 500]).all()
    again = hsc.hsc_cutouts(120, np.random.default_rng(3))
    np.testing.assert_array_equal(cutouts, again)


def test_standin_pretraining_learns_more_than_the_mean_value():
    held_out = torch.from_numpy(hsc.hsc_cutouts(16, np.random.default_rng(99)))
    narrow = dataclasses.replace(TINY, multisurvey_projection_dims=12)  # 4x faster than 54
    rng_state = torch.get_rng_state()
    trained, errors = pretrain(narrow, steps=40, seed=2, device=torch.device("cpu"), progress=False)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is left alone
    assert not trained.training
    # 1.0 = no better than the mean value everywhere: where the initialisation starts, so what is
    # learned comes from the training steps (seeds 1-3 reach 0.17-0.34)
    assert errors["error_before"] > 0.95
    assert errors["error_after"] < 0.5
    assert relative_round_trip_error(trained, held_out) < 0.5  # on cutouts it never saw
    with pytest.raises(ValueError, match="at least one"):
        pretrain(narrow, steps=0, seed=0, device=torch.device("cpu"))


def test_standin_warns_when_it_learned_little_and_runs_under_bf16(caplog):
    narrow = dataclasses.replace(TINY, multisurvey_projection_dims=12)
    with caplog.at_level("WARNING", logger="fmb"):
        codec, errors = pretrain(narrow, steps=1, seed=2, device=torch.device("cpu"), bf16=True, progress=False)
    assert errors["error_after"] > 0.9 and "learned little" in caplog.text
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in codec.parameters())


def test_standin_is_written_once_reused_and_checked(tmp_path, caplog):
    directory = tmp_path / "standin"
    directory.mkdir()
    (directory / "config.json").write_text("{}")  # an incomplete leftover is replaced
    with caplog.at_level("INFO", logger="fmb"):
        ensure_standin(directory, TINY, 2, 0, torch.device("cpu"), progress=False)
        first = (directory / "model.safetensors").read_bytes()
        assert not (tmp_path / "standin.partial").exists()
        provenance = json.loads((directory / "standin.json").read_text())
        assert provenance["steps"] == 2 and provenance["seed"] == 0 and provenance["shape"]["hidden_dims"] == 8
        assert load_codec(directory).cfg.hidden_dims == 8
        assert "is a stand-in codec" in caplog.text  # loading it never passes for the published weights
        ensure_standin(directory, TINY, 2, 0, torch.device("cpu"), progress=False)
    assert (directory / "model.safetensors").read_bytes() == first
    assert "reusing" in caplog.text
    with pytest.raises(ConfigError, match="made with"):
        ensure_standin(directory, TINY, 3, 0, torch.device("cpu"), progress=False)


# ----------------------------------------------------------------------------- data


def test_euclid_bands_dataset(dataset_dir):
    rows = open_split(str(dataset_dir), "train", COLUMNS, None, 0.2, 0)
    item = EuclidBands(rows)[0]
    assert item["euclid"].shape == (4, 96, 96) and item["valid"].all()
    raw = np.asarray(rows.row(0)["VIS_image"], dtype=np.float32)
    np.testing.assert_allclose(item["euclid"][0].numpy(), raw * EUCLID_ZERO_POINTS["VIS_image"] / 3631, rtol=1e-6)
    # the validation hold-out and the test split never reach training
    val = open_split(str(dataset_dir), "validation", COLUMNS, None, 0.2, 0)
    assert set(rows.source.column("object_id")[rows.indices]).isdisjoint(val.source.column("object_id")[val.indices])
    assert len(rows) + len(val) == pq.ParquetFile(dataset_dir / "data" / "train-00000-of-00001.parquet").metadata.num_rows


def test_band_image_nan_resize_crop_and_errors():
    image = np.ones((120, 120), np.float32)
    image[:10, :10] = np.nan
    flux, valid = band_image(image, 96, "resize", "f.parquet row 3")
    assert flux.shape == (96, 96) and torch.isfinite(flux).all()
    assert not valid[0, 0] and valid[60, 60] and valid.float().mean() > 0.9
    flux, valid = band_image(image, 96, "crop", "f")
    assert valid.all() and flux.shape == (96, 96)  # the NaN corner is outside the centre crop
    with pytest.raises(DataError, match="f.parquet row 3.*smaller than 96"):
        band_image(np.ones((64, 64)), 96, "crop", "f.parquet row 3")
    for absent in (np.full((96, 96), np.nan), None):  # an all-NaN or null band is absent, not an error
        flux, valid = band_image(absent, 96, "resize", "x")
        assert flux.shape == (96, 96) and not valid.any() and (flux == 0).all()


def test_missing_bands_are_masked_and_objects_without_any_have_no_image(tmp_path):
    table = synth.make_table(2, 1, 96)
    nan = pa.array([[[float("nan")] * 96] * 96] * 2, type=table.schema.field("NISP_J_image").type)
    table = table.set_column(table.schema.get_field_index("NISP_J_image"), "NISP_J_image", nan)
    for column in ("VIS_image", "NISP_Y_image", "NISP_H_image"):  # object 1 has no band at all
        values = table.column(column).to_pylist()
        values[1] = None
        table = table.set_column(table.schema.get_field_index(column), column, pa.array(values, table.schema.field(column).type))
    pq.write_table(table, tmp_path / "bad.parquet")
    rows = open_split(str(tmp_path / "bad.parquet"), "test", COLUMNS, None, 0.0, 0)
    first, second = EuclidBands(rows)[0], EuclidBands(rows)[1]
    assert first["has_image"] and not first["valid"][2].any() and first["valid"][0].all()
    assert not second["has_image"] and not second["valid"].any()
    with pytest.raises(DataError, match=r"bad.parquet row 0, column VIS_image, object_id \d+: expected a 2-D"):
        band_image(np.ones(5), 96, "resize", "bad.parquet row 0, column VIS_image, object_id 7")


# ----------------------------------------------------------------------------- adapters


def test_unet_shapes_and_norms():
    for norm in ("batch", "group", "none"):
        net = UNet(4, 5, depth=2, hidden=4, norm=norm)
        assert net(torch.randn(2, 4, 96, 96)).shape == (2, 5, 96, 96)
    widths = [m.out_channels for m in UNet(4, 5, depth=2, hidden=16).modules() if isinstance(m, torch.nn.Conv2d)]
    assert max(widths) == 64


def test_gradient_modes_reach_the_adapters_only():
    euclid = torch.rand(2, 4, 96, 96) * 0.1
    for mode in ("ste", "full"):
        codec = tiny_codec()
        codec.requires_grad_(False)
        model = AionAdapters(codec, hidden=4, gradient=mode)
        out = model(euclid)
        assert out["hsc"].shape == (2, 5, 96, 96) and out["euclid"].shape == (2, 4, 96, 96)
        ((out["euclid"] - euclid) ** 2).mean().backward()
        assert model.euclid_to_hsc.head.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in codec.parameters())
    # straight-through: the decoded HSC image equals the codec's reconstruction in value
    with torch.no_grad():
        _, decoded = model.codec_round_trip(out["hsc"])
    torch.testing.assert_close(out["hsc_decoded"], decoded, rtol=1e-5, atol=1e-6)


def test_latent_consistency_outputs_and_gradient():
    codec = tiny_codec()
    codec.requires_grad_(False)
    model = AionAdapters(codec, hidden=4, latent_consistency=True)
    out = model(torch.rand(2, 4, 96, 96) * 0.1)
    assert out["latent_decoded"].shape == out["latent"].shape == (2, 5, 24, 24)
    torch.nn.functional.mse_loss(out["latent_decoded"], out["latent"].detach()).backward()
    assert model.euclid_to_hsc.head.weight.grad.abs().sum() > 0  # the term trains the Euclid -> HSC adapter
    assert model.hsc_to_euclid.head.weight.grad is None


def test_band_errors():
    target = torch.ones(1, 2, 4, 4)
    prediction = target.clone()
    prediction[0, 1] += 0.1
    valid = torch.ones_like(target)
    mse, psnr = band_errors(prediction, target, valid)
    torch.testing.assert_close(mse[0, 1], torch.tensor(0.01))
    torch.testing.assert_close(psnr[0, 1], torch.tensor(20.0))
    assert psnr[0, 0] > 100


# ----------------------------------------------------------------------------- training, embeddings, CLI


def test_demo_trains_writes_outputs_and_embeds(monkeypatch, capsys, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, "retrain", "aion", "--demo", "--out", str(run), "--max-steps", "16",
                        "--no-progress", "--set", "data.synthetic=24", "--set", "train.batch_size=4",
                        "--set", "train.eval_every=16", "--set", "model.codec.shape.hidden_dims=8",
                        "--set", "data.sample_grid=2", "--set", "train.optim.lr=1e-2", "--set", "model.codec.standin_steps=0")
    assert code == 0, err
    assert "reconstructed Euclid images are flat" in err  # a random codec: said, not hidden behind a PSNR
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in vals] == [0, 16]
    assert vals[-1]["val/loss"] < vals[0]["val/loss"]
    assert {f"val/{k}_{b}" for k in ("mse", "psnr") for b in ("VIS", "NISP_Y", "NISP_J", "NISP_H")} <= set(vals[0])
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000000.png", "step_0000016.png"]
    assert (run / "samples" / "step_0000016.png").read_bytes()[:4] == b"\x89PNG"
    from safetensors.torch import load_file

    adapters = load_file(str(run / "adapters.safetensors"))
    assert adapters and all(k.startswith(("euclid_to_hsc.", "hsc_to_euclid.")) for k in adapters)

    # resume restores adapters and codec strictly and continues
    code, _, err = run_cli(monkeypatch, capsys, "retrain", "aion", "--demo", "--out", str(run), "--max-steps", "18",
                        "--resume", "--no-progress", "--set", "data.synthetic=24", "--set", "train.batch_size=4",
                        "--set", "train.eval_every=16", "--set", "model.codec.shape.hidden_dims=8",
                        "--set", "data.sample_grid=2", "--set", "train.optim.lr=1e-2", "--set", "model.codec.standin_steps=0")
    assert code == 0, err
    assert "resumed from" in (run / "train.log").read_text()
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 18

    # the demo's random stand-in AION transformer, written into the run for fmb embed
    standin = json.loads((run / "standin_transformer" / "standin.json").read_text())
    assert standin["size"] == "demo" and standin["weights"].startswith("random")
    assert f"path: {(run / 'standin_transformer').resolve()}" in (run / "config.yaml").read_text()
    out = tmp_path / "emb.parquet"
    code, _, err = run_cli(monkeypatch, capsys, "embed", "aion", "--checkpoint", str(run), "--out", str(out),
                        "--data", str(run / "data"), "--split", "test", "--batch-size", "4",
                        "--set", "model.embed.codec_latents=true")
    assert code == 0, err
    table = pq.read_table(out)
    n_test = pq.ParquetFile(run / "data" / "data" / "test-00000-of-00001.parquet").metadata.num_rows
    assert table.num_rows == n_test
    for name in ("image", "spectrum", "joint"):  # the transformer's (demo width 64)
        assert table.column(f"embedding_{name}").type.list_size == 64
    assert table.column("embedding_image_codec").type.list_size == 10  # mean and spread of 5 latent channels
    assert table.column("embedding_image_codec_encoder").type.list_size == 16
    values = np.stack(table.column("embedding_image").to_numpy(zero_copy_only=False))
    assert np.isfinite(values).all()
    # (a random demo codec may give these few objects the same tokens; its latents still differ)
    latents = np.stack(table.column("embedding_image_codec").to_numpy(zero_copy_only=False))
    assert latents.std(axis=0).max() > 0
    redshift = table.column("aion_redshift").to_numpy()
    assert np.isfinite(redshift).all() and ((redshift >= 0) & (redshift <= 1)).all()  # the stand-in's codec: [0, 1]
    assert {"redshift", "truth_type"} <= set(table.column_names)  # targets carried for fmb evaluate
    baseline = tmp_path / "random.parquet"
    code, _, err = run_cli(monkeypatch, capsys, "embed", "aion", "--checkpoint", str(run), "--out", str(baseline),
                           "--data", str(run / "data"), "--split", "test", "--batch-size", "4", "--random-init",
                           "--set", "model.embed.codec_latents=true")
    assert code == 0, err
    random_values = np.stack(pq.read_table(baseline).column("embedding_image_codec").to_numpy(zero_copy_only=False))
    code, _, err = run_cli(monkeypatch, capsys, "embed", "aion", "--checkpoint", str(run), "--out", str(tmp_path / "x.parquet"),
                           "--set", "model.hidden=8")  # --set reaches the architecture, which must fit
    assert code == 1 and "does not fit the model" in err
    assert random_values.shape == latents.shape and not np.allclose(random_values, latents)

    # codec fine-tune mode: only the decoder moves
    tuned = tmp_path / "tuned"
    code, _, err = run_cli(monkeypatch, capsys, "retrain", "aion", "--demo", "--out", str(tuned), "--max-steps", "2",
                        "--no-progress", "--set", f"data.path={run / 'data'}", "--set", "train.batch_size=4",
                        "--set", f"model.init_from={run}", "--set", "model.codec.train=decoder",
                        "--set", "model.gradient=full", "--set", "model.freeze_adapters=true",
                        "--set", "model.codec.activation_checkpointing=true", "--set", "data.sample_grid=0",
                        "--set", "model.codec.standin_steps=0")
    assert code == 0, err
    before = load_file(str(find_checkpoint(run) / "model.safetensors"))  # what init_from starts from
    after = load_file(str(next((tuned / "checkpoints").glob("step_*")) / "model.safetensors"))
    assert not torch.equal(before["codec.model.conv_out.conv.weight"], after["codec.model.conv_out.conv.weight"])
    assert torch.equal(before["codec.model.conv_in.conv.weight"], after["codec.model.conv_in.conv.weight"])
    assert torch.equal(before["euclid_to_hsc.head.weight"], after["euclid_to_hsc.head.weight"])
    assert load_codec(tuned / "codec").cfg.hidden_dims == 8


def test_demo_with_a_standin_codec_trains_through_it_and_resumes(monkeypatch, capsys, tmp_path):
    run = tmp_path / "run"
    args = ["retrain", "aion", "--demo", "--out", str(run), "--no-progress", "--set", "data.synthetic=24",
            "--set", "train.batch_size=4", "--set", "model.codec.shape.hidden_dims=8",
            "--set", "model.codec.standin_steps=3", "--set", "data.sample_grid=0"]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--max-steps", "2")
    assert code == 0, err
    standin = run / "standin_codec"
    config = (run / "config.yaml").read_text()
    assert f"path: {standin.resolve()}" in config  # absolute: later commands may run from elsewhere
    from safetensors.torch import load_file

    saved = load_file(str(standin / "model.safetensors"))
    trained = load_file(str(find_checkpoint(run) / "model.safetensors"))
    torch.testing.assert_close(trained["codec.model.conv_in.conv.weight"], saved["model.conv_in.conv.weight"])
    code, _, err = run_cli(monkeypatch, capsys, *args, "--max-steps", "3", "--resume")
    assert code == 0, err
    assert "stand-in codec: reusing" in (run / "train.log").read_text()
    assert load_file(str(standin / "model.safetensors"))["model.conv_in.conv.weight"].equal(
        saved["model.conv_in.conv.weight"])
    # the saved config re-runs as is: it names the stand-in's path and no steps to pretrain
    assert "standin_steps: 0" in config
    code, _, err = run_cli(monkeypatch, capsys, "retrain", "aion", "--config", str(run / "config.yaml"),
                           "--out", str(tmp_path / "again"), "--max-steps", "1", "--no-progress")
    assert code == 0, err
    assert "is a stand-in codec" in (tmp_path / "again" / "train.log").read_text()


def test_config_errors(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "retrain", "aion", "--demo", "--out", str(tmp_path / "r"),
                        "--set", "model.codec.train=decoder")
    assert code == 2 and "needs model.gradient=full" in err
    code, _, err = run_cli(monkeypatch, capsys, "retrain", "aion", "--demo", "--out", str(tmp_path / "r2"),
                        "--set", "model.codec.random_init=false", "--set", "data.synthetic=4")
    assert code == 2 and "aion_codec" in err
    code, _, err = run_cli(monkeypatch, capsys, "retrain", "aion", "--demo", "--out", str(tmp_path / "r3"),
                           "--set", "model.codec.standin_steps=5", "--set", f"model.codec.path={tmp_path}")
    assert code == 2 and "model.codec.standin_steps" in err and "random_init=true" in err
    code, _, err = run_cli(monkeypatch, capsys, "retrain", "aion", "--demo", "--out", str(tmp_path / "r4"),
                           "--set", "model.codec.standin_steps=5", "--set", "model.codec.random_init=false")
    assert code == 2 and "random_init=true" in err
    code, _, err = run_cli(monkeypatch, capsys, "retrain", "aion", "--demo", "--out", str(tmp_path / "r5"),
                           "--set", "model.codec.standin_steps=-1")
    assert code == 2 and "must be >= 0" in err


def test_band_columns_are_the_euclid_ones():
    assert COLUMNS[1:] == list(EUCLID_BAND_COLUMNS) == ["VIS_image", "NISP_Y_image", "NISP_J_image", "NISP_H_image"]


def test_grid_pool_keeps_mean_and_spread():
    from fmb.models.aion.embedder import grid_pool

    small = torch.zeros(1, 1, 4, 4)
    small[..., 1:3, 1:3] = 4.0  # compact: 4 bright cells
    large = torch.full((1, 1, 4, 4), 1.0)  # same total, spread over the grid
    pooled = grid_pool(torch.cat([small, large]))
    assert pooled.shape == (2, 2) and pooled.dtype == torch.float32
    assert torch.allclose(pooled[:, 0], torch.tensor([1.0, 1.0]))  # the mean alone cannot tell them apart
    assert pooled[0, 1] > 1.5 and pooled[1, 1] == 0.0  # the spread can


def test_objects_without_bands_or_spectra_train_and_embed(monkeypatch, capsys, tmp_path):
    """Incomplete Euclid + DESI rows: no image at all, a missing band, no spectrum, or neither."""
    from fmb.data.synth import null_rows
    from tests.incomplete import assert_nulls_follow_the_data, retrain_and_embed, write_incomplete

    data = tmp_path / "data"
    write_incomplete(data, 24, 96, list(COLUMNS[1:]))
    for file in sorted((data / "data").glob("*.parquet")):  # and one band missing for others
        table = pq.read_table(file)
        pq.write_table(null_rows(table, ["NISP_J_image"], np.arange(table.num_rows) % 3 == 1), file)
    out = retrain_and_embed(monkeypatch, capsys, "aion", tmp_path, [
        "--max-steps", "3", "--set", f"data.path={data}", "--set", "train.batch_size=4", "--set", "train.eval_every=3",
        "--set", "model.codec.shape.hidden_dims=8", "--set", "data.sample_grid=0", "--set", "model.codec.standin_steps=0"],
        ["--batch-size", "4"])
    assert_nulls_follow_the_data(out, data, "VIS_image")
