from dede_core.detector.checkpoint import load_checkpoint
from dede_core.detector.train import TrainConfig
from flows.train import TrainSettings, train_flow


def test_train_flow_runs_and_resumes(tmp_path, image_folder, encoder_spec, prefect_harness):
    out = tmp_path / "run"
    one, two = (TrainSettings(train=TrainConfig(epochs=n, batch_size=16)) for n in (1, 2))
    path = train_flow(str(image_folder), encoder_spec, str(out), one)
    assert load_checkpoint(path).meta["epoch"] == 1
    path = train_flow(str(image_folder), encoder_spec, str(out), two)
    ckpt = load_checkpoint(path)
    assert ckpt.meta["epoch"] == 2 and len(ckpt.meta["loss_history"]) == 2
