"""ResNet-50/101 backbone (Caffe-style bottlenecks) and the feature pyramid (FPN).

Layer names follow Matterport (``conv1``, ``res4b_branch2a``, ``bn5c_branch2c``, ``fpn_c5p5``,
``fpn_p2`` ...) so that Keras-2 HDF5 weights load by name. Feature maps are NHWC.
Strides: C2/P2 4, C3/P3 8, C4/P4 16, C5/P5 32, P6 64.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
from keras import activations, ops
from keras import layers as KL

#: Identity blocks after the projection block in stage 4.
STAGE4_IDENTITY_BLOCKS = {"resnet50": 5, "resnet101": 22}


#: Fold every frozen BatchNorm (``train_bn`` False) into the convolution before it (see
#: :class:`FoldingConv2D`). Module switch for interleaved A/B measurements only
#: (benchmarks/bn_fold_ab.py); both settings compute the same values up to float rounding, and
#: it is read when a graph is built.
FOLD_FROZEN_BN = True


class BatchNorm(KL.BatchNormalization):
    """Keras BatchNormalization (Matterport's name) whose mode can be pinned.

    ``fixed_training`` True/False fixes the mode whatever ``training`` the enclosing model is
    called with (Matterport's TRAIN_BN semantics: False = moving statistics and no updates, also
    while training). Keras 3 lets an outer ``model(x, training=True)`` override a
    ``training=False`` given when the graph was built, hence the pin. None = normal Keras behaviour.

    A frozen BatchNorm (``fixed_training`` False) whose convolution computes it
    (:meth:`FoldingConv2D.fold_batch_norm`) passes its input through unchanged; its weights stay
    its own (loading, saving and gradients as before).
    """

    def __init__(self, *args: Any, fixed_training: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fixed_training = fixed_training
        self.folded_into_conv = False

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        if self.fixed_training is not None:
            training = self.fixed_training
        if self.folded_into_conv:
            return inputs
        return super().call(inputs, training=training, mask=mask)

    def frozen_scale_offset(self) -> tuple[Any, Any]:
        """(scale, offset), float32 [C]: the frozen layer as ``x * scale + offset``, from the moving
        statistics (scale = gamma / sqrt(moving_variance + epsilon), offset = beta - moving_mean * scale)."""
        variance = ops.cast(self.moving_variance, "float32")
        scale = ops.rsqrt(variance + self.epsilon)
        if self.scale:
            scale = scale * ops.cast(self.gamma, "float32")
        offset = -ops.cast(self.moving_mean, "float32") * scale
        if self.center:
            offset = offset + ops.cast(self.beta, "float32")
        return scale, offset

    def get_config(self) -> dict:
        return {**super().get_config(), "fixed_training": self.fixed_training}


class FoldingConv2D(KL.Conv2D):
    """Conv2D that can compute the frozen BatchNorm after it (:meth:`fold_batch_norm`), so that the
    pair costs one convolution instead of a convolution plus BatchNorm's elementwise passes over
    the activation map (and, in training, their backward passes). Two formulations, same function:

    * ``training`` True: conv(x, kernel * scale) + bias * scale + offset (scale, offset from
      :meth:`BatchNorm.frozen_scale_offset`): a conv with bias (grappler fuses it with a following
      ReLU) whose gradients reach kernel, gamma and beta exactly as through the unfolded pair.
    * otherwise (inference): conv(x, kernel) then ``fused_batch_norm(is_training=False)`` with
      mean = moving_mean - bias, which grappler's remapper fuses with the conv (and a following
      ReLU) into one ``_FusedConv2D``: the kernel stays the variable as stored (no per-call rescaling
      of the weights; oneDNN keeps its reordered copy).

    The conv's bias gets no loss gradient in either form (SGD's L2 term still pulls it towards 0, as
    before 2026-12-07): in front of a frozen BatchNorm it only adds ``scale * bias`` to beta's
    per-channel offset, and the offset trains through beta. (Matterport trains both, which doubles the offset's step; from random weights that
    collapsed learning runs and lowered the demo preset's Jaccard: benchmarks/README.md, 2026-12-07.)

    Weight files load into the conv and BatchNorm layers by name as before. The layer's own output
    (``get_layer(conv).output``) is the normalised activation; the BatchNorm passes it through.
    """

    def fold_batch_norm(self, batch_norm: BatchNorm) -> None:
        """Compute ``batch_norm`` (frozen, not yet called) in this layer; it becomes a pass-through."""
        if batch_norm.fixed_training is not False:
            raise ValueError(f"only a frozen BatchNorm (fixed_training False) can be folded, "
                             f"{batch_norm.name} has {batch_norm.fixed_training!r}")
        linear = self.activation in (None, activations.linear)
        if not self.use_bias or not linear or self.data_format != "channels_last":
            raise ValueError(f"{self.name}: folding needs a channels-last conv with bias and no activation")
        # Not an attribute Keras tracks: the BatchNorm's weights must stay the BatchNorm's alone.
        object.__setattr__(self, "_folded_batch_norm", batch_norm)
        batch_norm.folded_into_conv = True

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        batch_norm = getattr(self, "_folded_batch_norm", None)
        if batch_norm is None:
            return super().call(inputs)
        if not batch_norm.built:
            batch_norm.build(tuple(inputs.shape[:-1]) + (self.filters,))
        if training:
            scale, offset = batch_norm.frozen_scale_offset()
            kernel = ops.cast(ops.cast(self.kernel, "float32") * scale, inputs.dtype)
            bias = ops.cast(ops.stop_gradient(ops.cast(self.bias, "float32")) * scale + offset, inputs.dtype)
            return ops.add(self.convolution_op(inputs, kernel), ops.reshape(bias, (1, 1, 1, self.filters)))
        ones = tf.ones((self.filters,), tf.float32)
        gamma = ops.cast(batch_norm.gamma, "float32") if batch_norm.scale else ones
        beta = ops.cast(batch_norm.beta, "float32") if batch_norm.center else 0.0 * ones
        mean = ops.cast(batch_norm.moving_mean, "float32") - ops.cast(self.bias, "float32")
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            self.convolution_op(inputs, self.kernel), gamma, beta, mean,
            ops.cast(batch_norm.moving_variance, "float32"), epsilon=batch_norm.epsilon, is_training=False)
        return y


def batch_norm(x: Any, name: str, train_bn: bool | None) -> Any:
    """BatchNorm named ``name`` pinned to ``training=train_bn`` (False = frozen moving stats,
    True = always batch statistics, None = Keras default behaviour)."""
    layer = BatchNorm(name=name, epsilon=1e-3, momentum=0.99, fixed_training=train_bn)
    if train_bn is None:
        return layer(x)
    return layer(x, training=train_bn)


def conv_bn(x: Any, filters: int, kernel: int, conv_name: str, bn_name: str, train_bn: bool | None,
            strides: int = 1, padding: str = "valid") -> Any:
    """Conv2D (with bias) named ``conv_name`` -> BatchNorm ``bn_name`` (mode as :func:`batch_norm`).

    A frozen BatchNorm (``train_bn`` False) is folded into the convolution (:class:`FoldingConv2D`,
    when FOLD_FROZEN_BN); the layers, their names and weights are the same either way.
    """
    conv = FoldingConv2D(filters, (kernel, kernel), strides=(strides, strides), padding=padding,
                         use_bias=True, name=conv_name)
    if train_bn is False and FOLD_FROZEN_BN:
        bn = BatchNorm(name=bn_name, epsilon=1e-3, momentum=0.99, fixed_training=False)
        conv.fold_batch_norm(bn)
        return bn(conv(x), training=False)
    return batch_norm(conv(x), bn_name, train_bn)


def _conv_bn(x: Any, filters: int, kernel: int, conv_name: str, bn_name: str, train_bn: bool | None,
             strides: int = 1, padding: str = "valid", relu: bool = True) -> Any:
    """Conv2D (with bias) -> BN -> optional ReLU."""
    x = conv_bn(x, filters, kernel, conv_name, bn_name, train_bn, strides=strides, padding=padding)
    return KL.Activation("relu")(x) if relu else x


def bottleneck_block(x: Any, filters: tuple[int, int, int], stage: int, block: str,
                     strides: int = 1, projection: bool = False, train_bn: bool | None = False,
                     kernel_size: int = 3) -> Any:
    """Caffe-style bottleneck: 1x1 (stride here) -> 3x3 same -> 1x1, plus shortcut, ReLU.

    ``projection`` adds the 1x1 shortcut conv ``res{stage}{block}_branch1`` (Matterport's
    "conv_block"); otherwise the input is the shortcut ("identity_block").
    """
    f1, f2, f3 = filters
    conv, bn = f"res{stage}{block}_branch", f"bn{stage}{block}_branch"
    y = _conv_bn(x, f1, 1, conv + "2a", bn + "2a", train_bn, strides=strides)
    y = _conv_bn(y, f2, kernel_size, conv + "2b", bn + "2b", train_bn, padding="same")
    y = _conv_bn(y, f3, 1, conv + "2c", bn + "2c", train_bn, relu=False)
    if projection:
        shortcut = _conv_bn(x, f3, 1, conv + "1", bn + "1", train_bn, strides=strides, relu=False)
    else:
        shortcut = x
    y = KL.Add()([y, shortcut])
    return KL.Activation("relu", name=f"res{stage}{block}_out")(y)


def identity_block(input_tensor: Any, kernel_size: int, filters: tuple[int, int, int], stage: int, block: str,
                   use_bias: bool = True, train_bn: bool | None = True) -> Any:
    """Matterport's identity block (bottleneck without shortcut conv). Convs always have biases."""
    return bottleneck_block(input_tensor, filters, stage, block, train_bn=train_bn, kernel_size=kernel_size)


def conv_block(input_tensor: Any, kernel_size: int, filters: tuple[int, int, int], stage: int, block: str,
               strides: tuple[int, int] = (2, 2), use_bias: bool = True, train_bn: bool | None = True) -> Any:
    """Matterport's conv block (bottleneck with a strided 1x1 projection shortcut)."""
    return bottleneck_block(input_tensor, filters, stage, block, strides=strides[0], projection=True,
                            train_bn=train_bn, kernel_size=kernel_size)


def _stage(x: Any, filters: tuple[int, int, int], stage: int, blocks: int, strides: int,
           train_bn: bool | None) -> Any:
    """One ResNet stage: a projection block ``a`` then ``blocks - 1`` identity blocks ``b, c, ...``."""
    x = bottleneck_block(x, filters, stage, "a", strides=strides, projection=True, train_bn=train_bn)
    for i in range(1, blocks):
        x = bottleneck_block(x, filters, stage, chr(ord("a") + i), train_bn=train_bn)
    return x


def resnet_graph(input_image: Any, architecture: str, stage5: bool = True,
                 train_bn: bool | None = False) -> list[Any]:
    """ResNet body. input_image [B, H, W, C] -> [C1, C2, C3, C4, C5] (C5 is None if not stage5).

    C1 stride 4 (after max-pool), C2 stride 4 (256 ch), C3 8 (512), C4 16 (1024), C5 32 (2048).
    """
    if architecture not in STAGE4_IDENTITY_BLOCKS:
        raise ValueError(f"architecture must be one of {sorted(STAGE4_IDENTITY_BLOCKS)}, got {architecture!r}")
    x = KL.ZeroPadding2D((3, 3))(input_image)
    x = _conv_bn(x, 64, 7, "conv1", "bn_conv1", train_bn, strides=2)
    c1 = x = KL.MaxPooling2D((3, 3), strides=(2, 2), padding="same")(x)
    c2 = x = _stage(x, (64, 64, 256), 2, 3, 1, train_bn)
    c3 = x = _stage(x, (128, 128, 512), 3, 4, 2, train_bn)
    c4 = x = _stage(x, (256, 256, 1024), 4, 1 + STAGE4_IDENTITY_BLOCKS[architecture], 2, train_bn)
    c5 = _stage(x, (512, 512, 2048), 5, 3, 2, train_bn) if stage5 else None
    return [c1, c2, c3, c4, c5]


# -------------------------------------------------------------------------------------------
# Basic-block ResNets (ResNet-18/34 layout) for training from scratch on small images.
# Not Matterport's: their layers have their own names (``bres*``), so Matterport/COCO HDF5 files
# loaded by name simply skip them. No pretrained weights exist for them here.

#: Blocks per stage (C2..C5) of the basic-block ResNets.
BASIC_BLOCK_STAGES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}

#: Every BACKBONE name the graph builders accept.
BACKBONE_NAMES = tuple(STAGE4_IDENTITY_BLOCKS) + tuple(BASIC_BLOCK_STAGES)


def basic_block(x: Any, filters: int, stage: int, block: str, strides: int = 1,
                train_bn: bool | None = False) -> Any:
    """3x3 (stride here) -> BN -> ReLU -> 3x3 -> BN, plus shortcut (1x1 projection + BN when the
    stride or channel count changes), ReLU. Names ``bres{stage}{block}_conv{1,2,proj}``."""
    conv, bn = f"bres{stage}{block}_conv", f"bbn{stage}{block}_"
    y = _conv_bn(x, filters, 3, conv + "1", bn + "1", train_bn, strides=strides, padding="same")
    y = _conv_bn(y, filters, 3, conv + "2", bn + "2", train_bn, padding="same", relu=False)
    if strides != 1 or int(x.shape[-1]) != filters:
        shortcut = _conv_bn(x, filters, 1, conv + "proj", bn + "proj", train_bn, strides=strides, relu=False)
    else:
        shortcut = x
    y = KL.Add()([y, shortcut])
    return KL.Activation("relu", name=f"bres{stage}{block}_out")(y)


def basic_resnet_graph(input_image: Any, architecture: str, stage5: bool = True,
                       train_bn: bool | None = False, width: int = 64) -> list[Any]:
    """Basic-block ResNet body ("resnet18" / "resnet34"), same strides as :func:`resnet_graph`.

    input_image [B, H, W, C] -> [C1, C2, C3, C4, C5]; C2..C5 have width, 2, 4 and 8 x width
    channels (64 -> 64/128/256/512 as torchvision's ResNet-18/34) at strides 4, 8, 16, 32.
    """
    if architecture not in BASIC_BLOCK_STAGES:
        raise ValueError(f"architecture must be one of {sorted(BASIC_BLOCK_STAGES)}, got {architecture!r}")
    x = _conv_bn(input_image, width, 7, "bconv1", "bbn_conv1", train_bn, strides=2, padding="same")
    c1 = x = KL.MaxPooling2D((3, 3), strides=(2, 2), padding="same")(x)
    outputs = [c1]
    for i, blocks in enumerate(BASIC_BLOCK_STAGES[architecture]):
        stage = i + 2
        if stage == 5 and not stage5:
            outputs.append(None)
            break
        for b in range(blocks):
            x = basic_block(x, width * 2 ** i, stage, chr(ord("a") + b),
                            strides=2 if (b == 0 and stage > 2) else 1, train_bn=train_bn)
        outputs.append(x)
    return outputs


def build_fpn(C2: Any, C3: Any, C4: Any, C5: Any, pyramid_size: int) -> list[Any]:
    """Top-down feature pyramid. C2..C5 -> [P2, P3, P4, P5, P6], all ``pyramid_size`` channels.

    P6 is a stride-2 subsampling of P5 (RPN only).
    """
    p5 = KL.Conv2D(pyramid_size, (1, 1), name="fpn_c5p5")(C5)
    p4 = KL.Add(name="fpn_p4add")([KL.UpSampling2D(size=(2, 2), name="fpn_p5upsampled")(p5),
                                   KL.Conv2D(pyramid_size, (1, 1), name="fpn_c4p4")(C4)])
    p3 = KL.Add(name="fpn_p3add")([KL.UpSampling2D(size=(2, 2), name="fpn_p4upsampled")(p4),
                                   KL.Conv2D(pyramid_size, (1, 1), name="fpn_c3p3")(C3)])
    p2 = KL.Add(name="fpn_p2add")([KL.UpSampling2D(size=(2, 2), name="fpn_p3upsampled")(p3),
                                   KL.Conv2D(pyramid_size, (1, 1), name="fpn_c2p2")(C2)])
    p2 = KL.Conv2D(pyramid_size, (3, 3), padding="same", name="fpn_p2")(p2)
    p3 = KL.Conv2D(pyramid_size, (3, 3), padding="same", name="fpn_p3")(p3)
    p4 = KL.Conv2D(pyramid_size, (3, 3), padding="same", name="fpn_p4")(p4)
    p5 = KL.Conv2D(pyramid_size, (3, 3), padding="same", name="fpn_p5")(p5)
    p6 = KL.MaxPooling2D(pool_size=(1, 1), strides=2, name="fpn_p6")(p5)
    return [p2, p3, p4, p5, p6]


def batch_norm_mode(config: Any, inference: bool = False) -> bool | None:
    """``train_bn`` for the graph being built (see :func:`batch_norm`): config.TRAIN_BN, except in an
    inference graph whose config.INFERENCE_BN is "moving" (False: moving averages) or "batch" (True)."""
    choice = config.INFERENCE_BN if inference else "same"
    return {"moving": False, "batch": True}.get(choice, config.TRAIN_BN)


def build_backbone_and_fpn(input_image: Any, config: Any, inference: bool = False,
                           return_c5: bool = False) -> tuple[Any, ...]:
    """input_image [B, H, W, C] -> (rpn_feature_maps [P2..P6], mrcnn_feature_maps [P2..P5]), and
    with ``return_c5`` the backbone's last stage C5 as a third element (the image-level diagnosis head).

    ``config.BACKBONE`` may be "resnet50", "resnet101", "resnet18", "resnet34" (basic blocks,
    ``config.BACKBONE_WIDTH`` channels in stage 2) or a callable with resnet_graph's signature.
    BatchNorm mode from :func:`batch_norm_mode` (``inference``: the inference graph's).
    """
    train_bn = batch_norm_mode(config, inference)
    if callable(config.BACKBONE):
        _, c2, c3, c4, c5 = config.BACKBONE(input_image, stage5=True, train_bn=train_bn)
    elif config.BACKBONE in BASIC_BLOCK_STAGES:
        _, c2, c3, c4, c5 = basic_resnet_graph(input_image, config.BACKBONE, stage5=True, train_bn=train_bn,
                                               width=config.BACKBONE_WIDTH)
    else:
        _, c2, c3, c4, c5 = resnet_graph(input_image, config.BACKBONE, stage5=True, train_bn=train_bn)
    p2, p3, p4, p5, p6 = build_fpn(c2, c3, c4, c5, config.TOP_DOWN_PYRAMID_SIZE)
    if return_c5:
        return [p2, p3, p4, p5, p6], [p2, p3, p4, p5], c5
    return [p2, p3, p4, p5, p6], [p2, p3, p4, p5]


__all__ = ["resnet_graph", "basic_resnet_graph", "basic_block", "BACKBONE_NAMES", "build_fpn", "build_backbone_and_fpn", "batch_norm", "batch_norm_mode", "conv_bn", "FoldingConv2D", "FOLD_FROZEN_BN", "bottleneck_block", "BatchNorm",
           "identity_block", "conv_block"]
