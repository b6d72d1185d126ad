"""The video job store on its own: ids, pages, atomic results, recovery after a crash, one server per folder."""

import pytest

from teaserve.server.videos.store import (
    VIDEO_ID,
    DataDirInUseError,
    VideoRecord,
    VideoStore,
    new_video_id,
)

FILES = {"video.mp4": b"mp4 bytes", "thumbnail.png": b"png bytes", "spritesheet.jpg": b"jpeg bytes"}


def record(status="queued") -> VideoRecord:
    return VideoRecord(
        id=new_video_id(),
        model="tiny",
        status=status,
        prompt="a cat",
        seconds="1",
        size="16x16",
        num_frames=9,
        fps=8,
        seed=0,
        progress=0,
        created_at=0,
    )


@pytest.fixture
def store(tmp_path):
    store = VideoStore(tmp_path)
    yield store
    store.close()


def test_ids_sort_by_creation_and_never_name_other_paths(store):
    ids = [new_video_id() for _ in range(50)]
    assert ids == sorted(ids) and len(set(ids)) == 50 and all(VIDEO_ID.fullmatch(video_id) for video_id in ids)
    for bad in ("../videos.db", "video_" + "0" * 31 + "/", "", "video_" + "G" * 32):
        with pytest.raises(ValueError):
            store.folder(bad)


def test_pages_follow_creation_order_and_a_cursor_outlives_its_job(store):
    records = [record() for _ in range(5)]
    for each in records:
        store.insert(each)
    ids = [each.id for each in records]
    page, more = store.page(after=None, limit=2, order="desc")
    assert [each.id for each in page] == ids[:-3:-1] and more
    page, more = store.page(after=ids[2], limit=10, order="asc")
    assert [each.id for each in page] == ids[3:] and not more
    assert store.delete(ids[2]) == records[2] and store.get(ids[2]) is None and store.delete(ids[2]) is None
    page, _ = store.page(after=ids[2], limit=10, order="desc")
    assert [each.id for each in page] == ids[1::-1]


def test_results_are_written_before_the_job_is_completed_and_never_for_a_deleted_job(store):
    kept, deleted = record(), record()
    store.insert(kept)
    store.insert(deleted)
    store.mark_in_progress(kept.id)
    assert store.get(kept.id).status == "in_progress"
    assert store.complete(kept.id, FILES)
    finished = store.get(kept.id)
    assert (finished.status, finished.progress) == ("completed", 100) and finished.completed_at is not None
    assert sorted(path.name for path in store.folder(kept.id).iterdir()) == sorted(FILES)  # no temporary file left
    with store.open_file(kept.id, "video.mp4") as file:
        assert file.read() == FILES["video.mp4"]
    assert not store.fail(kept.id, "late", "a completed job stays completed", 50)

    store.delete(deleted.id)
    assert not store.complete(deleted.id, FILES) and not store.folder(deleted.id).exists()
    assert not store.fail(deleted.id, "x", "y", 0) and store.open_file(deleted.id, "video.mp4") is None


def test_a_restart_fails_unfinished_jobs_and_removes_what_no_completed_job_owns(tmp_path):
    store = VideoStore(tmp_path)
    queued, running, completed, failed = record(), record(), record(), record()
    for each in (queued, running, completed, failed):
        store.insert(each)
    store.mark_in_progress(running.id)
    store.complete(completed.id, FILES)
    store.fail(failed.id, "generation_failed", "it failed", 40)
    half_written = store.folder(running.id)
    half_written.mkdir()
    (half_written / ".video.mp4.tmp").write_bytes(b"half")  # the process died while writing
    orphan = store.folder(new_video_id())  # a deleted job's folder left by a crash
    orphan.mkdir()
    (store.files_dir / "notes.txt").write_text("not ours")
    store.close()

    store = VideoStore(tmp_path)
    assert sorted(store.recover("restarted")) == sorted([queued.id, running.id])
    for each in (queued, running):
        again = store.get(each.id)
        assert (again.status, again.error_code, again.error_message) == ("failed", "server_restarted", "restarted")
    assert store.get(failed.id).error_code == "generation_failed" and store.get(failed.id).progress == 40
    assert store.get(completed.id).status == "completed"
    assert sorted(path.name for path in store.files_dir.iterdir()) == sorted([completed.id, "notes.txt"])
    assert store.recover("restarted") == []
    store.close()


def test_one_server_per_data_directory(tmp_path):
    first = VideoStore(tmp_path)
    with pytest.raises(DataDirInUseError, match="--data-dir"):
        VideoStore(tmp_path)
    first.close()
    VideoStore(tmp_path).close()
