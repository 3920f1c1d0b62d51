"""Bad input, case by case (issue 7, items 3 and 5): every odd file gets a decided answer.

Each case of :data:`CASES` generates its files in a temporary ISIC-layout dataset (whose own path
has a space and a non-ASCII letter) next to one good pair, then checks the decided behaviour

* through the dataset scan (``lesionkit.dataset_scan.scan_dataset``): usable pair, or skipped and
  counted under a named problem;
* for a usable pair, through ``LesionDataset.load_image``/``load_mask`` (what training and
  evaluate read): converted to uint8 RGB and a bool mask of the same size, aligned;
* through predict's reading (``prediction_files.list_images``, ``drop_duplicate_ids``, ``read_image``):
  read, skipped and counted, or for a single file one ``lesions: error:`` line and exit 2.

The decided answers are the README's "Bad input: what happens" table. One module fixture builds a
tiny random-weights model once, in a subprocess, and runs ``lesions.main`` predict over a folder
holding all the bad files together, then over 300 small images to check that memory stays flat.
The last test prints how many cases were tried.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import lesions
from lesionkit import dataset_scan, prediction_files
from mrcnn import imaging
from mrcnn.imaging import ImageReadError, read_image
from tests.cli_helpers import REPO, TINY

IMG = "ISIC2018_Task1-2_Training_Input"
GT = "ISIC2018_Task1_Training_GroundTruth"
ID = "case"
H, W = 48, 64  # small images: multiples of 8 and 16, so JPEG blocks do not blur the edges
BIG = (6000, 8000)  # (height, width) of the very large image


# -------------------------------------------------------------------------------------------
# Generators


def image_file(root: Path, name: str) -> Path:
    path = root / IMG / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def mask_file(root: Path, image_id: str = ID, ext: str = ".png") -> Path:
    path = root / GT / f"{image_id}_segmentation{ext}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def lesion(h: int = H, w: int = W) -> np.ndarray:
    """Bool mask: a block in the upper left (not symmetric, so a rotation shows)."""
    m = np.zeros((h, w), bool)
    m[h // 6: h // 2, w // 8: w // 2] = True
    return m


def photo(mask: np.ndarray) -> np.ndarray:
    """uint8 RGB 'dermoscopy': light skin, dark lesion where ``mask``."""
    img = np.empty(mask.shape + (3,), np.uint8)
    img[...] = (220, 170, 150)
    img[mask] = (70, 40, 30)
    return img


def write_mask(root: Path, mask: np.ndarray, image_id: str = ID, ext: str = ".png", **save) -> Path:
    path = mask_file(root, image_id, ext)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path, **save)
    return path


def write_pair(root: Path, image_id: str = ID, ext: str = ".jpg") -> Path:
    path = image_file(root, image_id + ext)
    Image.fromarray(photo(lesion())).save(path, quality=95)
    write_mask(root, lesion(), image_id)
    return path


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def exif_rotated_jpeg(root: Path) -> Path:
    """A JPEG stored sideways (W x H) with EXIF orientation 6: displayed as H x W (portrait)."""
    shown = lesion(W, H)  # the displayed (portrait) lesion
    stored = np.rot90(shown, k=1)  # orientation 6 = rotate the stored pixels 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    path = image_file(root, f"{ID}.jpg")
    Image.fromarray(photo(stored)).save(path, quality=95, exif=exif.tobytes())
    return path


# -------------------------------------------------------------------------------------------
# The cases


@dataclass
class Case:
    make: Callable[[Path], Path | None]  # writes the files; returns the image file predict would read
    scan: str  # "pair", or the ScanReport list it is counted in
    answer: str  # the decided behaviour (README table)
    check: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None  # (image, masks, ids)
    predict: str | None = None  # "ok", "unreadable", "duplicate", "non-image"; None: no image to predict
    shape: tuple[int, int] = (H, W)  # (h, w) the image reads as


def same_lesion(image: np.ndarray, masks: np.ndarray, ids: np.ndarray) -> None:
    """One instance, aligned with the dark lesion in the image (< 1 % of the pixels disagree)."""
    assert masks.shape[-1] == 1 and ids.tolist() == [1]
    dark = image.mean(axis=-1) < 128
    assert np.mean(dark != masks[..., 0]) < 0.01, "image and mask are not aligned"


def made(fn: Callable[[Path], object], image: Callable[[Path], Path | None]) -> Callable[[Path], Path | None]:
    def make(root: Path) -> Path | None:
        fn(root)
        return image(root)
    return make


def jpg(root: Path) -> Path:
    return root / IMG / f"{ID}.jpg"


def png(root: Path) -> Path:
    return root / IMG / f"{ID}.png"


def _gray(root):
    write_mask(root, lesion())
    Image.fromarray(photo(lesion())).convert("L").save(image_file(root, f"{ID}.jpg"), quality=95)


def _check_gray(image, masks, ids):
    assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])
    same_lesion(image, masks, ids)


def _rgba(root):
    write_mask(root, lesion())
    rgba = np.dstack([photo(lesion()), np.full((H, W), 7, np.uint8)])  # almost transparent: alpha dropped
    Image.fromarray(rgba, "RGBA").save(image_file(root, f"{ID}.png"))


def _check_rgba(image, masks, ids):
    assert np.array_equal(image, photo(lesion()))
    same_lesion(image, masks, ids)


def _png16(root):
    write_mask(root, lesion())
    grey = np.where(lesion(), 50, 200).astype(np.uint16) * 257  # 16-bit values of 8-bit 50 / 200
    Image.fromarray(grey).save(image_file(root, f"{ID}.png"))


def _check_png16(image, masks, ids):
    assert set(np.unique(image).tolist()) == {50, 200}
    same_lesion(image, masks, ids)


def _mask16(root):
    write_pair(root)
    Image.fromarray(lesion().astype(np.uint16) * 65535).save(mask_file(root))


def _cmyk(root):
    write_mask(root, lesion())
    Image.fromarray(photo(lesion())).convert("CMYK").save(image_file(root, f"{ID}.jpg"), quality=95)


def _exif(root):
    exif_rotated_jpeg(root)
    write_mask(root, lesion(W, H))  # ISIC: the mask is drawn in the displayed orientation


def _exif_mask_tag(root):
    exif_rotated_jpeg(root)
    exif = Image.Exif()
    exif[0x0112] = 6  # a tool copied the photo's EXIF into the mask: it must not rotate the mask
    write_mask(root, lesion(W, H), exif=exif.tobytes())


def _exif_mask_raw(root):
    exif_rotated_jpeg(root)
    write_mask(root, np.rot90(lesion(W, H), k=1))  # mask drawn on the stored (sideways) pixels


def _big(root):
    path = image_file(root, f"{ID}.jpg")
    Image.new("RGB", BIG[::-1], (220, 170, 150)).save(path, quality=80)
    Image.new("L", BIG[::-1], 0).save(mask_file(root))


def _check_big(image, masks, ids):
    assert image.shape == BIG + (3,) and masks.shape[:2] == BIG
    assert masks.shape[-1] == 0 and ids.size == 0


def _size_mismatch(root):
    write_pair(root)
    write_mask(root, lesion(H - 8, W))


def disc(h: int = H, w: int = W) -> np.ndarray:
    """Bool mask: an off-centre disc (curved edges: JPEG cannot store it exactly)."""
    y, x = np.mgrid[:h, :w]
    return (y - h / 3) ** 2 + (x - w / 3) ** 2 < (h / 4) ** 2


def _jpeg_mask(root):
    Image.fromarray(photo(disc())).save(image_file(root, f"{ID}.jpg"), quality=95)
    path = write_mask(root, disc(), ext=".jpg", quality=60)
    with Image.open(path) as im:
        values = np.unique(np.asarray(im))
    assert len(values) > 2  # really not binary: compression noise


def _empty_mask(root):
    write_pair(root)
    write_mask(root, np.zeros((H, W), bool))


def _check_empty(image, masks, ids):
    assert masks.shape == (H, W, 0) and ids.shape == (0,)


def _labels01(root):
    write_pair(root)
    Image.fromarray(lesion().astype(np.uint8)).save(mask_file(root))  # values 0/1, not 0/255


def _duplicate(root):
    write_pair(root, ext=".jpg")
    Image.fromarray(photo(lesion())).save(image_file(root, f"{ID}.png"))


def _check_duplicate_kept_first(image, masks, ids):
    same_lesion(image, masks, ids)


def _unicode(root):
    write_pair(root, image_id="lésion 1 ü")


def _not_image(root):
    write_pair(root)
    image_file(root, "notes.txt").write_text("not an image")


CASES: dict[str, Case] = {
    "zero-byte image": Case(made(lambda r: (write_pair(r), jpg(r).write_bytes(b"")), jpg), "unreadable",
                            "skipped and counted (unreadable)", predict="unreadable"),
    "zero-byte mask": Case(made(lambda r: (write_pair(r), mask_file(r).write_bytes(b"")), lambda r: None),
                           "unreadable", "skipped and counted (unreadable)"),
    "truncated JPEG": Case(made(lambda r: truncated(write_pair(r)), jpg), "unreadable",
                           "skipped and counted (unreadable)", predict="unreadable"),
    "truncated PNG image": Case(made(lambda r: truncated(write_pair(r, ext=".png")), png), "unreadable",
                                "skipped and counted (unreadable)", predict="unreadable"),
    "truncated PNG mask": Case(made(lambda r: (write_pair(r), truncated(mask_file(r))), lambda r: None),
                               "unreadable", "skipped and counted (unreadable)"),
    "text file named .jpg": Case(made(lambda r: (write_pair(r), jpg(r).write_text("hello")), jpg), "unreadable",
                                 "skipped and counted (unreadable)", predict="unreadable"),
    "grayscale JPEG": Case(made(_gray, jpg), "pair", "converted to RGB (grey copied)", _check_gray, "ok"),
    "RGBA PNG": Case(made(_rgba, png), "pair", "converted to RGB (alpha dropped)", _check_rgba, "ok"),
    "16-bit PNG image": Case(made(_png16, png), "pair", "converted to 8-bit RGB (x 255/65535)", _check_png16, "ok"),
    "16-bit PNG mask": Case(made(_mask16, jpg), "pair", "binarised (> 32896 = 128 x 257)", same_lesion, "ok"),
    "CMYK JPEG": Case(made(_cmyk, jpg), "pair", "converted to RGB", same_lesion, "ok"),
    "EXIF-rotated JPEG": Case(made(_exif, jpg), "pair", "image rotated upright; mask used as stored: aligned",
                              same_lesion, "ok", (W, H)),
    "mask with a copied EXIF tag": Case(made(_exif_mask_tag, jpg), "pair", "mask's EXIF ignored: aligned",
                                        same_lesion, "ok", (W, H)),
    "mask in the image's stored orientation": Case(made(_exif_mask_raw, jpg), "size_mismatch",
                                                   "skipped and counted (size mismatch, EXIF hint)",
                                                   predict="ok", shape=(W, H)),
    "very large image (8000x6000)": Case(made(_big, jpg), "pair", "used; the scan reads headers and a 1/8 decode",
                                         _check_big, "ok", BIG),
    "mask of a different size": Case(made(_size_mismatch, jpg), "size_mismatch",
                                     "skipped and counted (size mismatch)", predict="ok"),
    "non-binary mask (JPEG)": Case(made(_jpeg_mask, jpg), "pair", "binarised (> 128, as the ISIC scorer)", same_lesion, "ok"),
    "empty mask": Case(made(_empty_mask, jpg), "pair", "used as an image without lesion", _check_empty, "ok"),
    "0/1 label mask": Case(made(_labels01, jpg), "pair", "binarised (> 0)", same_lesion, "ok"),
    "missing mask": Case(made(lambda r: Image.fromarray(photo(lesion())).save(image_file(r, f"{ID}.jpg")), jpg),
                         "images_without_mask", "skipped and counted (no mask)", predict="ok"),
    "duplicate ids (x.jpg, x.png)": Case(made(_duplicate, png), "duplicate_ids", "first kept, others counted",
                                         _check_duplicate_kept_first, "duplicate"),
    "spaces and non-ASCII in names": Case(made(_unicode, lambda r: r / IMG / "lésion 1 ü.jpg"), "pair", "used",
                                          same_lesion, "ok"),
    "non-image file in the image folder": Case(made(_not_image, lambda r: r / IMG / "notes.txt"), "not_images",
                                               "ignored and counted", same_lesion, "non-image"),
}

TRIED: list[str] = []


class DecodeRecorder:
    """Records the pixel size of every Pillow decode (ImageFile.load) while active."""

    def __init__(self, monkeypatch):
        self.sizes: list[tuple[int, int]] = []
        original = ImageFile.ImageFile.load

        def load(im):
            out = original(im)
            self.sizes.append(im.size)
            return out

        monkeypatch.setattr(ImageFile.ImageFile, "load", load)

    def largest(self) -> int:
        return max((w * h for w, h in self.sizes), default=0)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_case(name, tmp_path, monkeypatch, capsys):
    TRIED.append(name)
    case = CASES[name]
    root = tmp_path / "data set é"
    image_id = "lésion 1 ü" if name.startswith("spaces") else ID
    image = case.make(root)
    write_pair(root, "ISIC_ok")  # one good pair, so the dataset as a whole is usable

    # 1. the scan (train, evaluate): headers and cheap checks only
    decodes = DecodeRecorder(monkeypatch)
    report = dataset_scan.scan_dataset(root)
    monkeypatch.undo()
    assert decodes.largest() <= (BIG[0] // 8) * (BIG[1] // 8), "the scan decoded a large image in full"
    ids = [p.image_id for p in report.pairs]
    assert "ISIC_ok" in ids
    if case.scan == "pair":
        assert report.problem_lines() == []
    else:
        assert len(getattr(report, case.scan)) == 1, report.to_dict()
        assert [line for line in report.problem_lines() if line.startswith("1 ")], report.problem_lines()
    usable = case.check is not None
    assert (image_id in ids) == usable, report.to_dict()
    if usable:
        dataset, = lesions.make_datasets(report, [image_id])
        loaded = dataset.load_image(0)
        masks, class_ids = dataset.load_mask(0)
        assert loaded.dtype == np.uint8 and loaded.shape == case.shape + (3,)
        assert masks.dtype == bool and masks.shape[:2] == loaded.shape[:2]
        case.check(loaded, masks, class_ids)
    if name.startswith("dup"):
        assert report.duplicate_ids == [f"{ID}.png"] and dataset.image_info[0]["path"].endswith(".jpg")
    if name == "mask in the image's stored orientation":
        assert "EXIF" in report.size_mismatch[0]

    # 2. predict's inputs
    if case.predict is None:
        return
    paths, skipped, _ = prediction_files.list_images(str(image.parent))
    paths, duplicates = prediction_files.drop_duplicate_ids(paths)
    if case.predict == "non-image":
        assert skipped == [image.name]
        return
    if case.predict == "duplicate":
        assert duplicates == [image.name] and jpg(root) in paths
        return
    assert image in paths
    if case.predict == "ok":
        got = read_image(image)
        assert got.dtype == np.uint8 and got.shape == case.shape + (3,)
        return
    with pytest.raises(ImageReadError) as info:
        read_image(image)
    assert "\n" not in str(info.value) and image.name in str(info.value)
    # a single unreadable file: one line, exit 2, before any model or output exists
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert lesions.main(["--mode", "predict", "--image", str(image), "--output", "out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lesions: error: ") and image.name in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_dataset_of_only_bad_pairs_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    root = tmp_path / "bad only"
    for name in ("zero-byte image", "truncated PNG mask", "mask of a different size"):
        sub = tmp_path / name
        CASES[name].make(sub)
        for folder in (IMG, GT):
            for f in (sub / folder).iterdir():
                (root / folder).mkdir(parents=True, exist_ok=True)
                shutil.copy(f, root / folder / f"{name[:4]}{f.name}")
    monkeypatch.chdir(tmp_path)
    assert lesions.main(["--mode", "train", "--dataset", str(root), "--weights", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable image/mask pair" in err[0] and "unreadable" in err[0], err


def test_mask_binarisation_rules(tmp_path):
    Image.fromarray(lesion().astype(np.uint8)).save(tmp_path / "labels.png")  # evaluate's truth: 0/1 too
    assert np.array_equal(imaging.read_mask(tmp_path / "labels.png"), lesion())
    assert imaging.binarize_mask(np.array([0, 1], np.uint8)).tolist() == [False, True]
    eight_bit = imaging.binarize_mask(np.array([0, 127, 128, 129, 255], np.uint8))
    assert eight_bit.tolist() == [False, False, False, True, True]  # > 128, the ISIC scorer's rule
    assert imaging.binarize_mask(np.array([0, 200, 40000], np.uint16)).tolist() == [False, False, True]
    assert imaging.binarize_mask(np.zeros(3, np.uint8)).tolist() == [False] * 3


# -------------------------------------------------------------------------------------------
# Memory: a dataset of thousands of entries is not read into memory


def test_scanning_and_loading_2000_entries_reads_no_image_in_full(tmp_path, monkeypatch):
    n = 2000
    (tmp_path / IMG).mkdir()
    (tmp_path / GT).mkdir()
    small = Image.fromarray(photo(lesion(16, 16)))
    mask = Image.fromarray(lesion(16, 16).astype(np.uint8) * 255)
    for i in range(n):
        small.save(tmp_path / IMG / f"ISIC_{i:07d}.jpg", quality=90)
        mask.save(tmp_path / GT / f"ISIC_{i:07d}_segmentation.png")
    opened: list[str] = []
    original = imaging._open_image

    def counting(path, *args, **kwargs):
        opened.append(str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(imaging, "_open_image", counting)
    decodes = DecodeRecorder(monkeypatch)
    report, train, val = lesions.scan_and_split(tmp_path, lesions.LesionConfig())
    train_set, val_set = lesions.make_datasets(report, train, val)
    assert len(report.pairs) == n and train_set.num_images + val_set.num_images == n
    assert opened == [], "scanning or building the datasets decoded an image"
    assert len(decodes.sizes) == n and decodes.largest() <= 2 * 2  # 1/8-scale JPEG checks only; PNG: CRCs
    assert not any(isinstance(v, np.ndarray) for info in train_set.image_info for v in info.values())
    train_set.load_image(0)
    train_set.load_mask(0)
    assert len(opened) == 2  # images are read when the pipeline asks, one at a time


# -------------------------------------------------------------------------------------------
# One predict run over all the bad files together, and memory over 300 images (one model)

CHILD = textwrap.dedent(r"""
    import contextlib, io, json, os, pickle, sys, time
    from pathlib import Path
    started = time.monotonic()
    work, bad, many, tiny = (Path(a) for a in sys.argv[1:5])
    measure = sys.argv[5] == "measure"
    import keras
    import numpy as np
    import lesions
    from lesionkit import prediction_run
    from mrcnn.model import MaskRCNN
    from mrcnn.weights import WeightsError

    def vm():
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: int(fields[k].split()[0]) for k in ("VmHWM", "VmRSS")}  # kB

    config = lesions.LesionConfig()
    config.load_toml(tiny)
    config.set("DETECTION_MIN_CONFIDENCE", 0.0)  # as lesions.load_inference_model: predict filters
    config.validate()
    keras.utils.set_random_seed(1)
    model = MaskRCNN("inference", config, str(work / "logs"))
    logits = model.keras_model.get_layer("mrcnn_class_logits")
    kernel, bias = logits.get_weights()
    logits.set_weights([kernel, bias + np.array([0.0, 10.0], np.float32)])  # random weights: find lesions
    run = work / "logs" / "lesion20260101T0000"
    run.mkdir(parents=True)
    checkpoint = run / "mask_rcnn_lesion_0001.h5"
    model.save_weights(str(checkpoint))
    config.save(str(run / "config.json"))

    original_load = prediction_run.load_inference_model

    def reuse_model(run_config, weights, logs):  # load_inference_model without building the model again
        if str(weights) != str(checkpoint):
            return original_load(run_config, weights, logs)  # the bad weights files below: the real loader
        model.load_weights(str(weights), by_name=True, verbose=0)
        return model

    prediction_run.load_inference_model = reuse_model
    seconds = {"build": time.monotonic() - started}
    marks = {}
    original = prediction_run.predict_images

    def measured(model, paths, out_dir, options, on_result=None):
        done = [0]
        def after(image_id, result, kept):
            done[0] += 1
            if done[0] in (1, 50, len(paths)):
                marks[done[0]] = vm()
        return original(model, paths, out_dir, options, on_result=after)

    def cli(*argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = lesions.main(list(argv))
        return {"rc": rc, "stdout": out.getvalue()[-4000:], "stderr": err.getvalue()}

    result = {"bad": cli("--mode", "predict", "--image", str(bad), "--weights", str(checkpoint),
                         "--output", str(work / "out bad é"))}
    seconds["bad"] = time.monotonic() - started - sum(seconds.values())
    if measure:
        prediction_run.predict_images = measured
        result["many"] = cli("--mode", "predict", "--image", str(many), "--weights", str(checkpoint),
                             "--output", str(work / "out many"))
        result["memory"] = marks
        seconds["many"] = time.monotonic() - started - sum(seconds.values())
    result["seconds"] = seconds

    # weights come only from Keras-2 HDF5, read by layer name: anything else is a one-line error
    tiny_model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    tiny_model.save(str(work / "model.keras"))
    tiny_model.save_weights(str(work / "k3.weights.h5"))
    fakes = {"pickle": pickle.dumps({"conv1": np.zeros(3)}), "keras": (work / "model.keras").read_bytes(),
             "random": np.random.default_rng(0).bytes(4096), "keras3_weights": (work / "k3.weights.h5").read_bytes()}
    result["weights"] = {}
    for kind, data in fakes.items():
        path = work / f"{kind}.h5"
        path.write_bytes(data)
        try:
            model.load_weights(str(path), by_name=True, verbose=0)
            result["weights"][kind] = "loaded"
        except WeightsError as exc:
            result["weights"][kind] = str(exc)
    print("RESULT " + json.dumps(result))
""")

#: Predict inputs of the table that go into the one folder (all but the very large image: it
#: would spend seconds resizing; its reading is checked above).
FOLDER_CASES = [n for n, c in CASES.items() if c.predict and not n.startswith("very large")]
N_MANY = 300


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, request) -> tuple[dict, Path, dict[str, str]]:
    """(the child's results, work folder, {case: file name in the bad folder}).

    The 300-image memory run (~40 s) happens only when its test is selected (it is ``slow``).
    """
    measure = any(item.name == "test_predict_memory_stays_flat_over_300_images" for item in request.session.items)
    work = tmp_path_factory.mktemp("predict")
    bad = work / "bad inputs é"
    bad.mkdir()
    names: dict[str, str] = {}
    for i, name in enumerate(FOLDER_CASES):
        root = work / f"case{i}"
        image = CASES[name].make(root)
        if CASES[name].predict == "duplicate":
            shutil.copy(jpg(root), bad / f"dup{jpg(root).name}")
        target = bad / (f"dup{image.name}" if CASES[name].predict == "duplicate" else f"c{i:02d} {image.name}")
        shutil.copy(image, target)
        names[name] = target.name
    many = work / "many"
    many.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_MANY if measure else 0):
        img = photo(lesion(64, 80)).astype(np.int16) + rng.integers(-20, 20, (64, 80, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(many / f"ISIC_{i:07d}.jpg", quality=90)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(work), str(bad), str(many), str(TINY),
                           "measure" if measure else "no"], cwd=work,
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):]), work, names


def test_predict_over_a_folder_of_all_bad_files(predicted):
    result, work, names = predicted
    bad = result["bad"]
    assert bad["rc"] == 0, bad
    assert "Traceback" not in bad["stderr"] + bad["stdout"]
    summary = json.loads((work / "out bad é" / "summary.json").read_text())
    by_kind: dict[str, list[str]] = {}
    for name, file_name in names.items():
        by_kind.setdefault(CASES[name].predict, []).append(file_name)
    assert sorted(summary["unreadable"]) == sorted(by_kind["unreadable"])
    assert summary["skipped_non_images"] == by_kind["non-image"]
    assert summary["duplicate_ids"] == by_kind["duplicate"]
    records = {r["id"]: r for r in summary["images"]}
    assert sorted(records) == sorted(Path(f).stem for f in by_kind["ok"] + ["dupcase.jpg"])
    for name, file_name in names.items():
        if CASES[name].predict != "ok":
            continue
        record = records[Path(file_name).stem]
        assert (record["height"], record["width"]) == CASES[name].shape, name
        with Image.open(work / "out bad é" / record["files"]["segmentation"]) as im:
            assert im.mode == "L" and im.size == CASES[name].shape[::-1]
    n_unreadable = len(by_kind["unreadable"])
    assert f"Skipped 1 non-image and {n_unreadable} unreadable file(s) and 1 duplicate id(s)." in bad["stdout"]


@pytest.mark.slow
def test_predict_memory_stays_flat_over_300_images(predicted):
    """Peak RSS may not grow from image 50 to image 300 (measured 2026-11: 0.0 MB, peak ~1.09 GB)."""
    result, _, _ = predicted
    assert result["many"]["rc"] == 0, result["many"]
    marks = {int(k): v for k, v in result["memory"].items()}
    assert sorted(marks) == [1, 50, N_MANY]
    growth_mb = (marks[N_MANY]["VmHWM"] - marks[50]["VmHWM"]) / 1024
    print(f"\npredict {N_MANY} images ({result['seconds']['many']:.0f} s): peak RSS (VmHWM) "
          + ", ".join(f"{marks[k]['VmHWM'] / 1024:.0f} MB after {k}" for k in sorted(marks))
          + f"; RSS {marks[50]['VmRSS'] / 1024:.0f} -> {marks[N_MANY]['VmRSS'] / 1024:.0f} MB;"
          f" growth of the peak from image 50 to {N_MANY}: {growth_mb:.1f} MB")
    assert growth_mb < 20, marks


@pytest.mark.parametrize("kind", ["pickle", "keras", "random", "keras3_weights"])
def test_weights_other_than_keras2_hdf5_are_one_line_errors(predicted, kind):
    message = predicted[0]["weights"][kind]
    assert message != "loaded" and "\n" not in message and f"{kind}.h5" in message
    expected = "not a Keras-2 weight file" if kind == "keras3_weights" else "not an HDF5 file"
    assert expected in message


def test_zz_every_case_was_tried(request, capsys):
    collected = [item for item in request.session.items if getattr(item, "originalname", "") == "test_bad_input_case"]
    with capsys.disabled():
        print(f"\nbad-input cases tried: {len(TRIED)} of {len(CASES)} in the table")
    assert len(TRIED) == len(collected)
    if len(collected) == len(CASES):
        assert sorted(TRIED) == sorted(CASES)
