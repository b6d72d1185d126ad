"""Video jobs that outlive the process: rows in SQLite at `<data-dir>/videos.db`, files under
`<data-dir>/videos/<id>/`.

Every method blocks (SQLite, file writes); the serving class runs them one at a time on a thread of their own, so
that the event loop never waits on the disk and no two calls interleave. Video ids are made here, never taken from
a request: no path is built from client input.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import sqlite3
import time
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import BinaryIO, Literal

DATA_DIR_ENV = "TEASERVE_DATA_DIR"
VARIANT_FILES = {"video": "video.mp4", "thumbnail": "thumbnail.png", "spritesheet": "spritesheet.jpg"}
"""The file of each content variant in a video's folder."""
VIDEO_ID = re.compile(r"video_[0-9a-f]{32}")
SERVER_RESTARTED = "server_restarted"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS videos (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    prompt TEXT NOT NULL,
    seconds TEXT NOT NULL,
    size TEXT NOT NULL,
    num_frames INTEGER NOT NULL,
    fps INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    progress INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    error_code TEXT,
    error_message TEXT
)
"""


def default_data_dir() -> Path:
    """$TEASERVE_DATA_DIR, else the user's data folder ($XDG_DATA_HOME or ~/.local/share) /teaserve."""
    given = os.environ.get(DATA_DIR_ENV)
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or "~/.local/share"
    return Path(base).expanduser() / "teaserve"


def new_video_id() -> str:
    """`video_` + the creation time in nanoseconds (16 hex digits) + 64 random bits: ids sort by creation, so a
    page cursor stays valid after the job it names is deleted."""
    return f"video_{time.time_ns():016x}{secrets.token_hex(8)}"


@dataclass
class VideoRecord:
    """One job as stored: what the request resolved to, and how it ended."""

    id: str
    model: str
    status: str
    prompt: str
    seconds: str
    size: str
    num_frames: int
    fps: int
    seed: int
    progress: int
    """Percent of the denoising steps done when the job was last stored (100 once completed)."""
    created_at: int
    completed_at: int | None = None
    error_code: str | None = None
    error_message: str | None = None


_COLUMNS = ", ".join(spec.name for spec in fields(VideoRecord))


class DataDirInUseError(ValueError):
    """Another server holds the data directory: a setting this server cannot use (the command line says so in one
    line)."""


class VideoStore:
    """The jobs of one server. Opening it takes a lock on the data directory: a second server on the same directory
    would take the first one's running jobs for abandoned ones."""

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir).expanduser()
        self.files_dir = self.data_dir / "videos"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._lock = (self.data_dir / "videos.lock").open("a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise DataDirInUseError(
                f"another teaserve server uses the data directory {self.data_dir}; give each server its own --data-dir"
            ) from None
        # One connection, used by one call at a time (the serving class's single thread).
        self._db = sqlite3.connect(self.data_dir / "videos.db", check_same_thread=False, isolation_level=None)
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        self._db.close()
        self._lock.close()  # releases the lock

    # -- start-up ----------------------------------------------------------------------------------------------
    def recover(self, message: str) -> list[str]:
        """Fail the jobs a previous process left unfinished (code server_restarted, `message`) and remove every
        folder that belongs to no completed job (files of unfinished or deleted jobs, half-written files). Returns
        the ids of the failed jobs."""
        failed = self._db.execute(
            "UPDATE videos SET status = 'failed', error_code = ?, error_message = ?, completed_at = ? "
            "WHERE status IN ('queued', 'in_progress') RETURNING id",
            (SERVER_RESTARTED, message, int(time.time())),
        ).fetchall()
        completed = {row[0] for row in self._db.execute("SELECT id FROM videos WHERE status = 'completed'")}
        for folder in self.files_dir.iterdir():
            if VIDEO_ID.fullmatch(folder.name) and folder.name not in completed:
                shutil.rmtree(folder, ignore_errors=True)
        return [row[0] for row in failed]

    # -- jobs --------------------------------------------------------------------------------------------------
    def insert(self, record: VideoRecord) -> None:
        placeholders = ", ".join("?" for _ in fields(VideoRecord))
        self._db.execute(f"INSERT INTO videos ({_COLUMNS}) VALUES ({placeholders})", astuple(record))

    def mark_in_progress(self, video_id: str) -> None:
        self._db.execute("UPDATE videos SET status = 'in_progress' WHERE id = ? AND status = 'queued'", (video_id,))

    def complete(self, video_id: str, files: dict[str, bytes]) -> bool:
        """Write a finished job's files (`VARIANT_FILES` names), then mark it completed; False (nothing written)
        when the job was deleted meanwhile. Each file is written under a temporary name and renamed: a crash never
        leaves a half file under its real name, and the row says completed only once every file is in place."""
        if self._status(video_id) not in ("queued", "in_progress"):
            return False
        folder = self.folder(video_id)
        folder.mkdir(exist_ok=True)
        try:
            for name, data in files.items():
                _write_atomically(folder / name, data)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._db.execute(
            "UPDATE videos SET status = 'completed', progress = 100, completed_at = ? WHERE id = ?",
            (int(time.time()), video_id),
        )
        return True

    def fail(self, video_id: str, code: str, message: str, progress: int) -> bool:
        """Mark an unfinished job failed (`progress`: how far it got); False when it was deleted meanwhile."""
        cursor = self._db.execute(
            "UPDATE videos SET status = 'failed', error_code = ?, error_message = ?, progress = ?, completed_at = ? "
            "WHERE id = ? AND status IN ('queued', 'in_progress')",
            (code, message, progress, int(time.time()), video_id),
        )
        return cursor.rowcount == 1

    def get(self, video_id: str) -> VideoRecord | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM videos WHERE id = ?", (video_id,)).fetchone()
        return None if row is None else VideoRecord(*row)

    def page(self, *, after: str | None, limit: int, order: Literal["asc", "desc"]) -> tuple[list[VideoRecord], bool]:
        """Up to `limit` jobs in creation order (`order`), starting after the job `after`; and whether more follow.
        `after` need not exist any more: ids sort by creation."""
        comparison, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        where, arguments = ("", ()) if after is None else (f"WHERE id {comparison} ?", (after,))
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM videos {where} ORDER BY id {direction} LIMIT ?", (*arguments, limit + 1)
        ).fetchall()
        return [VideoRecord(*row) for row in rows[:limit]], len(rows) > limit

    def delete(self, video_id: str) -> VideoRecord | None:
        """Remove a job's row, then its files; returns what was removed (None: no such job). Row first: a crash in
        between leaves a folder that the next start removes, never a completed job without its files."""
        record = self.get(video_id)
        if record is None:
            return None
        self._db.execute("DELETE FROM videos WHERE id = ?", (video_id,))
        shutil.rmtree(self.folder(video_id), ignore_errors=True)
        return record

    def open_file(self, video_id: str, name: str) -> BinaryIO | None:
        """A completed job's file, open for reading (None when the job is gone): once open, it stays readable
        even if the job is deleted meanwhile."""
        try:
            return (self.folder(video_id) / name).open("rb")
        except FileNotFoundError:
            return None

    def folder(self, video_id: str) -> Path:
        if not VIDEO_ID.fullmatch(video_id):  # ids come from new_video_id; anything else never names a path
            raise ValueError(f"not a video id: {video_id!r}")
        return self.files_dir / video_id

    def _status(self, video_id: str) -> str | None:
        row = self._db.execute("SELECT status FROM videos WHERE id = ?", (video_id,)).fetchone()
        return None if row is None else row[0]


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
