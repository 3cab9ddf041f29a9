"""The model shipped in models/: what predict.py uses when nothing was trained here."""
import config
import data
import nuclei
import predict
import unet
from tests.conftest import SAMPLE_TRAIN


def test_the_shipped_model_loads_with_its_recipe_and_finds_the_nuclei():
    model = unet.load_unet(config.SHIPPED_MODEL)
    recipe = unet.read_recipe(config.SHIPPED_MODEL)
    assert model.count_params() == 1_940_851 and model.output_shape == (None, None, None, 3)
    assert recipe == config.RECIPES["instance"]
    ids = data.list_ids(SAMPLE_TRAIN)
    id_ = next(i for i in ids if i.startswith("1d4a5e72"))
    images, truths = data.load_native(SAMPLE_TRAIN, [id_])
    found = nuclei.Predictor(model, recipe).nuclei(images)[0]
    # 27 nuclei in the truth (a training image); here the model found 27, scoring 0.745 on
    # this image (bounds leave room for another CPU's rounding; an untrained network finds none).
    assert truths[0].max() == 27 and 24 <= found.max() <= 30
    assert unet.competition_score(truths[0], found) > 0.65


def test_predict_uses_the_shipped_model_when_none_was_trained(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config, "MODEL_PATH", tmp_path / "never_trained.keras")
    assert predict.default_model() == config.SHIPPED_MODEL
    assert "using the shipped model models/instance.keras" in capsys.readouterr().out
    trained = tmp_path / "mine.keras"
    trained.write_bytes(b"")
    monkeypatch.setattr(config, "MODEL_PATH", trained)
    assert predict.default_model() == trained
