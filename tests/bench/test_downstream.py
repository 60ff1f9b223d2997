"""The downstream filtering evaluation: poisoning, removal and screening, with stand-in embed and score functions."""

import numpy as np
import pytest
import torch

from bench.attacks import apply_trigger
from bench.downstream import DownstreamConfig, evaluate_filtering, poison_labelled


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey images whose class is written in their brightness, so a probe on the mean pixel learns it."""
    labels = torch.arange(n) % 4
    images = (labels * 40 + 20).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).clone()
    images[:, :, :4, :4] = torch.randint(0, 30, (n, 3, 4, 4), generator=torch.Generator().manual_seed(seed),
                                         dtype=torch.uint8)
    return images, labels


def test_poison_labelled_triggers_and_relabels_only_non_target_samples():
    images, labels = _data(200, 0)
    poisoned, new_labels, planted = poison_labelled(images, labels, rate=0.05, trigger="patch", target=0,
                                                    trigger_args={}, seed=3)
    assert len(planted) == 10 and (labels[planted] != 0).all() and (new_labels[planted] == 0).all()
    assert torch.equal(poisoned[planted], apply_trigger("patch", images[planted]))
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[planted] = False
    assert torch.equal(poisoned[untouched], images[untouched]) and torch.equal(new_labels[untouched],
                                                                               labels[untouched])
    with pytest.raises(ValueError, match="3-channel"):
        poison_labelled(images[:, :1], labels, rate=0.05, trigger="ctrl", target=0, trigger_args={}, seed=3)


def test_removing_what_a_perfect_detector_flags_takes_the_poison_out_of_the_probe():
    train, test = _data(400, 1), _data(200, 2)

    def embed(images: torch.Tensor) -> torch.Tensor:
        # Brightness outside the trigger corner, and the trigger corner's brightness: the probe can learn both.
        x = images.float() / 255
        return torch.stack([x[:, :, 8:, 8:].mean((1, 2, 3)), x[:, :, 21:31, 21:31].mean((1, 2, 3))], 1) * 10

    def score(images: torch.Tensor, prefix: str) -> np.ndarray:  # flags exactly the patched images
        return (images[:, 0, 21:31, 21:31] == 255).all(dim=(1, 2)).double().numpy()

    result = evaluate_filtering(embed=embed, score=score, threshold=0.5, train=train, test=test, trigger="patch",
                                target=0, trigger_args={}, config=DownstreamConfig(train_images=400, rate=0.1))
    assert result["planted"] == 40 and result["removed_planted"] == 40 and result["removed_clean"] == 0
    assert result["asr_after"] < result["asr_before"]
    assert result["screen_asr"] == 0.0 and result["screen_clean_rejected"] == 0.0
