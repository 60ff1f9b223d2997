"""The DeDe detector: a masked autoencoder whose token 0 is the frozen victim's embedding.

Pure torch: no file I/O, no argument parsing. The victim encoder is not part of this module; the caller passes
its embedding in, so the detector composes with any encoder (see dede_core.detector.encoders).
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from dede_core.detector.config import DetectorConfig


class DeDe(nn.Module):
    """Patch encoder over visible patches + injected global embedding + MAE-style decoder."""

    def __init__(self, *, config: DetectorConfig, global_dim: int) -> None:
        super().__init__()
        if global_dim <= 0:
            raise ValueError(f"global_dim must be positive, got {global_dim}")
        self.config = config
        self.global_dim = global_dim
        c, p, num_patches = config.in_chans, config.patch_size, config.num_patches

        # Patch encoder.
        self.patch_embed = nn.Conv2d(c, config.embed_dim, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, config.embed_dim))
        self.blocks = nn.ModuleList(
            Block(config.embed_dim, config.num_heads, config.mlp_ratio, qkv_bias=True)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.embed_dim)
        # The victim's embedding replaces the encoder's class-token output (bias-free, as in the reference).
        self.global_proj = nn.Linear(global_dim, config.embed_dim, bias=False) if config.use_global else None

        # Decoder.
        self.decoder_embed = nn.Linear(config.embed_dim, config.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, config.decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(config.decoder_embed_dim, config.decoder_num_heads, config.mlp_ratio, qkv_bias=True)
            for _ in range(config.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(config.decoder_embed_dim)
        self.decoder_pred = nn.Linear(config.decoder_embed_dim, p * p * c)

        self.register_buffer("pix_mean", torch.tensor(config.mean).view(1, c, 1, 1), persistent=False)
        self.register_buffer("pix_std", torch.tensor(config.std).view(1, c, 1, 1), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for param in (self.pos_embed, self.decoder_pos_embed, self.cls_token, self.mask_token):
            nn.init.trunc_normal_(param, std=0.02)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def normalize(self, images: Tensor) -> Tensor:
        """(N, C, H, W) floats in [0, 1] -> the normalised pixels the detector reconstructs."""
        return (images - self.pix_mean) / self.pix_std

    def patchify(self, imgs: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, L, p*p*C)."""
        p, c = self.config.patch_size, self.config.in_chans
        n, h = imgs.shape[0], imgs.shape[2] // p
        x = imgs.reshape(n, c, h, p, h, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, h * h, p * p * c)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(N, L, p*p*C) -> (N, C, H, W)."""
        p, c = self.config.patch_size, self.config.in_chans
        n, h = x.shape[0], self.config.img_size // p
        x = x.reshape(n, h, h, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, h * p, h * p)

    @staticmethod
    def random_masking(x: Tensor, noise: Tensor, n_visible: int) -> tuple[Tensor, Tensor, Tensor]:
        """Keep the n_visible patches with the smallest noise.

        x (N, L, E), noise (N, L) -> visible (N, n_visible, E), mask (N, L) with 1 on hidden patches,
        ids_restore (N, L). The noise comes from the caller so that masks are reproducible per sample.
        """
        n, length, dim = x.shape
        ids_shuffle = torch.argsort(noise, dim=1, stable=True)
        ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
        ids_keep = ids_shuffle[:, :n_visible]
        visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
        mask[:, :n_visible] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return visible, mask, ids_restore

    def forward_encoder(
        self, imgs: Tensor, global_emb: Tensor, noise: Tensor, n_visible: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised (N, C, H, W), embedding (N, D), noise (N, L) -> latent (N, 1+V, E), mask, ids_restore."""
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2)  # (N, L, E)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, noise, n_visible)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.global_proj is not None:
            token0 = self.global_proj(global_emb.to(x.dtype)).unsqueeze(1)
            x = torch.cat([token0, x[:, 1:, :]], dim=1)
        return x, mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Latent (N, 1+V, E), ids_restore (N, L) -> per-patch prediction (N, L, p*p*C)."""
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        hidden = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:, :], hidden], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error over hidden patches, normalised pixels: imgs (N, C, H, W), pred (N, L, ppC)."""
        err = (pred.float() - self.patchify(imgs).float()).pow(2).mean(dim=-1)  # (N, L)
        # The reference divides by the nominal mask ratio; dividing by the hidden count is the same quantity
        # without depending on how int() rounded the number of visible patches.
        return (err * mask).sum() / mask.sum()

    def forward(
        self, imgs: Tensor, global_emb: Tensor, noise: Tensor, n_visible: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised imgs (N, C, H, W), embedding (N, D), noise (N, L) -> loss, pred (N, L, ppC), mask (N, L)."""
        latent, mask, ids_restore = self.forward_encoder(imgs, global_emb, noise, n_visible)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def pixel_errors(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Reference score of one draw: sum of squared error over hidden pixels, (N,)."""
        err = (pred.float() - self.patchify(imgs).float()).pow(2).sum(dim=-1)  # (N, L)
        return (err * mask.float()).sum(dim=1)
