"""Where face users keep insightface model packs, and the FaceAnalysis made from one.

InstantID and PuLID load antelopev2 from ComfyUI/models/insightface/models/antelopev2/, and many users keep buffalo_l
beside it: those folders work as they are. Also searched: a pack directly in an insightface folder
(models/insightface/antelopev2/), and every insightface folder named in extra_model_paths.yaml.
"""
from functools import lru_cache
from pathlib import Path

import folder_paths

from ..encoders.subject_preparation import INSIGHTFACE_MODEL_FILES, INSTALL_INSIGHTFACE, load_face_analysis, missing_model_files


def candidate_folders(name: str) -> list[Path]:
    """Where the pack `name` may be, in the order searched."""
    roots = [Path(root) for root in folder_paths.get_folder_paths("insightface")]
    return [root / "models" / name for root in roots] + [root / name for root in roots]


def find_model_pack(name: str) -> Path:
    """The first complete copy of the pack, or a refusal naming the pack, its files, the folders searched, and what
    was found there."""
    folders = candidate_folders(name)
    for folder in folders:
        if not missing_model_files(folder):
            return folder
    files = INSIGHTFACE_MODEL_FILES.get(name)
    found = []
    for folder in folders:
        if (folder / name).is_dir():  # the antelopev2 zip unpacks into a folder of the same name
            found.append(f"{folder}/ holds a folder {name}/: move its files up one level")
        elif folder.is_dir():
            found.append(f"{folder}/ lacks {', '.join(missing_model_files(folder))}")
    raise FileNotFoundError(
        f"insightface model pack '{name}' not found: put {'the files ' + ', '.join(files) if files else 'its .onnx files'} "
        f"in {folders[0]}/ (where InstantID and PuLID keep it), or in an insightface folder of extra_model_paths.yaml. "
        f"Searched: {', '.join(f'{folder}/' for folder in folders)}"
        f"{'; ' + '; '.join(found) if found else ''}. The pack also needs insightface itself: {INSTALL_INSIGHTFACE}")


def face_analysis(name: str):
    """insightface's FaceAnalysis for the pack `name`, kept while its files stay the same."""
    folder = find_model_pack(name)
    stamp = tuple((file.name, file.stat().st_mtime_ns) for file in sorted(folder.glob("*.onnx")))
    return _cached_face_analysis(folder, stamp)


@lru_cache(maxsize=2)
def _cached_face_analysis(folder: Path, stamp: tuple):
    return load_face_analysis(folder)
