"""Tests for mrcnn.visualize: headless import, Matterport API smoke tests, PNG outputs and sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mrcnn import visualize

REPO_ROOT = Path(__file__).resolve().parents[1]


def _png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def _no_temp_files(folder):
    return not [p for p in Path(folder).rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def sample():
    """A 60x80 image with two instances (boxes y1, x1, y2, x2)."""
    image = np.full((60, 80, 3), 180, np.uint8)
    masks = np.zeros((60, 80, 2), bool)
    masks[10:30, 10:40, 0] = True
    masks[35:55, 50:75, 1] = True
    boxes = np.array([[10, 10, 30, 40], [35, 50, 55, 75]], np.int32)
    return image, masks, boxes, np.array([1, 1]), np.array([0.97, 0.61])


def test_import_without_display_or_ipython():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND", "WAYLAND_DISPLAY")}
    code = ("import sys, matplotlib, mrcnn.visualize; "
            "assert matplotlib.get_backend().lower() == 'agg', matplotlib.get_backend(); "
            "assert 'IPython' not in sys.modules; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_random_colors_apply_mask_draw_box():
    colors = visualize.random_colors(5)
    assert len(colors) == 5 and all(0 <= c <= 1 for rgb in colors for c in rgb)
    assert all(max(rgb) == pytest.approx(0.7) for rgb in visualize.random_colors(3, bright=False))
    image = np.full((4, 4, 3), 100, np.uint8)
    mask = np.zeros((4, 4), np.uint8)
    mask[1, 1] = 1
    out = visualize.apply_mask(image, mask, (1.0, 0.0, 0.0), alpha=0.5)
    assert out is image and tuple(image[1, 1]) == (177, 50, 50) and tuple(image[0, 0]) == (100, 100, 100)
    canvas = visualize.draw_box(np.zeros((10, 10, 3), np.uint8), (2, 3, 7, 8), (255, 0, 0))
    assert canvas[2, 5, 0] == 255 and canvas[5, 3, 0] == 255 and canvas[5, 5, 0] == 0


def test_draw_overlay(sample):
    image, masks, boxes, _, scores = sample
    out = visualize.draw_overlay(image, masks, boxes, scores)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out, image) and np.array_equal(image, np.full_like(image, 180))
    assert tuple(out[20, 10]) == (0, 255, 0)  # outline on the left edge of instance 0
    union = visualize.draw_overlay(image, masks.any(axis=2))
    assert union.shape == image.shape
    nothing = visualize.draw_overlay(image, np.zeros((60, 80, 0), bool), np.zeros((0, 4)), np.zeros(0))
    assert np.array_equal(nothing, image)
    grey = visualize.draw_overlay(image[..., 0], masks[..., 0])
    assert grey.shape == (60, 80, 3)


def test_save_instances_and_display_instances(sample, tmp_path):
    image, masks, boxes, class_ids, scores = sample
    path = visualize.save_instances(image, boxes, masks, class_ids, ["BG", "lesion"], scores, tmp_path / "inst.png")
    assert _png_size(path) == (80, 60)
    visualize.display_instances(image, boxes, masks, class_ids, ["BG", "lesion"], scores, figsize=(4, 3),
                                save_path=tmp_path / "display.png")
    assert _png_size(tmp_path / "display.png") == (400, 300)
    visualize.display_instances(image, np.zeros((0, 4)), np.zeros((60, 80, 0)), np.zeros(0, int), ["BG"],
                                figsize=(2, 2), save_path=tmp_path / "empty.png")
    assert (tmp_path / "empty.png").is_file()
    assert _no_temp_files(tmp_path)


def test_training_curves_draw_each_row_at_its_epoch_number(tmp_path):
    """training.csv numbers epochs 1.. (the checkpoint number); the plot must not shift them by one."""
    (tmp_path / "training.csv").write_text("epoch,loss\n1,2.0\n2,1.5\n3,1.2\n")
    log = visualize._read_log(tmp_path / "training.csv")
    epochs, values = visualize.curve_points(log, "loss")
    assert epochs.tolist() == [1, 2, 3] and values.tolist() == [2.0, 1.5, 1.2]
    epochs, values = visualize.curve_points(log, "val_loss")
    assert epochs.tolist() == [1, 2, 3] and np.isnan(values).all()


def test_matterport_plots_save(sample, tmp_path):
    image, masks, boxes, class_ids, scores = sample
    names = ["BG", "lesion"]
    visualize.display_differences(image, boxes, class_ids, masks, boxes[::-1], class_ids, scores, masks[..., ::-1],
                                  names, save_path=tmp_path / "diff.png")
    visualize.display_top_masks(image, masks, class_ids, names, save_path=tmp_path / "top.png")
    visualize.plot_precision_recall(0.5, np.array([1, 1, 0.5, 0]), np.array([0, 0.5, 0.5, 1]),
                                    save_path=tmp_path / "pr.png")
    visualize.plot_overlaps(class_ids, class_ids, scores, np.array([[0.9, 0.0], [0.1, 0.7]]), names,
                            save_path=tmp_path / "overlaps.png")
    visualize.draw_boxes(image, boxes=boxes, refined_boxes=boxes + 1, masks=masks, captions=["a", "b"],
                         visibilities=[2, 1], save_path=tmp_path / "boxes.png")
    visualize.draw_rois(image, boxes, boxes, np.ones((2, 28, 28), np.float32), class_ids, names,
                        save_path=tmp_path / "rois.png")
    visualize.display_images([image, masks[..., 0]], titles=["image", "mask"], cols=2, save_path=tmp_path / "imgs.png")
    for name in ("diff", "top", "pr", "overlaps", "boxes", "rois", "imgs"):
        assert _png_size(tmp_path / f"{name}.png")[0] > 0
    assert _no_temp_files(tmp_path)


def test_display_table_and_weight_stats(capsys):
    text = visualize.display_table([["name", "value"], ["jaccard", "0.80"]])
    assert text.splitlines() == ["name     value", "jaccard  0.80"]

    class Weight:
        def __init__(self, path, values):
            self.path, self.values = path, values

        def __array__(self, dtype=None, copy=None):
            return self.values

    class Layer:
        weights = [Weight("conv/kernel", np.ones((3, 3))), Weight("conv/bias", np.array([0.0, 1.0]))]

    class Model:
        layers = [Layer()]

    stats = visualize.display_weight_stats(Model())
    assert "conv/kernel  *** dead?" in stats and "conv/bias" in stats and "(3, 3)" in stats
    assert "WEIGHT NAME" in capsys.readouterr().out


LOG = """epoch,loss,mrcnn_bbox_loss,mrcnn_class_loss,mrcnn_mask_loss,rpn_bbox_loss,rpn_class_loss,val_loss,val_mrcnn_bbox_loss,val_mrcnn_class_loss,val_mrcnn_mask_loss,val_rpn_bbox_loss,val_rpn_class_loss
0,3.1,0.9,0.5,0.6,0.8,0.3,3.0,0.8,0.5,0.6,0.8,0.3
1,2.5,0.7,0.4,0.5,0.6,0.3,2.6,0.7,0.4,0.5,0.7,0.3
2,2.1,0.6,0.3,0.4,0.5,0.3,2.4,0.6,0.4,0.5,0.6,0.3
"""


def test_plot_training_curves(tmp_path):
    (tmp_path / "log.csv").write_text(LOG)
    out = visualize.plot_training_curves(tmp_path / "log.csv", tmp_path / "plots" / "curves.png")
    assert _png_size(out) == (1200, 700)
    # Training only (no val_ columns), one epoch repeated after a resume.
    (tmp_path / "train.csv").write_text("epoch,loss,rpn_class_loss\n0,2.0,0.4\n1,1.5,0.3\n1,1.4,0.3\n")
    assert visualize._read_log(tmp_path / "train.csv")[1]["loss"] == 1.4
    assert _png_size(visualize.plot_training_curves(tmp_path / "train.csv", tmp_path / "t.png")) == (1200, 700)
    (tmp_path / "empty.csv").write_text("epoch,loss\n")
    with pytest.raises(ValueError):
        visualize.plot_training_curves(tmp_path / "empty.csv", tmp_path / "e.png")
    assert _no_temp_files(tmp_path)


def test_save_evaluation_grid(sample, tmp_path):
    image, masks, *_ = sample
    truth = masks.any(axis=2)
    rows = [(image, truth, masks[..., :1], "ISIC_0000000 J=0.51"),
            (image, np.where(truth, 255, 0).astype(np.uint8), None, "no prediction"),
            {"image": image[..., 0], "truth": truth, "pred": truth, "title": "perfect, grey image"}]
    out = visualize.save_evaluation_grid(rows, tmp_path / "grid.png")
    assert _png_size(out) == (900, 900)
    out4 = visualize.save_evaluation_grid(rows[:1], tmp_path / "grid4.png", ncols=4)
    assert _png_size(out4) == (1200, 300)
    with pytest.raises(ValueError):
        visualize.save_evaluation_grid(rows, tmp_path / "bad.png", ncols=5)
    assert _no_temp_files(tmp_path)
