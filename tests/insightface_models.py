"""Stand-in insightface model packs for the tests: real ONNX files under the names of antelopev2 and buffalo_l, which
insightface's own FaceAnalysis and model router load (the real packs cannot be downloaded here).

- The detector is an SCRFD graph as insightface reads one (input 1x3x640x640; per stride 8, 16, 32 and 2 anchors:
  scores, box distances and five-landmark distances). Its outputs are constants chosen by the test, so it finds the
  faces the test placed, whatever the image: the test then knows every box and landmark insightface must report.
- The recognition model is an ArcFace graph as insightface routes one (input 1x3x112x112, a 512-vector out): the mean
  colour of the aligned face through a fixed matrix.
- The landmark and attribute files are small graphs the router does not recognise; the pack asks FaceAnalysis for
  detection and recognition only.
What they prove: the pack's hand-off to insightface and back, through insightface's own code. What they do not: that a
real detector finds real faces, or anything about the quality of a real crop.
"""
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DETECTOR_SIZE = 640
STRIDES = (8, 16, 32)
ANCHORS = 2
PACK_FILES = {  # what each pack holds (encoders/subject_preparation.py INSIGHTFACE_MODEL_FILES): detector, recognition
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx", ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx")),
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx", ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx")),
}
OPSET = [helper.make_opsetid("", 13)]


def _save(graph, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _anchor_centre(stride: int, anchor: int) -> tuple[float, float]:
    row, column = divmod(anchor // ANCHORS, DETECTOR_SIZE // stride)
    return column * stride, row * stride


def detector(path: Path, faces: list[tuple[tuple[float, float, float, float], np.ndarray]]) -> None:
    """An SCRFD detector that reports `faces`, each (box (x1, y1, x2, y2), landmarks (5, 2)) in the pixels of its
    640x640 input, with score 0.99, on the stride-32 anchor nearest each face's centre."""
    stride = STRIDES[-1]
    cells = DETECTOR_SIZE // stride
    outputs = {}
    for s in STRIDES:
        count = (DETECTOR_SIZE // s) ** 2 * ANCHORS
        outputs[s] = [np.zeros((count, 1), np.float32), np.zeros((count, 4), np.float32), np.zeros((count, 10), np.float32)]
    for number, (box, landmarks) in enumerate(faces):
        x1, y1, x2, y2 = box
        column, row = round((x1 + x2) / 2 / stride), round((y1 + y2) / 2 / stride)
        anchor = (min(row, cells - 1) * cells + min(column, cells - 1)) * ANCHORS
        assert outputs[stride][0][anchor, 0] == 0, "two faces on one anchor: place them further apart"
        cx, cy = _anchor_centre(stride, anchor)
        outputs[stride][0][anchor, 0] = 0.99 - 0.01 * number
        outputs[stride][1][anchor] = np.array([cx - x1, cy - y1, x2 - cx, y2 - cy], np.float32) / stride
        outputs[stride][2][anchor] = ((np.asarray(landmarks, np.float32) - [cx, cy]) / stride).reshape(10)
    # Every output is its constant plus 0 x the image's mean: the graph reads its input, as a detector does.
    nodes = [helper.make_node("ReduceMean", ["input.1"], ["mean"], keepdims=0),
             helper.make_node("Mul", ["mean", "zero"], ["nothing"])]
    initializers = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    graph_outputs = []
    for kind, index in (("score", 0), ("bbox", 1), ("kps", 2)):
        for s in STRIDES:
            constant = outputs[s][index]
            initializers.append(numpy_helper.from_array(constant, f"{kind}_{s}_constant"))
            nodes.append(helper.make_node("Add", [f"{kind}_{s}_constant", "nothing"], [f"{kind}_{s}"]))
            graph_outputs.append(helper.make_tensor_value_info(f"{kind}_{s}", TensorProto.FLOAT, list(constant.shape)))
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, DETECTOR_SIZE, DETECTOR_SIZE])
    _save(helper.make_graph(nodes, "scrfd_stand_in", [image], graph_outputs, initializers), path)


def recognition(path: Path, seed: int) -> None:
    """An ArcFace-routed model: the aligned face's mean colour (3) through a fixed seeded 3x512 matrix."""
    projection = np.random.default_rng(seed).standard_normal((3, 512)).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["input.1"], ["pooled"], name="pool"),
             helper.make_node("Flatten", ["pooled"], ["colour"], name="flatten"),
             helper.make_node("MatMul", ["colour", "projection"], ["embedding"], name="project")]
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])
    embedding = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 512])
    _save(helper.make_graph(nodes, "arcface_stand_in", [image], [embedding],
                           [numpy_helper.from_array(projection, "projection")]), path)


def unrouted(path: Path) -> None:
    """A graph whose input size (1x3x8x8) insightface's router maps to no model."""
    nodes = [helper.make_node("Identity", ["input.1"], ["output"])]
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 8, 8])
    _save(helper.make_graph(nodes, "unrouted_stand_in", [image], [helper.make_tensor_value_info(
        "output", TensorProto.FLOAT, [1, 3, 8, 8])]), path)


def write_model_pack(folder: Path, name: str, faces: list[tuple[tuple[float, float, float, float], np.ndarray]]) -> Path:
    """<folder>/<name>/ with every file of that pack; the detector reports `faces` (detector-input pixels)."""
    pack = folder / name
    pack.mkdir(parents=True, exist_ok=True)
    detector_file, recognition_file, others = PACK_FILES[name]
    detector(pack / detector_file, faces)
    recognition(pack / recognition_file, seed=0)
    for other in others:
        unrouted(pack / other)
    return pack


def detector_scale(height: int, width: int) -> float:
    """How insightface's SCRFD scales an image of this size into its 640x640 input (aspect kept, top-left)."""
    if height / width > 1:
        return DETECTOR_SIZE / height
    return int(DETECTOR_SIZE * height / width) / height
