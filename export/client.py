"""A small REST client for the exported PIT segmenter behind TF Serving (standard library, numpy and Pillow only).

    python export/client.py --server=http://localhost:8501 --image=street.png --output=street_labels.png
    python export/client.py --image=street.png --write_request=request.json     # for curl, no server needed

It sends the image as uint8 RGB to `/v1/models/MODEL:predict` (the `serving_default` signature resizes it to
the training resolution and back), and writes the returned train ids as an 8-bit PNG, plus a colour overlay if
`--metadata` (the export's metadata.json, which holds the palette) is given. It talks only to --server: there
is no default address.
"""

import argparse
import json
import sys
import urllib.error
import urllib.request

import numpy as np
from PIL import Image

# As in pit_keras.data.images (MAX_MEGAPIXELS): larger images are refused before decoding.
MAX_MEGAPIXELS = 50


def read_rgb(path):
    """`[H, W, 3]` uint8 RGB of an image file (alpha dropped, grey expanded); refuses images over the limit."""
    with Image.open(path) as image:
        if image.width * image.height > MAX_MEGAPIXELS * 1e6:
            raise ValueError(f"{path} is {image.width}x{image.height}, over the {MAX_MEGAPIXELS} MP limit.")
        if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: scaled to 8 bits, not clipped
            grey = np.asarray(image, np.float64) * (255.0 / 65535.0)
            return np.repeat(np.clip(grey.round(), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
        return np.asarray(image.convert("RGB"), np.uint8)


def build_request(image):
    """The REST predict body for one `[H, W, 3]` uint8 image, in TF Serving's columnar ("inputs") format."""
    return {"signature_name": "serving_default", "inputs": {"images": [np.asarray(image, np.uint8).tolist()]}}


def parse_response(body):
    """`[H, W]` uint8 train ids from a REST predict response (columnar format: `{"outputs": {...}}`)."""
    outputs = body["outputs"]
    labels = outputs["labels"] if isinstance(outputs, dict) else outputs
    return np.asarray(labels, np.int64)[0].astype(np.uint8)


def predict(server, model, image, timeout=60):
    """Posts one image to `SERVER/v1/models/MODEL:predict` and returns the train ids.

    Args:
        server: the TF Serving REST address, e.g. http://localhost:8501.
        model: the model name in models.config.
        image: `[H, W, 3]` uint8 RGB.
        timeout: seconds to wait for the answer.
    """
    url = f"{server.rstrip('/')}/v1/models/{model}:predict"
    data = json.dumps(build_request(image)).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return parse_response(json.load(answer))


def overlay(image, labels, palette, alpha=0.5):
    """Blends the palette colours of the train ids over the image (ids outside the palette stay black)."""
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8)
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * table[labels].astype(np.float32)
    return mixed.round().astype(np.uint8)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="TF Serving REST address, e.g. http://localhost:8501.")
    parser.add_argument("--model", default="pit", help="Model name in models.config.")
    parser.add_argument("--image", required=True, help="The image to segment.")
    parser.add_argument("--output", help="Where the 8-bit train-id PNG goes.")
    parser.add_argument("--metadata", help="The export's metadata.json, for the palette of an overlay.")
    parser.add_argument("--write_request", help="Write the request body here instead of sending it.")
    args = parser.parse_args()
    try:
        image = read_rgb(args.image)
        if args.write_request:
            with open(args.write_request, "w") as f:
                json.dump(build_request(image), f)
            print(f"wrote the request for {args.image} to {args.write_request}")
            return 0
        if not args.server or not args.output:
            parser.error("--server and --output are required unless --write_request is given.")
        labels = predict(args.server, args.model, image)
        Image.fromarray(labels).save(args.output)
        if args.metadata:
            with open(args.metadata) as f:
                palette = json.load(f)["palette"]
            overlay_path = args.output.rsplit(".", 1)[0] + "_overlay.png"
            Image.fromarray(overlay(image, labels, palette)).save(overlay_path)
        print(f"wrote {args.output} ({labels.shape[1]}x{labels.shape[0]})")
        return 0
    except (OSError, ValueError, KeyError, urllib.error.URLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
