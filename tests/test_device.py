"""device.py's choice of compilation and precision, and prediction on each path."""
import gc
import weakref

import numpy as np
import pytest

import config
import data
import device
import nuclei
from tests.conftest import SAMPLE_TEST, SAMPLE_TRAIN


@pytest.mark.parametrize("setting, gpu, bfloat16, jit", [
    ("auto", False, True, False),   # AVX-512 BF16 / AMX: oneDNN's plain graph
    ("auto", False, False, True),   # AVX2 only: XLA
    ("auto", True, True, "auto"),   # GPU: Keras' own rule (XLA there)
    ("on", False, True, True),
    ("off", False, False, False),
    ("off", True, False, False),
])
def test_jit_follows_the_device_unless_forced(setting, gpu, bfloat16, jit):
    chosen, why = device.choose_jit(setting, gpu, bfloat16)
    assert chosen is jit or chosen == jit
    assert why


def test_training_path_keeps_the_notebooks_compilation_and_takes_bfloat16_where_native(
        monkeypatch):
    monkeypatch.setattr(device, "has_gpu", lambda: False)
    monkeypatch.setattr(device, "cpu_has_bfloat16", lambda: True)
    assert device.prediction_compute("auto").policy == "mixed_bfloat16"
    assert device.prediction_compute("auto", "float32").policy == "float32"
    assert device.training_compute("auto", False, notebook=True) == device.Compute(
        "auto", "float32", "the notebook's path (Keras' auto: XLA on GPUs only)")
    instance = device.training_compute("auto", True, notebook=False)
    assert (instance.jit, instance.policy) == (False, "mixed_bfloat16")
    assert device.training_compute("on", True, notebook=True).jit is True
    monkeypatch.setattr(device, "cpu_has_bfloat16", lambda: False)
    emulated = device.training_compute("auto", True, notebook=False)
    assert (emulated.jit, emulated.policy) == (True, "float32")
    assert "emulated" in emulated.why
    assert device.prediction_compute("off").policy == "float32"


def test_a_dropped_model_and_its_network_are_freed():
    import unet

    model = unet.build_unet(recipe=config.RECIPES["instance"])
    network = nuclei.Network(model, device.Compute(False, "mixed_bfloat16", "a test"))
    assert network(np.zeros((1, 32, 32, 1), np.float32)).shape == (1, 32, 32, 3)
    freed = weakref.ref(model)
    del model, network
    gc.collect()
    assert freed() is None


def test_bfloat16_prediction_finds_the_float32_nuclei_on_the_sample_images():
    import checkpoints

    model = checkpoints.load_unet(config.SHIPPED_MODEL)
    recipe = checkpoints.read_recipe(config.SHIPPED_MODEL)
    images = []
    for folder in (SAMPLE_TRAIN, SAMPLE_TEST):
        images += data.load_native(folder, data.list_ids(folder), with_labels=False)[0]
    found = {policy: nuclei.Predictor(model, recipe, device.Compute(False, policy, "a test"))
             .nuclei(images) for policy in ("float32", "mixed_bfloat16")}
    counts = {policy: sum(int(labels.max()) for labels in found[policy]) for policy in found}
    assert len(images) == 33 and counts["float32"] > 1000
    assert abs(counts["mixed_bfloat16"] - counts["float32"]) <= 0.01 * counts["float32"]
    for single, half in zip(found["float32"], found["mixed_bfloat16"]):
        union = np.count_nonzero((single > 0) | (half > 0))
        assert np.count_nonzero((single > 0) & (half > 0)) >= 0.99 * union


def test_a_model_trained_in_bfloat16_predicts_in_float32_when_asked():
    """A model saved by a mixed-precision run carries its layers' bfloat16 policy: float32
    prediction computes in float32 all the same (as a float32 model with its weights does)."""
    import keras

    import unet

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    mixed = unet.build_unet(recipe=config.RECIPES["instance"])
    keras.mixed_precision.set_global_policy("float32")
    single = unet.build_unet(recipe=config.RECIPES["instance"])
    single.set_weights(mixed.get_weights())
    x = np.random.default_rng(0).random((1, 64, 64, 1), dtype=np.float32)
    plain = device.Compute(False, "float32", "a test")
    expected = nuclei.Network(single, plain)(x)
    np.testing.assert_allclose(nuclei.Network(mixed, plain)(x), expected, atol=1e-5)
    half = nuclei.Network(single, device.Compute(False, "mixed_bfloat16", "a test"))(x)
    assert np.abs(half - expected).max() > 1e-4  # bfloat16 is not float32
