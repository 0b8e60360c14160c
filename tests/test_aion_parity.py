"""AION image codec parity with polymathic-aion 0.0.2 (the `parity` extra) at the same random weights."""

from __future__ import annotations

import pytest
import torch

from tests.extras import need

aion_image = need("aion.codecs.image")
aion_modalities = need("aion.modalities")

from fmb.models.aion.model import HSC_BANDS, HSC_ZP_SCALE, LEGACY_BANDS  # noqa: E402
from fmb.models.aion.weights import load_codec  # noqa: E402


@pytest.fixture(scope="module")
def codecs(tmp_path_factory):
    """Upstream codec with random weights saved by upstream itself, then loaded into fmb's codec."""
    torch.manual_seed(0)
    upstream = aion_image.ImageCodec(quantizer_levels=[7, 5, 5, 5, 5], hidden_dims=32, num_consecutive=1)
    with torch.no_grad():  # upstream starts the squeeze-excite gates closed; open them so they are tested
        for p in upstream.parameters():
            p.add_(0.05 * torch.randn_like(p))
    upstream.eval()
    root = tmp_path_factory.mktemp("aion_base")
    upstream.save_pretrained(str(root), modality=aion_modalities.Image)  # writes <root>/codecs/image/
    assert (root / "codecs" / "image" / "config.json").is_file()
    return upstream, load_codec(root).eval()


def images(bands: tuple[str, ...], scale: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(len(bands))
    return torch.randn(3, len(bands), 100, 100, generator=gen) * scale  # exercises the crop and the clamp


def test_legacy_survey_tokens_and_decoding_match(codecs):
    upstream, ours = codecs
    flux = images(LEGACY_BANDS, 4.0)
    with torch.no_grad():
        up_tokens = upstream.encode(aion_modalities.LegacySurveyImage(flux=flux.clone(), bands=list(LEGACY_BANDS)))
        our_tokens = ours.indices(flux, LEGACY_BANDS)
        assert torch.equal(up_tokens.long(), our_tokens)
        assert len(our_tokens.unique()) > 20
        up_flux = upstream.decode(up_tokens, bands=list(LEGACY_BANDS)).flux
        our_flux = ours.decode_indices(our_tokens, LEGACY_BANDS)
    torch.testing.assert_close(our_flux, up_flux, rtol=0, atol=1e-5)


def test_hsc_tokens_match_and_decoding_uses_the_corrected_inverse(codecs):
    upstream, ours = codecs
    flux = images(HSC_BANDS, 150.0)
    copy = flux.clone()
    with torch.no_grad():
        up_tokens = upstream.encode(aion_modalities.HSCImage(flux=copy, bands=list(HSC_BANDS)))
        assert not torch.equal(copy, flux)  # upstream 0.0.2 clamps and rescales the caller's tensor ...
        our_tokens = ours.indices(flux, HSC_BANDS)
        assert torch.equal(up_tokens.long(), our_tokens)
        with pytest.raises(AttributeError):  # ... and cannot decode HSC bands at all
            upstream.decode(up_tokens, bands=list(HSC_BANDS))
        # The corrected formula, from upstream's own pieces: decode in the 9-band space, invert the
        # range compression, keep the HSC bands and undo the zero-point rescale (x 10^((27 - 22.5) / 2.5)).
        z = upstream.quantizer.decode(up_tokens).reshape(3, 5, 24, 24)
        raw = upstream.decoder(upstream.post_quant_proj(z))
        padded = upstream.subsample_out(raw, torch.ones(3, 9, dtype=torch.bool))
        expected = upstream._reverse_range_compress(padded)[:, :5] * HSC_ZP_SCALE
        our_flux = ours.decode_indices(our_tokens, HSC_BANDS)
    torch.testing.assert_close(our_flux, expected, rtol=1e-5, atol=1e-5 * HSC_ZP_SCALE)

