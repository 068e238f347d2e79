"""Subject preparation: turn raw photos into the crops the subject encoders expect.

Two paths. Pets and objects: a MASK (or a box) selects the subject, the background outside it
is replaced by a plain colour, and the image is cropped around it. People: insightface detects
the faces, one is chosen, and the face is aligned to the ArcFace 5-point template.

Conventions. Images are ComfyUI IMAGE tensors (B, H, W, C) floats in [0, 1]; masks are
(H, W) or (B, H, W) floats in [0, 1]. Boxes from masks are (top, left, bottom, right) in
pixels with bottom/right exclusive (Python slicing). Face boxes and landmarks are insightface's
(x, y) pixel coordinates, pixel centres at integers. Pure torch (+ numpy for the insightface
hand-off); insightface is imported only inside `load_face_analysis`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F

Box = tuple[int, int, int, int]  # (top, left, bottom, right), bottom/right exclusive
Background = Union[str, Sequence[float], None]

NAMED_BACKGROUNDS = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0), "gray": (0.5, 0.5, 0.5), "grey": (0.5, 0.5, 0.5)}

# The standard ArcFace 5-point template for a 112x112 crop: eyes, nose tip, mouth corners (x, y).
ARCFACE_TEMPLATE_112 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)

# What FaceAnalysis(name=...) loads from <root>/models/<name>/; checked before importing so errors are exact.
INSIGHTFACE_MODEL_FILES = {
    "antelopev2": ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx"),
    "buffalo_l": ("1k3d68.onnx", "2d106det.onnx", "det_10g.onnx", "genderage.onnx", "w600k_r50.onnx"),
}


def _as_image_batch(image: torch.Tensor) -> torch.Tensor:
    """(H, W, C) or (B, H, W, C) -> (B, H, W, C), with a clear error for anything else."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or 0 in image.shape:
        raise ValueError(f"expected a non-empty IMAGE (B, H, W, C), got shape {tuple(image.shape)}")
    return image


def _as_mask_batch(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) or (B, H, W) -> (B, H, W); a (B, H, W, 1) mask-as-image is accepted too."""
    if mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or 0 in mask.shape:
        raise ValueError(f"expected a non-empty MASK (H, W) or (B, H, W), got shape {tuple(mask.shape)}")
    return mask


def _check_mask_matches(image: torch.Tensor, mask: torch.Tensor) -> None:
    """Same pixel size, and one mask for all images or one per image."""
    (_, height, width, _), (mask_batch, mask_height, mask_width) = image.shape, mask.shape
    if (mask_height, mask_width) != (height, width):
        raise ValueError(
            f"mask is {mask_width}x{mask_height} but the image is {width}x{height}: resize the mask "
            "(e.g. with 'Upscale Image' / 'Mask resize') or use the mask from the same image"
        )
    if mask_batch not in (1, image.shape[0]):
        raise ValueError(f"got {mask_batch} masks for {image.shape[0]} images: give one mask for all images or one per image")


def mask_box(mask: torch.Tensor, threshold: float = 0.5) -> Box:
    """Tight (top, left, bottom, right) box of the pixels >= threshold (union over a mask batch)."""
    selected = _as_mask_batch(mask).ge(threshold).any(dim=0)
    if not bool(selected.any()):
        raise ValueError(
            f"the mask selects no pixel (no value >= {threshold}): draw the subject in the mask "
            "or lower the threshold"
        )
    rows = torch.nonzero(selected.any(dim=1)).flatten()
    columns = torch.nonzero(selected.any(dim=0)).flatten()
    return int(rows[0]), int(columns[0]), int(rows[-1]) + 1, int(columns[-1]) + 1


def box_mask(box: Box, image_height: int, image_width: int) -> torch.Tensor:
    """A (H, W) mask that is 1 inside the box: lets the box path reuse the mask path."""
    top, left, bottom, right = _check_box(box, image_height, image_width)
    mask = torch.zeros(image_height, image_width)
    mask[top:bottom, left:right] = 1.0
    return mask


def _check_box(box: Box, image_height: int, image_width: int) -> Box:
    """Integers, non-empty, inside the image."""
    top, left, bottom, right = (int(value) for value in box)
    if not (0 <= top < bottom <= image_height and 0 <= left < right <= image_width):
        raise ValueError(
            f"box (top={top}, left={left}, bottom={bottom}, right={right}) is empty or outside "
            f"the {image_width}x{image_height} image"
        )
    return top, left, bottom, right


def _fit_span(start: int, end: int, limit: int) -> tuple[int, int]:
    """Shift [start, end) inside [0, limit) without changing its length where it fits, else clamp."""
    if end - start >= limit:
        return 0, limit
    shift = max(0, -start) - max(0, end - limit)
    return start + shift, end + shift


def expand_box(box: Box, image_height: int, image_width: int, margin: float = 0.1, square: bool = True) -> Box:
    """Grow each side by margin x the box's own size, optionally square it, and keep it in the image.

    A square box is shifted (not cut) to stay inside the image, so it stays square unless its
    side exceeds the image's shorter dimension; `crop_to_box` pads that case back to square.
    """
    top, left, bottom, right = _check_box(box, image_height, image_width)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    pad_rows, pad_columns = round(margin * (bottom - top)), round(margin * (right - left))
    top, bottom, left, right = top - pad_rows, bottom + pad_rows, left - pad_columns, right + pad_columns
    if not square:  # a plain clamp: the margin is simply lost where the image ends
        return max(0, top), max(0, left), min(image_height, bottom), min(image_width, right)
    side = max(bottom - top, right - left)
    # Centre the square on the box; an odd excess puts the extra pixel after the box.
    top -= (side - (bottom - top)) // 2
    left -= (side - (right - left)) // 2
    top, bottom = _fit_span(top, top + side, image_height)
    left, right = _fit_span(left, left + side, image_width)
    return top, left, bottom, right


def _background_color(background: Background, channels: int) -> torch.Tensor:
    """A name ('black', 'white', 'gray') or per-channel values in [0, 1] -> (C,) tensor."""
    if isinstance(background, str):
        if background.lower() not in NAMED_BACKGROUNDS:
            raise ValueError(f"unknown background {background!r}: use one of {sorted(NAMED_BACKGROUNDS)} or an RGB tuple in [0, 1]")
        background = NAMED_BACKGROUNDS[background.lower()]
    color = torch.as_tensor(background, dtype=torch.float32).flatten()
    if color.numel() == 1:
        color = color.expand(channels)
    if color.numel() != channels or not bool(((color >= 0) & (color <= 1)).all()):
        raise ValueError(f"background must give {channels} values in [0, 1], got {background!r}")
    return color


def _pad_to_square(pixels: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> centred on a square canvas of the given colour (extra odd pixel after)."""
    batch, height, width, channels = pixels.shape
    side = max(height, width)
    if height == width:
        return pixels
    canvas = color.to(pixels).view(1, 1, 1, channels).expand(batch, side, side, channels).clone()
    top, left = (side - height) // 2, (side - width) // 2
    canvas[:, top:top + height, left:left + width] = pixels
    return canvas


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, size, size, C), bilinear with antialias (no aliasing when shrinking)."""
    resized = F.interpolate(image.movedim(-1, 1), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.movedim(1, -1).clamp(0.0, 1.0)


def crop_to_box(image: torch.Tensor, box: Box, size: int | None = None, pad_color: Background = "black") -> torch.Tensor:
    """The box's exact pixels; with `size`, padded to square (if it is not) and resized to size x size."""
    image = _as_image_batch(image)
    top, left, bottom, right = _check_box(box, image.shape[1], image.shape[2])
    crop = image[:, top:bottom, left:right]
    if size is None:
        return crop
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    # Padding instead of stretching keeps the subject's aspect ratio.
    crop = _pad_to_square(crop, _background_color(pad_color, crop.shape[-1]))
    return crop if crop.shape[1] == size else resize_image(crop, size)


def replace_background(image: torch.Tensor, mask: torch.Tensor, background: Background = "black") -> torch.Tensor:
    """Subject (mask = 1) kept, everything else the plain colour; soft mask edges blend linearly."""
    image, mask = _as_image_batch(image), _as_mask_batch(mask)
    _check_mask_matches(image, mask)
    if background is None:  # None = keep the photo's own background (crop only)
        return image
    color = _background_color(background, image.shape[-1]).to(image)
    weight = mask.to(image).clamp(0.0, 1.0)[..., None]
    return image * weight + color * (1.0 - weight)


def prepare_with_mask(
    image: torch.Tensor,
    mask: torch.Tensor,
    size: int | None = 224,
    margin: float = 0.1,
    background: Background = "black",
    square: bool = True,
    threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: background replaced, cropped to the (expanded) mask box, resized -> (images, masks).

    Default background black: FastComposer was trained on subjects on a plain background, and black
    is the fill its own preprocessing pads with (docs/methods.md §1.1: pad with fill 0).
    The returned masks are the crops of the input masks (padding counts as background).
    """
    image, mask = _as_image_batch(image), _as_mask_batch(mask)
    _check_mask_matches(image, mask)
    mask = mask.to(image).expand(image.shape[0], -1, -1)
    images, masks = [], []
    for index in range(image.shape[0]):
        try:
            box = mask_box(mask[index], threshold)
        except ValueError as error:
            raise ValueError(f"image {index} of the batch: {error}") from None
        box = expand_box(box, image.shape[1], image.shape[2], margin, square)
        subject = replace_background(image[index:index + 1], mask[index], background)
        images.append(crop_to_box(subject, box, size, background if background is not None else "black"))
        masks.append(crop_to_box(mask[index, :, :, None], box, size, 0.0)[..., 0])
    if len({tuple(crop.shape) for crop in images}) > 1:
        raise ValueError(
            "the subjects' crops have different sizes "
            f"({', '.join(f'{c.shape[2]}x{c.shape[1]}' for c in images)}): set a size so they can form one batch"
        )
    return torch.cat(images), torch.cat(masks)


def prepare_with_box(
    image: torch.Tensor, box: Box, size: int | None = 224, margin: float = 0.0, background: Background = None, square: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The box path: the box acts as the mask (background None keeps the photo around the subject)."""
    image = _as_image_batch(image)
    return prepare_with_mask(image, box_mask(box, image.shape[1], image.shape[2]), size, margin, background, square)


@dataclass(frozen=True)
class FaceDetection:
    """One detected face, in the pixel coordinates of the image it was found in."""

    box: tuple[float, float, float, float]  # (x1, y1, x2, y2)
    score: float
    landmarks: torch.Tensor  # (5, 2) (x, y): left eye, right eye, nose, left and right mouth corner
    embedding: torch.Tensor | None = None  # ArcFace identity embedding (L2-normalised) when recognition ran

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def choose_face(faces: Sequence[FaceDetection], index: int | None = None, image_index: int = 0) -> FaceDetection:
    """The largest face (index None), or the index-th counting left to right (by the box's left edge)."""
    if not faces:
        raise ValueError(f"no face found in image {image_index}; use a clearer photo or the mask/box path for non-faces")
    if index is None:
        return max(faces, key=lambda face: face.area)
    # Left to right is how a user counts people in a group photo.
    ordered = sorted(faces, key=lambda face: (face.box[0], face.box[1]))
    if not 0 <= index < len(ordered):
        noun = "face" if len(ordered) == 1 else "faces"
        raise ValueError(
            f"found {len(ordered)} {noun}, index {index} requested in image {image_index}: "
            f"use 0 to {len(ordered) - 1} (counted left to right) or leave the index empty for the largest face"
        )
    return ordered[index]


def estimate_similarity(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (scale, rotation, translation; no reflection) with target ~ M @ [source; 1].

    Umeyama (1991): rotation from the SVD of the cross-covariance, its last singular direction
    flipped when needed so the determinant is +1. Returns (2, 3) float64.
    """
    source, target = source.to(torch.float64).reshape(-1, 2), target.to(torch.float64).reshape(-1, 2)
    if source.shape != target.shape or source.shape[0] < 2:
        raise ValueError(f"need matching sets of at least 2 points, got {tuple(source.shape)} and {tuple(target.shape)}")
    source_mean, target_mean = source.mean(0), target.mean(0)
    source_centered, target_centered = source - source_mean, target - target_mean
    source_variance = source_centered.square().sum(1).mean()
    if float(source_variance) <= 0:
        raise ValueError("the landmarks coincide: cannot estimate an alignment")
    covariance = target_centered.T @ source_centered / source.shape[0]
    u, singular, vh = torch.linalg.svd(covariance)
    signs = torch.ones(2, dtype=torch.float64)
    if float(torch.linalg.det(u) * torch.linalg.det(vh)) < 0:  # the best orthogonal fit is a reflection: forbid it
        signs[-1] = -1.0
    rotation = u @ torch.diag(signs) @ vh
    scale = (singular * signs).sum() / source_variance
    translation = target_mean - scale * rotation @ source_mean
    return torch.cat([scale * rotation, translation[:, None]], dim=1)


def face_template(size: int = 512) -> torch.Tensor:
    """The ArcFace 112x112 template scaled to a size x size crop (float64, (5, 2))."""
    return torch.tensor(ARCFACE_TEMPLATE_112, dtype=torch.float64) * (size / 112.0)


def warp_affine(image: torch.Tensor, matrix: torch.Tensor, size: int) -> torch.Tensor:
    """Output pixel p samples the input at the inverse of `matrix` (input -> output), bilinear, zeros outside."""
    image = _as_image_batch(image)
    _, height, width, _ = image.shape
    matrix = matrix.to(torch.float64)
    linear_inverse = torch.linalg.inv(matrix[:, :2])
    coordinates = torch.arange(size, dtype=torch.float64)
    output_y, output_x = torch.meshgrid(coordinates, coordinates, indexing="ij")
    output_points = torch.stack([output_x, output_y], dim=-1) - matrix[:, 2]
    source = output_points @ linear_inverse.T  # (size, size, 2) input (x, y), pixel centres at integers
    # align_corners=False: pixel centre i sits at (2 i + 1) / n - 1 in grid_sample's [-1, 1] space.
    grid = torch.stack([(2 * source[..., 0] + 1) / width - 1, (2 * source[..., 1] + 1) / height - 1], dim=-1)
    grid = grid.to(image.dtype)[None].expand(image.shape[0], -1, -1, -1)
    warped = F.grid_sample(image.movedim(-1, 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.movedim(1, -1)


def align_face(image: torch.Tensor, landmarks: torch.Tensor, size: int = 512) -> torch.Tensor:
    """(1, H, W, C) or (H, W, C) and 5 landmarks -> (1, size, size, C), the face on the ArcFace template."""
    landmarks = torch.as_tensor(landmarks, dtype=torch.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"expected 5 (x, y) face landmarks, got shape {tuple(landmarks.shape)}")
    matrix = estimate_similarity(landmarks, face_template(size))
    return warp_affine(image, matrix, size)


INSTALL_INSIGHTFACE = ("pip install insightface onnxruntime (or onnxruntime-gpu): insightface 2.x installs as a "
                       "pure-Python wheel; 0.7.3, the release InstantID and PuLID name, builds a C++ extension and needs "
                       "a compiler; both work with the pack")


def missing_model_files(folder: Path) -> list[str]:
    """The files of the model pack in `folder` (named after the pack: antelopev2, buffalo_l) that are not there; for
    another pack, ["*.onnx"] when the folder holds no ONNX file."""
    files = INSIGHTFACE_MODEL_FILES.get(folder.name)
    if files is None:
        return [] if folder.is_dir() and any(folder.glob("*.onnx")) else ["*.onnx"]
    return [file for file in files if not (folder / file).is_file()]


def load_face_analysis(folder: str | Path, providers: Sequence[str] | None = None, det_size: int = 640):
    """An insightface FaceAnalysis (detection + recognition) from the model pack in `folder`
    (.../antelopev2/ or .../buffalo_l/). The files are checked before insightface is imported, so a missing pack is
    named exactly and nothing is downloaded. insightface 0.7.3 and 2.x both take the folder itself as the pack's name."""
    folder = Path(folder).absolute()
    missing = missing_model_files(folder)
    if missing:
        raise FileNotFoundError(f"insightface model pack '{folder.name}' is incomplete in {folder}/ (missing: "
                                f"{', '.join(missing)})")
    try:
        from insightface.app import FaceAnalysis  # lazy: optional dependency, only the face path needs it
    except ImportError as error:
        raise ImportError(f"the face path needs insightface, which could not be imported ({error}): "
                          f"{INSTALL_INSIGHTFACE}") from error
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    analysis = FaceAnalysis(name=str(folder), root=str(folder.parent), providers=providers,
                            allowed_modules=["detection", "recognition"])
    analysis.prepare(ctx_id=0 if any("CUDA" in provider for provider in providers) else -1, det_size=(det_size, det_size))
    return analysis


def image_to_bgr_uint8(image: torch.Tensor):
    """One ComfyUI image -> the (H, W, 3) BGR uint8 numpy array insightface (OpenCV) expects."""
    image = _as_image_batch(image)
    if image.shape[0] != 1:
        raise ValueError(f"detect faces one image at a time, got a batch of {image.shape[0]}")
    pixels = (image[0, ..., :3].detach().float().cpu() * 255.0).round().clamp(0, 255).to(torch.uint8)
    return pixels.flip(-1).contiguous().numpy()


def detect_faces(face_analysis, image: torch.Tensor) -> list[FaceDetection]:
    """All faces insightface finds in one image, as FaceDetection (boxes and landmarks in pixels)."""
    detections = []
    for face in face_analysis.get(image_to_bgr_uint8(image)):
        embedding = getattr(face, "normed_embedding", None)
        detections.append(FaceDetection(
            box=tuple(float(value) for value in face.bbox[:4]),
            score=float(face.det_score),
            landmarks=torch.as_tensor(face.kps, dtype=torch.float64).reshape(5, 2),
            embedding=None if embedding is None else torch.as_tensor(embedding, dtype=torch.float32),
        ))
    return detections


def prepare_faces(
    face_analysis, image: torch.Tensor, index: int | None = None, size: int = 512
) -> tuple[torch.Tensor, list[FaceDetection]]:
    """Per image of the batch: detect, choose (largest or index), align -> ((B, size, size, C), faces)."""
    image = _as_image_batch(image)
    aligned, chosen = [], []
    for image_index in range(image.shape[0]):
        face = choose_face(detect_faces(face_analysis, image[image_index:image_index + 1]), index, image_index)
        aligned.append(align_face(image[image_index:image_index + 1], face.landmarks, size))
        chosen.append(face)
    return torch.cat(aligned), chosen
