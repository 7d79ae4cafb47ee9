"""Segmenting a video file frame by frame into an overlay video, with OpenCV (imported only when a video is
given; mediapipe's dependency opencv-contrib-python provides it, or `pip install opencv-python`)."""

import os
import time

import numpy as np

from pit_keras.errors import UserError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def is_video(path):
    """Whether `path` names a video file (by its extension)."""
    return os.path.isfile(path) and path.lower().endswith(VIDEO_EXTENSIONS)


def import_cv2():
    """OpenCV, or a UserError saying what to install."""
    try:
        import cv2
    except ImportError:
        raise UserError('reading video needs OpenCV: pip install -e ".[deploy]" (or pip install opencv-python).') \
            from None
    return cv2


def open_video(path, flag="--input"):
    """An opened `cv2.VideoCapture` of `path` and its frame rate; the first frame is checked to decode.

    Raises:
        UserError: if OpenCV cannot open or decode the file.
    """
    cv2 = import_cv2()
    capture = cv2.VideoCapture(path)
    if not capture.isOpened() or not capture.grab():
        capture.release()
        raise UserError(f"{flag}={path}: OpenCV cannot decode this video file.")
    capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
    fps = capture.get(cv2.CAP_PROP_FPS)
    return capture, fps if fps and fps > 0 else 30.0


def predict_video(predictor, path, output_dir, alpha=0.5):
    """Segments every frame of the video `path` and writes `OUTPUT/NAME_overlay.mp4` (palette colours over the
    frames, at the video's size and frame rate).

    Args:
        predictor: an `predictors.Predictor`.
        path: a video file OpenCV can read.
        output_dir: created if missing.
        alpha: opacity of the colours in the overlay.

    Returns:
        `(output path, seconds)`, `seconds` the time of each frame written: `{"model": [...], "all": [...]}`, in
        the predictor and in all (decoding, segmenting, drawing, encoding); the first frame's include what the
        predictor does once (imports, warm-up).
    """
    from pit_keras import atomic, visualize

    cv2 = import_cv2()
    capture, fps = open_video(path)
    os.makedirs(output_dir, exist_ok=True)
    output = os.path.join(output_dir, f"{os.path.splitext(os.path.basename(path))[0]}_overlay.mp4")
    seconds = {"model": [], "all": []}

    def write(tmp):  # a whole video or none: an earlier overlay is replaced only once this one is complete
        writer = None
        try:
            while True:
                start = time.perf_counter()
                ok, bgr = capture.read()
                if not ok:
                    break
                rgb = np.ascontiguousarray(bgr[..., ::-1])
                tick = time.perf_counter()
                labels = np.asarray(predictor(rgb)).astype(np.uint8)
                seconds["model"].append(time.perf_counter() - tick)
                overlay = visualize.overlay(rgb, visualize.colorize(labels, predictor.class_set), alpha)
                if writer is None:
                    height, width = rgb.shape[:2]
                    writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
                    if not writer.isOpened():
                        raise UserError(f"--output_dir={output_dir}: OpenCV cannot write {output}.")
                writer.write(np.ascontiguousarray(overlay[..., ::-1]))
                seconds["all"].append(time.perf_counter() - start)
        finally:
            capture.release()
            if writer is not None:
                writer.release()
        if writer is None:
            raise UserError(f"--input={path}: the video holds no frame OpenCV can decode.")

    atomic.atomic_write(output, write, suffix=".mp4")
    return output, seconds
