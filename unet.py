"""The notebook's U-Net and its losses: the network of both recipes, compiled for training."""

import keras
import tensorflow as tf
from keras import layers

import config
import device
from data import INPUT_CHANNELS
from metrics import my_iou_metric

# (filters, dropout) of the contracting blocks c1..c4 and of the bottom block c5.
DOWN = [(16, 0.1), (32, 0.1), (64, 0.2), (128, 0.2)]
BOTTOM = (256, 0.3)
# The expanding blocks u6..u9 mirror c4..c1 with the same dropout rates.
UP = [(128, 0.2), (64, 0.2), (32, 0.1), (16, 0.1)]


def widened(blocks, filters):
    """`blocks` with c1's filters `filters` instead of the notebook's 16, every level in the same
    proportion (each level down doubles them)."""
    return [(f * filters // DOWN[0][0], dropout) for f, dropout in blocks]


def conv_block(x, filters, dropout):
    """conv 3x3 -> dropout -> conv 3x3, ELU and He initialisation, as every notebook block;
    no dropout layer when `dropout` is 0."""
    x = layers.Conv2D(filters, 3, activation="elu", kernel_initializer="he_normal",
                      padding="same")(x)
    if dropout:
        x = layers.Dropout(dropout)(x)
    return layers.Conv2D(filters, 3, activation="elu", kernel_initializer="he_normal",
                         padding="same")(x)


def build_unet(input_shape=None, recipe=None, steps=None, jit=None):
    """The notebook's U-Net (1,941,105 parameters at 128x128x3), compiled as the notebook does.
    The input shape defaults to config's image size, read at call time. Another recipe keeps the
    blocks and changes what is recipe data: the input (any size, its channels, already scaled
    by data.native_input), the number of outputs, the blocks' width, whether they keep their
    dropout, the loss, and the learning rate's schedule over `steps` training steps. `jit` is
    Keras' jit_compile; by default device.py's choice for this machine."""
    recipe = recipe or config.RECIPES["notebook"]
    notebook = config.is_notebook(recipe)
    if input_shape is None:
        input_shape = ((config.IMG_HEIGHT, config.IMG_WIDTH, config.IMG_CHANNELS) if notebook
                       else (None, None, INPUT_CHANNELS[recipe["input"]]))
    inputs = keras.Input(input_shape)
    # Rescaling instead of the notebook's Lambda: the same x / 255, and it reloads in safe mode.
    x = layers.Rescaling(1 / 255)(inputs) if notebook else inputs
    keep = recipe["dropout"]  # the notebook's dropout rates, or none
    width = recipe.get("filters", DOWN[0][0])
    skips = []
    for filters, dropout in widened(DOWN, width):
        x = conv_block(x, filters, dropout if keep else 0)
        skips.append(x)
        x = layers.MaxPooling2D(2)(x)
    (filters, dropout), = widened([BOTTOM], width)
    x = conv_block(x, filters, dropout if keep else 0)
    for (filters, dropout), skip in zip(widened(UP, width), reversed(skips)):
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same")(x)
        x = layers.concatenate([x, skip])
        x = conv_block(x, filters, dropout if keep else 0)
    # float32 output keeps the loss stable when --mixed-precision computes the rest in 16 bits.
    outputs = layers.Conv2D(recipe["outputs"], 1, activation="sigmoid", dtype="float32")(x)
    model = keras.Model(inputs, outputs)
    if jit is None:
        jit = device.training_compute("auto", False, notebook).jit
    if notebook:
        # The metric is compiled by XLA whatever `jit` is.
        model.compile(optimizer="adam", loss="binary_crossentropy", metrics=[my_iou_metric],
                      jit_compile=jit)
    else:
        learning_rate = 1e-3  # Adam's default, as the notebook's
        if recipe["lr_schedule"] == "cosine" and steps:
            learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, steps)
        loss = bce_dice if recipe["loss"] == "bce_dice" else "binary_crossentropy"
        if recipe.get("gap_weight", 1.0) != 1:
            loss = GapWeightedBceDice(recipe["gap_weight"])
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss,
                      jit_compile=jit)
    return model


@keras.saving.register_keras_serializable(package="dsb2018")
def bce_dice(y_true, y_pred, gap_weight=1.0):
    """Binary cross-entropy plus (1 - soft Dice) of each output channel over the batch: the
    Dice term weighs small nuclei and thin contours as much as the big background. With
    `gap_weight`, every channel's cross-entropy counts that many times on the pixels of the
    gaps between touching nuclei (the third target), as the U-Net paper's border weights."""
    y_true = tf.cast(y_true, y_pred.dtype)
    bce = keras.losses.binary_crossentropy(y_true[..., None], y_pred[..., None])
    if gap_weight != 1:
        bce = bce * (1 + (gap_weight - 1) * y_true[..., 2])[..., None]
    bce = tf.reduce_mean(bce)
    intersection = tf.reduce_sum(y_true * y_pred, axis=(0, 1, 2))
    total = tf.reduce_sum(y_true + y_pred, axis=(0, 1, 2))
    dice = (2 * intersection + 1) / (total + 1)
    return bce + tf.reduce_mean(1 - dice)


@keras.saving.register_keras_serializable(package="dsb2018")
class GapWeightedBceDice(keras.losses.Loss):
    """bce_dice with the recipe's gap_weight, kept in the model file for --resume."""

    def __init__(self, gap_weight, name="gap_weighted_bce_dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.gap_weight = gap_weight

    def call(self, y_true, y_pred):
        return bce_dice(y_true, y_pred, self.gap_weight)

    def get_config(self):
        return {**super().get_config(), "gap_weight": self.gap_weight}
