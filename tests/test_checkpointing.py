"""train.activation_checkpointing: the same loss and gradients, less kept for backward; astromodal padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmb.errors import ConfigError
from fmb.models.astroclip.model import AstroCLIP, SpecFormerShape, ViTShape, clip_loss
from fmb.models.astromodal.data import Vocabulary, collate_sequences
from fmb.models.astromodal.model import AstromodalModelConfig, AstromodalTransformer
from fmb.models.astropt.model import AstroPT, GPTShape, Modality, next_patch_loss
from fmb.models.checkpointing import set_activation_checkpointing


def saved_for_backward(loss_fn) -> tuple[torch.Tensor, int]:
    """(loss, bytes of the distinct storages autograd keeps for backward)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    return loss, sum(storages.values())


def astropt_case():
    torch.manual_seed(0)
    model = AstroPT(GPTShape(4, 2, 32, 64, dropout=0.1), [Modality("images", 12, 2), Modality("spectra", 5, 5)])
    tokens = {"images": torch.rand(3, 16, 12), "spectra": torch.randn(3, 20, 5)}
    positions = {k: torch.arange(v.shape[1]).expand(3, -1) for k, v in tokens.items()}
    return model, lambda: next_patch_loss(model.modalities, tokens, model(tokens, positions))[0]


def astroclip_case():
    torch.manual_seed(0)
    model = AstroCLIP(ViTShape(32, 3, 2, patch_size=4, image_size=16, drop_path=0.2),
                      SpecFormerShape(32, 3, 2, max_len=64, dropout=0.1), embed_dim=32, head_heads=2)
    images, spectra = torch.rand(4, 3, 16, 16), 1.0 + torch.randn(4, 300)
    return model, lambda: clip_loss(*model(images, spectra))


def toy_vocab() -> Vocabulary:
    return Vocabulary(image_size=4, image_tokens=3, scalar_columns=["a", "b"], scalar_bins=5,
                      groups={"desi_b": 6, "gaiaxp_bp": 2})


def astromodal_case():
    torch.manual_seed(0)
    vocab = toy_vocab()
    model = AstromodalTransformer(AstromodalModelConfig(preset="tiny", n_layer=3, d_model=32, d_ff=64, max_len=64,
                                                        dropout=0.1), vocab, image_dim=2)
    tokens = torch.randint(5, vocab.size, (3, 40))
    types = torch.randint(0, vocab.n_types, (3, 40))
    return model, lambda: model(tokens, types).float().logsumexp(-1).mean()


@pytest.mark.parametrize("case", [astropt_case, astroclip_case, astromodal_case])
def test_checkpointing_gives_the_same_loss_and_gradients_and_keeps_less(case):
    model, loss_fn = case()
    model.train()  # dropout and drop-path on: the recomputation must draw the same masks
    results = []
    for enabled in (False, True):
        if enabled:
            set_activation_checkpointing(model, True, "test")
        torch.manual_seed(1)
        loss, kept = saved_for_backward(loss_fn)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results.append((loss.detach(), grads, kept))
    (loss_a, grads_a, kept_a), (loss_b, grads_b, kept_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-6, msg=name)
    assert kept_b < 0.6 * kept_a, (kept_a, kept_b)


def test_checkpointing_is_refused_where_a_model_has_no_blocks():
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        set_activation_checkpointing(torch.nn.Linear(2, 2), True, "toy")
    set_activation_checkpointing(torch.nn.Linear(2, 2), False, "toy")  # off: nothing to do
    codec_like = torch.nn.Linear(2, 2)
    codec_like.activation_checkpointing = True  # a family's own setting is not switched off
    set_activation_checkpointing(codec_like, False, "toy")
    assert codec_like.activation_checkpointing


def test_astromodal_padded_batch_equals_each_sequence_alone_without_a_dense_mask():
    vocab = toy_vocab()
    torch.manual_seed(0)
    model = AstromodalTransformer(AstromodalModelConfig(preset="tiny", max_len=64), vocab, image_dim=2).eval()
    rng = np.random.default_rng(0)
    items = [{"tokens": rng.integers(5, vocab.size, n), "types": rng.integers(1, vocab.n_types, n), "index": i}
             for i, n in enumerate((30, 17, 5))]
    batch = collate_sequences(items)
    with torch.no_grad():
        logits = model(batch["tokens"], batch["types"], batch["mask"])
        for k, item in enumerate(items):
            alone = model(torch.from_numpy(item["tokens"])[None], torch.from_numpy(item["types"])[None])
            torch.testing.assert_close(logits[k, :len(item["tokens"])], alone[0], rtol=0, atol=1e-6)
    holes = batch["mask"].clone()
    holes[2, 1] = False
    with pytest.raises(ValueError, match="right-padded"):
        model(batch["tokens"], batch["types"], holes)
