"""The Gradio demo (tools/app.py), served for real and queried over HTTP with gradio_client."""

import json
import os
import runpy
import subprocess
import sys
import threading
import time
import urllib.request

import gradio_client
import numpy as np
import pytest
from PIL import Image

from conftest import DATA, REPO, load_photo
from model.segmenter import ReasonSegmenter
from test_inference import scripted
from utils.gradio_app import examples_in, handle_request
from utils.distributed import free_port
from utils.inference import NO_MASK_MESSAGE, InferenceSession, InputError



@pytest.fixture(scope="module")
def server(tiny_segmenter_dir, tmp_path_factory):
    """tools/app.py on a free port with the tiny model (1 MB upload limit); its URL."""
    scratch = tmp_path_factory.mktemp("app")
    port = free_port()
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        GRADIO_TEMP_DIR=str(scratch / "gradio"),
        GRADIO_ANALYTICS_ENABLED="False",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    log = open(scratch / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "tools/app.py", "--version", str(tiny_segmenter_dir("qwen2_5_vl")), "--port", str(port),
         "--max_new_tokens", "8", "--max_file_size", "1mb"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the app exited ({process.returncode}):\n{(scratch / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the app did not start:\n{(scratch / 'server.log').read_text()}")
            time.sleep(0.5)
        yield url, scratch
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def client(server):
    url, scratch = server
    return gradio_client.Client(url, verbose=False, download_files=str(scratch / "downloads"), analytics_enabled=False)


def segment(client, image, prompt):
    return client.predict(gradio_client.handle_file(str(image)), prompt, api_name="/segment")


def check_result(result, image_shape):
    overlay, text, boxes, status, download = result
    assert np.array(Image.open(overlay)).shape == image_shape
    assert isinstance(text, str) and isinstance(boxes, list)
    assert len(boxes) == text.count("[SEG]")
    record = json.loads(open(download, encoding="utf-8").read())  # the answer as JSON, for download
    assert record["text"] == text and (record["height"], record["width"]) == image_shape[:2]
    assert [obj["bbox_2d"] for obj in record["objects"]] == [box["bbox_2d"] for box in boxes]
    masks = NO_MASK_MESSAGE if not boxes else f"{len(boxes)} mask{'s' if len(boxes) > 1 else ''}"
    assert status.startswith(masks) and status.endswith(" image tokens")


def test_a_request_over_http(client, server):
    check_result(segment(client, DATA / "dog.jpg", "Where is the dog?"), (534, 800, 3))
    log = (server[1] / "server.log").read_text()
    assert f"Running on local URL:  {server[0].rstrip('/')}" in log  # 127.0.0.1 by default


def test_bad_input_is_a_message_in_the_page(client, tmp_path):
    AppError = gradio_client.exceptions.AppError
    with pytest.raises(AppError, match="the request is empty"):
        segment(client, DATA / "dog.jpg", "   ")
    (tmp_path / "holiday.jpg").write_text("not a photograph")
    with pytest.raises(AppError, match=r"holiday\.jpg is not an image file that can be read") as error:
        segment(client, tmp_path / "holiday.jpg", "Where is the dog?")
    assert "/gradio/" not in str(error.value)  # the person's file name, not the server's path
    # The server is still answering.
    check_result(segment(client, DATA / "truck.jpg", "Where is the wheel?"), (1200, 1800, 3))


def test_a_path_that_was_not_uploaded_is_refused(server):
    """A payload naming a server file directly (no upload, no file metadata for Gradio to check)
    must not be read: the app would show any image of the server, and say which paths exist."""
    import httpx

    for path in (str(DATA / "dog.jpg"), "/etc/passwd", "/etc/nonexistent.jpg"):
        call = httpx.post(server[0] + "gradio_api/call/segment", json={"data": [{"path": path}, "Where?"]}, timeout=30)
        event_id = call.json()["event_id"]
        events = httpx.get(server[0] + f"gradio_api/call/segment/{event_id}", timeout=120).text
        assert "event: error" in events and "event: complete" not in events, events
        assert "was not uploaded" in events and "does not exist" not in events, events


def test_uploads_over_the_size_limit_are_refused(server, tmp_path):
    import httpx

    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    assert (tmp_path / "noise.png").stat().st_size > 1_000_000
    with open(tmp_path / "noise.png", "rb") as file:
        response = httpx.post(server[0] + "gradio_api/upload", files={"files": ("noise.png", file, "image/png")}, timeout=30)
    assert response.status_code == 413


def test_concurrent_users_are_queued_not_crashed(server):
    url, scratch = server
    results, errors = [], []

    def user(index):  # each person has their own browser (client and download folder)
        try:
            client = gradio_client.Client(url, verbose=False, download_files=str(scratch / f"user{index}"), analytics_enabled=False)
            results.append(segment(client, DATA / "dog.jpg", f"Where is the dog? ({index})"))
        except Exception as err:  # noqa: BLE001 - collected and reported below
            errors.append(err)

    threads = [threading.Thread(target=user, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [], errors
    assert len(results) == 3
    for result in results:
        check_result(result, (534, 800, 3))


def test_missing_model_directory_is_a_message(tmp_path, monkeypatch):
    """tools/app.py exits with a one-line message (run in-process: the check is the same)."""
    monkeypatch.setattr(sys, "argv", ["tools/app.py", "--version", str(tmp_path / "no_model")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "tools" / "app.py"), run_name="__main__")
    assert exit_info.value.code == f"error: model directory {tmp_path / 'no_model'} does not exist"


def test_handler_draws_one_mask_and_box_per_seg(tiny_segmenter_dir, monkeypatch):
    model = ReasonSegmenter.from_pretrained(tiny_segmenter_dir("qwen2_5_vl")).eval()
    session = InferenceSession(model, max_new_tokens=24)
    ask = session.ask
    monkeypatch.setattr(session, "ask", lambda image, prompt: ask(image, prompt, logits_processor=scripted(model, "Sure, the dog [SEG] and [SEG].")))
    payload = {"path": str(DATA / "dog.jpg"), "orig_name": "dog.jpg"}
    overlay, text, boxes, status, download = handle_request(session, payload, "Where is the dog and the grass?")
    assert text == "Sure, the dog [SEG] and [SEG]." and status == "2 masks; 28 image tokens"
    assert [b["mask"] for b in boxes] == [0, 1] and overlay.shape == (534, 800, 3)
    assert [b["label"] for b in boxes] == ["the dog", None] and all("bbox_2d" in b and "score" in b for b in boxes)
    record = json.loads(open(download, encoding="utf-8").read())
    assert record["image"] == "dog.jpg" and record["prompt"] == "Where is the dog and the grass?"
    assert [obj["label"] for obj in record["objects"]] == ["the dog", None] and download.endswith(".json")
    assert not np.array_equal(overlay, load_photo("dog.jpg"))
    with pytest.raises(InputError, match="no image"):
        handle_request(session, None, "Where?")
    session.close()


def test_bundled_examples_exist():
    examples = examples_in(REPO / "tools" / "examples")
    assert len(examples) == 5
    for path, prompt in examples:
        assert os.path.isfile(path) and prompt
    assert (REPO / "tools" / "examples" / "README.md").is_file()
