"""Keras's AdamW and SGD with TensorFlow's fused update kernels.

Keras 3 updates each weight with ~10 separate elementwise ops (AdamW: two moment updates, a
square, a square root, a division, ...), each a full pass over the weight in memory. TensorFlow
has one kernel per optimiser that does the same arithmetic in one pass: ``ResourceApplyAdam``
(Keras's Adam formula, epsilon added to the square root of the uncorrected second moment) and
``ResourceApplyKerasMomentum`` (Keras's SGD momentum, ``m = momentum * m - lr * g; w += m``, and
its Nesterov form). :class:`FusedAdamW` and :class:`FusedSGD` call them; everything else (slots and
their names, weight decay, clipping, EMA, loss scaling, tf.distribute, serialisation) is Keras's.

The update alone takes 0.48x (AdamW) and 0.46x (SGD) the CPU time of Keras's at ``ham10000_dx``'s
5.0 M weights, 0.35x / 0.19x at Matterport's ResNet-101 layout (benchmarks/README.md, "Fused
optimiser updates"). The fused kernels run only on the TensorFlow backend with dense
gradients (and without AMSGrad); otherwise Keras's own update step runs.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf


def _fusable(gradient: Any, variable: Any) -> bool:
    """True when TF's fused kernel can update ``variable``: TF backend, a dense gradient and a
    resource variable (inside ``Strategy.update`` the replica's own component)."""
    return (keras.backend.backend() == "tensorflow" and not isinstance(gradient, tf.IndexedSlices)
            and hasattr(variable, "handle"))


class FusedAdamW(keras.optimizers.AdamW):
    """:class:`keras.optimizers.AdamW` whose per-weight update is TF's ``ResourceApplyAdam`` (one
    pass over weight, first and second moment instead of ~10); the same numbers as Keras's AdamW
    to float32 rounding. Decoupled weight decay stays Keras's (applied before the update)."""

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        if self.amsgrad or not _fusable(gradient, variable):
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].value.handle, v=self._velocities[index].value.handle,
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype), use_locking=False)


class FusedSGD(keras.optimizers.SGD):
    """:class:`keras.optimizers.SGD` whose momentum update is TF's ``ResourceApplyKerasMomentum``
    (one pass instead of ~4); the same numbers as Keras's SGD. Without momentum Keras's step runs."""

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        if self.momentum == 0 or not _fusable(gradient, variable):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle, accum=self.momentums[self._get_variable_index(variable)].value.handle,
            lr=tf.cast(learning_rate, dtype), grad=tf.cast(gradient, dtype),
            momentum=tf.cast(self.momentum, dtype), use_locking=False, use_nesterov=self.nesterov)


#: The Keras optimiser each fused one computes (optimizer-state manifests name this class, so that
#: a state saved by either loads into the other).
KERAS_EQUIVALENT = {FusedAdamW: keras.optimizers.AdamW, FusedSGD: keras.optimizers.SGD}


def keras_class_name(optimizer: keras.optimizers.Optimizer) -> str:
    """The Keras class whose update ``optimizer`` computes: "AdamW" for :class:`FusedAdamW`."""
    return KERAS_EQUIVALENT.get(type(optimizer), type(optimizer)).__name__
