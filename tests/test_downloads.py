"""mrcnn.downloads against a local HTTP server: good file, truncated download, wrong checksum, no network."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest

from mrcnn import downloads
from mrcnn.downloads import DownloadError, WeightFile, fetch_weights

PAYLOAD = bytes(range(256)) * 400  # 100 KiB
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """/good.h5: the payload; /truncated.h5: announces the payload, sends 1000 bytes, hangs up."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path not in ("/good.h5", "/truncated.h5"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD if self.path == "/good.h5" else PAYLOAD[:1000])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> str:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    """A localhost URL nobody listens on (connection refused: what 'no network' looks like fast)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/mask_rcnn_coco.h5"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("digest", [SHA256, MD5], ids=["sha256", "md5"])
def test_a_good_download_is_verified_and_renamed_into_place(server, tmp_path, digest, capsys):
    target = tmp_path / "weights" / "w.h5"
    assert fetch_weights(WeightFile("w.h5", f"{server}/good.h5", digest), target) == target
    assert target.read_bytes() == PAYLOAD
    assert leftovers(target.parent) == ["w.h5"]  # the staging folder is gone
    assert f"{server}/good.h5" in capsys.readouterr().out  # says what it downloads (Keras' progress bar too)
    # present: used as it is, nothing fetched (this URL would fail)
    assert fetch_weights(WeightFile("w.h5", closed_port_url(), digest), target) == target


def test_a_truncated_download_leaves_nothing(server, tmp_path):
    target = tmp_path / "weights" / "w.h5"
    with pytest.raises(DownloadError) as err:
        fetch_weights(WeightFile("w.h5", f"{server}/truncated.h5", SHA256), target)
    message = str(err.value)
    assert f"{server}/truncated.h5" in message and f"put it at {target}" in message and "\n" not in message
    assert not target.exists() and leftovers(tmp_path) == []  # no partial file, no weights/ folder made by us


def test_a_wrong_checksum_leaves_nothing(server, tmp_path):
    (tmp_path / "weights").mkdir()
    target = tmp_path / "weights" / "w.h5"
    with pytest.raises(DownloadError, match="hash"):
        fetch_weights(WeightFile("w.h5", f"{server}/good.h5", "0" * 64), target)
    assert leftovers(tmp_path / "weights") == []  # the folder was there before: it stays, empty


def test_no_network_is_one_line_naming_url_and_place(tmp_path):
    url = closed_port_url()
    target = tmp_path / "a" / "weights" / "mask_rcnn_coco.h5"
    with pytest.raises(DownloadError) as err:
        fetch_weights(WeightFile("mask_rcnn_coco.h5", url, SHA256), target)
    assert str(err.value).startswith(f"could not download {url} (")
    assert str(err.value).endswith(f"put it at {target}")
    assert leftovers(tmp_path) == []


def test_matterports_entry_points_download(server, tmp_path, monkeypatch):
    from mrcnn import utils
    from mrcnn.model import MaskRCNN

    monkeypatch.setattr(downloads, "COCO", WeightFile("mask_rcnn_coco.h5", f"{server}/good.h5", SHA256))
    monkeypatch.setattr(downloads, "IMAGENET_RESNET50", WeightFile("resnet50.h5", f"{server}/good.h5", MD5))
    monkeypatch.setattr(downloads, "WEIGHTS_DIR", tmp_path / "weights")
    coco = tmp_path / "coco" / "mask_rcnn_coco.h5"
    assert utils.download_trained_weights(str(coco), verbose=0) == str(coco) and coco.read_bytes() == PAYLOAD
    imagenet = MaskRCNN.get_imagenet_weights(None)  # Matterport's method; it uses no model state
    assert imagenet == str(tmp_path / "weights" / "resnet50.h5") and Path(imagenet).read_bytes() == PAYLOAD
