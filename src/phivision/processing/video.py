"""Video frames for training and prediction, sampled exactly like the official UCF101 converter.

The official converter picks `np.arange(0, n, n / k)` of the frame count `n` that the container
claims. That count is 0 for formats that do not store it (MKV, WebM, MPEG-TS) and can be wrong
for others, so here `n` is always the number of frames that actually decode: the claimed count is
only a guess that lets a well-formed file be sampled in one decoding pass, and any other file is
decoded a second time with the indices of the true count. Only the selected frames are kept.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image

from phivision.errors import PhivisionError


def frame_indices(n: int, k: int) -> list[int]:
    """The official sample of k frames out of n, cut to k where float steps round to one more.

    With fewer frames than requested (k > n) indices repeat, so every video yields exactly k frames.
    """
    if n < 1:
        raise PhivisionError(f"cannot sample frames from a video with {n} frames")
    if k < 1:
        raise PhivisionError(f"the number of frames to sample must be at least 1, got {k}")
    return [int(index) for index in np.arange(0, n, n / k)[:k]]


def load_frames(path: str | Path, num_frames: int) -> list[Image.Image]:
    """`num_frames` RGB frames of the video at `path`, at `frame_indices(decoded frame count, num_frames)`."""
    path = Path(path)
    if num_frames < 1:
        raise PhivisionError(f"video {path}: the number of frames to sample must be at least 1, got {num_frames}")
    if not path.is_file():
        raise PhivisionError(f"video {path} does not exist")
    claimed = _claimed_frame_count(path)
    guessed_indices = frame_indices(claimed, num_frames) if claimed > 0 else []
    decoded, frames = _decode_frames(path, guessed_indices)
    if decoded == 0:
        raise PhivisionError(f"video {path} has no decodable frames; re-encode or remove it")
    if decoded == claimed:
        return frames
    return _decode_frames(path, frame_indices(decoded, num_frames))[1]


def video_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the first decoded frame: a file that opens but does not decode fails now,
    in the up-front check, not hours into training."""
    path = Path(path)
    if not path.is_file():
        raise PhivisionError(f"video {path} does not exist")
    with _open_video(path) as container:
        try:
            frame = next(container.decode(video=0), None)
        except av.FFmpegError as error:
            raise PhivisionError(f"video {path} cannot be decoded ({_reason(error)}); re-encode or remove it") from None
    if frame is None or frame.width < 1 or frame.height < 1:
        raise PhivisionError(f"video {path} has no decodable frames; re-encode or remove it")
    return frame.width, frame.height


def _claimed_frame_count(path: Path) -> int:
    """The frame count stored in the container, 0 where it stores none."""
    with _open_video(path) as container:
        return max(container.streams.video[0].frames, 0)


def _decode_frames(path: Path, indices: list[int]) -> tuple[int, list[Image.Image]]:
    """Decode the whole video once: (number of frames decoded, RGB images at `indices`)."""
    wanted = set(indices)
    selected: dict[int, Image.Image] = {}
    decoded = 0
    with _open_video(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for decoded, frame in enumerate(container.decode(stream), start=1):
                if decoded - 1 in wanted:
                    selected[decoded - 1] = frame.to_image()
        except av.FFmpegError as error:
            raise PhivisionError(
                f"video {path} cannot be decoded after frame {decoded} ({_reason(error)}); re-encode or remove it"
            ) from None
    if len(selected) < len(wanted):
        return decoded, []
    return decoded, [selected[index] for index in indices]


def _open_video(path: Path) -> av.container.InputContainer:
    """Open a file that must hold a video stream, with one clear error otherwise."""
    try:
        container = av.open(str(path))
    except av.FFmpegError as error:
        reason = _reason(error)
        raise PhivisionError(f"video {path} cannot be opened ({reason}); check that it is a video file") from None
    if not container.streams.video:
        container.close()
        raise PhivisionError(f"video {path} has no video stream; check that it is a video file")
    return container


def _reason(error: av.FFmpegError) -> str:
    """FFmpeg's reason without the file name it repeats."""
    return error.strerror or str(error)
