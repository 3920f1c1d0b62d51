"""Mask R-CNN for TensorFlow 2.21 / Keras 3 with Matterport's public API.

Matterport import paths keep working: ``mrcnn.config.Config``, ``mrcnn.utils``,
``mrcnn.model.MaskRCNN``, ``mrcnn.visualize``. The implementation lives in small modules
(one concept each); see the README's "Where things live" table.
"""

__version__ = "0.1.0"

import os as _os

# As quiet as the CLI (lesions.py): TensorFlow's C++ log lines (INFO, WARNING and ERROR) are hidden
# unless the user set TF_CPP_MIN_LOG_LEVEL (0 shows them all). During training and detection they
# are notices, not failures: e.g. Grappler's "Error in PredictCost() for the op: ... CropAndResize"
# for every ROI align op, oneDNN's "supports DT_BOOL only on platforms with AVX-512". Real failures
# reach Python as exceptions; Python warnings and logging (ours, Keras', TensorFlow's) are untouched.
# Set before TensorFlow reads it, so it applies when mrcnn is imported first.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from mrcnn import tf_startup as _tf_startup  # noqa: E402

_tf_startup.install()  # TensorFlow's C++ start-up lines are dropped when it is first imported
