"""The pack's model folders under ComfyUI/models/, also reachable through extra_model_paths.yaml."""
import os

import folder_paths

from ..encoders.official_nested_import import IMPORT_SUFFIXES

MODEL_FOLDERS = {
    "fastcomposer": {".bin", ".safetensors"},
    "nested_attention": set(IMPORT_SUFFIXES),  # adapters (.safetensors), and the official checkpoint in any form
    "ipadapter": {".safetensors", ".bin"},  # IP-Adapter users' folder (IPAdapter_plus registers it too)
    "insightface": set(),
}


def register_model_folders() -> None:
    for name, extensions in MODEL_FOLDERS.items():
        default_path = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:  # already named in extra_model_paths.yaml
            paths, known_extensions = folder_paths.folder_names_and_paths[name]
            if default_path not in paths:
                paths.append(default_path)
            known_extensions.update(extensions)
        else:
            folder_paths.folder_names_and_paths[name] = ([default_path], set(extensions))
