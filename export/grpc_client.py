"""A gRPC client for the exported PIT segmenter behind TF Serving (faster than REST for large images: the
pixels travel as a binary tensor, and only the labels come back).

    pip install tensorflow-serving-api
    python export/grpc_client.py --server=localhost:8500 --image=street.png --output=street_labels.png

Needs `tensorflow-serving-api` (which brings grpcio and TensorFlow); it is imported only when the client runs,
so the rest of the toolkit does not depend on it. It talks only to --server: there is no default address.
"""

import argparse
import sys

import numpy as np
from PIL import Image

from client import read_rgb


def import_serving_apis():
    """`(grpc, tf, predict_pb2, prediction_service_pb2_grpc)`, or a clear message if the package is missing."""
    try:
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    except ImportError as err:
        raise SystemExit(f"error: the gRPC client needs tensorflow-serving-api ({err}); "
                         "run `pip install tensorflow-serving-api`, or use export/client.py (REST).") from None
    return grpc, tf, predict_pb2, prediction_service_pb2_grpc


def predict(server, model, image, timeout=60):
    """Sends one `[H, W, 3]` uint8 image to `serving_default` and returns `[H, W]` uint8 train ids."""
    grpc, tf, predict_pb2, prediction_service_pb2_grpc = import_serving_apis()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = "serving_default"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(image[None], dtype=tf.uint8))
    # The probabilities are C floats per pixel: far larger than the image, and not needed for labels.
    request.output_filter.append("labels")
    with grpc.insecure_channel(server) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout=timeout)
    return tf.make_ndarray(response.outputs["labels"])[0].astype(np.uint8)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="TF Serving gRPC address, e.g. localhost:8500.")
    parser.add_argument("--model", default="pit", help="Model name in models.config.")
    parser.add_argument("--image", required=True, help="The image to segment.")
    parser.add_argument("--output", required=True, help="Where the 8-bit train-id PNG goes.")
    args = parser.parse_args()
    labels = predict(args.server, args.model, read_rgb(args.image))
    Image.fromarray(labels).save(args.output)
    print(f"wrote {args.output} ({labels.shape[1]}x{labels.shape[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
