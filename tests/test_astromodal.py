"""astromodal pieces: S-PLUS synthetic schema, k-means, tokenisers, vocabulary, sequences, losses, model."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fmb.data.surveys.splus import Selection, cutout_stack, read_fields
from fmb.data.synth import splus
from fmb.errors import ConfigError, DataError
from fmb.models.astromodal.data import (
    BOS,
    EOS,
    MISS,
    PAD,
    SEP,
    SequenceDataset,
    TokenShards,
    Vocabulary,
    collate_sequences,
)
from fmb.models.astromodal.kmeans import fit_kmeans, nearest
from fmb.models.astromodal.model import (
    AstromodalModelConfig,
    AstromodalTransformer,
    LossConfig,
    ReconstructionTargets,
    astromodal_loss,
    reconstruct,
)
from fmb.models.astromodal.tokenize import Tokenizers, encode_dataset, fit_tokenizers
from fmb.models.astromodal.tokenizers import (
    ImageTokenizer,
    ScalarTokenizer,
    SpectrumTokenizer,
    TokenizerConfig,
    ellipse_weights,
    normalise_images,
    spectrum_features,
)


def small_tokenizer_config(**overrides) -> TokenizerConfig:
    cfg = TokenizerConfig(scalar_bins=16, spectrum_codebook=8, desi_rebin=128, image_codebook=8,
                          image_downsample=4, image_hidden=4, image_epochs=1, kmeans_steps=10,
                          kmeans_batch=512, device="cpu")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


# ----------------------------------------------------------------------------- synthetic data


def test_synthetic_fields_have_the_hypercube_schema(tmp_path):
    out = splus.write(tmp_path, 150, seed=0)
    files = sorted(out.glob("datacube_*.parquet"))
    assert len(files) == 3
    table = pq.read_table(files[0])
    names = set(table.column_names)
    for band in splus.BANDS:
        assert {f"mag_pstotal_{band}", f"err_mag_pstotal_{band}"} <= names
    for band in splus.CUTOUT_BANDS:
        assert table.schema.field(f"splus_cut_{band}").type == pa.list_(pa.float32())
    assert {"id", "ra", "dec", *splus.MORPHOLOGY, "gaia_source_id", "gaiaxp_bp_coefficients",
            "gaiaxp_rp_coefficient_errors", "desi_wave_b", "desi_flux_z", "desi_ivar_r", "specz_z",
            "specz_e_z", "vista_ksapermag6err", "truth_class", "truth_redshift"} <= names
    cut = table.column("splus_cut_R")
    lengths = [len(v) for v in cut.to_pylist() if v is not None]
    assert lengths and set(lengths) == {96 * 96}
    xp = [v for v in table.column("gaiaxp_bp_coefficients").to_pylist() if v is not None]
    assert xp and {len(v) for v in xp} == {55}
    # Missing is the normal case: most rows have no DESI spectrum and no Gaia match.
    assert table.column("desi_flux_b").null_count > table.num_rows / 2
    assert table.column("gaia_parallax").null_count > table.num_rows / 2
    fluxes = np.concatenate([pq.read_table(f, columns=["gaia_phot_g_mean_flux"]).column(0).to_numpy(
        zero_copy_only=False) for f in files])
    assert np.nanmax(fluxes) > 65504


# ----------------------------------------------------------------------------- k-means


def test_kmeans_recovers_planted_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    labels = torch.arange(4).repeat_interleave(300)
    x = centres[labels] + 0.1 * torch.randn(1200, 2, generator=gen)
    found = fit_kmeans(x, 4, steps=30, batch_size=256, seed=1)
    # every planted centre has one found centre within 0.05, and assignments are pure
    dist = torch.cdist(centres, found)
    assert dist.min(1).values.max() < 0.05
    assigned = nearest(x, found)
    for k in range(4):
        assert len(set(assigned[labels == k].tolist())) == 1


def test_kmeans_refuses_bad_input():
    with pytest.raises(DataError, match="fewer than the codebook size"):
        fit_kmeans(torch.randn(3, 2), 8, name="group x")
    with pytest.raises(DataError, match="NaN"):
        fit_kmeans(torch.tensor([[0.0, float("nan")]] * 10), 2)


# ----------------------------------------------------------------------------- tokenisers


def test_scalar_tokenizer_round_trip_miss_and_save(tmp_path):
    rng = np.random.default_rng(0)
    values = np.stack([rng.normal(18, 2, 2000), rng.uniform(1e5, 1e6, 2000)], 1)  # second column > 65504
    values[::7, 0] = np.nan
    tok = ScalarTokenizer(["mag", "flux"], 64).fit(values)
    bins = tok.encode(values)
    assert (bins[::7, 0] == -1).all() and (bins[1::7, 0] >= 0).all()
    decoded = tok.decode(bins)
    assert np.isnan(decoded[::7, 0]).all()
    ok = bins >= 0
    width = np.take_along_axis(np.diff(tok.edges, axis=1)[None].repeat(len(bins), 0),
                               np.clip(bins, 0, 63)[:, :, None], 2)[:, :, 0]
    assert (np.abs(decoded - values)[ok] <= width[ok] + 1e-9).all()
    # out of the fitted range: first / last bin; infinite: MISS
    assert tok.encode(np.array([[-1e9, 1e12], [np.inf, 5e5]])).tolist()[0] == [0, 63]
    assert tok.encode(np.array([[np.inf, 5e5]]))[0, 0] == -1
    # normalised centres are O(1) even for the column above 65504, and map back exactly
    norm = tok.normalised_centres()
    assert norm.abs().max() < 10
    np.testing.assert_allclose(tok.from_normalised(norm.double().numpy()[1], np.ones(64, int)), tok.centres[1],
                               rtol=1e-6)
    tok.save(tmp_path)
    again = ScalarTokenizer.load(tmp_path)
    np.testing.assert_array_equal(again.encode(values), bins)
    with pytest.raises(DataError, match="scalar column 'empty'"):
        ScalarTokenizer(["empty"], 4).fit(np.full((5, 1), np.nan))


def test_spectrum_features_guard_errors_and_rebin():
    flux = np.array([1.0, 3.0, np.nan, 2.0])
    err = np.array([1.0, 0.0, 1.0, -1.0])  # zero and negative errors are masked, never 1/0
    feats = spectrum_features(flux, err, "error", rebin=1, clip=10.0)
    assert np.isfinite(feats).all()
    assert feats[:, 1].tolist() == pytest.approx([math.log1p(1.0), 0.0, 0.0, 0.0])
    # ivar-weighted rebinning: (1 * 1 + 3 * 3) / 4 = 2.5 in the first pair
    feats = spectrum_features(np.array([1.0, 3.0, 5.0, 5.0]), np.array([1.0, 3.0, 0.0, 2.0]), "ivar", 2, 10.0)
    scale = np.median([2.5, 5.0])
    assert feats[:, 0].tolist() == pytest.approx([2.5 / scale, 5.0 / scale])
    assert feats[:, 1].tolist() == pytest.approx([math.log1p(2.0 * scale), math.log1p(math.sqrt(2.0) * scale)])
    assert spectrum_features(np.full(5, np.nan), np.ones(5), "ivar", 1, 10.0) is None
    assert spectrum_features(np.ones(5), np.zeros(5), "ivar", 1, 10.0) is None


def test_spectrum_tokenizer_one_codebook_per_group(tmp_path):
    rng = np.random.default_rng(1)
    blobs = {"desi_b": np.array([[0.0, 0.0], [1.0, 1.0]]), "gaiaxp_bp": np.array([[5.0, 2.0], [-3.0, 2.0]])}
    feats = {g: [c[rng.integers(0, 2, 300)] + 0.01 * rng.standard_normal((300, 2))] for g, c in blobs.items()}
    tok = SpectrumTokenizer(["desi_b", "gaiaxp_bp"], 2, 4, 20.0)
    tok.fit({g: [f.astype(np.float32) for f in v] for g, v in feats.items()}, 20, 256, 10_000, 0, torch.device("cpu"))
    for g, centres in blobs.items():
        book = tok.codebooks[g].numpy()
        assert np.abs(np.sort(book, 0) - np.sort(centres, 0)).max() < 0.02
        x = feats[g][0].astype(np.float32)
        decoded = tok.decode(g, tok.encode(g, x))
        assert np.abs(decoded - x).max() < 0.1  # within the codebook resolution
    tok.save(tmp_path)
    again = SpectrumTokenizer.load(tmp_path)
    assert torch.equal(again.codebooks["gaiaxp_bp"], tok.codebooks["gaiaxp_bp"]) and again.desi_rebin == 4


def test_image_normalisation_and_object_mask():
    images = torch.randn(2, 12, 96, 96) * 5 + 100
    images[0, 3, 0, 0] = float("nan")
    present = torch.ones(2, 12, dtype=torch.bool)
    present[1, 5] = False
    x = normalise_images(images, present)
    assert torch.isfinite(x).all() and x[0, 3, 0, 0] == 0 and (x[1, 5] == 0).all()
    assert abs(float(x[0, 0].median())) < 0.15  # median subtracted (estimated on a pixel subsample)
    shape = torch.tensor([[4.0, 2.0, 0.0], [float("nan"), 1.0, 0.0]])
    w = ellipse_weights(shape, 96, scale=2.0, outside=0.3)
    assert w.shape == (2, 1, 96, 96)
    assert w[0, 0, 48, 48] == 1.0 and w[0, 0, 0, 0] == pytest.approx(0.3)
    # along x the ellipse reaches 2 x 4 = 8 pixels, along y only 2 x 2 = 4
    assert w[0, 0, 48, 48 + 7] == 1.0 and w[0, 0, 48 + 7, 48] == pytest.approx(0.3)
    assert (w[1] == 1.0).all()  # unknown shape: uniform weights


def test_image_tokenizer_fit_encode_decode_save(tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(6, 12, 96, 96, generator=gen)
    images[:, :, 40:56, 40:56] += 20.0
    present = torch.ones(6, 12, dtype=torch.bool)
    shapes = torch.tensor([[5.0, 3.0, 30.0]]).repeat(6, 1)
    cfg = small_tokenizer_config()
    tok = ImageTokenizer(12, 96, 8, 2, 4, 4).fit(images, present, shapes, cfg, torch.device("cpu"))
    tokens = tok.encode(images, present)
    assert tokens.shape == (6, 36) and tokens.min() >= 0 and tokens.max() < 8
    assert tok.decode(tokens).shape == (6, 12, 96, 96)
    tok.save(tmp_path)
    np.testing.assert_array_equal(ImageTokenizer.load(tmp_path).encode(images, present), tokens)


# ----------------------------------------------------------------------------- reading, shards


def test_fields_read_selection_missing_columns_and_bad_cutouts(tmp_path, caplog):
    splus.write(tmp_path / "d", 60, seed=0)
    files = sorted((tmp_path / "d").glob("*.parquet"))
    # one field without VISTA columns, one field where no row passes the selection
    table = pq.read_table(files[0])
    pq.write_table(table.drop([c for c in table.column_names if c.startswith("vista_")]), files[0])
    table = pq.read_table(files[1])
    faint = pa.array(np.full(table.num_rows, 23.5, np.float32))
    pq.write_table(table.set_column(table.column_names.index("mag_pstotal_r"), "mag_pstotal_r", faint), files[1])
    sel = Selection()
    with caplog.at_level("WARNING", logger="fmb"):
        batches = list(read_fields(tmp_path / "d", ["vista_yapermag6", "mag_pstotal_g"], sel))
    assert {b.file for b in batches} == {files[0], files[2]}
    assert batches[0].columns["vista_yapermag6"] is None
    assert "vista_yapermag6" in caplog.text and files[1].name in caplog.text and "no rows pass" in caplog.text
    capped = list(read_fields(tmp_path / "d", [], sel, batch_rows=4, max_rows=6))
    # 2 rows per field (6 / 3 fields); the field with no selected row gives none
    assert [len(b) for b in capped] == [2, 2] and [b.file for b in capped] == [files[0], files[2]]
    with pytest.raises(DataError, match="no rows in any field pass"):
        list(read_fields(tmp_path / "d", [], Selection(mag_range=(30.0, 31.0))))

    table = pq.read_table(files[2])
    row = next(i for i, v in enumerate(table.column("splus_cut_G").to_pylist()) if v is not None)
    cut = table.column("splus_cut_G").to_pylist()
    cut[row] = cut[row][:100]
    bad = table.set_column(table.column_names.index("splus_cut_G"), "splus_cut_G", pa.array(cut, pa.list_(pa.float32())))
    pq.write_table(bad, files[2])
    batch = next(b for b in read_fields(files[2], ["splus_cut_G"], sel) if b.columns["splus_cut_G"].null_count < len(b))
    with pytest.raises(DataError, match=rf"{files[2].name}.*splus_cut_G.*iDR6.*100 values"):
        cutout_stack(batch)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("astromodal")
    splus.write(root / "data", 120, seed=5)
    fit_tokenizers(root / "data", root / "tok", small_tokenizer_config(), ["scalar", "spectrum", "image"])
    encode_dataset(root / "data", root / "tok", root / "tokens")
    return root


def test_encoded_shards_random_access(encoded):
    shards = TokenShards(encoded / "tokens")
    toks = Tokenizers.load(encoded / "tok")
    objects = shards.objects()
    assert len(shards) == objects.num_rows > 50
    assert set(objects.column_names) >= {"id", "field", "key", "truth_class", "truth_redshift"}
    with_image = [i for i in range(len(shards)) if shards.row(i)[1]["image"] is not None]
    without = [i for i in range(len(shards)) if shards.row(i)[1]["image"] is None]
    assert with_image and without
    scalars, streams = shards.row(with_image[0])
    assert scalars.shape == (len(toks.scalar.columns),) and streams["image"].shape == (36,)
    assert any(shards.row(i)[1]["desi_b"] is not None for i in range(len(shards)))
    # DataLoader workers get a picklable dataset that maps the files again on first access
    dataset = pickle.loads(pickle.dumps(SequenceDataset(shards, toks.vocabulary(), 512, np.arange(len(shards)))))
    assert dataset.shards._maps is None
    item = dataset[with_image[0]]
    assert item["tokens"][0] == BOS and item["tokens"][-1] == EOS and len(item["tokens"]) == len(item["types"])
    # MISS (-1) where the source value is null: the Gaia columns of unmatched objects
    col = toks.scalar.columns.index("gaia_parallax")
    assert (np.array([shards.row(i)[0][col] for i in range(len(shards))]) == -1).mean() > 0.5


def test_all_nan_spectrum_is_encoded_as_missing_and_counted(encoded, tmp_path, caplog):
    file = sorted((encoded / "data").glob("*.parquet"))[0]
    table = pq.read_table(file)
    flux = table.column("desi_flux_b").to_pylist()
    row = next(i for i, v in enumerate(flux) if v is not None
               and 14 < table.column("mag_pstotal_r")[i].as_py() < 22)
    flux[row] = [float("nan")] * len(flux[row])
    table = table.set_column(table.column_names.index("desi_flux_b"), "desi_flux_b",
                             pa.array(flux, pa.list_(pa.float32())))
    (tmp_path / "d").mkdir()
    pq.write_table(table, tmp_path / "d" / file.name)
    with caplog.at_level("WARNING", logger="fmb"):
        encode_dataset(tmp_path / "d", encoded / "tok", tmp_path / "tokens")
    shards = TokenShards(tmp_path / "tokens")
    ids = shards.objects(["id"]).column("id").to_pylist()
    scalars, streams = shards.row(ids.index(table.column("id")[row].as_py()))
    assert streams["desi_b"] is None and streams["desi_r"] is not None
    assert "desi_b: 1 spectra without a usable pixel" in caplog.text


# ----------------------------------------------------------------------------- vocabulary, sequences


def toy_vocab() -> Vocabulary:
    return Vocabulary(image_size=4, image_tokens=3, scalar_columns=["a", "b"], scalar_bins=5,
                      groups={"desi_b": 6, "gaiaxp_bp": 2})


def test_vocabulary_layout_and_types():
    v = toy_vocab()
    assert (PAD, BOS, EOS, SEP, MISS) == (0, 1, 2, 3, 4)
    assert v.ranges == {"image": (5, 9), "scalar": (9, 14), "spec/desi_b": (14, 20), "spec/gaiaxp_bp": (20, 22)}
    assert v.size == 22 and v.n_types == 6
    assert v.group_type == {"desi_b": 4, "gaiaxp_bp": 5}
    tokens, types, dropped = v.sequence(np.array([0, 3, 1]), np.array([2, -1]),
                                        {"desi_b": np.array([5, 0]), "gaiaxp_bp": np.array([1])}, 64)
    assert tokens.tolist() == [BOS, 5, 8, 6, SEP, 11, MISS, SEP, 19, 14, SEP, 21, SEP, EOS]
    assert types.tolist() == [0, 1, 1, 1, 0, 2, 3, 0, 4, 4, 0, 5, 0, 0]
    assert dropped == 0


def test_sequences_with_missing_modalities_and_truncation():
    v = toy_vocab()
    tokens, types, _ = v.sequence(None, np.array([-1, -1]), {"desi_b": None, "gaiaxp_bp": np.array([0])}, 64)
    assert tokens.tolist() == [BOS, SEP, MISS, MISS, SEP, 20, SEP, EOS]
    assert types.tolist() == [0, 0, 2, 3, 0, 5, 0, 0]
    # 10 tokens fit: the 6-token desi group would make 14, so it is dropped; the later group still fits
    tokens, _, dropped = v.sequence(np.array([0, 0, 0]), np.array([0, 0]),
                                    {"desi_b": np.arange(6), "gaiaxp_bp": np.array([1])}, 11)
    assert dropped == 1 and tokens.tolist()[-3:] == [21, SEP, EOS] and len(tokens) <= 11
    with pytest.raises(ConfigError, match="model.max_len=8"):
        v.sequence(None, np.zeros(2), {}, 8)
    batch = collate_sequences([{"tokens": np.array([1, 5, 2]), "types": np.array([0, 1, 0]), "index": 0},
                               {"tokens": np.array([1, 2]), "types": np.array([0, 0]), "index": 1}])
    assert batch["tokens"].tolist() == [[1, 5, 2], [1, 2, PAD]]
    assert batch["mask"].tolist() == [[True, True, True], [True, True, False]]


# ----------------------------------------------------------------------------- losses


def hand_targets(vocab: Vocabulary) -> ReconstructionTargets:
    targets = ReconstructionTargets(vocab, image_dim=2)
    targets.image.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    # column b: bin centres of a flux column around 1e5-1e6 in its normalised units
    raw = np.array([1e5, 2e5, 4e5, 7e5, 1e6])
    loc, scale = 4e5, 3e5
    targets.scalar.copy_(torch.from_numpy(np.stack([np.linspace(-2.0, 2.0, 5), (raw - loc) / scale])).float())
    targets.spec_desi_b.copy_(torch.arange(12, dtype=torch.float32).reshape(6, 2))
    targets.spec_gaiaxp_bp.copy_(torch.tensor([[10.0, 0.0], [-10.0, 0.0]]))
    return targets


def test_every_loss_term_against_hand_computation():
    v = toy_vocab()
    targets_module = hand_targets(v)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 6, v.size, generator=gen, dtype=torch.float64) * 3
    #   next tokens: image code 2, scalar a bin 1, MISS for b, scalar b bin 4, desi code 5, PAD
    targets = torch.tensor([[7, 10, MISS, 13, 19, PAD]])
    types = torch.tensor([[1, 2, 3, 3, 4, 0]])
    total, terms = astromodal_loss(logits.half(), targets, types, v, targets_module,
                                   LossConfig(image_weight=0.1, scalar_weight=0.2, spectrum_weight=0.3), sample=False)
    lg = logits.half().double()[0]  # the same fp16 logits, evaluated in float64 by hand
    ce = sum(-torch.log_softmax(lg[i], -1)[targets[0, i]] for i in range(5)) / 5

    def expect(i, lo, hi, values):
        return torch.softmax(lg[i, lo:hi], -1) @ values.double()

    img = ((expect(0, 5, 9, targets_module.image) - targets_module.image[2].double()) ** 2).mean()
    sc_a = (expect(1, 9, 14, targets_module.scalar[0]) - targets_module.scalar[0, 1]) ** 2
    sc_b = (expect(3, 9, 14, targets_module.scalar[1]) - targets_module.scalar[1, 4]) ** 2
    spec = ((expect(4, 14, 20, targets_module.spec_desi_b) - targets_module.spec_desi_b[5].double()) ** 2).mean()
    want = {"ce": ce, "recon_image": img, "recon_scalar": (sc_a + sc_b) / 2, "recon_spec_desi_b": spec,
            "recon_spec_gaiaxp_bp": torch.tensor(0.0)}
    for name, value in want.items():
        assert float(terms[name][0]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), name
    assert [int(terms[k][1]) for k in want] == [5, 1, 2, 1, 0]
    assert float(total) == pytest.approx(float(ce + 0.1 * img + 0.2 * (sc_a + sc_b) / 2 + 0.3 * spec), rel=1e-5)
    assert terms["ce"][0].dtype == torch.float32 and torch.isfinite(total)


def test_scalar_reconstruction_uses_each_columns_own_centres_and_stays_finite_above_65504():
    v = toy_vocab()
    targets_module = hand_targets(v)
    # Column b's raw centres (up to 1e6) would be inf in fp16; in normalised units under
    # bf16 autocast the term is finite and equals the fp64 value.
    big = torch.full((1, 2, v.size), -30.0)
    big[0, 0, 9 + 4] = 30.0  # both positions confidently predict bin 4
    big[0, 1, 9 + 4] = 30.0
    targets = torch.tensor([[9 + 0, 9 + 0]])  # true bin 0 of column a, then of column b
    types = torch.tensor([[2, 3]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, terms = astromodal_loss(big.bfloat16(), targets, types, v, targets_module, LossConfig(), sample=False)
    col_a = (2.0 - -2.0) ** 2
    col_b = ((1e6 - 4e5) / 3e5 - (1e5 - 4e5) / 3e5) ** 2
    assert float(terms["recon_scalar"][0]) == pytest.approx((col_a + col_b) / 2, rel=1e-4)
    assert torch.tensor(1e6).half().isinf()  # what an fp16 computation with raw centres would hit


def test_sampled_positions_are_bounded_and_valid():
    v = toy_vocab()
    targets = torch.full((4, 50), 6)  # all image tokens (code 1)
    targets[:, 40:] = PAD
    types = torch.ones_like(targets)
    logits = torch.zeros(4, 50, v.size)
    _, terms = astromodal_loss(logits, targets, types, v, hand_targets(v), LossConfig(positions=16), sample=True)
    assert int(terms["recon_image"][1]) == 16
    # uniform softmax over 4 codes: expected (0.5, 0.5) vs code (1, 0): MSE 0.25
    assert float(terms["recon_image"][0]) == pytest.approx(0.25)
    _, terms = astromodal_loss(logits, targets, types, v, hand_targets(v), LossConfig(positions=1000), sample=True)
    assert int(terms["recon_image"][1]) == 160  # fewer real positions than K: only real ones count


# ----------------------------------------------------------------------------- model


def tiny_model(v: Vocabulary) -> AstromodalTransformer:
    torch.manual_seed(0)
    cfg = AstromodalModelConfig(preset="tiny", n_layer=2, d_model=32, n_head=4, d_ff=64, max_len=32)
    return AstromodalTransformer(cfg, v, image_dim=2).eval()


def test_model_is_causal_and_padding_does_not_leak():
    v = toy_vocab()
    model = tiny_model(v)
    a = torch.tensor([[BOS, 5, 6, SEP, 10, 11, SEP, EOS]])
    ta = torch.tensor([[0, 1, 1, 0, 2, 3, 0, 0]])
    b = torch.tensor([[BOS, SEP, 12, MISS, SEP, EOS, PAD, PAD]])
    tb = torch.tensor([[0, 0, 2, 3, 0, 0, 0, 0]])
    tokens, types = torch.cat([a, b]), torch.cat([ta, tb])
    with torch.no_grad():
        both = model(tokens, types, tokens != PAD)
        alone = model(b[:, :6], tb[:, :6], None)
        changed = a.clone()
        changed[0, 5] = 12
        later = model(changed, ta, None)
        first = model(a, ta, None)
    torch.testing.assert_close(both[1, :6], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[0], first[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(later[0, :5], first[0, :5], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(later[0, 5:], first[0, 5:])
    with pytest.raises(ValueError, match="max_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long), torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ConfigError, match="model.preset"):
        AstromodalModelConfig(preset="huge").shape()


def test_reconstruct_expected_values_from_logits():
    v = toy_vocab()
    targets_module = hand_targets(v)
    logits = torch.full((1, 3, v.size), -50.0)
    logits[0, 0, 5 + 3] = 50.0  # image code 3 -> (1, 1)
    logits[0, 1, 9 + 2] = 50.0  # scalar bin 2
    logits[0, 2, 20 + 1] = 50.0  # gaiaxp code 1 -> (-10, 0)
    out = reconstruct(logits, torch.tensor([[1, 3, 5]]), v, targets_module)
    assert out["image"][0, 0].tolist() == pytest.approx([1.0, 1.0])
    assert float(out["scalar"][0, 1]) == pytest.approx(float(targets_module.scalar[1, 2]))
    assert out["spec/gaiaxp_bp"][0, 2].tolist() == pytest.approx([-10.0, 0.0])
    assert torch.isnan(out["image"][0, 1]).all() and torch.isnan(out["spec/desi_b"]).all()
