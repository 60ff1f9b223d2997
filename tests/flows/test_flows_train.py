from dede_core.detector.checkpoint import load_checkpoint
from flows.train import train_flow


def test_train_flow_runs_and_resumes(tmp_path, image_folder, encoder_spec, prefect_harness):
    out = tmp_path / "run"
    path = train_flow(str(image_folder), encoder_spec, str(out), epochs=1, batch_size=16)
    assert load_checkpoint(path).meta["epoch"] == 1
    path = train_flow(str(image_folder), encoder_spec, str(out), epochs=2, batch_size=16)
    ckpt = load_checkpoint(path)
    assert ckpt.meta["epoch"] == 2 and len(ckpt.meta["loss_history"]) == 2
