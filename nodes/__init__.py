"""Node registry: each feature's module contributes its classes here, under the pack's ids (naming.node_id)."""
from . import (attention_map_nodes, fastcomposer_encode, fastcomposer_loader, nested_adapter_nodes, nested_apply,
               nested_encode, nested_import_nodes, nested_subject, subject_preparation_nodes, subject_regions, subjects)
from .example_photos import install_example_photos
from .model_folders import register_model_folders
from .naming import node_id

register_model_folders()
install_example_photos()

_FEATURES = (fastcomposer_loader, fastcomposer_encode, nested_adapter_nodes, nested_import_nodes, nested_subject,
             nested_encode, nested_apply, subjects, subject_regions, attention_map_nodes, subject_preparation_nodes)

NODE_CLASS_MAPPINGS = {node_id(name): cls for feature in _FEATURES for name, cls in feature.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id(name): display for feature in _FEATURES
                              for name, display in feature.NODE_DISPLAY_NAME_MAPPINGS.items()}
