"""The packs users put in the same graph as this one (IPAdapter_plus, InstantID, PuLID), installed from their source
snapshots in ../shared/peers as custom nodes of the ComfyUI under test: their real code, never a copy in this repository.
"""
import hashlib
import os
import tarfile
from pathlib import Path

import pytest

PEERS_FOLDER = Path(os.environ.get("SUBJECT_TEST_PEERS") or Path(__file__).resolve().parents[2] / "shared" / "peers")
# Folder name in custom_nodes/ (each archive's top folder) -> its archive in PEERS_FOLDER.
PEERS = {
    "ComfyUI_IPAdapter_plus": "ComfyUI_IPAdapter_plus-9d076a3.tar.gz",
    "ComfyUI_InstantID": "ComfyUI_InstantID-1ef34ef.tar.gz",
    "PuLID_ComfyUI": "PuLID_ComfyUI-4e1fd40.tar.gz",
}
NOT_THERE = (f"the other packs' source snapshots are not in {PEERS_FOLDER} (the project's shared/peers, beside the pack; "
             f"or set SUBJECT_TEST_PEERS to that folder)")


def install_peers(custom_nodes: Path, names: tuple[str, ...] = tuple(PEERS)) -> list[str]:
    """Extract the named packs into custom_nodes after checking each archive against SHA256SUMS; the names installed
    (none where the snapshots are not there: the tests that need them skip, and CI fails on those skips)."""
    if not PEERS_FOLDER.is_dir():
        return []
    sums = dict(line.split()[::-1] for line in (PEERS_FOLDER / "SHA256SUMS").read_text().splitlines() if line.strip())
    for name in names:
        archive = PEERS_FOLDER / PEERS[name]
        if hashlib.sha256(archive.read_bytes()).hexdigest() != sums[archive.name]:
            raise ValueError(f"{archive} does not match its line in {PEERS_FOLDER / 'SHA256SUMS'}: restore the file")
        with tarfile.open(archive) as tar:
            tar.extractall(custom_nodes, filter="data")
    return list(names)


def require_peer(node_mappings: dict, *node_classes: str) -> None:
    """Skip (a failure in CI) where ComfyUI did not load the pack that defines one of node_classes."""
    missing = [name for name in node_classes if name not in node_mappings]
    if missing:
        pytest.skip(f"{', '.join(missing)} not registered: {NOT_THERE}, or its pack failed to import (see 'IMPORT "
                    f"FAILED' in the log)")
