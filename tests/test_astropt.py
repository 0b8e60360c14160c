"""AstroPT family: model, masked loss, Euclid+DESI decoding, conversion, embeddings, demo."""

from __future__ import annotations

import io
import json
import math
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from fmb.data.images import decode_image, encode_png
from fmb.data.surveys.euclid_desi import clean_spectrum, inverse_variance, open_split
from fmb.data.synth import euclid_desi as synth
from fmb.errors import CheckpointError, ConfigError, DataError
from fmb.models.astropt.convert import convert, map_key
from fmb.models.astropt.data import COLUMNS, EuclidDesiPatches, image_patches, spectrum_patches
from fmb.models.astropt.model import PRESETS, AstroPT, GPTShape, Modality, next_patch_loss
from fmb.models.astropt.trainer import AstroPTConfig, AstroPTModelConfig, build_astropt, model_shape
from fmb.train import checkpoint as ckpt
from tests.cli_runner import run_cli
from tests.extras import need

IMAGES = Modality("images", 16 * 16 * 3, 16)
SPECTRA = Modality("spectra", 10, 10)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("euclid_desi")
    synth.write(out, 40, seed=3, image_size=32)
    return out


def tiny(modalities=(IMAGES, SPECTRA), tokeniser="aim") -> AstroPT:
    torch.manual_seed(0)
    return AstroPT(GPTShape(n_layer=2, n_head=2, n_embd=32, block_size=128, tokeniser=tokeniser), list(modalities))


def inputs(batch=2, n_img=4, n_spec=6):
    gen = torch.Generator().manual_seed(1)
    tokens = {"images": torch.randn(batch, n_img, 768, generator=gen), "spectra": torch.randn(batch, n_spec, 10, generator=gen)}
    positions = {k: torch.arange(v.shape[1]).expand(batch, -1) for k, v in tokens.items()}
    return tokens, positions


# ----------------------------------------------------------------------------- model


def test_prediction_shapes_follow_next_token_rule():
    model = tiny()
    tokens, positions = inputs()
    pred = model(tokens, positions)
    assert pred["images"].shape == (2, 3, 768)  # tokens 1..3 of the first modality
    assert pred["spectra"].shape == (2, 6, 10)  # every spectrum token, the first from the last image token


def test_attention_is_causal():
    model = tiny().eval()
    tokens, positions = inputs()
    base = model(tokens, positions)
    tokens["spectra"][:, -1] += 100.0  # the last token influences no prediction at all
    changed = model(tokens, positions)
    torch.testing.assert_close(base["images"], changed["images"])
    torch.testing.assert_close(base["spectra"], changed["spectra"])
    tokens["images"][:, 2] += 100.0  # image token 2 changes predictions from position 2 on only
    later = model(tokens, positions)
    torch.testing.assert_close(base["images"][:, :2], later["images"][:, :2])
    assert not torch.allclose(base["images"][:, 2:], later["images"][:, 2:])


def test_initialisation_and_presets():
    model = tiny()
    std = model.blocks[0].mlp.proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(4), rel=0.2)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    assert model_shape(AstroPTModelConfig(preset="300M")).n_embd == 1024
    assert model_shape(AstroPTModelConfig(preset="001M", n_layer=2)).n_layer == 2
    with pytest.raises(ConfigError, match="not one of"):
        model_shape(AstroPTModelConfig(preset="5M"))
    small = build_astropt(AstroPTModelConfig(preset="001M"))
    assert 1.5e6 < sum(p.numel() for p in small.parameters()) < 3e6
    assert set(PRESETS) >= {"001M", "095M", "2100M"}


def test_loss_matches_hand_computation_and_weights():
    model = tiny((Modality("images", 768, 16, loss_weight=2.0), SPECTRA))
    tokens, positions = inputs()
    pred = model(tokens, positions)
    loss, parts = next_patch_loss(model.modalities, tokens, pred)
    img = F.huber_loss(pred["images"], tokens["images"][:, 1:])
    spec = F.huber_loss(pred["spectra"], tokens["spectra"])
    torch.testing.assert_close(parts["images"], img)
    torch.testing.assert_close(loss, (2.0 * img + spec) / 2)


def test_masks_keep_absent_spectra_out_without_misaligning_the_batch():
    model = tiny()
    tokens, positions = inputs(batch=2)
    masks = {"images": torch.ones(2, 4, dtype=torch.bool), "spectra": torch.tensor([[True] * 6, [False] * 6])}
    pred = model(tokens, positions)
    _, parts = next_patch_loss(model.modalities, tokens, pred, masks)
    only_first = F.huber_loss(pred["spectra"][0], tokens["spectra"][0])
    torch.testing.assert_close(parts["spectra"], only_first)
    # the second object's images still count
    both = F.huber_loss(pred["images"], tokens["images"][:, 1:])
    torch.testing.assert_close(parts["images"], both)
    # a batch with no spectrum at all: zero, not NaN
    none = {"images": masks["images"], "spectra": torch.zeros(2, 6, dtype=torch.bool)}
    loss, parts = next_patch_loss(model.modalities, tokens, pred, none)
    assert parts["spectra"].item() == 0.0 and torch.isfinite(loss)


def test_sequence_longer_than_block_size_is_an_error():
    model = AstroPT(GPTShape(2, 2, 32, block_size=8), [IMAGES, SPECTRA])
    tokens, positions = inputs()
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(tokens, positions)


# ----------------------------------------------------------------------------- data


def test_png_round_trip_and_corrupt_bytes():
    image = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(encode_png(image)), image)
    with pytest.raises(DataError):
        decode_image(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError):
        decode_image(b"definitely not an image")


def test_jpeg_and_filtered_png_go_through_pillow():
    Image = need("PIL.Image")

    image = np.zeros((8, 8, 3), np.uint8)
    image[:, 4:] = 200
    for fmt in ("JPEG", "PNG"):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format=fmt)
        decoded = decode_image(buffer.getvalue())
        assert decoded.shape == (8, 8, 3) and abs(int(decoded[0, 6, 0]) - 200) < 10


def test_patch_order_is_row_column_channel():
    image = np.arange(4 * 4 * 3).reshape(4, 4, 3)
    patches = image_patches(image, 2)
    assert patches.shape == (4, 12)
    # patch 1 is the top-right 2x2 block; its first values are pixel (0, 2) channels 0, 1, 2, then pixel (0, 3)
    assert patches[1, :6].tolist() == [*image[0, 2], *image[0, 3]]


def test_rgb_patches_are_the_scaled_image_in_8_bits_and_columns_follow_modalities():
    from fmb.data.surveys.euclid_desi import rgb_tensor
    from fmb.models.astropt.data import columns_for, rgb_patches
    from fmb.models.astropt.trainer import model_inputs

    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image = {"bytes": encode_png(pixels)}
    for size, within in ((16, 0.0), (8, 0.5 / 255 + 1e-6)):  # as decoded (exact), and resized (rounded to 8 bits)
        patches = rgb_patches(image, size, 4)
        assert patches.dtype == torch.uint8
        scaled = model_inputs([Modality("images", 48, 4)], {"images": patches[None], "images_mask": None})[0]["images"][0]
        expected = torch.from_numpy(image_patches(rgb_tensor(image, size).permute(1, 2, 0).numpy(), 4))
        torch.testing.assert_close(scaled, expected, rtol=0, atol=within)
    images = [Modality(name="images", input_size=48, patch_size=4)]
    assert columns_for(images) == ["object_id", "targetid", "redshift", "RGB_image.bytes"]
    both = [*images, Modality(name="spectra", input_size=10, patch_size=10)]
    assert columns_for(both) == COLUMNS and "spectrum.error" not in COLUMNS


def test_spectrum_cleaning_pads_trims_masks_and_guards_zero_spread():
    flux = np.array([1.0, np.nan, 3.0, np.inf, 5.0], np.float32)
    values, valid = clean_spectrum({"flux": flux}, length=7, grid=5)  # the model input is longer than the grid
    assert valid.tolist() == [True, False, True, False, True, False, False]
    std = np.std([1.0, 3.0, 5.0])
    np.testing.assert_allclose(values[[0, 2, 4]], np.array([1.0, 3.0, 5.0]) / std, rtol=1e-6)
    assert values[1] == 0.0 and values[5] == 0.0
    with pytest.raises(DataError, match="flat"):
        clean_spectrum({"flux": np.ones(10)}, length=10, grid=10)
    with pytest.raises(DataError, match="0 finite flux values of 10"):
        clean_spectrum({"flux": np.full(10, np.nan)}, length=10, grid=10)
    assert clean_spectrum(None) is None and clean_spectrum({"flux": None, "wavelength": None}) is None
    trimmed, _ = clean_spectrum({"flux": np.arange(20.0)}, length=8, grid=20)
    assert len(trimmed) == 8
    tokens, mask = spectrum_patches(values, valid, 3)
    assert tokens.shape == (3, 3) and mask.tolist() == [False, False, False]
    tokens, mask = spectrum_patches(np.arange(7, dtype=np.float32), np.array([1, 1, 1, 0, 1, 1, 1], bool), 3)
    assert tokens.tolist() == [[0, 1, 2], [3, 4, 5], [6, 0, 0]] and tokens.dtype == torch.float32
    assert mask.tolist() == [True, False, True]  # the padding of the last patch counts as valid
    _, mask = spectrum_patches(np.arange(7, dtype=np.float32), np.array([1, 1, 1, 0, 1, 1, 1], np.int8), 3)
    assert mask.tolist() == [True, False, True]  # integer flags read as truth values, not bit patterns
    with pytest.raises(ValueError, match="7 values but 6 validity flags"):
        spectrum_patches(np.arange(7, dtype=np.float32), np.ones(6, bool), 3)
    np.testing.assert_array_equal(inverse_variance(np.array([0.5, 0.0, np.nan, -1.0])), [4.0, 0.0, 0.0, 0.0])


def test_spectra_off_the_desi_grid_say_what_is_wrong_or_are_resampled():
    grid = 3600.0 + 0.8 * np.arange(7781)
    rng = np.random.default_rng(0)
    for pixels in (0, 5, 100, 20000):
        with pytest.raises(DataError, match=rf"the spectrum has {pixels} pixels where the DESI grid has 7781"):
            clean_spectrum({"flux": rng.normal(size=pixels)})
    with pytest.raises(DataError, match="7781 flux values but 7000 wavelengths"):
        clean_spectrum({"flux": rng.normal(size=7781), "wavelength": grid[:7000]})
    shifted = {"flux": np.sin(grid / 50.0), "wavelength": grid + 100.0}
    with pytest.raises(DataError, match=r"another grid \(3700.0-9924.0 A\).*data.resample_spectra=true"):
        clean_spectrum(shifted)
    coarse = {"flux": np.sin(grid[::4] / 50.0), "wavelength": grid[::4]}  # 1946 pixels of 3.2 A
    values, valid = clean_spectrum(coarse, resample=True)
    assert valid.sum() >= 7778  # the last pixels lie beyond the coarse spectrum's range
    reference, _ = clean_spectrum({"flux": np.sin(grid / 50.0)})
    np.testing.assert_allclose(values[valid], reference[valid], atol=0.02)
    values, valid = clean_spectrum(shifted, resample=True)
    assert not valid[:125].any() and valid[126:].all()  # below 3700 A the shifted spectrum has no data


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # numpy on the wavelengths of the all-NaN case
def test_the_wavelength_grid_check_skips_gaps_and_refuses_offsets():
    grid = 3600.0 + 0.8 * np.arange(7781)
    flux = np.sin(grid / 50.0)
    with_gaps = grid.copy()
    with_gaps[[0, 500]] = np.nan  # pixels without a wavelength are not checked
    assert clean_spectrum({"flux": flux, "wavelength": with_gaps.astype(np.float32)}) is not None
    nudged = with_gaps.copy()
    nudged[1000] += 0.06
    for wavelength in (nudged, grid + 0.06, np.full(7781, np.nan)):
        with pytest.raises(DataError, match="the same number of pixels on another grid"):
            clean_spectrum({"flux": flux, "wavelength": wavelength})
    assert clean_spectrum({"flux": flux, "wavelength": grid + 0.04}) is not None


def test_unusable_modalities_become_faults_with_file_and_row(tmp_path, caplog):
    table = synth.make_table(4, seed=1, image_size=16)
    images = table.column("RGB_image").to_pylist()
    images[1] = {"bytes": b"broken", "path": None}
    images[3] = None  # absent: not a fault
    spectra = table.column("spectrum").to_pylist()
    spectra[2] = {**spectra[2], "flux": [float("nan")] * 7781}
    spectra[0] = {"flux": [1.0] * 100, "wavelength": None, "error": None}
    table = table.set_column(table.schema.get_field_index("RGB_image"), "RGB_image", pa.array(images, table.schema.field("RGB_image").type))
    table = table.set_column(table.schema.get_field_index("spectrum"), "spectrum", pa.array(spectra, table.schema.field("spectrum").type))
    pq.write_table(table, tmp_path / "x.parquet")
    rows = open_split(str(tmp_path / "x.parquet"), "test", COLUMNS, None, 0.0, 0)
    ds = EuclidDesiPatches(rows, [IMAGES, SPECTRA], 16, 7781)
    ids = table.column("object_id").to_pylist()
    with caplog.at_level("WARNING", logger="fmb"):
        items = [ds[i] for i in range(4)]
    assert not caplog.text  # nothing per row: the trainer reports the counts once per epoch
    assert not items[1]["images_mask"].any() and not items[2]["spectra_mask"].any() and not items[0]["spectra_mask"].any()
    assert f"object_id {ids[1]}, x.parquet row 1" in items[1]["fault_image"] and "6 bytes" in items[1]["fault_image"]
    assert "BytesIO" not in items[1]["fault_image"]
    assert "0 finite flux values" in items[2]["fault_spectrum"] and "row 2" in items[2]["fault_spectrum"]
    assert "100 pixels where the DESI grid has 7781" in items[0]["fault_spectrum"]
    assert items[3]["fault_image"] == "" and not items[3]["images_mask"].any()  # null image: just absent
    assert [i["fault_spectrum"] == "" for i in items] == [False, True, False, True]


def test_a_modality_broken_for_every_object_stops_the_run(monkeypatch, capsys, tmp_path):
    data = tmp_path / "data"
    synth.write(data, 40, 0, image_size=16)
    for file in (data / "data").glob("*.parquet"):
        table = pq.read_table(file)
        broken = pa.array([{"bytes": b"\x00" * 12, "path": None}] * table.num_rows, table.schema.field("RGB_image").type)
        pq.write_table(table.set_column(table.schema.get_field_index("RGB_image"), "RGB_image", broken), file)
    code, _, err = run_cli(monkeypatch, capsys, "retrain", "astropt", "--demo", "--out", str(tmp_path / "run"),
                           "--max-steps", "30", "--no-progress", "--set", f"data.path={data}", "--set", "data.image_size=16",
                           "--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2",
                           "--set", "train.num_workers=0", "--batch-size", "4")
    assert code == 1
    assert "training epoch 0: image is unusable for 28 of 28 samples (100%, more than train.max_unusable_fraction=0.05)" in err
    assert "cannot decode image bytes (12 bytes" in err
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"data/unusable_image": 28, "data/unusable_spectrum": 0, "data/samples": 28} in [{k: v for k, v in r.items() if k.startswith("data/")}
                                                                for r in records]


def test_synthetic_file_has_the_real_schema_and_truth(dataset_dir):
    table = pq.read_table(dataset_dir / "data" / "train-00000-of-00001.parquet")
    for column in ("object_id", "targetid", "redshift", "RGB_image", "VIS_image", "NISP_Y_image", "NISP_J_image",
                   "NISP_H_image", "spectrum", "sed_data", "truth_type"):
        assert column in table.column_names
    assert table.schema.field("spectrum").type.get_field_index("wavelength") == 1
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["VIS_image"]) == 32 and len(row["VIS_image"][0]) == 32
    if row["spectrum"] is not None:
        assert len(row["spectrum"]["flux"]) == 7781
        assert row["spectrum"]["wavelength"][0] == pytest.approx(3600.0)
        assert row["spectrum"]["wavelength"][-1] == pytest.approx(9824.0)
    assert decode_image(row["RGB_image"]["bytes"]).shape == (32, 32, 3)


def test_synthetic_spectra_carry_redshifted_lines():
    table = synth.make_table(60, seed=5, image_size=16)
    rows = [r for r in table.to_pylist() if r["spectrum"] is not None and r["truth_type"] == 1]
    wave = np.asarray(rows[0]["spectrum"]["wavelength"])
    hits = 0
    for row in rows:
        observed = 6562.8 * (1 + row["redshift"])
        if observed > 9800:
            continue
        flux = np.asarray(row["spectrum"]["flux"])
        near = np.abs(wave - observed) < 4
        far = (np.abs(wave - observed) > 30) & (np.abs(wave - observed) < 80)
        hits += flux[near].mean() > flux[far].mean() + 0.5
    assert hits >= 0.8 * sum(6562.8 * (1 + r["redshift"]) <= 9800 for r in rows)


def test_dataset_items_masks_and_splits(dataset_dir):
    train = open_split(str(dataset_dir), "train", COLUMNS, None, 0.2, 0)
    val = open_split(str(dataset_dir), "validation", COLUMNS, None, 0.2, 0)
    test = open_split(str(dataset_dir), "test", COLUMNS, None, 0.2, 0)
    ids = lambda rows: {rows.row(i)["object_id"] for i in range(len(rows))}  # noqa: E731
    assert ids(train).isdisjoint(ids(val)) and ids(train).isdisjoint(ids(test)) and len(val) > 0
    ds = EuclidDesiPatches(train, [IMAGES, SPECTRA], 32, 7781)
    items = [ds[i] for i in range(len(ds))]
    assert items[0]["images"].shape == (4, 768) and items[0]["spectra"].shape == (779, 10)
    assert all(it["images"].dtype == torch.uint8 and it["images"].max() > 0 for it in items)
    absent = [it for it in items if not it["spectra_mask"].any()]
    present = [it for it in items if it["spectra_mask"].any()]
    assert absent and present  # the generator leaves some rows without a spectrum
    assert all(it["spectra"].abs().sum() == 0 for it in absent)


def test_missing_column_names_file_and_column(tmp_path):
    pq.write_table(synth.make_table(3, seed=1, image_size=16).drop_columns(["spectrum"]), tmp_path / "y.parquet")
    with pytest.raises(DataError, match=r"y\.parquet: missing column\(s\) spectrum"):
        open_split(str(tmp_path / "y.parquet"), "test", COLUMNS, None, 0.0, 0)


# ----------------------------------------------------------------------------- conversion




def upstream_checkpoint(path, modalities, tokeniser="aim", prefix="_orig_mod.", layout="2.x"):
    upstream = need("astropt.model")
    GPT, GPTConfig, ModalityConfig, ModalityRegistry = (upstream.GPT, upstream.GPTConfig, upstream.ModalityConfig,
                                                        upstream.ModalityRegistry)

    torch.manual_seed(0)
    configs = [ModalityConfig(name=m.name, input_size=m.input_size, pos_input_size=m.pos_input_size,
                              patch_size=m.patch_size, embed_pos=m.positions == "index", loss_weight=m.loss_weight)
               for m in modalities]
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128, tokeniser=tokeniser, modalities=configs)
    registry = ModalityRegistry(configs)
    model = GPT(config, registry, master_process=False)
    for param in model.parameters():  # random weights, not just the init
        torch.nn.init.normal_(param, std=0.05)
    state = model.state_dict()
    if layout == "3.x":  # the 3.0 names of the same tensors
        rename = {"transformer.wte.": "encoders.", "transformer.wpe.": "embedders.", "lm_head.": "decoders."}
        state = {next((new + k[len(old):] for old, new in rename.items() if k.startswith(old)), k): v for k, v in state.items()}
    args = dict(n_layer=2, n_head=2, n_embd=32, n_chan=1, block_size=128, dropout=0.0, attn_type="causal", modalities=configs)
    torch.save({"model": {prefix + k: v for k, v in state.items()}, "model_args": args, "iter_num": 77,
                "best_val_loss": np.float32(0.25), "config": {"batch_size": 8}, "modality_registry": registry}, path)
    return model.eval()


@pytest.mark.parametrize("layout, prefix", [("2.x", "_orig_mod."), ("2.x", ""), ("3.x", "module.")])
def test_convert_both_key_layouts(tmp_path, layout, prefix):
    upstream_checkpoint(tmp_path / "up.pt", [IMAGES, SPECTRA], prefix=prefix, layout=layout)
    out = convert(tmp_path / "up.pt", tmp_path / "conv")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["family"] == "astropt" and meta["step"] == 77 and meta["upstream_layout"] == layout
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()


def test_key_mapping_examples():
    assert map_key("_orig_mod.transformer.wte.images.c_fc.weight") == "encoders.images.fc.weight"
    assert map_key("transformer.wpe.images.wpe.weight") == "embedders.images.table.weight"
    assert map_key("module.transformer.h.3.attn.c_attn.weight") == "blocks.3.attn.qkv.weight"
    assert map_key("lm_head.spectra.c_proj.weight") == "decoders.spectra.proj.weight"
    assert map_key("decoders.spectra.c_fc.weight") == "decoders.spectra.fc.weight"


def test_convert_rejects_mismatch_and_code(tmp_path):
    upstream_checkpoint(tmp_path / "up.pt", [IMAGES, SPECTRA])
    raw = torch.load(tmp_path / "up.pt", weights_only=False)
    raw["model"]["_orig_mod.transformer.h.0.mlp.c_fc.weight"] = torch.zeros(3, 3)
    del raw["model"]["_orig_mod.transformer.ln_f.weight"]
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: ln_f\.weight(.|\n)*blocks\.0\.mlp\.fc\.weight: checkpoint \(3, 3\)"):
        convert(tmp_path / "bad.pt", tmp_path / "o1")

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"model": {}, "x": Exploit()}, handle)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        convert(tmp_path / "evil.pt", tmp_path / "o2")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an AstroPT checkpoint"):
        convert(tmp_path / "other.pt", tmp_path / "o3")


# ----------------------------------------------------------------------------- parity with upstream 2.0.9


@pytest.mark.parametrize("modalities, tokeniser", [
    ([IMAGES], "aim"),
    ([IMAGES, SPECTRA], "aim"),
    ([IMAGES, Modality("spectra", 10, 10, positions="float", pos_input_size=10, loss_weight=0.5)], "affine"),
])
def test_parity_with_upstream_astropt(tmp_path, modalities, tokeniser):
    upstream = upstream_checkpoint(tmp_path / "up.pt", modalities, tokeniser=tokeniser)
    out = convert(tmp_path / "up.pt", tmp_path / "conv")
    config = ckpt.read_config(out, AstroPTConfig)
    ours = build_astropt(config.model)
    ckpt.load_weights(ours, out, "astropt")
    ours.eval()

    gen = torch.Generator().manual_seed(7)
    names = [m.name for m in sorted(modalities, key=lambda m: m.name)]
    tokens = {"images": torch.randn(3, 9, 768, generator=gen), "spectra": torch.randn(3, 12, 10, generator=gen)}
    positions = {"images": torch.arange(9).expand(3, -1), "spectra": torch.arange(12).expand(3, -1)}
    if modalities[-1].positions == "float":
        positions["spectra"] = torch.rand(3, 12, 10, generator=gen)
    tokens = {k: v for k, v in tokens.items() if k in names}
    positions = {k: v for k, v in positions.items() if k in names}

    if len(names) == 1:  # upstream shifts a single modality on the data side
        up_in = {"images": tokens["images"][:, :-1], "images_positions": positions["images"][:, :-1]}
        up_targets = {"images": tokens["images"][:, 1:]}
    else:
        up_in = {**tokens, **{f"{k}_positions": v for k, v in positions.items()}}
        up_targets = {"images": tokens["images"][:, 1:], "spectra": tokens["spectra"]}
    with torch.no_grad():
        _, up_loss = upstream(up_in, targets=up_targets)
        up_emb = upstream.generate_embeddings(up_in, reduction="mean")
        ours_loss, _ = next_patch_loss(ours.modalities, tokens, ours(tokens, positions))
        ours_emb = ours.embed(tokens, positions, layer="middle", reduction="mean")
    torch.testing.assert_close(ours_loss, up_loss, rtol=0, atol=1e-5)
    if len(names) > 1:  # single modality: upstream embeds the shortened input, fmb the full one
        for name in names:
            torch.testing.assert_close(ours_emb[name], up_emb[name], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- run, embed, CLI


def test_demo_trains_and_embeds(monkeypatch, capsys, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, "retrain", "astropt", "--demo", "--out", str(run), "--max-steps", "12",
                        "--no-progress", "--set", "data.synthetic=48", "--set", "data.image_size=32",
                        "--set", "train.eval_every=12", "--set", "train.num_workers=0", "--set", "model.n_layer=2")
    assert code == 0, err
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val/loss"] for r in records if "val/loss" in r]
    assert len(vals) == 2 and vals[-1] < 0.8 * vals[0]  # step 0 and step 12
    assert any("tokens_per_s" in r for r in records)

    out = tmp_path / "emb.parquet"
    code, _, err = run_cli(monkeypatch, capsys, "embed", "astropt", "--checkpoint", str(run), "--out", str(out),
                        "--batch-size", "8")
    assert code == 0, err
    table = pq.read_table(out)
    assert {"object_id", "targetid", "redshift", "embedding_image", "embedding_spectrum", "embedding_joint",
            "truth_type", "truth_half_light_px", "split"} <= set(table.column_names)
    assert table.num_rows == 48 and set(table.column("split").to_pylist()) == {"train", "validation", "test"}
    joint = np.stack(table.column("embedding_joint").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(joint, axis=1), 1.0, rtol=1e-5)
    assert table.column("embedding_image").type.value_type == pa.float32()

    baseline = tmp_path / "random.parquet"
    code, _, err = run_cli(monkeypatch, capsys, "embed", "astropt", "--checkpoint", str(run), "--out", str(baseline),
                        "--random-init")
    assert code == 0, err
    random_joint = np.stack(pq.read_table(baseline).column("embedding_joint").to_numpy(zero_copy_only=False))
    assert random_joint.shape == joint.shape and not np.allclose(random_joint, joint)
    last = tmp_path / "last.parquet"  # --set reaches the config: the last block's output instead of the middle one
    code, _, err = run_cli(monkeypatch, capsys, "embed", "astropt", "--checkpoint", str(run), "--out", str(last),
                           "--split", "validation", "--set", "model.embed_layer=last")
    assert code == 0, err
    last_table = pq.read_table(last)
    assert set(last_table.column("split").to_pylist()) == {"validation"}
    rows = [table.column("object_id").to_pylist().index(i) for i in last_table.column("object_id").to_pylist()]
    assert not np.allclose(np.stack(last_table.column("embedding_joint").to_numpy(zero_copy_only=False)), joint[rows])
    code, _, err = run_cli(monkeypatch, capsys, "embed", "astropt", "--checkpoint", str(run), "--out", str(out),
                        "--data", str(run / "data"))
    assert code == 0 and set(pq.read_table(out).column("split").to_pylist()) == {"train", "test"}  # as named there
    code, _, err = run_cli(monkeypatch, capsys, "embed", "astropt", "--checkpoint", str(run), "--out", str(out),
                        "--data", str(run / "data"), "--split", "test")
    assert code == 0, err
    spectra = pq.read_table(out).column("embedding_spectrum")
    test_rows = pq.read_table(run / "data" / "data" / "test-00000-of-00001.parquet", columns=["spectrum"])
    assert spectra.null_count == test_rows.column("spectrum").null_count


def test_checkpoint_of_another_family_is_refused(tmp_path, monkeypatch, capsys):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "meta.json").write_text(json.dumps({"family": "astroclip", "step": 1}))
    (directory / "config.yaml").write_text("train: {}\n")
    (directory / "model.safetensors").write_bytes(b"")
    code, _, err = run_cli(monkeypatch, capsys, "embed", "astropt", "--checkpoint", str(directory), "--out", str(tmp_path / "e.parquet"))
    assert code == 1 and "checkpoint of the 'astroclip' family, not 'astropt'" in err


def test_fine_tune_from_a_converted_upstream_checkpoint(monkeypatch, capsys, tmp_path):
    upstream_checkpoint(tmp_path / "up.pt", [IMAGES, SPECTRA])
    converted = convert(tmp_path / "up.pt", tmp_path / "conv")
    run = tmp_path / "run"
    modalities = "[{name: images, input_size: 768, patch_size: 16}, {name: spectra, input_size: 10, patch_size: 10}]"
    code, _, err = run_cli(monkeypatch, capsys, "retrain", "astropt", "--demo", "--out", str(run), "--max-steps", "2",
                           "--no-progress", "--set", "data.synthetic=24", "--set", "data.image_size=32",
                           "--set", "data.spectrum_length=100", "--set", "model.preset=null", "--set", "model.n_layer=2",
                           "--set", "model.n_head=2", "--set", "model.n_embd=32", "--set", "model.block_size=128",
                           "--set", f"model.modalities={modalities}", "--set", f"model.init_from={converted}",
                           "--set", "train.num_workers=0", "--set", "train.optim.lr=1e-12")
    assert code == 0, err
    assert "initialised from" in (run / "train.log").read_text()
    start = ckpt.read_safetensors(converted / ckpt.MODEL_FILE)
    after = ckpt.read_safetensors(ckpt.latest_checkpoint(run) / ckpt.MODEL_FILE)
    for key in start:  # a vanishing learning rate: the run starts from (and stays at) the upstream weights
        torch.testing.assert_close(after[key], start[key], rtol=0, atol=1e-6)
    code, _, err = run_cli(monkeypatch, capsys, "retrain", "astropt", "--demo", "--out", str(tmp_path / "bad"),
                           "--max-steps", "1", "--no-progress", "--set", f"model.init_from={converted}")
    assert code == 1 and "does not fit the model" in err  # the demo's 001M preset is another shape


def test_objects_without_image_or_spectrum_train_and_embed(monkeypatch, capsys, tmp_path):
    """The missing modality contributes nothing (its tokens are masked) and its column is null."""
    from tests.incomplete import assert_nulls_follow_the_data, retrain_and_embed, write_incomplete

    data = tmp_path / "data"
    write_incomplete(data, 40, 32, ["RGB_image"], seed=7)
    out = retrain_and_embed(monkeypatch, capsys, "astropt", tmp_path, [
        "--max-steps", "4", "--set", f"data.path={data}", "--set", "data.image_size=32", "--set", "train.eval_every=4",
        "--set", "train.num_workers=0", "--set", "model.n_layer=1"], ["--batch-size", "8"])
    assert_nulls_follow_the_data(out, data, "RGB_image")
