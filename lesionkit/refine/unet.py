"""The refinement U-Net (Ronneberger et al. 2015) in Keras 3, sized by :class:`RefineSettings`.

``depth`` down-sampling levels of two 3x3 conv + BatchNorm + ReLU blocks, ``width`` filters at
the first level, doubled per level; transposed-conv up-sampling with skip connections; a 1x1
conv gives one logit per pixel. Input: [B, S, S, 3 or 4] float in 0..255 (RGB, and the coarse
mask x 255 as a fourth channel with ``mask_channel``); it is scaled to [-1, 1] inside the model.
Output: [B, S, S, 1] logits (sigmoid -> lesion probability).
"""

from __future__ import annotations

import keras
from keras import layers

from lesionkit.refine.settings import RefineSettings


def _conv_block(x, filters: int, name: str):
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def build_unet(settings: RefineSettings) -> keras.Model:
    """The U-Net for ``settings`` (crop_size, depth, width, channels); output logits [B, S, S, 1]."""
    size = settings.crop_size
    inputs = keras.Input((size, size, settings.channels), name="refine_input")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="refine_scale")(inputs)
    skips = []
    for level in range(settings.depth):
        x = _conv_block(x, settings.width * 2 ** level, f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
    x = _conv_block(x, settings.width * 2 ** settings.depth, "bottom")
    for level in reversed(range(settings.depth)):
        filters = settings.width * 2 ** level
        x = layers.Conv2DTranspose(filters, 2, strides=2, name=f"up{level}")(x)
        x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = _conv_block(x, filters, f"dec{level}")
    logits = layers.Conv2D(1, 1, name="refine_logits")(x)
    return keras.Model(inputs, logits, name="refine_unet")


def refine_loss(y_true, logits):
    """Binary cross-entropy plus soft Dice (1 - 2|P∩T| / (|P| + |T|), per crop), both on [B, S, S, 1]."""
    from keras import ops

    y_true = ops.cast(y_true, logits.dtype)
    bce = ops.mean(ops.binary_crossentropy(y_true, logits, from_logits=True), axis=(1, 2, 3))
    prob = ops.sigmoid(logits)
    overlap = ops.sum(prob * y_true, axis=(1, 2, 3))
    total = ops.sum(prob, axis=(1, 2, 3)) + ops.sum(y_true, axis=(1, 2, 3))
    dice = 1.0 - (2.0 * overlap + 1.0) / (total + 1.0)
    return bce + dice
