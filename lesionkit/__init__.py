"""lesionkit: the skin-lesion application built on :mod:`mrcnn` (Matterport's API).

``mrcnn/`` is the Mask R-CNN library (model, training, weights); ``lesionkit/`` is what the
``lesions.py`` command line does with it: dataset folders, prediction files, ISIC metrics,
evaluation runs, TTA, k-fold, and the synthetic demo data. It is not named ``lesions`` because
a package of that name would shadow ``lesions.py``.
"""
