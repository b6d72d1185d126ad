"""The Videos API with the official openai client: a real `teaserve serve` process on a tiny Wan model, jobs that
outlive a killed and a gracefully stopped process, and in process: image to video, a full queue, cancellation,
deadlines, and a model that makes images."""

import base64
import io
import signal
import threading

import httpx
import openai
import pytest
from conftest import HeldServer, RunningServer, metric, pixels, png_bytes, wait_until
from PIL import Image

from teaserve.engine import AsyncEngine, decode_mp4
from teaserve.pipelines.testing import build_tiny_wan
from teaserve.server import build_app

# The SDK marks every videos method deprecated (the Sora API's end); the calls are what is tested here.
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")

FAST = {"num_inference_steps": 1, "true_cfg_scale": 1.0}
"""One step without CFG (the tiny model's defaults: 4 steps with CFG)."""
SHORT = {**FAST, "num_frames": 5}
PROMPT = "a red ball rolls"
"""One prompt throughout: after the first job, a server's prompt cache spares the text encoder."""
FPS = 8
"""The tiny models' frame rate (their folder's defaults: 16x16, 9 frames at 8 fps)."""


@pytest.fixture(scope="module")
def tiny_wan_t2v(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("tiny-wan-t2v"), kind="t2v")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module", autouse=True)
def first_process(tiny_wan_t2v, data_dir, tmp_path_factory):
    """`teaserve serve` on the tiny text-to-video model, started with the module: the in-process tests run while it
    loads. The restart test at the end of the module kills it."""
    server = HeldServer(tiny_wan_t2v, tmp_path_factory.mktemp("first"), "--data-dir", str(data_dir), held=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def served(first_process):
    return first_process.wait_ready()


def downloads(client, video_id) -> dict[str, bytes]:
    return {
        variant: client.videos.download_content(video_id, variant=variant).content
        for variant in ("video", "thumbnail", "spritesheet")
    }


def listed_ids(client) -> list[str]:
    return [video.id for video in client.videos.list(limit=100)]


def held_engine(engine) -> threading.Event:
    """Hold every transformer call of `engine` until the returned event is set (set by the test's end)."""
    release = threading.Event()

    def hold(module, args):
        release.wait(timeout=120)

    engine.model.pipeline.transformer.register_forward_pre_hook(hold)
    return release


# -- in process, while the first process loads: the queue, cancellation, deadlines, image to video ----------------
def test_a_full_queue_is_429_and_deleting_cancels(tiny_wan_t2v, tmp_path):
    engine = AsyncEngine(str(tiny_wan_t2v), max_queue_size=1)
    release = held_engine(engine)
    try:
        with RunningServer(build_app(engine, data_dir=tmp_path)) as server:
            client = server.client()
            running = client.videos.create(prompt=PROMPT, extra_body=FAST)
            wait_until(lambda: engine.num_running == 1)
            waiting = client.videos.create(prompt=PROMPT, extra_body=FAST)
            with pytest.raises(openai.RateLimitError) as error:
                client.videos.create(prompt=PROMPT, extra_body=FAST)
            assert int(error.value.response.headers["retry-after"]) >= 1
            assert error.value.body["code"] == "queue_full"
            assert listed_ids(client) == [waiting.id, running.id]  # the refused job was never created

            shown = client.videos.with_raw_response.retrieve(running.id)
            assert shown.parse().status == "in_progress" and int(shown.headers["openai-poll-after-ms"]) > 0
            assert client.videos.retrieve(waiting.id).status == "queued"
            with pytest.raises(openai.ConflictError) as error:
                client.videos.download_content(running.id)
            assert error.value.body["code"] == "video_not_ready"

            assert client.videos.delete(waiting.id).deleted and client.videos.delete(running.id).deleted
            release.set()
            wait_until(lambda: not engine.num_running and not engine.queue_depth)
            assert listed_ids(client) == [] and list((tmp_path / "videos").iterdir()) == []
            assert metric(server, "teaserve_video_jobs_total", status="cancelled") == 2
    finally:
        release.set()


def test_a_job_past_its_deadline_fails_with_request_timeout(tiny_wan_t2v, tmp_path):
    engine = AsyncEngine(str(tiny_wan_t2v), request_timeout=1.0)
    release = held_engine(engine)
    try:
        with RunningServer(build_app(engine, data_dir=tmp_path)) as server:
            client = server.client()
            video = client.videos.create(prompt=PROMPT, extra_body=FAST)

            def past_the_deadline():  # it runs from the job's start: the held job has run longer, or failed already
                return (engine.seconds_since_progress or 0) > 1.5 or client.videos.retrieve(video.id).status == "failed"

            wait_until(past_the_deadline)
            release.set()
            failed = client.videos.poll(video.id)
            assert failed.status == "failed" and failed.error.code == "request_timeout"
            assert video.id in failed.error.message
            with pytest.raises(openai.ConflictError) as error:
                client.videos.download_content(video.id)
            assert error.value.body["code"] == "video_failed"
            assert metric(server, "teaserve_video_jobs_total", status="failed") == 1
    finally:
        release.set()


def test_image_to_video(tmp_path_factory, tmp_path):
    engine = AsyncEngine(str(build_tiny_wan(tmp_path_factory.mktemp("tiny-wan-i2v"), kind="i2v")))
    reference = png_bytes(Image.new("RGB", (32, 32), (200, 30, 30)))
    data_url = "data:image/png;base64," + base64.b64encode(reference).decode()
    with RunningServer(build_app(engine, data_dir=tmp_path)) as server:
        client = server.client()
        uploaded = client.videos.create_and_poll(
            prompt=PROMPT, input_reference=("ref.png", reference, "image/png"), size="32x32", extra_body=SHORT
        )
        assert uploaded.status == "completed", uploaded.error
        frames, _ = decode_mp4(client.videos.download_content(uploaded.id).content)
        assert len(frames) == 5 and frames[0].size == (32, 32)
        # the SDK's typed {"image_url"} fails client-side; through extra_body it is the form field input_reference[...]
        inline = client.videos.create_and_poll(
            prompt=PROMPT, size="32x32", extra_body={**SHORT, "input_reference": {"image_url": data_url}}
        )
        assert inline.status == "completed" and inline.model_extra["num_frames"] == 5
        # a JSON body: its reference is decoded when the job is created (validation happens there)
        as_json = httpx.post(
            f"{server.url}/v1/videos", json={"prompt": PROMPT, "input_reference": {"image_url": data_url}, **SHORT}
        )
        assert as_json.status_code == 200 and client.videos.delete(as_json.json()["id"]).deleted

        before = listed_ids(client)
        for reference_field, message in [
            ({"image_url": "https://example.com/cat.png"}, "fetches no URL"),
            ({"image_url": "/etc/passwd"}, "fetches no URL"),
            ({"image_url": "data:image/png;base64,@@@"}, "not valid base64"),
            ({"image_url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}, "not a supported"),
            ({"file_id": "file-123"}, "file_id is not supported"),
        ]:
            with pytest.raises(openai.BadRequestError) as error:
                client.videos.create(prompt=PROMPT, extra_body={"input_reference": reference_field})
            assert error.value.body["param"] == "input_reference" and message in error.value.body["message"]
        with pytest.raises(openai.BadRequestError) as error:
            client.videos.create(prompt=PROMPT)
        assert "send its first frame as input_reference" in error.value.body["message"]
        assert listed_ids(client) == before


def test_a_model_that_makes_images_refuses_videos_and_stores_nothing(tiny_qwen, tmp_path):
    engine = AsyncEngine(str(tiny_qwen))
    with RunningServer(build_app(engine, data_dir=tmp_path / "data")) as server:
        with pytest.raises(openai.BadRequestError) as error:
            server.client().videos.create(prompt=PROMPT)
        message = error.value.body["message"]
        assert "makes images" in message and "/v1/images/generations" in message
        assert httpx.get(f"{server.url}/v1/videos").status_code == 400
    assert not (tmp_path / "data").exists()


# -- text to video through a real process ------------------------------------------------------------------------
def test_text_to_video_with_the_sdk(served):
    client = served.client()
    video = client.videos.create_and_poll(prompt=PROMPT, seconds="1", size="32x16", extra_body={**FAST, "seed": 3})
    assert video.status == "completed" and video.progress == 100 and video.error is None
    assert (video.seconds, video.size, video.model) == ("1", "32x16", "teaserve/tiny-wan-t2v")
    assert video.completed_at >= video.created_at and video.expires_at is None
    assert video.model_extra["num_frames"] == FPS + 1 and video.model_extra["seed"] == 3

    mp4 = client.videos.download_content(video.id)
    assert mp4.response.headers["content-type"] == "video/mp4"
    frames, rate = decode_mp4(mp4.content)
    assert len(frames) == 9 and {frame.size for frame in frames} == {(32, 16)} and rate == FPS
    thumbnail = client.videos.download_content(video.id, variant="thumbnail")
    assert thumbnail.response.headers["content-type"] == "image/png"
    first = Image.open(io.BytesIO(thumbnail.content))
    assert first.format == "PNG" and first.size == (32, 16)
    assert abs(pixels(first).mean() - pixels(frames[0]).mean()) < 8  # the first frame (the MP4's is lossy)
    sheet = client.videos.download_content(video.id, variant="spritesheet")
    assert sheet.response.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(sheet.content)).size == (3 * 32, 3 * 16)  # the 9 frames in a 3x3 grid
    assert metric(served, "teaserve_video_jobs_total", status="completed") >= 1


def test_a_json_body_with_its_own_frame_rate(served):
    client = served.client()
    created = httpx.post(f"{served.url}/v1/videos", json={"prompt": PROMPT, "seconds": 1, "fps": 4, **FAST})
    assert created.status_code == 200 and created.json()["status"] in ("queued", "in_progress")
    assert int(created.headers["openai-poll-after-ms"]) > 0
    video = client.videos.poll(created.json()["id"])
    frames, rate = decode_mp4(client.videos.download_content(video.id).content)
    assert (len(frames), rate, video.seconds, video.size) == (5, 4, "1", "16x16")  # the model's default size


def test_list_retrieve_and_delete(served, data_dir):
    client = served.client()
    ids = [client.videos.create(prompt=PROMPT, seconds="4", extra_body=SHORT).id for _ in range(3)]
    for video_id in ids:
        video = client.videos.poll(video_id)
        assert video.status == "completed" and video.seconds == "0.625"  # num_frames wins: 5 frames at 8 fps
    assert len(decode_mp4(client.videos.download_content(ids[0]).content)[0]) == 5
    newest_first = listed_ids(client)
    assert newest_first == sorted(newest_first, reverse=True) and newest_first[:3] == ids[::-1]

    page = httpx.get(f"{served.url}/v1/videos", params={"limit": 2, "order": "asc", "after": ids[0]}).json()
    assert [video["id"] for video in page["data"]] == ids[1:] and page["object"] == "list"
    assert (page["first_id"], page["last_id"]) == (ids[1], ids[2])
    paged = list(client.videos.list(limit=1))  # the SDK follows last_id while has_more
    assert [video.id for video in paged] == newest_first
    assert client.videos.retrieve(ids[1]).model_dump() == next(
        video.model_dump() for video in paged if video.id == ids[1]
    )

    deleted = client.videos.delete(ids[1])
    assert (deleted.id, deleted.deleted, deleted.object) == (ids[1], True, "video.deleted")
    assert not (data_dir / "videos" / ids[1]).exists() and (data_dir / "videos" / ids[0] / "video.mp4").exists()
    for call in (client.videos.retrieve, client.videos.download_content, client.videos.delete):
        with pytest.raises(openai.NotFoundError) as error:
            call(ids[1])
        assert error.value.body["code"] == "video_not_found"
    after_deleted = httpx.get(f"{served.url}/v1/videos", params={"order": "asc", "after": ids[1]}).json()
    assert [video["id"] for video in after_deleted["data"]][:1] == [ids[2]]  # a cursor outlives its video


@pytest.mark.parametrize(
    ("fields", "status", "param", "message"),
    [
        ({"seconds": "0"}, 400, "seconds", "above 0"),
        ({"seconds": "soon"}, 400, "seconds", "number of seconds"),
        ({"seconds": "600"}, 400, "seconds", "600 seconds at 8 fps make 4801 frames"),
        ({"size": "big"}, 400, "size", "WIDTHxHEIGHT"),
        ({"size": "24x24"}, 400, "size", "multiple of 16"),
        ({"size": "8192x8192"}, 400, "size", "max_image_pixels"),
        ({"num_frames": "10"}, 400, "num_frames", "9 or 13"),
        ({"fps": "0"}, 400, "fps", "fps"),
        ({"num_inference_steps": "many"}, 400, "num_inference_steps", "integer"),
        ({"flavour": "sweet"}, 400, "flavour", "unknown parameter"),
        ({"model": "sora-2"}, 404, "model", "teaserve/tiny-wan-t2v"),
        ({"prompt": None, "seconds": "1"}, 400, "prompt", "missing required parameter"),
    ],
)
def test_bad_requests_name_their_parameter_and_store_nothing(served, fields, status, param, message):
    body = {name: value for name, value in {"prompt": "x", **fields}.items() if value is not None}
    before = listed_ids(served.client())
    # multipart with every value a string, as the SDK sends it
    response = httpx.post(f"{served.url}/v1/videos", files={name: (None, value) for name, value in body.items()})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert listed_ids(served.client()) == before


def test_an_input_reference_on_a_text_to_video_model_is_400(served):
    with pytest.raises(openai.BadRequestError) as error:
        served.client().videos.create(
            prompt=PROMPT, input_reference=("ref.png", png_bytes(Image.new("RGB", (16, 16))), "image/png")
        )
    assert error.value.body["param"] == "input_reference" and "text only" in error.value.body["message"]


def test_image_endpoints_on_a_video_model_point_to_the_videos_api(served):
    with pytest.raises(openai.BadRequestError) as error:
        served.client().images.generate(prompt=PROMPT)
    assert error.value.body["param"] == "model" and "POST /v1/videos" in error.value.body["message"]


def test_content_errors(served):
    unknown = httpx.get(f"{served.url}/v1/videos/video_{'0' * 32}/content", params={"variant": "gif"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "variant"
    for missing in ("video_" + "0" * 32, "video_x"):
        response = httpx.get(f"{served.url}/v1/videos/{missing}/content")
        assert response.status_code == 404 and response.json()["error"]["code"] == "video_not_found"
    assert httpx.get(f"{served.url}/v1/videos/..%2Fvideos.db/content").status_code == 404


# -- restarts ----------------------------------------------------------------------------------------------------
def test_jobs_outlive_a_killed_process_and_a_graceful_restart(served, tiny_wan_t2v, data_dir):
    client = served.client()
    done = client.videos.create_and_poll(prompt=PROMPT, extra_body={**SHORT, "seed": 1})
    files = downloads(client, done.id)
    served.hold.touch()
    running = client.videos.create(prompt=PROMPT, extra_body=SHORT)
    wait_until(lambda: client.videos.retrieve(running.id).status == "in_progress")
    queued = client.videos.create(prompt=PROMPT, extra_body=SHORT)
    served.process.send_signal(signal.SIGKILL)
    served.process.wait(timeout=30)

    # The next servers on the folder run in this process: what they check needs no new process.
    engine = AsyncEngine(str(tiny_wan_t2v))
    release = held_engine(engine)
    second = RunningServer(build_app(engine, data_dir=data_dir))
    try:
        with second:
            client = second.client()
            for video_id in (running.id, queued.id):
                shown = client.videos.with_raw_response.retrieve(video_id)
                video = shown.parse()
                assert video.status == "failed" and video.error.code == "server_restarted"
                assert "submit it again" in video.error.message and "openai-poll-after-ms" not in shown.headers
            assert client.videos.retrieve(done.id).status == "completed" and downloads(client, done.id) == files
            assert {done.id, running.id, queued.id} <= set(listed_ids(client))
            assert metric(second, "teaserve_video_jobs_total", status="failed") == 2

            # SIGTERM drains: the running job may finish and is saved, the queued one fails at once
            finishing = client.videos.create(prompt=PROMPT, extra_body=SHORT)
            wait_until(lambda: client.videos.retrieve(finishing.id).status == "in_progress")
            refused = client.videos.create(prompt=PROMPT, extra_body=SHORT)
            second.server.handle_exit(signal.SIGTERM, None)
            refused_shown = client.videos.poll(refused.id)
            assert refused_shown.status == "failed" and refused_shown.error.code == "shutting_down"
            release.set()
            second.thread.join(timeout=60)
            assert not second.thread.is_alive()
    finally:
        release.set()

    with RunningServer(build_app(AsyncEngine(str(tiny_wan_t2v)), data_dir=data_dir)) as third:
        client = third.client()
        finished = client.videos.retrieve(finishing.id)
        assert finished.status == "completed", finished.error
        assert len(decode_mp4(client.videos.download_content(finishing.id).content)[0]) == 5
        assert client.videos.retrieve(refused.id).error.code == "shutting_down"
        assert downloads(client, done.id) == files
        assert metric(third, "teaserve_video_jobs_total", status="failed") == 0  # nothing was left unfinished
