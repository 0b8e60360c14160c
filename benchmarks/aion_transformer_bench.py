"""AION transformer benchmark: embedding throughput (objects/s) of fmb's path against polymathic-aion's on
the same inputs and weights, timed alternately. Needs polymathic-aion (the `parity` extra).

One object's work, both sides: DESI spectrum -> spectrum-codec tokens; encoder passes over the image tokens
alone, the spectrum tokens alone and both (mean-pooled); the zero-shot redshift from the decoder (timed
with it, and without it for the like-for-like figure of the embeddings alone). Image
tokens are given (the image codec is the same network on both sides: benchmarks/aion_bench.py times it).
Upstream's route is its public API as AION's README uses it (`encode` three times, `_forward` for the
redshift, which encodes the joint input again); fmb predicts from the joint encoding it already has.
Weights are random (upstream builds and saves them, fmb loads the directory), which does not change the cost.

    python benchmarks/aion_transformer_bench.py --device cpu                          # reduced sizes (CPU)
    python benchmarks/aion_transformer_bench.py --device cuda --size base --spectrum-codec published --batch 64
"""

from __future__ import annotations

import argparse
import tempfile
from contextlib import nullcontext

import torch
from aion_bench import timed

from fmb.data.surveys.euclid_desi import DESI_WAVELENGTH
from fmb.models.aion.embedder import AionEmbedder
from fmb.models.aion.model import AionAdapters, AionImageCodec, CodecConfig
from fmb.models.aion.pretrained import load_aion
from fmb.models.aion.trainer import AionEmbedSettings
from fmb.models.aion.transformer import PRESETS

DOMAINS = ["tok_image_hsc", "tok_spectrum_desi", "tok_z"]
SIZES = {**PRESETS, "small": {"dim": 384, "encoder_depth": 6, "decoder_depth": 6, "num_heads": 6}}  # CPU default
SPECTRUM_CODECS = {"published": {}, "small": {"encoder_depths": (1, 1, 3, 1), "encoder_dims": (48, 96, 192, 384),
                                              "decoder_depths": (1, 1, 1, 1), "decoder_dims": (192, 96, 48, 1),
                                              "latent_channels": 384}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--spectrum-codec", choices=list(SPECTRUM_CODECS), default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=600, help="encoder token budget")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    from aion import AION
    from aion.codecs import GridScalarCodec, SpectrumCodec
    from aion.modalities import DESISpectrum, Z

    upstream = AION({"domains_in": DOMAINS, "domains_out": DOMAINS, "norm_bias": True, "act_layer": "GELU",
                     **SIZES[args.size]}).eval()
    upstream_spectrum = SpectrumCodec(embedding_dim=10, **SPECTRUM_CODECS[args.spectrum_codec]).eval()
    redshift_codec = GridScalarCodec(modality="Z", codebook_size=1024)
    with tempfile.TemporaryDirectory() as tmp:
        upstream.save_pretrained(tmp)
        upstream_spectrum.save_pretrained(tmp, modality=DESISpectrum)
        redshift_codec.save_pretrained(tmp, modality=Z)
        ours = load_aion(tmp, size=None).to(device)
    for module in (upstream, upstream_spectrum, redshift_codec):
        module.to(device)
    adapters = AionAdapters(AionImageCodec(CodecConfig(hidden_dims=8, num_consecutive=1))).eval()  # not timed
    embedder = AionEmbedder(adapters, ours, AionEmbedSettings(num_encoder_tokens=args.tokens), device)

    B = args.batch
    wavelength = torch.from_numpy(DESI_WAVELENGTH).float().to(device)
    flux = 5.0 + torch.randn(B, 7781, device=device).cumsum(1) * 0.1
    ivar = torch.rand(B, 7781, device=device) * 3
    bad = torch.rand(B, 7781, device=device) < 0.05
    image = torch.randint(0, 4375, (B, 576), device=device)
    batch = {"has_spectrum": torch.ones(B, dtype=torch.bool), "spectrum_flux": flux, "spectrum_ivar": ivar,
             "spectrum_bad": bad}
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext

    def run_upstream(redshift: bool = True) -> torch.Tensor:
        with torch.no_grad(), autocast():
            spectrum = upstream_spectrum.encode(DESISpectrum(flux=flux.clone(), ivar=ivar.clone(), mask=bad,
                                                             wavelength=wavelength.expand(B, -1)))
            both = {"tok_image_hsc": image, "tok_spectrum_desi": spectrum}
            vectors = [upstream.encode({"tok_image_hsc": image}, num_encoder_tokens=args.tokens).mean(1),
                       upstream.encode({"tok_spectrum_desi": spectrum}, num_encoder_tokens=args.tokens).mean(1),
                       upstream.encode(both, num_encoder_tokens=args.tokens).mean(1)]
            if redshift:
                logits = upstream._forward(both, {"tok_z": torch.zeros(B, 1, dtype=torch.bool)}, num_decoder_tokens=1,
                                           num_encoder_tokens=args.tokens)["tok_z"]
                vectors.append((torch.softmax(logits[:, :1024].float(), -1) @ redshift_codec.quantizer.buckets)[:, None])
            return torch.cat([v.float() for v in vectors], 1)

    def run_ours(redshift: bool = True) -> torch.Tensor:
        vectors: dict = {}
        embedder.redshift = redshift
        with torch.no_grad(), embedder.autocast():
            embedder.encode(image, batch, vectors, {})
        out = [vectors["image"], vectors["spectrum"], vectors["joint"]]
        return torch.cat(out + [embedder.predictions["aion_redshift"][:, None]] if redshift else out, 1)

    tolerance = 1e-4 if device.type == "cpu" else 0.1  # the same work (bf16 on CUDA rounds differently)
    torch.testing.assert_close(run_ours(), run_upstream(), rtol=0, atol=tolerance)
    t_up, t_ours, t_up_embed, t_ours_embed = timed(
        [run_upstream, run_ours, lambda: run_upstream(False), lambda: run_ours(False)], device, args.repeats)
    size = SIZES[args.size]
    print(f"device {device} | batch {B} | {'bf16 autocast' if device.type == 'cuda' else 'fp32'} | threads "
          f"{torch.get_num_threads()} | transformer {args.size} ({size['dim']} wide, {size['encoder_depth']}+"
          f"{size['decoder_depth']} blocks) | spectrum codec {args.spectrum_codec} | {args.tokens} encoder tokens")
    for what, up, mine in (("embeddings + zero-shot redshift", t_up, t_ours), ("embeddings alone", t_up_embed, t_ours_embed)):
        print(f"{what:<32} polymathic-aion {B / up:8.2f} objects/s | fmb {B / mine:8.2f} objects/s | "
              f"time ratio fmb / polymathic-aion {mine / up:6.3f}")


if __name__ == "__main__":
    main()
