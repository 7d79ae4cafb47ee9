"""Image files for prediction: reading one image (refusing damaged or oversized files in one sentence), listing
a folder's images, and output names that keep every input apart."""

import os

import numpy as np
from PIL import Image

from pit_keras.errors import UserError

# Larger images are refused before decoding: a 50 MP RGB image is 150 MB of pixels and far more in float
# activations, and a decompression bomb should fail with a sentence, not an out-of-memory kill.
MAX_MEGAPIXELS = 50
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def read_image(path, max_megapixels=MAX_MEGAPIXELS):
    """Reads an image file as `[H, W, 3]` uint8 RGB.

    Alpha is dropped (the network never saw transparency), grey and palette images are expanded to RGB, and
    16-bit grey images are scaled to 8 bits.

    Args:
        path: an image file Pillow can read.
        max_megapixels: larger images are refused before their pixels are decoded.

    Raises:
        UserError: if the file is missing, unreadable or too large.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such image file.")
    try:
        with Image.open(path) as image:
            megapixels = image.width * image.height / 1e6
            if megapixels > max_megapixels:
                raise UserError(f"{path} is {image.width}x{image.height} ({megapixels:.0f} MP), over the "
                                f"{max_megapixels} MP limit; downscale it first.")
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):
                grey = np.asarray(image, np.float64) * (255.0 / 65535.0)
                return np.repeat(np.clip(grey.round(), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
            return np.asarray(image.convert("RGB"), np.uint8)
    except (OSError, Image.DecompressionBombError) as err:
        raise UserError(f"{path}: not a readable image ({err}).") from None


def list_images(path, exclude=None):
    """The image files to predict: `path` itself, or the images in the folder `path` and its sub-folders (the
    Cityscapes layout: leftImg8bit/SPLIT/CITY/), sorted by their path; hidden files and folders are left out.

    Args:
        path: an image file or a folder.
        exclude: a folder not to look into (the output folder, should it be inside `path`).

    Raises:
        UserError: if the path does not exist or the folder holds no image.
    """
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"--input={path}: no such file or folder.")
    exclude = os.path.realpath(exclude) if exclude else None
    images = []
    for root, folders, names in os.walk(path):
        folders[:] = sorted(f for f in folders if not f.startswith(".")
                            and os.path.realpath(os.path.join(root, f)) != exclude)
        images += [os.path.join(root, name) for name in names
                   if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
    if not images:
        raise UserError(f"--input={path}: the folder holds no {'/'.join(IMAGE_EXTENSIONS)} images (sub-folders "
                        "included).")
    return sorted(images)


OUTPUT_SUFFIXES = ("_labelTrainIds.png", "_overlay.png")  # what predict writes for an image NAME: NAME + each


def output_names(images, input_path, output_dir=None):
    """`{image: output stem}`: each image's path relative to `input_path` (a folder) without its extension, so
    the outputs mirror its sub-folders; just the file name for a single image.

    Raises:
        UserError: if two images would write the same outputs (`a.png` and `a.jpg` in one folder), or if an
            output in `output_dir` would be one of the images (`--output_dir` the input folder, holding
            `a.png` and a photo named `a_overlay.png`).
    """
    if os.path.isfile(input_path):
        stems = {image: os.path.splitext(os.path.basename(image))[0] for image in images}
    else:
        stems, seen = {}, {}
        for image in images:
            stem = os.path.splitext(os.path.relpath(image, input_path))[0]
            if stem in seen:
                raise UserError(f"{seen[stem]} and {image} would write the same outputs "
                                f"({stem}_labelTrainIds.png); rename one of them.")
            seen[stem] = image
            stems[image] = stem
    if output_dir:
        inputs = {os.path.realpath(image) for image in images}
        for stem in stems.values():
            for suffix in OUTPUT_SUFFIXES:
                output = os.path.join(output_dir, stem + suffix)
                if os.path.realpath(output) in inputs:
                    raise UserError(f"--output_dir={output_dir}: predict would write {output}, which is one of the "
                                    "input images; choose an --output_dir that holds no input image.")
    return stems
