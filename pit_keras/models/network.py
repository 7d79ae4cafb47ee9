"""The PIT network: a shared backbone, a fine head and K coarse region-expansion heads (paper Fig. 1).

A functional Keras model with named dict outputs:

- `"seg"`: fine logits S at the input size (the segmenter; the only output that is exported);
- `"cam_k"`: the k-th coarse unit's class-activation map S^k at the input size;
- `"seg_feat"`, `"cam_k_feat"`: the same logits at feature resolution, before upsampling;
- `"recon"`: `sum_k w^k S^k` at the input size (the reconstruction of S).

Bilinear upsampling is linear, so the losses on the coarse maps can be computed at feature resolution at a
fraction of the cost (see `trainer.PITTrainer`, `loss_resolution`).
"""

import keras

from pit_keras.models import backbones, heads, layers

RECONSTRUCTION_LAYER = "reconstruction"


def build_network(backbone, num_classes, num_units=3, backbone_weights="none", aspp_implementation="matmul"):
    """Builds the PIT network.

    Args:
        backbone: a registry name (`backbones.BACKBONES`).
        num_classes: C.
        num_units: K, one coarse unit per `--lse_r` value; 0 builds a plain segmenter.
        backbone_weights: imagenet | none | a local weights file.
        aspp_implementation: how ASPP heads compute (`heads.ASPPClassifier`); the same weights either way.

    Returns:
        A `keras.Model` from `"image"` (`[B, H, W, 3]` RGB, float in [0, 255]) to the dict of outputs above.
    """
    # === Layers ===
    feature_extractor = backbones.build_backbone(backbone, backbone_weights)
    head_kind = backbones.BACKBONES[backbone].head
    fine_head = heads.build_head(head_kind, num_classes, "fine_head", aspp_implementation)
    coarse_heads = [heads.build_head(head_kind, num_classes, f"coarse_head_{k}", aspp_implementation)
                    for k in range(num_units)]

    # === Functional Model ===
    image = keras.Input((None, None, 3), name="image")
    features = feature_extractor(image)
    seg_feat = fine_head(features)
    outputs = {"seg": layers.ResizeLike(name="seg")([seg_feat, image]), "seg_feat": seg_feat}
    cam_feats = []
    for k, head in enumerate(coarse_heads):
        cam_feat = head(features)
        cam_feats.append(cam_feat)
        outputs[f"cam_{k}_feat"] = cam_feat
        outputs[f"cam_{k}"] = layers.ResizeLike(name=f"cam_{k}")([cam_feat, image])
    if num_units:
        recon_feat = layers.RegionReconstruction(num_units, name=RECONSTRUCTION_LAYER)(cam_feats)
        outputs["recon"] = layers.ResizeLike(name="recon")([recon_feat, image])
    return keras.Model(image, outputs, name=f"pit_{backbone}")


def all_layers(model):
    """Every layer of `model`, nested models' layers included (depth first)."""
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from all_layers(layer)


def interaction_weights(network):
    """The K learnable scalars w^k of a network built by `build_network`."""
    return network.get_layer(RECONSTRUCTION_LAYER).w


def head_variables(network):
    """The trainable variables of the layers that are new to the backbone: the fine head, every coarse head
    and the reconstruction's w^k."""
    names = {"fine_head", RECONSTRUCTION_LAYER} | {layer.name for layer in network.layers
                                                   if layer.name.startswith("coarse_head_")}
    return [v for layer in network.layers if layer.name in names for v in layer.trainable_variables]


def fine_segmenter(network):
    """The deployable segmenter: image -> fine logits `"seg"` at the input size, without the coarse units."""
    return keras.Model(network.input, network.get_layer("seg").output, name=f"{network.name}_fine")
