"""The example workflows' subject photos (photos/, with their licences): copied into ComfyUI's input folder, under
input/subject_personalization/, where Load Image finds them; a file already there is never overwritten."""
import logging
import shutil
from pathlib import Path

import folder_paths

PHOTOS = Path(__file__).resolve().parent.parent / "photos"
INPUT_SUBFOLDER = "subject_personalization"


def install_example_photos() -> None:
    target = Path(folder_paths.get_input_directory()) / INPUT_SUBFOLDER
    try:
        target.mkdir(parents=True, exist_ok=True)
        for photo in sorted(PHOTOS.glob("*.jpg")):
            if not (target / photo.name).exists():
                shutil.copyfile(photo, target / photo.name)
    except OSError as error:  # a read-only input folder costs the examples their photos, never the pack its nodes
        logging.warning(f"subject personalization: could not copy the example photos into {target}: {error}; the "
                        f"example workflows need their photos chosen by hand")
