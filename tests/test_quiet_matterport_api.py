"""Training and detecting through the Matterport API is as quiet as the CLI (issue 18, point 5).

A fresh Python process imports ``mrcnn`` first, trains a tiny model for one epoch through
``MaskRCNN(mode="training").train`` and detects with it, with no ``TF_CPP_MIN_LOG_LEVEL`` set:
stderr must hold none of TensorFlow's C++ lines (start-up notices, oneDNN, Grappler's
``Error in PredictCost() ... CropAndResize``), while our own Python warnings still show.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cli_helpers import TF_NOISE

REPO = Path(__file__).resolve().parents[1]

CHILD = r'''
import sys
import warnings

import mrcnn.model as modellib  # first: before TensorFlow is imported
from factories import make_config
from helpers import array_dataset, lesion_pairs

try:
    import imgaug.augmenters as iaa   # Matterport's call, when a NumPy-2 imgaug fork is installed
    augmentation, kind = iaa.Sequential([iaa.Fliplr(0.5), iaa.Affine(rotate=(-10, 10))]), "imgaug"
except Exception:
    from mrcnn.input_pipeline import default_augmentation
    augmentation, kind = default_augmentation(1), "albumentations"

logs = sys.argv[1]
train, val = array_dataset(lesion_pairs(3, 64, seed=1)), array_dataset(lesion_pairs(2, 64, seed=2))
model = modellib.MaskRCNN(mode="training", config=make_config("tiny", NAME="quiet"), model_dir=logs)
model.train(train, val, learning_rate=0.001, epochs=1, layers="heads", augmentation=augmentation)
model = modellib.MaskRCNN(mode="inference", config=make_config("tiny", NAME="quiet"), model_dir=logs)
model.load_weights(model.find_last(), by_name=True)
result = model.detect([train.load_image(0)], verbose=0)[0]
warnings.warn("our own warning stays visible")
print("DETECTED", kind, sorted(result), flush=True)
'''


def test_matterport_api_train_and_detect_print_no_tensorflow_cpp_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "PYTHONWARNINGS",
                                                           "MRCNN_TF_STARTUP_LINES")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "logs")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DETECTED" in proc.stdout and "'masks'" in proc.stdout, proc.stdout[-2000:]
    noise = [line for line in proc.stderr.splitlines()
             if TF_NOISE.match(line) or any(s in line for s in ("PredictCost", "oneDNN", "absl::", "cpu_feature"))]
    assert noise == [], "\n".join(noise[:5])
    assert "UserWarning: our own warning stays visible" in proc.stderr  # Python warnings are not hidden


def test_a_log_level_the_user_set_is_kept():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", "import os, mrcnn; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "0", out.stderr
    env.pop("TF_CPP_MIN_LOG_LEVEL")
    out = subprocess.run([sys.executable, "-c", "import os, mrcnn; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "3", out.stderr
