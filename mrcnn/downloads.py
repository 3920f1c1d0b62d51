"""Pretrained weight files by download: Matterport's COCO weights and the ResNet-50 ImageNet weights.

:func:`fetch_weights` downloads with ``keras.utils.get_file`` (progress bar, checksum check) into a
temporary folder next to the target, then renames the verified file into place: an interrupted
or corrupt download never leaves a file under the target name. Offline, on an HTTP error, a
truncated download or a checksum mismatch it raises :class:`DownloadError`, one line naming the
URL and where to put the file by hand.

Checksums: the publishers give none; the digests below are the MD5 sums published with these
exact files elsewhere (Keras' own ResNet-50 loader; the NVIDIA TensorRT Mask R-CNN sample). A
SHA-256 could not be computed here (no network to fetch the files): ``file_hash`` accepts either.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mrcnn.errors import UserError


class DownloadError(UserError):
    """A weight file could not be downloaded or failed its checksum (one line: URL and target path)."""


@dataclass(frozen=True)
class WeightFile:
    """A downloadable weight file: its file name, URL and expected digest (MD5 or SHA-256 hex)."""

    name: str
    url: str
    file_hash: str


COCO = WeightFile("mask_rcnn_coco.h5",
                  "https://github.com/matterport/Mask_RCNN/releases/download/v2.0/mask_rcnn_coco.h5",
                  "e98aaff6f99e307b5e2a8a3ff741a518")
IMAGENET_RESNET50 = WeightFile("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                               "https://github.com/fchollet/deep-learning-models/releases/download/v0.2/"
                               "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                               "a268eb855778b3df3c7506639542a6af")
#: Seconds without data after which a download fails.
STALL_TIMEOUT_S = 60.0
#: Where the toolkit keeps downloaded weights (relative to the folder you run from).
WEIGHTS_DIR = Path("weights")


def fetch_weights(spec: WeightFile, path: str | os.PathLike | None = None, verbose: int = 1) -> Path:
    """``path`` (default ``weights/<spec.name>``) holding the verified file: downloaded when missing.

    An existing file is used as it is. Raises :class:`DownloadError` when the download fails.
    """
    path = Path(path) if path is not None else WEIGHTS_DIR / spec.name
    if path.is_file():
        return path
    import keras

    created = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=path.parent))
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(STALL_TIMEOUT_S)  # a stalled connection fails instead of hanging
    try:
        if verbose:
            print(f"Downloading {spec.url} -> {path}", flush=True)
        got = keras.utils.get_file(fname=spec.name, origin=spec.url, file_hash=spec.file_hash,
                                   cache_dir=str(staging), cache_subdir="")
        os.replace(got, path)
    except Exception as exc:  # noqa: BLE001 - every failure gets the same one-line answer
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DownloadError(f"could not download {spec.url} ({reason}); download it on a connected machine and"
                            f" put it at {path}") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
        shutil.rmtree(staging, ignore_errors=True)
        if not path.is_file():
            for folder in created:  # innermost first; only the ones this call made, and only if empty
                with contextlib.suppress(OSError):
                    folder.rmdir()
    return path
