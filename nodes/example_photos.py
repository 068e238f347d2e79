"""The example workflows' subject photos (photos/, with their licences): copied into the top level of ComfyUI's input
folder, the only place Load Image lists (and the graph editor checks a workflow's image against that list). Their names
carry the pack's name, so they cannot collide with a user's files; a file already there is never overwritten, and
each is copied beside its name and renamed into place, so a ComfyUI killed while it starts leaves no photo cut short."""
import logging
import shutil
from pathlib import Path

import folder_paths

from ..encoders.kill_safe import written_beside

PHOTOS = Path(__file__).resolve().parent.parent / "photos"


def install_example_photos() -> None:
    target = Path(folder_paths.get_input_directory())
    try:
        target.mkdir(parents=True, exist_ok=True)
        for photo in sorted(PHOTOS.glob("*.jpg")):
            if not (target / photo.name).exists():
                with written_beside(target / photo.name) as partial:
                    shutil.copyfile(photo, partial)
    except OSError as error:  # a read-only input folder costs the examples their photos, never the pack its nodes
        logging.warning(f"subject personalization: could not copy the example photos into {target}: {error}; the "
                        f"example workflows need their photos chosen by hand")
