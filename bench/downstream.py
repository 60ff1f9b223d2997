"""What filtering buys downstream: a linear probe trained on a poisoned labelled set, before and after removal.

Setting (the one a user of `dede clean` is in before fine-tuning): a labelled training set in which `rate` of
the samples, never of the target class, carry the trigger and the target's label (dirty-label poisoning); a
linear probe on the victim encoder's embeddings is trained on it. The detector flags samples above its
label-free threshold; the probe is retrained on what is kept. Clean accuracy is measured on clean test images,
the attack success rate (ASR) on triggered test images of the other classes.

Filtering the training set cannot undo a backdoor that lives in the encoder itself (BadEncoder maps every
triggered input onto the target whatever the probe learned), so the same detector is also measured as an
input screen at inference: a triggered test input succeeds only if it is accepted and classified as the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from bench.attacks import apply_trigger
from bench.ssl import linear_probe

Embed = Callable[[Tensor], Tensor]  # uint8 images -> embeddings
Score = Callable[[Tensor, str], np.ndarray]  # uint8 images, key prefix -> detector scores


@dataclass(frozen=True)
class DownstreamConfig:
    train_images: int = 10_000  # first N Fashion-MNIST training images, labelled
    rate: float = 0.02  # share of them triggered and relabelled to the target
    seed: int = 2


def poison_labelled(images: Tensor, labels: Tensor, *, rate: float, trigger: str, target: int,
                    trigger_args: dict, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(images, labels, planted indices): `rate` of the samples outside the target class triggered and relabelled."""
    if not 0 <= rate < 1:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    candidates = torch.nonzero(labels != target).flatten()
    count = int(round(rate * len(images)))
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    planted = candidates[order[:count]].sort().values
    images, labels = images.clone(), labels.clone()
    if count:
        triggered = apply_trigger(trigger, images[planted], **trigger_args)
        if triggered.shape[1:] != images.shape[1:]:  # CTRL turns grey into RGB: pass RGB images
            raise ValueError(f"trigger {trigger!r} changes the image shape {tuple(images.shape[1:])} to "
                             f"{tuple(triggered.shape[1:])}; give 3-channel images")
        images[planted] = triggered
        labels[planted] = target
    return images, labels, planted


def _probe_rates(probe: torch.nn.Module, clean: Tensor, clean_y: Tensor, triggered: Tensor,
                 target: int) -> tuple[float, float, np.ndarray]:
    with torch.no_grad():
        clean_acc = (probe(clean).argmax(1) == clean_y).float().mean().item()
        hit = (probe(triggered).argmax(1) == target).numpy()
    return clean_acc, float(hit.mean()), hit


def evaluate_filtering(*, embed: Embed, score: Score, threshold: float, train: tuple[Tensor, Tensor],
                       test: tuple[Tensor, Tensor], trigger: str, target: int, trigger_args: dict,
                       config: DownstreamConfig) -> dict[str, float | int]:
    """Clean accuracy and ASR before and after removing flagged training samples, and with input screening."""
    train_x, train_y = train[0][: config.train_images], train[1][: config.train_images]
    poisoned_x, poisoned_y, planted = poison_labelled(train_x, train_y, rate=config.rate, trigger=trigger,
                                                      target=target, trigger_args=trigger_args, seed=config.seed)
    test_x, test_y = test
    others = test_x[test_y != target]
    triggered_test = apply_trigger(trigger, others, **trigger_args)
    train_emb, clean_emb, trig_emb = embed(poisoned_x), embed(test_x), embed(triggered_test)

    before = linear_probe(train_emb, poisoned_y)
    clean_before, asr_before, _ = _probe_rates(before, clean_emb, test_y, trig_emb, target)

    flagged = score(poisoned_x, "train") > threshold
    is_planted = np.zeros(len(poisoned_x), dtype=bool)
    is_planted[planted.numpy()] = True
    keep = torch.from_numpy(~flagged)
    after = linear_probe(train_emb[keep], poisoned_y[keep])
    clean_after, asr_after, hits = _probe_rates(after, clean_emb, test_y, trig_emb, target)

    accepted_triggered = score(triggered_test, "trig") <= threshold
    accepted_clean = score(test_x, "test") <= threshold
    return {
        "train_images": len(poisoned_x), "planted": int(is_planted.sum()),
        "removed": int(flagged.sum()), "removed_planted": int((flagged & is_planted).sum()),
        "removed_clean": int((flagged & ~is_planted).sum()),
        "clean_accuracy_before": clean_before, "asr_before": asr_before,
        "clean_accuracy_after": clean_after, "asr_after": asr_after,
        "screen_clean_rejected": float(1 - accepted_clean.mean()),
        "screen_asr": float((hits & accepted_triggered).mean()),
    }
