"""MediaPipe ImageSegmenter metadata for the exported `.tflite` models, written with MediaPipe's own writer
(`mediapipe.tasks.python.metadata.metadata_writers.image_segmenter`).

The metadata carries the input normalisation (mean and std per channel, from which the task computes the
range it feeds the input tensor), the class names as the output's labels file (the task's `labels`) and the
output's activation; the task takes the argmax of the per-class output as its category mask.

mediapipe is optional (`pip install -e ".[deploy]"`): without it, `available()` is False and the export
writes the models without metadata.

mediapipe 1.2.3's wheel ships the writer's Python code but not its compiled helper
`mediapipe.tasks.cc.metadata.python._pywrap_metadata_version`, so importing the writer fails. The helper has
one function, the minimum metadata-parser version a metadata buffer needs; when the compiled module is
missing, `_install_metadata_version()` provides it in Python, following MediaPipe's
`mediapipe/tasks/cc/metadata/metadata_version.cc` (the schema members added after version 1.0.0 and the
version that introduced each).
"""

import importlib
import importlib.util
import sys
import types

_VERSION_MODULE = "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version"


def available():
    """Whether mediapipe (and so its metadata writer) is installed."""
    return importlib.util.find_spec("mediapipe") is not None


def minimum_parser_version(metadata_buffer):
    """The oldest metadata parser that reads `metadata_buffer` (a `ModelMetadata` flatbuffer), as "X.Y.Z".

    The largest version among the schema members the buffer uses; 1.0.0 if it uses none added later.
    """
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

    model = fb.ModelMetadataT.InitFromObj(fb.ModelMetadata.GetRootAsModelMetadata(bytes(metadata_buffer), 0))
    versions = [(1, 0, 0)]

    def files(items):
        for item in items or ():
            if item.type == fb.AssociatedFileType.VOCABULARY:
                versions.append((1, 0, 1))
            if item.type == fb.AssociatedFileType.SCANN_INDEX_FILE:
                versions.append((1, 4, 0))
            if item.version is not None:
                versions.append((1, 4, 1))

    def units(items):
        tokenizers = {fb.ProcessUnitOptions.BertTokenizerOptions: (1, 1, 0),
                      fb.ProcessUnitOptions.SentencePieceTokenizerOptions: (1, 1, 0),
                      fb.ProcessUnitOptions.RegexTokenizerOptions: (1, 2, 1)}
        for item in items or ():
            if item.optionsType in tokenizers:
                versions.append(tokenizers[item.optionsType])

    def tensors(items):
        for item in items or ():
            files(item.associatedFiles)
            units(item.processUnits)
            if item.content is not None and (item.content.contentPropertiesType
                                             == fb.ContentProperties.AudioProperties):
                versions.append((1, 3, 0))

    for subgraph in model.subgraphMetadata or ():
        tensors(subgraph.inputTensorMetadata)
        tensors(subgraph.outputTensorMetadata)
        files(subgraph.associatedFiles)
        for process_units in (subgraph.inputProcessUnits, subgraph.outputProcessUnits):
            if process_units is not None:
                versions.append((1, 1, 0))
                units(process_units)
        if subgraph.inputTensorGroups is not None or subgraph.outputTensorGroups is not None:
            versions.append((1, 2, 0))
        if subgraph.customMetadata is not None:
            versions.append((1, 5, 0))
    files(model.associatedFiles)
    return ".".join(str(v) for v in max(versions))


def _install_metadata_version():
    """Makes `_pywrap_metadata_version` importable: the compiled module if the wheel has it, else ours."""
    try:
        importlib.import_module(_VERSION_MODULE)
        return
    except ImportError:
        pass
    module = types.ModuleType(_VERSION_MODULE)
    module.GetMinimumMetadataParserVersion = minimum_parser_version
    parts = _VERSION_MODULE.split(".")
    for depth in range(3, len(parts)):
        name = ".".join(parts[:depth])
        if name not in sys.modules:
            try:
                importlib.import_module(name)
            except ImportError:
                sys.modules[name] = types.ModuleType(name)
    sys.modules[_VERSION_MODULE] = module


def _writer():
    _install_metadata_version()
    from mediapipe.tasks.python.metadata.metadata_writers import image_segmenter, metadata_writer

    return image_segmenter, metadata_writer


def add_segmenter_metadata(model, class_names, norm_mean, norm_std, softmax):
    """A `.tflite` model with MediaPipe ImageSegmenter metadata (and the labels file packed inside).

    Args:
        model: the `.tflite` flatbuffer (bytes), with one image input and one per-class output.
        class_names: the output's channel names, in channel order.
        norm_mean, norm_std: per-channel (or single) input normalisation: the task feeds a float input
            `(pixel - mean) / std`; uint8 inputs get the pixels as they are.
        softmax: the output holds logits (the task applies a softmax for its confidence masks); else
            probabilities or scores used as they are.

    Returns:
        The model with metadata, as bytes.
    """
    image_segmenter, metadata_writer = _writer()
    labels = metadata_writer.Labels().add(list(class_names))
    activation = image_segmenter.Activation.SOFTMAX if softmax else image_segmenter.Activation.NONE
    writer = image_segmenter.MetadataWriter.create(bytearray(model), list(norm_mean), list(norm_std),
                                                   labels=labels, activation=activation)
    try:
        with_metadata, _ = writer.populate()
    finally:
        # The writer deletes its scratch folder in __del__, which fails (a traceback on stderr) if it runs at
        # interpreter shutdown, and something keeps this frame alive until then: free the writer here.
        writer.writer._temp_folder.cleanup()
        del writer
    return bytes(with_metadata)


def metadata_json(model):
    """The MediaPipe metadata of a `.tflite` model as a JSON string (for checks and humans)."""
    image_segmenter, _ = _writer()
    from mediapipe.tasks.python.metadata import metadata

    return image_segmenter.convert_to_json(metadata.get_metadata_buffer(bytearray(model)))


def packed_files(model):
    """`{name: bytes}` of the files packed into a `.tflite` model with metadata (the labels file)."""
    _install_metadata_version()
    from mediapipe.tasks.python.metadata import metadata

    displayer = metadata.MetadataDisplayer.with_model_buffer(bytearray(model))
    return {name: displayer.get_associated_file_buffer(name) for name in displayer.get_packed_associated_file_list()}
