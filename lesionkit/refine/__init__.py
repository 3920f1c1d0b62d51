"""Crop-and-refine stage: a U-Net that re-segments each detected lesion from a crop of the original image.

The ISIC 2018 Task 1 winner's recipe: detect the lesion with Mask R-CNN, cut its box out of the
original image with a margin, resize the crop to the U-Net's input size, segment it, and paste
the crop's probability map back at full resolution (no 28x28 mask-head round trip).

* :mod:`lesionkit.refine.settings`: the ``REFINE_*`` config keys as a validated dataclass;
* :mod:`lesionkit.refine.geometry`: crop windows (y1, x1, y2, x2), crop + resize, paste-back;
* :mod:`lesionkit.refine.unet`: the Keras U-Net;
* :mod:`lesionkit.refine.crops`: training crops from true boxes with random margins and shifts;
* :mod:`lesionkit.refine.checkpoints`: ``refiner_NNNN.weights.h5`` files in a run folder;
* :mod:`lesionkit.refine.training`: the training stage (resumable, checkpointed atomically);
* :mod:`lesionkit.refine.inference`: :class:`Refiner` and the :class:`RefinedDetector` wrapper
  that gives ``detect`` results with refined masks (so predict, evaluate and TTA use it unchanged).

Only :mod:`settings`, :mod:`geometry` and :mod:`checkpoints` are light (no TensorFlow).
"""
