"""Prints the parameter counts of every registered backbone and of the PIT network built on it.

    python tools/count_params.py [--num_classes=19] [--num_units=3] [--backbones=deeplabv2_resnet101,...]

Everything is built with random weights (no download). "trainable" excludes frozen layers (DeepLab-v2's
BatchNorm) and BatchNorm moving statistics; the network adds the fine head, K coarse heads and the K w^k.
"""

from absl import flags

from pit_keras.errors import UserError, run_main

FLAGS = flags.FLAGS


def define_flags():
    """The command's flags, defined when it runs (so tests can import the module)."""
    flags.DEFINE_integer("num_classes", 19, "Classes of the network's heads.")
    flags.DEFINE_integer("num_units", 3, "Coarse units K of the PIT network.")
    flags.DEFINE_list("backbones", None, "Comma-separated registry names (default: all).")


def count(weights):
    return sum(int(w.numpy().size) for w in weights)


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r} (flags are written --name=value).")
    import keras

    from pit_keras.models import backbones
    from pit_keras.models.network import build_network

    names = FLAGS.backbones or list(backbones.BACKBONES)
    unknown = [n for n in names if n not in backbones.BACKBONES]
    if unknown:
        raise UserError(f"--backbones: {', '.join(unknown)} not in {', '.join(backbones.BACKBONES)}.")
    if FLAGS.num_classes <= 0 or FLAGS.num_units < 0:
        raise UserError("--num_classes must be positive and --num_units not negative.")

    header = (f"{'backbone':22} {'head':8} {'stride':>6} {'backbone params':>16} {'trainable':>12} "
              f"{'network params':>15} {'trainable':>12}")
    print(f"PIT network: C={FLAGS.num_classes} classes, K={FLAGS.num_units} coarse units")
    print(header)
    print("-" * len(header))
    for name in names:
        spec = backbones.BACKBONES[name]
        network = build_network(name, FLAGS.num_classes, num_units=FLAGS.num_units)
        backbone = next(layer for layer in network.layers if isinstance(layer, keras.Model))
        print(f"{name:22} {spec.head:8} {spec.output_stride:>6} {count(backbone.weights):>16,} "
              f"{count(backbone.trainable_weights):>12,} {count(network.weights):>15,} "
              f"{count(network.trainable_weights):>12,}", flush=True)
        del network, backbone


if __name__ == "__main__":
    define_flags()
    run_main(main)
