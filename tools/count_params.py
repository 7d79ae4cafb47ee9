"""Prints the parameter counts of every registered backbone and of the PIT network built on it.

    python tools/count_params.py [--num_classes=19] [--num_units=3] [--backbones=deeplabv2_resnet101,...]

Everything is built with random weights (no download). "trainable" excludes frozen layers (DeepLab-v2's
BatchNorm) and BatchNorm moving statistics; the network adds the fine head, K coarse heads and the K w^k.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pit_keras import console  # noqa: E402


def count(weights):
    return sum(int(w.numpy().size) for w in weights)


def main():
    console.configure_from_argv()
    import keras

    from pit_keras.models import backbones
    from pit_keras.models.network import build_network

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_classes", type=int, default=19)
    parser.add_argument("--num_units", type=int, default=3)
    parser.add_argument("--backbones", default=",".join(backbones.BACKBONES),
                        help="comma-separated registry names (default: all)")
    parser.add_argument("--tf_logs", action="store_true", help=console.TF_LOGS_HELP)
    args = parser.parse_args()
    names = args.backbones.split(",")
    unknown = [n for n in names if n not in backbones.BACKBONES]
    if unknown:
        sys.exit(f"error: --backbones: {', '.join(unknown)} not in {', '.join(backbones.BACKBONES)}.")

    header = (f"{'backbone':22} {'head':8} {'stride':>6} {'backbone params':>16} {'trainable':>12} "
              f"{'network params':>15} {'trainable':>12}")
    print(f"PIT network: C={args.num_classes} classes, K={args.num_units} coarse units")
    print(header)
    print("-" * len(header))
    for name in names:
        spec = backbones.BACKBONES[name]
        network = build_network(name, args.num_classes, num_units=args.num_units)
        backbone = next(layer for layer in network.layers if isinstance(layer, keras.Model))
        print(f"{name:22} {spec.head:8} {spec.output_stride:>6} {count(backbone.weights):>16,} "
              f"{count(backbone.trainable_weights):>12,} {count(network.weights):>15,} "
              f"{count(network.trainable_weights):>12,}", flush=True)
        del network, backbone


if __name__ == "__main__":
    main()
