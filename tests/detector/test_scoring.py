import contextlib
import copy

import pytest
import torch

from conftest import smooth_images
from dede_core.detector.config import cpu
from dede_core.detector.masking import mask_noise, sample_seed
from dede_core.detector.model import DeDe
from dede_core.detector.scorer import ScoreConfig, Scorer, autocast_for


def refs(encoder):
    """Reference embeddings for the score's normalisation (a checkpoint takes them from its k-NN bank)."""
    return torch.randn(16, encoder.dim, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def detector(encoder):
    torch.manual_seed(0)
    return DeDe(config=cpu(), global_dim=encoder.dim).eval()


@pytest.fixture(scope="module")
def batch():
    images = smooth_images(64, seed=3)
    return images, [f"sample_{i:04d}" for i in range(64)]


def test_mask_noise_is_a_pure_function_of_key_seed_draw():
    a = mask_noise(["x", "y"], 64, seed=1, draw=0)
    assert torch.equal(a, mask_noise(["y", "x"], 64, seed=1, draw=0).flip(0))
    assert not torch.equal(a, mask_noise(["x", "y"], 64, seed=2, draw=0))
    assert not torch.equal(a, mask_noise(["x", "y"], 64, seed=1, draw=1))
    assert sample_seed("x", 1, 0) == sample_seed("x", 1, 0) != sample_seed("x", 1, 1)


@pytest.mark.parametrize("visible,draws,bf16", [(0, 1, False), (6, 3, False), (6, 3, True)])
def test_scores_bitwise_identical_across_batch_sizes_and_order(detector, encoder, batch, visible, draws, bf16):
    images, keys = batch
    config = ScoreConfig(visible=visible, draws=draws, chunk=16, cpu_bf16=bf16)
    scorer = Scorer(
        references=refs(encoder), detector=detector, encoder=encoder, config=config)
    reference = scorer.score(images, keys).score
    assert reference.shape == (64,) and torch.isfinite(reference).all()
    for size in (1, 7, 64):
        parts = [scorer.score(images[i:i + size], keys[i:i + size]).score for i in range(0, 64, size)]
        assert torch.equal(torch.cat(parts), reference), size
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(5))
    shuffled = scorer.score(images[perm], [keys[i] for i in perm.tolist()]).score
    assert torch.equal(shuffled, reference[perm])


def test_more_draws_average_single_draws(detector, encoder, batch):
    images, keys = batch
    def scores(draws):
        config = ScoreConfig(visible=6, draws=draws, seed=9, chunk=16)
        return Scorer(
        references=refs(encoder), detector=detector, encoder=encoder, config=config).score(images[:8], keys[:8]).score

    single, triple = scores(1), scores(3)
    assert not torch.equal(single, triple) and torch.all(triple > 0)
    # The K-draw score is a mean over different masks: draw 1, recovered from the 2-draw mean, is its own
    # positive error and differs from draw 0.
    draw1 = 2 * scores(2) - single
    assert torch.all(draw1 > 0) and not torch.allclose(draw1, single)


def test_zero_visible_ignores_the_seed(detector, encoder, batch):
    images, keys = batch
    scores = [Scorer(
        references=refs(encoder), detector=detector, encoder=encoder, config=ScoreConfig(seed=s, chunk=16)).score(
        images[:4], keys[:4]).score for s in (0, 1)]
    assert torch.equal(scores[0], scores[1])


def test_bad_input_is_refused(detector, encoder, batch):
    images, keys = batch
    scorer = Scorer(
        references=refs(encoder), detector=detector, encoder=encoder, config=ScoreConfig())
    with pytest.raises(ValueError, match="uint8"):
        scorer.score(images.float(), keys)
    with pytest.raises(ValueError, match="keys"):
        scorer.score(images, keys[:3])
    with pytest.raises(ValueError):
        ScoreConfig(draws=0)
    with pytest.raises(ValueError, match="visible"):
        Scorer(
        references=refs(encoder), detector=detector, encoder=encoder, config=ScoreConfig(visible=64))


@pytest.mark.gpu
def test_cuda_scores_match_cpu_closely(detector, encoder, batch):
    images, keys = batch
    cpu_scores = Scorer(
        references=refs(encoder), detector=detector, encoder=encoder, config=ScoreConfig()).score(images, keys).score
    gpu = Scorer(
        references=refs(encoder), detector=detector, encoder=encoder, config=ScoreConfig(), device="cuda")
    gpu_scores = gpu.score(images, keys).score
    assert torch.equal(gpu_scores, gpu.score(images, keys).score)
    corr = torch.corrcoef(torch.stack([cpu_scores, gpu_scores]))[0, 1]
    assert corr > 0.99


def test_cpu_bf16_is_opt_in_and_close(detector, encoder, batch):
    images, keys = batch
    def run(config):
        return Scorer(
        references=refs(encoder), detector=detector, encoder=encoder, config=config).score(images, keys)

    fp32, bf16 = run(ScoreConfig(chunk=16)), run(ScoreConfig(chunk=16, cpu_bf16=True))
    assert not torch.equal(bf16.score, fp32.score) and bf16.score.dtype == bf16.embedding.dtype == torch.float32
    assert torch.corrcoef(torch.stack([bf16.error, fp32.error]))[0, 1] > 0.99
    # The normalised score of an untrained detector varies little between images, so bf16 rounding weighs more.
    assert torch.corrcoef(torch.stack([bf16.score, fp32.score]))[0, 1] > 0.95
    assert "cpu_bf16" not in ScoreConfig().to_dict() and ScoreConfig(cpu_bf16=True).to_dict()["cpu_bf16"] is True


def test_cuda_fp32_opts_out_of_bf16_and_names_itself_only_when_on():
    assert autocast_for(torch.device("cuda"), cuda_fp32=True).__class__ is contextlib.nullcontext
    assert autocast_for(torch.device("cpu"), cuda_fp32=True).__class__ is contextlib.nullcontext
    assert isinstance(autocast_for(torch.device("cpu"), cpu_bf16=True), torch.autocast)
    assert "cuda_fp32" not in ScoreConfig().to_dict() and ScoreConfig(cuda_fp32=True).to_dict()["cuda_fp32"] is True


@pytest.mark.gpu
def test_cuda_fp32_is_close_to_the_cpu(detector, encoder, batch):
    images, keys = batch
    def run(config, device):  # copies: a Scorer moves its modules to its device
        return Scorer(references=refs(encoder), detector=copy.deepcopy(detector), encoder=copy.deepcopy(encoder),
                      config=config, device=device).score(images, keys)

    cpu, fp32 = run(ScoreConfig(chunk=16), "cpu"), run(ScoreConfig(chunk=16, cuda_fp32=True), "cuda")
    bf16 = run(ScoreConfig(chunk=16), "cuda")
    assert (fp32.error - cpu.error).abs().max() <= (bf16.error - cpu.error).abs().max()
    assert torch.allclose(fp32.error, cpu.error, rtol=1e-3)
