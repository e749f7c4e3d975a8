"""The Gradio demo (tools/app.py), served for real and queried over HTTP with gradio_client."""

import contextlib
import json
import os
import re
import runpy
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import gradio_client
import numpy as np
import pytest
from PIL import Image

from conftest import DATA, REPO, load_photo
from model.segmenter import ReasonSegmenter
from test_inference import scripted
from utils.gradio_app import _json_file, build_demo, examples_in, handle_request
from utils.distributed import free_port
from utils.inference import NO_MASK_MESSAGE, InferenceSession, InputError


@contextlib.contextmanager
def serve(model_dir, scratch, *flags):
    """tools/app.py on a free port with the given model and flags, until the block ends; its URL.

    Its Gradio files go to ``scratch/gradio``, its log to ``scratch/server.log``; it is stopped
    with SIGTERM, as a service manager stops it.
    """
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
        [sys.executable, "tools/app.py", "--version", str(model_dir), "--port", str(port), "--max_new_tokens", "8", *flags],
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
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def server(tiny_segmenter_dir, tmp_path_factory):
    """tools/app.py with the tiny model (1 MB upload limit); its URL and scratch folder."""
    scratch = tmp_path_factory.mktemp("app")
    with serve(tiny_segmenter_dir("qwen2_5_vl"), scratch, "--max_file_size", "1mb") as url:
        yield url, scratch


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


def test_a_long_upload_name_is_answered(server):
    """The answer's file is named after the upload: a name longer than a file name may be (200
    "é" are 400 bytes) used to fail after the model had run ("Something went wrong"). Sent as a
    browser sends it (gradio_client would cut the name to 200 bytes itself)."""
    import httpx

    url, name = server[0], "é" * 200 + ".jpg"
    with open(DATA / "dog.jpg", "rb") as file:
        upload = httpx.post(url + "gradio_api/upload", files={"files": (name, file, "image/jpeg")}, timeout=30)
    payload = {"path": upload.json()[0], "orig_name": name, "meta": {"_type": "gradio.FileData"}}
    call = httpx.post(url + "gradio_api/call/segment", json={"data": [payload, "Where is the dog?"]}, timeout=30)
    events = httpx.get(url + f"gradio_api/call/segment/{call.json()['event_id']}", timeout=120).text
    assert "event: complete" in events, events
    download = json.loads(events.split("event: complete\ndata: ")[1].splitlines()[0])[4]
    assert re.fullmatch(r"é{50}_[0-9a-f]{12}\.json", os.path.basename(download["path"])), download
    record = httpx.get(download["url"], timeout=30).json()
    assert record["image"] == name  # the person's name, whole


def test_answer_file_names_are_safe_and_unique(tmp_path):
    for name, stem in [
        ("é" * 200 + ".jpg", "é" * 50),
        ("my photo (1).final.jpg", "my_photo_1_.final"),
        ("../../etc/passwd", "passwd"),
        ("..", "image"),
        ("", "image"),
        ("?!.png", "image"),
    ]:
        path = _json_file({"a": 1}, name, tmp_path)
        assert re.fullmatch(rf"{re.escape(stem)}_[0-9a-f]{{12}}\.json", os.path.basename(path)), (name, path)
        assert os.path.dirname(path) == str(tmp_path)
    assert _json_file({"a": 1}, "dog.jpg", tmp_path) != _json_file({"a": 2}, "dog.jpg", tmp_path)
    assert len(os.listdir(tmp_path)) == 8


def test_an_answer_that_cannot_be_serialised_leaves_no_file(tmp_path):
    with pytest.raises(TypeError):
        _json_file({"score": object()}, "dog.jpg", tmp_path)
    assert os.listdir(tmp_path) == []


def test_an_answer_left_by_a_request_failing_in_gradio_goes_on_the_cache_schedule(tiny_segmenter_dir, tmp_path, monkeypatch):
    """When Gradio fails on an output after the handler wrote the answer's JSON (here writing the
    overlay PNG), Gradio never takes the JSON over for its clean-up: it used to stay until the
    server stopped. It now goes once it is --cache_max_age old, as every other file of a request.
    Run through Gradio's own request processing, no server."""
    import asyncio

    import gradio as gr

    cache = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    (cache / "upload").mkdir(parents=True)
    Image.fromarray(load_photo("dog.jpg")).save(cache / "upload" / "dog.jpg")
    payload = {"path": str(cache / "upload" / "dog.jpg"), "orig_name": "dog.jpg", "meta": {"_type": "gradio.FileData"}}
    session = InferenceSession(ReasonSegmenter.from_pretrained(tiny_segmenter_dir("qwen2_5_vl")).eval(), max_new_tokens=4)
    demo = build_demo(session, "tiny", [], cache_max_age=600)
    segment = next(fn for fn in demo.fns.values() if fn.api_name == "segment")

    def request():
        return asyncio.run(demo.process_api(segment, [payload, "Where is the dog?"]))

    def answers():
        return sorted(cache.rglob("*.json"))

    def disk_full(self, value):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(gr.Image, "postprocess", disk_full)
        with pytest.raises(Exception, match="No space left on device"):
            request()
    [orphan] = answers()
    assert not any(str(orphan) in files for files in demo.temp_file_sets)  # Gradio will not delete it
    download = request()["data"][4]
    assert answers() == sorted([orphan, Path(download["path"])])  # younger than the age: kept
    an_hour_ago = time.time() - 3600
    os.utime(orphan, (an_hour_ago, an_hour_ago))
    latest = request()["data"][4]
    assert answers() == sorted([Path(download["path"]), Path(latest["path"])])
    assert json.loads(Path(latest["path"]).read_text(encoding="utf-8"))["image"] == "dog.jpg"
    assert any(latest["path"] in files for files in demo.temp_file_sets)
    session.close()


def test_the_answers_clean_up_never_fails_a_request(tmp_path, caplog):
    """A temp cleaner removed the answers' folder: it is made again, with a warning at most."""
    from utils.gradio_app import remove_files_older_than

    folder = tmp_path / "answers"
    remove_files_older_than(folder, 60)
    assert folder.is_dir()
    (folder / "old.json").write_text("{}")
    os.utime(folder / "old.json", (time.time() - 120, time.time() - 120))
    (folder / "new.json").write_text("{}")
    remove_files_older_than(folder, 60)
    assert sorted(p.name for p in folder.iterdir()) == ["new.json"]


def test_request_files_are_deleted_when_old_and_at_exit(tiny_segmenter_dir, tmp_path):
    """--cache_max_age: a request's upload, overlay and JSON answer go once they are that old,
    and the answers' folder when the server stops; before, a public demo kept them all for good."""
    cache = tmp_path / "gradio"

    def files():
        return {path for path in cache.rglob("*") if path.is_file()}

    # A photograph of its own: an upload equal to an example is the example's cached copy.
    Image.fromarray(load_photo("dog.jpg")[:, ::-1]).save(tmp_path / "holiday.jpg")
    with serve(tiny_segmenter_dir("qwen2_5_vl"), tmp_path, "--cache_max_age", "3") as url:
        client = gradio_client.Client(url, verbose=False, download_files=str(tmp_path / "downloads"), analytics_enabled=False)
        before = files()  # the examples, which stay
        check_result(segment(client, tmp_path / "holiday.jpg", "Where is the dog?"), (534, 800, 3))
        made = files() - before
        assert {path.suffix for path in made} == {".jpg", ".png", ".json"}, made  # upload, overlay, answer
        assert [path.parent.name[:8] for path in made if path.suffix == ".json"] == ["answers_"], made
        deadline = time.time() + 10  # 3 s old, swept every second
        while made & files() and time.time() < deadline:
            time.sleep(0.5)
        assert not made & files(), made & files()
        assert before <= files()
    assert not list(cache.glob("answers_*"))  # the answers' folder went with the server


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


def test_handler_draws_one_mask_and_box_per_seg(tiny_segmenter_dir, monkeypatch, tmp_path):
    model = ReasonSegmenter.from_pretrained(tiny_segmenter_dir("qwen2_5_vl")).eval()
    session = InferenceSession(model, max_new_tokens=24)
    ask = session.ask
    monkeypatch.setattr(session, "ask", lambda image, prompt: ask(image, prompt, logits_processor=scripted(model, "Sure, the dog [SEG] and [SEG].")))
    payload = {"path": str(DATA / "dog.jpg"), "orig_name": "dog.jpg"}
    overlay, text, boxes, status, record = handle_request(session, payload, "Where is the dog and the grass?")
    download = _json_file(record, record["image"], tmp_path)
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
