"""Dataset base class (Matterport ``utils.Dataset`` API).

Subclass it, register classes with ``add_class`` and images with ``add_image`` (paths only;
nothing is read at construction), call ``prepare()``, and override ``load_mask`` (and
``image_reference`` for nicer messages). Internal class id 0 is always background "BG".
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mrcnn.imaging import read_image

logger = logging.getLogger(__name__)


class Dataset:
    """Registry of classes and images from one or more sources (e.g. "isic", "coco")."""

    #: Whether :meth:`load_image` applies a photo's EXIF orientation tag. False (Matterport's
    #: behaviour: ``skimage.io.imread`` returns the pixels as stored) keeps masks drawn from stored
    #: pixel coordinates (e.g. the balloon sample's VIA polygons) aligned with the image. Set it to
    #: True in a subclass whose masks are drawn on the displayed, upright image (the CLI's
    #: ``LesionDataset``: ISIC masks). Part of the preprocessing cache's key.
    APPLY_EXIF_ORIENTATION: bool = False

    def __init__(self, class_map: Any = None) -> None:
        # class_map is accepted for Matterport compatibility and ignored.
        self._image_ids: Any = []
        self.image_info: list[dict[str, Any]] = []
        self.class_info: list[dict[str, Any]] = [{"source": "", "id": 0, "name": "BG"}]
        self.source_class_ids: dict[str, list[int]] = {}

    # ---- registration ---------------------------------------------------------------------

    def add_class(self, source: str, class_id: int, class_name: str) -> None:
        """Register class ``class_id`` of ``source``; a repeated (source, id) pair is ignored."""
        assert "." not in source, "Source name cannot contain a dot"
        for info in self.class_info:
            if info["source"] == source and info["id"] == class_id:
                return
        self.class_info.append({"source": source, "id": class_id, "name": class_name})

    def add_image(self, source: str, image_id: Any, path: Any, **kwargs: Any) -> None:
        """Register an image; extra kwargs (width, height, mask paths, ...) are stored with it."""
        info = {"id": image_id, "source": source, "path": path}
        info.update(kwargs)
        self.image_info.append(info)

    def image_reference(self, image_id: int) -> str:
        """A human-readable link to the image (override in subclasses); "" by default."""
        return ""

    # ---- preparation ----------------------------------------------------------------------

    def prepare(self, class_map: Any = None) -> None:
        """Build the id maps; call after all add_class/add_image calls."""
        self.num_classes = len(self.class_info)
        self.class_ids = np.arange(self.num_classes)
        self.class_names = [_short_name(c["name"]) for c in self.class_info]
        self.num_images = len(self.image_info)
        self._image_ids = np.arange(self.num_images)
        self.class_from_source_map = {f"{c['source']}.{c['id']}": i for i, c in enumerate(self.class_info)}
        self.image_from_source_map = {f"{info['source']}.{info['id']}": i for i, info in enumerate(self.image_info)}
        self.sources = list({c["source"] for c in self.class_info})
        self.source_class_ids = {}
        for source in self.sources:
            ids = [i for i, c in enumerate(self.class_info) if i == 0 or source == c["source"]]
            self.source_class_ids[source] = ids

    def map_source_class_id(self, source_class_id: str) -> int:
        """Internal class id of a "source.id" string, e.g. "coco.12"."""
        return self.class_from_source_map[source_class_id]

    def get_source_class_id(self, class_id: int, source: str) -> Any:
        """The source's own id of internal class ``class_id`` (asserts the source matches)."""
        info = self.class_info[class_id]
        assert info["source"] == source, f"class {class_id} belongs to {info['source']!r}, not {source!r}"
        return info["id"]

    @property
    def image_ids(self) -> Any:
        """Internal image ids (0..num_images-1) after prepare()."""
        return self._image_ids

    def source_image_link(self, image_id: int) -> Any:
        """The stored path (or URL) of an image."""
        return self.image_info[image_id]["path"]

    # ---- loading --------------------------------------------------------------------------

    def load_image(self, image_id: int) -> np.ndarray:
        """Read image ``image_id`` -> uint8 [H, W, 3] RGB (gray converted, alpha dropped).

        The EXIF orientation is applied only with ``APPLY_EXIF_ORIENTATION`` (default: pixels as stored).
        """
        return read_image(self.image_info[image_id]["path"], upright=self.APPLY_EXIF_ORIENTATION)

    def load_mask(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Instance masks bool [H, W, N] and int32 internal class ids [N]; override this.

        The base implementation logs a warning and returns empty arrays.
        """
        logger.warning("You are using the default load_mask(), maybe you need to define your own one.")
        return np.empty([0, 0, 0]), np.empty([0], np.int32)


def _short_name(name: str) -> str:
    """Class name up to its first comma ("person, human" -> "person")."""
    return ",".join(name.split(",")[:1])
