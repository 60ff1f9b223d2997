import os
import pickle

import pytest
import torch

from conftest import smooth_images
from dede_core.detector.checkpoint import CheckpointError, load_checkpoint, load_detector, save_checkpoint
from dede_core.detector.config import cpu
from dede_core.detector.model import DeDe
from dede_core.detector.scorer import ScoreConfig, Scorer


def test_round_trip_gives_identical_scores(tmp_path, encoder, encoder_spec):
    torch.manual_seed(0)
    model = DeDe(config=cpu(score_visible=4), global_dim=encoder.dim).eval()
    path = tmp_path / "detector.pt"
    digest = save_checkpoint(path, model=model, encoder_spec=encoder.spec, encoder_fingerprint=encoder.fingerprint,
                             meta={"epoch": 1})
    loaded, loaded_encoder, ckpt = load_detector(path)
    assert ckpt.content_hash == digest and ckpt.config == model.config and ckpt.meta["epoch"] == 1
    images, keys = smooth_images(10, seed=2), [f"k{i}" for i in range(10)]
    config = ScoreConfig(draws=2, seed=3, chunk=8, references=0)
    before = Scorer(detector=model, encoder=encoder, config=config).score(images, keys).score
    after = Scorer(detector=loaded, encoder=loaded_encoder, config=config).score(images, keys).score
    assert torch.equal(before, after)
    # The file loads with plain torch.load(weights_only=True): no custom classes inside.
    assert torch.load(path, weights_only=True)["content_hash"] == digest


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"format": "dede-detector/1", "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not marker.exists()


def test_altered_weights_fail_the_content_check(tmp_path, encoder):
    model = DeDe(config=cpu(), global_dim=encoder.dim)
    path = tmp_path / "detector.pt"
    save_checkpoint(path, model=model, encoder_spec=encoder.spec, encoder_fingerprint=encoder.fingerprint)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["decoder_pred.bias"] += 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="content check"):
        load_checkpoint(path)


def test_wrong_encoder_weights_are_refused(tmp_path, encoder):
    model = DeDe(config=cpu(), global_dim=encoder.dim)
    path = tmp_path / "detector.pt"
    save_checkpoint(path, model=model, encoder_spec=encoder.spec, encoder_fingerprint="0" * 64)
    with pytest.raises(CheckpointError, match="trained on weights"):
        load_detector(path)


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError):
        load_checkpoint(junk)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"format": "something-else"}, junk)
    with pytest.raises(CheckpointError, match="not a dede detector"):
        load_checkpoint(junk)


def test_ctrl_c_during_a_checkpoint_write_lands_after_the_file_is_complete(tmp_path, monkeypatch):
    """A SIGINT that arrives inside torch.save is held back: the file is written whole, then KeyboardInterrupt."""
    import signal

    from dede_core.detector.checkpoint import atomic_torch_save

    real_save = torch.save

    def save_interrupted(obj, handle):
        os.kill(os.getpid(), signal.SIGINT)  # arrives mid-write
        real_save(obj, handle)

    monkeypatch.setattr(torch, "save", save_interrupted)
    path = tmp_path / "state.pt"
    # Python's own SIGINT handler, as under a terminal: a test run started in the background inherits SIGINT
    # ignored, and then the write rightly lands without any KeyboardInterrupt.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_torch_save({"x": torch.arange(3)}, path)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
