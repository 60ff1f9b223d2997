import pytest
import torch

from dede_core.detector.config import cpu, paper
from dede_core.detector.masking import mask_noise
from dede_core.detector.model import DeDe


@pytest.mark.parametrize("factory", [paper, cpu])
@pytest.mark.parametrize("visible", [0, 6])
def test_shapes(factory, visible):
    cfg = factory()
    model = DeDe(config=cfg, global_dim=64)
    imgs = torch.randn(5, 3, 32, 32)
    assert model.patchify(imgs).shape == (5, 64, 48)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)
    noise = mask_noise([f"k{i}" for i in range(5)], 64, seed=0)
    latent, mask, ids_restore = model.forward_encoder(imgs, torch.randn(5, 64), noise, visible)
    assert latent.shape == (5, 1 + visible, cfg.embed_dim)
    assert mask.shape == (5, 64) and torch.all(mask.sum(1) == 64 - visible)
    pred = model.forward_decoder(latent, ids_restore)
    assert pred.shape == (5, 64, 48)
    loss, pred2, mask2 = model(imgs, torch.randn(5, 64), noise, visible)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert model.pixel_errors(imgs, pred2, mask2).shape == (5,)


def test_visible_patches_are_the_lowest_noise_ones():
    model = DeDe(config=cpu(), global_dim=8)
    noise = torch.arange(64, dtype=torch.float32).flip(0).unsqueeze(0)  # patches 63, 62, ... stay visible
    x = torch.arange(64, dtype=torch.float32).view(1, 64, 1)
    visible, mask, _ = model.random_masking(x, noise, 3)
    assert visible.flatten().tolist() == [63.0, 62.0, 61.0]
    assert mask[0, 61:].tolist() == [0, 0, 0] and mask[0, :61].sum() == 61


def test_global_embedding_is_token_zero_and_ablation_ignores_it():
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    model = DeDe(config=cpu(), global_dim=16).eval()
    with torch.no_grad():
        a, _, _ = model.forward_encoder(imgs, torch.zeros(2, 16), noise, 0)
        b, _, _ = model.forward_encoder(imgs, torch.ones(2, 16), noise, 0)
    assert not torch.equal(a, b)
    assert model.global_proj.bias is None
    ablation = DeDe(config=cpu(use_global=False), global_dim=16).eval()
    with torch.no_grad():
        a, _, _ = ablation.forward_encoder(imgs, torch.zeros(2, 16), noise, 0)
        b, _, _ = ablation.forward_encoder(imgs, torch.ones(2, 16), noise, 0)
    assert torch.equal(a, b)


def test_loss_falls_when_overfitting_16_images():
    from conftest import smooth_images

    torch.manual_seed(0)
    cfg = cpu()
    model = DeDe(config=cfg, global_dim=32)
    imgs = model.normalize(smooth_images(16).float() / 255)
    emb = torch.randn(16, 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(80):
        loss, _, _ = model(imgs, emb, torch.rand(16, 64), cfg.train_visible)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses[::10]
