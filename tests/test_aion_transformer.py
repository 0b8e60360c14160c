"""AION transformer in fmb without polymathic-aion: the model directory (stand-ins, sizes, wrong models,
mixed releases), spectra in the data, the embed step with missing and bad spectra, `fmb doctor`'s lines."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from fmb.data.surveys.euclid_desi import DESI_WAVELENGTH, open_split
from fmb.data.synth import euclid_desi as synth
from fmb.errors import CheckpointError, ConfigError, DataError
from fmb.models.aion.data import COLUMNS, SPECTRUM_COLUMN, EuclidBandsAndSpectrum, desi_spectrum
from fmb.models.aion.embedder import AionEmbedder, embedding_transformer
from fmb.models.aion.model import AionAdapters, AionImageCodec, CodecConfig
from fmb.models.aion.pretrained import (
    SPECTRUM_DIR,
    AionModel,
    ensure_standin,
    load_aion,
    random_standin,
    save_aion,
    weights_report,
)
from fmb.models.aion.spectrum import SpectrumCodec, SpectrumCodecConfig
from fmb.models.aion.trainer import AionEmbedSettings, AionModelConfig
from fmb.models.aion.weights import save_codec

TINY_CODEC = CodecConfig(hidden_dims=8, num_consecutive=1)


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory):
    return ensure_standin(tmp_path_factory.mktemp("aion") / "standin", "demo", 0)


def test_standin_round_trips_is_reused_and_checked(standin_dir, caplog):
    made = random_standin("demo", 0)
    with caplog.at_level(logging.WARNING, logger="fmb"):
        loaded = load_aion(standin_dir, "demo", AionImageCodec(TINY_CODEC))
    assert loaded.standin and "RANDOM stand-in" in caplog.text
    for ours, theirs in ((made.transformer, loaded.transformer), (made.spectrum, loaded.spectrum), (made.redshift, loaded.redshift)):
        for key, value in ours.state_dict().items():
            assert torch.equal(value, theirs.state_dict()[key]), key
    # the encoder's and decoder's shared modality embedding is stored once, as upstream's files hold it
    stored = load_file(str(standin_dir / "model.safetensors"))
    assert sum(k.endswith("tok_z.mod_emb") for k in stored) == 1
    assert ensure_standin(standin_dir, "demo", 0) == standin_dir  # reused
    with pytest.raises(ConfigError, match="made with"):
        ensure_standin(standin_dir, "demo", 1)


def test_wrong_size_wrong_model_and_broken_weights_name_the_keys(standin_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"not AION-base: dim 64 \(expected 768\), encoder_depth 2 .*'demo' size"):
        load_aion(standin_dir, "base")
    codec_dir = save_codec(AionImageCodec(TINY_CODEC), tmp_path / "image_codec")  # an image codec, not the transformer
    with pytest.raises(CheckpointError, match="not an AION transformer config.json: unknown config key 'quantizer_levels'"):
        load_aion(codec_dir, None)
    broken = tmp_path / "broken"
    save_aion(load_aion(standin_dir, "demo"), broken)
    weights = load_file(str(broken / "model.safetensors"))
    del weights["encoder.1.mlp.fc2.weight"]
    weights["decoder_norm.weight"] = torch.ones(65)
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys: encoder.1.mlp.fc2.weight(.|\n)*decoder_norm.weight: "
                                              r"checkpoint \(65,\) vs model \(64,\)"):
        load_aion(broken, "demo")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_aion(tmp_path / "nowhere")


def test_codecs_from_another_release_and_missing_codecs_are_errors(standin_dir, tmp_path):
    mixed = tmp_path / "mixed"
    model = load_aion(standin_dir, "demo")
    other = SpectrumCodecConfig(encoder_depths=(1, 1, 1, 1), encoder_dims=(8, 8, 8, 8), decoder_depths=(1, 1, 1, 1),
                                decoder_dims=(8, 8, 8, 1), latent_channels=8, embedding_dim=9, dim=9, codebook_size=512)
    save_aion(AionModel(mixed, model.transformer, SpectrumCodec(other), model.redshift, False), mixed)
    with pytest.raises(CheckpointError, match="different AION releases: codecs/spectrum has 512 codes"):
        load_aion(mixed, "demo")
    eight_levels = CodecConfig(quantizer_levels=[8, 5, 5, 5], embedding_dim=4, hidden_dims=8, num_consecutive=1)
    with pytest.raises(CheckpointError, match="the image codec has 1000 codes"):
        load_aion(standin_dir, "demo", AionImageCodec(eight_levels))
    lacking = tmp_path / "lacking"
    save_aion(AionModel(lacking, model.transformer, None, model.redshift, False), lacking)
    with pytest.raises(CheckpointError, match="codecs/spectrum has no config.json(.|\n)*huggingface-cli download"):
        load_aion(lacking, "demo")


def test_spectrum_rows_missing_nan_masked_and_wrong_grid(tmp_path):
    assert desi_spectrum(None) is None and desi_spectrum({"flux": None}) is None
    flux = np.ones(7781, np.float32)
    flux[:10] = np.nan
    error = np.full(7781, 0.5, np.float32)
    error[20:30] = 0.0
    got = desi_spectrum({"flux": flux, "wavelength": DESI_WAVELENGTH, "error": error})
    assert got is not None
    clean, ivar, bad = got
    assert bad[:10].all() and bad[20:30].all() and not bad[30:].any()  # NaN flux and zero error are bad pixels
    assert (clean[:10] == 0).all() and (ivar[20:30] == 0).all() and ivar[40] == pytest.approx(4.0)
    with pytest.raises(DataError, match="0 finite flux values"):  # present but unusable: a data fault
        desi_spectrum({"flux": np.full(7781, np.nan), "wavelength": DESI_WAVELENGTH, "error": error})
    with pytest.raises(DataError, match="every spectrum pixel"):
        desi_spectrum({"flux": flux, "wavelength": DESI_WAVELENGTH, "error": np.zeros(7781, np.float32)})
    with pytest.raises(DataError, match="no error array"):
        desi_spectrum({"flux": flux, "wavelength": DESI_WAVELENGTH, "error": None})

    synth.write(tmp_path, 6, seed=1, image_size=96)
    file = tmp_path / "data" / "train-00000-of-00001.parquet"
    table = pq.read_table(file)
    spectra = table.column(SPECTRUM_COLUMN).to_pylist()
    row = next(i for i, s in enumerate(spectra) if s is not None)
    spectra[row] = {**spectra[row], "wavelength": (DESI_WAVELENGTH / 10).tolist()}  # nanometres
    pq.write_table(table.set_column(table.schema.get_field_index(SPECTRUM_COLUMN), SPECTRUM_COLUMN,
                                    pa.array(spectra, table.schema.field(SPECTRUM_COLUMN).type)), file)
    rows = open_split(str(tmp_path), "train", COLUMNS + [SPECTRUM_COLUMN], None, 0.0, 0)
    dataset = EuclidBandsAndSpectrum(rows)
    item = dataset[row]  # a data fault naming what is wrong, the object, file and row; embedded without it
    assert not item["has_spectrum"]
    assert re.search(rf"another grid \(360.0-982.4 A\).*object_id \d+, train-00000-of-00001.parquet row {row}\)",
                     item["fault_spectrum"]), item["fault_spectrum"]
    absent = next(i for i, s in enumerate(spectra) if s is None) if None in spectra else None
    if absent is not None:
        assert not dataset[absent]["has_spectrum"] and dataset[absent]["spectrum_bad"].all()


def test_embedder_without_spectrum_all_masked_and_nan_flux(standin_dir):
    torch.manual_seed(0)
    aion = load_aion(standin_dir, "demo")
    adapters = AionAdapters(AionImageCodec(TINY_CODEC).eval(), depth=1, hidden=4).eval()
    flux = torch.rand(4, 7781) * 5
    flux[2, :3000] = float("nan")  # partly NaN: those pixels are bad, the rest is embedded
    bad = torch.zeros(4, 7781, dtype=torch.bool)
    bad[2, :3000] = True
    batch = {"euclid": torch.rand(4, 4, 96, 96) * 0.1, "has_spectrum": torch.tensor([True, False, True, False]),
             "has_image": torch.ones(4, dtype=torch.bool),
             "spectrum_flux": torch.nan_to_num(flux), "spectrum_ivar": torch.ones(4, 7781), "spectrum_bad": bad}
    embedder = AionEmbedder(adapters, aion, AionEmbedSettings(num_encoder_tokens=600), torch.device("cpu"))
    with torch.no_grad():
        vectors, present = embedder(batch)
    assert set(vectors) == {"image", "spectrum", "joint"} and vectors["image"].shape == (4, 64)
    assert present["spectrum"].tolist() == [True, False, True, False]
    assert all(torch.isfinite(v).all() for v in vectors.values())
    missing = ~batch["has_spectrum"]
    torch.testing.assert_close(vectors["joint"][missing], vectors["image"][missing], rtol=0, atol=1e-5)
    assert not torch.allclose(vectors["joint"][~missing], vectors["image"][~missing])
    assert (vectors["spectrum"][missing] == 0).all()  # written as null through `present`
    assert embedder.predictions["aion_redshift"].shape == (4,)
    nobody = {**batch, "has_spectrum": torch.zeros(4, dtype=torch.bool)}  # a batch without any spectrum
    with torch.no_grad():
        vectors, present = embedder(nobody)
    assert not present["spectrum"].any()
    torch.testing.assert_close(vectors["joint"], vectors["image"], rtol=0, atol=1e-5)
    # No Euclid image: the joint embedding is the spectrum alone; with neither, it is null.
    imageless = {**batch, "has_image": torch.tensor([False, False, True, True])}
    with torch.no_grad():
        vectors, present = embedder(imageless)
    assert present["image"].tolist() == [False, False, True, True]
    assert present["joint"].tolist() == [True, False, True, True]
    torch.testing.assert_close(vectors["joint"][0], vectors["spectrum"][0], rtol=0, atol=1e-5)
    assert all(torch.isfinite(v).all() for v in vectors.values())


def test_embedding_needs_a_transformer_or_says_where_to_put_it(tmp_path, monkeypatch):
    paths = tmp_path / "paths_local.yaml"
    paths.write_text("runs: runs\n")
    monkeypatch.setenv("FMB_PATHS", str(paths))
    cfg = AionModelConfig()
    with pytest.raises(ConfigError, match="set `aion_model:` in paths_local.yaml"):
        embedding_transformer(cfg, AionImageCodec(TINY_CODEC))
    cfg.embed.transformer = False
    with pytest.raises(ConfigError, match="leave nothing to embed"):
        embedding_transformer(cfg, AionImageCodec(TINY_CODEC))
    cfg.embed.codec_latents = True
    assert embedding_transformer(cfg, AionImageCodec(TINY_CODEC)) is None


def test_doctor_reports_the_weights(standin_dir, tmp_path):
    unset = weights_report({})
    assert "AION transformer   not set (aion_model" in unset[0] and "aion_codec" in unset[1]
    lines = weights_report({"aion_model": str(standin_dir)})
    assert lines[0].startswith(f"AION transformer   RANDOM STAND-IN: {standin_dir} (demo, 64 wide")
    assert f"codecs/spectrum  ok: {standin_dir / SPECTRUM_DIR}" in lines[1] and "codecs/Z" in lines[2]
    assert "AION image codec   PROBLEM" in lines[3]  # the stand-in has no image codec
    (tmp_path / "config.json").write_text(json.dumps({"dim": 8}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert "PROBLEM" in weights_report({"aion_model": str(tmp_path)})[0]
