"""AION transformer, spectrum and redshift codec parity with polymathic-aion 0.0.2 at the same random weights
(the `parity` extra): upstream builds and saves them, fmb loads the directory without the package."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

aion = pytest.importorskip("aion", reason="polymathic-aion 0.0.2 is not installed: pip install 'fmb[parity]'")

from aion.codecs import GridScalarCodec, SpectrumCodec  # noqa: E402
from aion.fourm.modality_info import MODALITY_INFO  # noqa: E402
from aion.modalities import DESISpectrum, Z  # noqa: E402

from fmb.data.surveys.euclid_desi import DESI_WAVELENGTH  # noqa: E402
from fmb.models.aion.embedder import AionEmbedder  # noqa: E402
from fmb.models.aion.model import HSC_BANDS, AionAdapters, AionImageCodec, CodecConfig  # noqa: E402
from fmb.models.aion.pretrained import load_aion  # noqa: E402
from fmb.models.aion.trainer import AionEmbedSettings  # noqa: E402
from fmb.models.aion.transformer import MODALITIES, AionTransformer, TransformerConfig  # noqa: E402

DOMAINS = ["tok_image_hsc", "tok_spectrum_desi", "tok_z"]
TINY = {"dim": 32, "encoder_depth": 2, "decoder_depth": 1, "num_heads": 2, "mlp_ratio": 4.0, "qkv_bias": True,
        "proj_bias": True, "mlp_bias": True, "norm_bias": True, "act_layer": "GELU", "gated_mlp": False, "qk_norm": False}
# SwiGLU, QK-norm, no biases, register tokens: the other upstream variants
VARIANT = {**TINY, "qkv_bias": False, "proj_bias": False, "mlp_bias": False, "norm_bias": False, "act_layer": "SiLU",
           "gated_mlp": True, "qk_norm": True, "num_register_tokens": 2}
WAVELENGTH = torch.from_numpy(DESI_WAVELENGTH).float()


def perturb(module: torch.nn.Module, scale: float, seed: int) -> None:
    """Random weights of some spread everywhere (upstream starts gates, norms and GRNs at identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen) * (p.std() if p.numel() > 1 else 1.0))


def upstream_directory(root, config: dict, seed: int, domains: list[str] = DOMAINS):
    torch.manual_seed(seed)
    model = aion.AION({"domains_in": domains, "domains_out": domains, **config})
    perturb(model, 0.3, seed)
    model.eval().save_pretrained(str(root))
    spectrum = SpectrumCodec(encoder_depths=(1, 1, 2, 1), encoder_dims=(8, 16, 32, 64), decoder_depths=(1, 1, 1, 1),
                             decoder_dims=(32, 16, 8, 2), latent_channels=64, embedding_dim=10)
    perturb(spectrum, 0.3, seed + 1)
    spectrum.eval().save_pretrained(str(root), modality=DESISpectrum)
    redshift = GridScalarCodec(modality="Z", codebook_size=1024)
    redshift.save_pretrained(str(root), modality=Z)
    return model, spectrum.eval(), redshift


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("aion_tiny")
    upstream = upstream_directory(root, TINY, 0)
    return root, upstream, load_aion(root, size=None)


def spectra(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    flux = 4.0 + torch.randn(n, 7781, generator=gen).cumsum(1) * 0.1 + torch.rand(n, 1, generator=gen) * 20
    ivar = torch.rand(n, 7781, generator=gen) * 3
    bad = torch.rand(n, 7781, generator=gen) < 0.05
    flux[0, :300] = float("nan")  # NaN flux and bad pixels are the codec's to handle
    bad[0, :300] = True
    ivar[bad] = 0.0
    return flux, ivar, bad


def test_modality_table_is_upstreams():
    assert set(MODALITIES) == set(MODALITY_INFO)
    for name, info in MODALITY_INFO.items():
        spec, encoder = MODALITIES[name], info["encoder_embedding"].keywords
        assert spec.vocab == info["vocab_size"], name
        if info["type"] == "img":
            (height, width), patch = encoder["image_size"], encoder["patch_size"]
            assert (spec.rows, spec.cols, spec.sequence) == (height // patch, width // patch, False), name
        else:
            assert spec.sequence and spec.rows == encoder["max_length"], name


def test_fresh_positions_are_upstreams():
    everything = sorted(MODALITY_INFO)
    ours = AionTransformer(TransformerConfig(domains_in=everything, domains_out=everything, **TINY))
    theirs = aion.AION({"domains_in": everything, "domains_out": everything, **TINY})
    assert set(ours.state_dict()) == set(theirs.state_dict())
    for name in everything:
        torch.testing.assert_close(ours.encoder_embeddings[name].pos_emb, theirs.encoder_embeddings[name].pos_emb)
        torch.testing.assert_close(ours.decoder_embeddings[name].pos_emb, theirs.decoder_embeddings[name].pos_emb)


def test_loading_does_not_use_the_upstream_package(pair):
    root = pair[0]
    code = ("import sys; sys.modules['aion'] = None\n"  # any import of polymathic-aion now fails
            "from fmb.models.aion.pretrained import load_aion\n"
            f"m = load_aion({str(root)!r}, size=None)\n"
            "assert 'aion' not in [k.split('.')[0] for k, v in sys.modules.items() if v is not None]\n"
            "print(m.transformer.cfg.dim, m.spectrum.cfg.latent_channels, m.redshift.buckets.shape[0])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["32", "64", "1024"]


def test_spectrum_tokens_and_decoding_match(pair):
    _, (_, upstream, _), ours = pair
    flux, ivar, bad = spectra(4, 1)
    copies = flux.clone(), ivar.clone()
    with torch.no_grad():
        theirs = upstream.encode(DESISpectrum(flux=copies[0], ivar=copies[1], mask=bad, wavelength=WAVELENGTH.expand(4, -1)))
        mine = ours.spectrum.tokens(flux, ivar, bad, WAVELENGTH)
        assert torch.equal(theirs.long(), mine)
        assert len(mine[:, 1:].unique()) > 20 and len(mine[:, 0].unique()) == 4  # tokens and normalisations differ
        for wavelength in (None, WAVELENGTH):
            decoded = upstream.decode(theirs, wavelength=None if wavelength is None else wavelength.expand(4, -1))
            flux_back, bad_back = ours.spectrum.decode(mine, wavelength)
            torch.testing.assert_close(flux_back, decoded.flux, rtol=0, atol=1e-5)
            assert torch.equal(bad_back, decoded.mask)


@pytest.mark.parametrize("budget", [256, 600, 900])
def test_encoder_outputs_match_image_spectrum_joint_and_masked(pair, budget):
    _, (upstream, _, _), ours = pair
    gen = torch.Generator().manual_seed(budget)
    image, spectrum = torch.randint(0, 4375, (3, 576), generator=gen), torch.randint(0, 1024, (3, 273), generator=gen)
    absent = torch.zeros(3, 273, dtype=torch.bool)
    absent[1] = True  # object 1 has no spectrum, object 2 half of one
    absent[2, 150:] = True
    cases = [({"tok_image_hsc": image}, None), ({"tok_spectrum_desi": spectrum}, None),
             ({"tok_image_hsc": image, "tok_spectrum_desi": spectrum}, None),
             ({"tok_image_hsc": image, "tok_spectrum_desi": spectrum}, {"tok_spectrum_desi": absent})]
    with torch.no_grad():
        for tokens, masks in cases:
            theirs = upstream.encode(tokens, input_mask=masks, num_encoder_tokens=budget)
            mine = ours.transformer.encode(tokens, masks, budget)
            torch.testing.assert_close(mine.context, theirs, rtol=0, atol=1e-5)
            valid = (mine.source >= 0).float()[..., None]  # what upstream kept and did not mask
            torch.testing.assert_close(mine.mean(), (theirs * valid).sum(1) / valid.sum(1), rtol=0, atol=1e-5)


def test_redshift_prediction_matches(pair):
    _, (upstream, _, redshift), ours = pair
    gen = torch.Generator().manual_seed(3)
    tokens = {"tok_image_hsc": torch.randint(0, 4375, (3, 576), generator=gen),
              "tok_spectrum_desi": torch.randint(0, 1024, (3, 273), generator=gen)}
    with torch.no_grad():
        theirs = upstream(tokens, [Z])["tok_z"]  # upstream's forward encodes every input token
        mine = ours.transformer.predict(ours.transformer.encode(tokens, budget=849), ["tok_z"])["tok_z"]
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
        probabilities = torch.softmax(theirs[:, 0, :1024], -1)
        expected = (probabilities * redshift.quantizer.buckets).sum(-1)
        torch.testing.assert_close(ours.redshift.expectation(mine[:, 0]), expected, rtol=0, atol=1e-6)


def test_other_architecture_variants_match(tmp_path):
    upstream, _, _ = upstream_directory(tmp_path, VARIANT, 5, DOMAINS + ["catalog"])
    ours = load_aion(tmp_path, size=None).transformer
    assert ours.cfg.gated_mlp and ours.cfg.qk_norm and ours.cfg.num_register_tokens == 2
    gen = torch.Generator().manual_seed(4)
    tokens = {"tok_image_hsc": torch.randint(0, 4375, (2, 576), generator=gen),
              "catalog": torch.randint(1, 3468, (2, 20), generator=gen),  # a sequence: positions of its valid entries
              "tok_spectrum_desi": torch.randint(0, 1024, (2, 273), generator=gen)}
    absent = {"tok_spectrum_desi": torch.arange(273).expand(2, -1) >= torch.tensor([[273], [40]]),
              "catalog": torch.arange(20).expand(2, -1) % torch.tensor([[7], [3]]) == 0}
    with torch.no_grad():
        for masks in (None, absent):
            torch.testing.assert_close(ours.encode(tokens, masks, 700).context,
                                       upstream.encode(tokens, input_mask=masks, num_encoder_tokens=700), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.predict(ours.encode(tokens, budget=869), ["tok_z"])["tok_z"],
                                   upstream(tokens, [Z])["tok_z"], rtol=0, atol=1e-5)


def test_embedder_matches_upstream_per_object(pair):
    """fmb's embed step (adapted image -> image codec tokens; spectrum -> spectrum codec tokens; three encoder
    passes) against upstream's codec and `encode` on the same tokens, with one object lacking a spectrum."""
    _, (upstream, upstream_spectrum, redshift), ours = pair
    torch.manual_seed(2)
    codec = AionImageCodec(CodecConfig(hidden_dims=8, num_consecutive=1))
    perturb(codec, 0.3, 9)
    adapters = AionAdapters(codec.eval(), depth=1, hidden=4).eval()
    flux, ivar, bad = spectra(3, 2)
    has = torch.tensor([True, False, True])
    batch = {"euclid": torch.rand(3, 4, 96, 96) * 0.05, "has_spectrum": has, "has_image": torch.ones(3, dtype=torch.bool),
             "spectrum_flux": flux, "spectrum_ivar": ivar, "spectrum_bad": bad}
    settings = AionEmbedSettings(num_encoder_tokens=600, codec_latents=True)
    with torch.no_grad():
        embedder = AionEmbedder(adapters, ours, settings, torch.device("cpu"))
        vectors, present = embedder(batch)
        image = codec.indices(adapters.to_hsc(batch["euclid"]), HSC_BANDS)
        spectrum = upstream_spectrum.encode(DESISpectrum(flux=flux.clone(), ivar=ivar.clone(), mask=bad,
                                                         wavelength=WAVELENGTH.expand(3, -1))).long()
        image_alone = upstream.encode({"tok_image_hsc": image}, num_encoder_tokens=600).mean(1)
        spectrum_alone = upstream.encode({"tok_spectrum_desi": spectrum}, num_encoder_tokens=600).mean(1)
        both = {"tok_image_hsc": image, "tok_spectrum_desi": spectrum}
        joint = upstream.encode(both, num_encoder_tokens=600).mean(1)
        logits = upstream._forward(both, {"tok_z": torch.zeros(3, 1, dtype=torch.bool)}, num_decoder_tokens=1,
                                   num_encoder_tokens=600)["tok_z"]
    assert len(image.unique()) > 10
    assert torch.equal(present["spectrum"], has) and set(vectors) == {"image", "spectrum", "joint", "image_codec",
                                                                       "image_codec_encoder"}
    torch.testing.assert_close(vectors["image"], image_alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(vectors["spectrum"][has], spectrum_alone[has], rtol=0, atol=1e-5)
    torch.testing.assert_close(vectors["joint"][has], joint[has], rtol=0, atol=1e-5)
    # without a spectrum, the joint embedding is the image alone: the spectrum tokens are masked, not zeros
    torch.testing.assert_close(vectors["joint"][~has], image_alone[~has], rtol=0, atol=1e-5)
    expected = torch.softmax(logits[:, :1024], -1) @ redshift.quantizer.buckets
    torch.testing.assert_close(embedder.predictions["aion_redshift"][has], expected[has], rtol=0, atol=1e-6)
    assert np.isfinite(vectors["spectrum"].numpy()).all()
