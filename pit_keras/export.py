"""Exports a training run for deployment: a SavedModel in TF Serving's layout and .tflite models for LiteRT.

    python -m pit_keras.export --model_dir=runs/demo --output_dir=exports/demo

Writes OUTPUT/saved_model/pit/1/ (serving_default: uint8 images of any size -> labels, probabilities),
OUTPUT/pit_{float32,float16,dynamic_int8,int8,gpu_float16}.tflite (fixed --tflite_size input -> logits; with
MediaPipe ImageSegmenter metadata when mediapipe is installed) and OUTPUT/metadata.json. Only the fine
segmenter is exported. See export/README.md for serving and on-device use.
"""

from absl import flags

from pit_keras import flags as pit_flags
from pit_keras.errors import UserError, run_main

pit_flags.define_export_flags()
flags.adopt_module_key_flags(pit_flags)  # --help lists this command's flags
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r} (flags are written --name=value).")
    for name in ("model_dir", "output_dir"):
        if not FLAGS[name].value:
            raise UserError(f"--{name} is required.")
    if FLAGS.calibration_images <= 0:
        raise UserError(f"--calibration_images={FLAGS.calibration_images}: must be positive.")
    tflite_size = pit_flags.parse_size("tflite_size", FLAGS.tflite_size) if FLAGS.tflite_size else None
    # TensorFlow is imported only once the flags are known to be good, so a typo fails in a second.
    from pit_keras.deploy import exporting

    exporting.check_output_dir(FLAGS.output_dir, FLAGS.overwrite)
    formats = FLAGS.formats
    metadata = exporting.export(FLAGS.model_dir, FLAGS.output_dir, tflite_size=tflite_size,
                                calibration_count=FLAGS.calibration_images, formats=formats,
                                overwrite=FLAGS.overwrite)
    total = sum(metadata["files"].values())
    print(f"exported {metadata['checkpoint']} (step {metadata['checkpoint_step']}) of {FLAGS.model_dir} to "
          f"{FLAGS.output_dir}: {len(metadata['files'])} files, {total / 1e6:.1f} MB")


if __name__ == "__main__":
    run_main(main)
