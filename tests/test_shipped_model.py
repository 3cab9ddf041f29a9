"""The model shipped in models/: what predict.py uses when nothing was trained here."""
import checkpoints
import config
import data
import metrics
import nuclei
import predict
from tests.conftest import SAMPLE_TRAIN


def test_the_shipped_model_loads_with_its_recipe_and_finds_the_nuclei():
    model = checkpoints.load_unet(config.SHIPPED_MODEL)
    recipe = checkpoints.read_recipe(config.SHIPPED_MODEL)
    assert model.count_params() == 1_940_851 and model.output_shape == (None, None, None, 3)
    assert recipe == config.RECIPES["instance"]
    # Trained by the README's command, to the end of its 160 epochs (the best was the 117th), on
    # the 597 training images and TNBC's slides 01-06 (30 tiles).
    record = checkpoints.read_training(config.SHIPPED_MODEL)
    assert record["command"] == ("python train.py --recipe instance --epochs 160 "
                                 "--extra-train-dir data/tnbc_train --model-path "
                                 "models/instance.keras")
    assert record["epochs"] == record["epochs_run"] == 160 and record["best_epoch"] == 117
    assert record["extra_train_dirs"] == ["data/tnbc_train"]
    assert record["training_images"] == 627 and record["policy"] == "mixed_bfloat16"
    ids = data.list_ids(SAMPLE_TRAIN)
    id_ = next(i for i in ids if i.startswith("1d4a5e72"))
    images, truths = data.load_native(SAMPLE_TRAIN, [id_])
    found = nuclei.Predictor(model, recipe).nuclei(images)[0]
    # 27 nuclei in the truth (a training image); here the model found 27, scoring 0.807 on
    # this image in float32 and in bfloat16 (bounds leave room for another CPU's rounding; an
    # untrained network finds none).
    assert truths[0].max() == 27 and 24 <= found.max() <= 30
    assert metrics.competition_score(truths[0], found) > 0.74


def test_predict_uses_the_shipped_model_when_none_was_trained(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config, "MODEL_PATH", tmp_path / "never_trained.keras")
    assert predict.default_model() == config.SHIPPED_MODEL
    assert "using the shipped model models/instance.keras" in capsys.readouterr().out
    trained = tmp_path / "mine.keras"
    trained.write_bytes(b"")
    monkeypatch.setattr(config, "MODEL_PATH", trained)
    assert predict.default_model() == trained


def test_tune_refuses_to_change_the_shipped_model(capsys):
    before = config.SHIPPED_MODEL.read_bytes()
    try:
        predict.main(["--model-path", str(config.SHIPPED_MODEL), "--tune"])
    except SystemExit as stop:
        message = str(stop)
    assert message == (f"error: {config.SHIPPED_MODEL}: --tune does not change the shipped "
                       "model; copy it and tune the copy (--model-path)")
    assert config.SHIPPED_MODEL.read_bytes() == before
