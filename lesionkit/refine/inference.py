"""Refining detections: :class:`Refiner` (the U-Net on crops) and :class:`RefinedDetector`.

:class:`RefinedDetector` wraps an inference ``MaskRCNN``: its ``detect`` returns the detector's
result dicts with the mask of each kept instance (score >= ``min_confidence``, else the best one;
only the best with ``top1``: the rule of :func:`lesionkit.prediction_files.choose_instances`)
replaced by the refiner's, pasted back at full resolution, and a ``refined`` bool [N] entry. So
prediction, evaluation and TTA (:func:`lesionkit.tta.detect_tta` runs both stages on each
flipped or rotated copy) use it without change. A refined mask that comes out empty keeps the
detector's mask (``refined`` False for that instance). Boxes (``rois``) stay the detector's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lesionkit.prediction_files import choose_instances
from lesionkit.refine import geometry
from lesionkit.refine.checkpoints import newest_refiner
from lesionkit.refine.crops import model_input
from lesionkit.refine.settings import RefineSettings


class Refiner:
    """The trained U-Net of a run: crops boxes of an image, segments them, pastes them back."""

    def __init__(self, settings: RefineSettings, weights: Path) -> None:
        from lesionkit.refine.training import load_refiner_weights
        from lesionkit.refine.unet import build_unet

        self.settings = settings
        self.path = Path(weights)
        self.net = build_unet(settings)
        load_refiner_weights(self.net, self.path)

    def probabilities(self, image: np.ndarray, boxes: np.ndarray,
                      coarse: np.ndarray | None = None) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
        """Per box (y1, x1, y2, x2) of ``image`` [H, W, 3]: (its window, lesion probability [S, S]).

        ``coarse``: bool [H, W, N], the detector's masks (the fourth channel with REFINE_MASK_CHANNEL).
        """
        s = self.settings
        windows = [geometry.crop_window(box, s.margin) for box in np.asarray(boxes).reshape(-1, 4)]
        if not windows:
            return []
        inputs = []
        for i, window in enumerate(windows):
            crop = geometry.crop_resize(image, window, s.crop_size)
            mask = geometry.crop_resize(coarse[..., i], window, s.crop_size) >= 0.5 if s.mask_channel else None
            inputs.append(model_input(crop, mask))
        logits = np.asarray(self.net.predict_on_batch(np.stack(inputs)), dtype=np.float32)[..., 0]
        probs = 1.0 / (1.0 + np.exp(-logits))
        return list(zip(windows, probs, strict=True))

    def masks(self, image: np.ndarray, boxes: np.ndarray, coarse: np.ndarray | None = None) -> np.ndarray:
        """bool [H, W, N]: the refined mask of each box at full resolution (REFINE_MASK_THRESHOLD)."""
        shape = image.shape[:2]
        out = [geometry.probability_mask(geometry.paste_back(prob, window, shape), self.settings.threshold)
               for window, prob in self.probabilities(image, boxes, coarse)]
        return np.stack(out, axis=-1) if out else np.zeros(shape + (0,), dtype=bool)


class RefinedDetector:
    """An inference ``MaskRCNN`` whose ``detect`` results carry refined masks (see module docstring).

    Every other attribute (``config``, ``keras_model``, ...) is the detector's.
    """

    def __init__(self, detector: Any, refiner: Refiner, min_confidence: float, top1: bool = False) -> None:
        self.detector = detector
        self.refiner = refiner
        self.min_confidence = float(min_confidence)
        self.top1 = bool(top1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["detector"], name)

    def detect(self, images: list[np.ndarray], verbose: int = 0) -> list[dict]:
        """``MaskRCNN.detect`` then refinement of each image's kept instances."""
        results = self.detector.detect(images, verbose=verbose)
        return [self.refine_result(image, result) for image, result in zip(images, results, strict=True)]

    def refine_result(self, image: np.ndarray, result: dict) -> dict:
        """``result`` with the kept instances' masks refined and ``refined`` bool [N] added."""
        scores = np.asarray(result["scores"]).reshape(-1)
        shape = image.shape[:2]
        masks = np.array(np.asarray(result["masks"], dtype=bool).reshape(shape + (scores.size,)))
        refined = np.zeros(scores.size, dtype=bool)
        indices, _ = choose_instances(scores, self.min_confidence)
        indices = indices[:1] if self.top1 else indices
        if indices:
            boxes = np.asarray(result["rois"]).reshape(-1, 4)[indices]
            new = self.refiner.masks(image, boxes, masks[..., indices])
            for k, i in enumerate(indices):
                if new[..., k].any():
                    masks[..., i] = new[..., k]
                    refined[i] = True
        return dict(result, masks=masks, refined=refined)


def attach_refiner(model: Any, config: Any, weights: Path, enabled: bool, min_confidence: float,
                   top1: bool = False) -> Any:
    """``model`` wrapped in a :class:`RefinedDetector` when the run of ``weights`` has a refiner
    checkpoint, REFINE is on and ``enabled`` (``--no-refine`` turns it off); else ``model``. Says which."""
    path = newest_refiner(Path(weights).parent)
    settings = RefineSettings.from_config(config)
    if path is None:
        print("Refiner: none in this run (detector masks only)")
        return model
    if not enabled or not settings.enabled:
        print(f"Refiner: off ({'--no-refine' if not enabled else 'REFINE = false'}; {path.name} not used)")
        return model
    refiner = Refiner(settings, path)
    print(f"Refiner: {path} (U-Net {settings.crop_size} px, depth {settings.depth}, width {settings.width},"
          f" margin {settings.margin})", flush=True)
    return RefinedDetector(model, refiner, min_confidence, top1)
