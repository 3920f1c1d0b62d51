"""Mask R-CNN for TensorFlow 2.21 / Keras 3 with Matterport's public API.

Matterport import paths keep working: ``mrcnn.config.Config``, ``mrcnn.utils``,
``mrcnn.model.MaskRCNN``, ``mrcnn.visualize``. The implementation lives in small modules
(one concept each); see the README's "Where things live" table.
"""

__version__ = "0.1.0"

from mrcnn import tf_startup as _tf_startup

_tf_startup.install()  # TensorFlow's C++ start-up lines are dropped when it is first imported
