"""What the pack's nodes are called where ComfyUI and other packs can see it.

Node ids: ComfyUI keeps one class per id and the pack loaded last wins, silently, so every id is the node's own name
behind NODE_ID_PREFIX, which no other pack uses. Saved workflows store ids, so they never change once released.
Categories: the menu path, each part in Title Case. Search aliases: the words a user types for these nodes (ComfyUI
0.33.0 lists a node's SEARCH_ALIASES in its node search; 0.8.0 ignores the attribute).
"""
NODE_ID_PREFIX = "SubjectPersonalization_"

PACK_CATEGORY = "Subject Personalization"
FASTCOMPOSER_CATEGORY = f"{PACK_CATEGORY}/FastComposer"
NESTED_ATTENTION_CATEGORY = f"{PACK_CATEGORY}/Nested Attention"
COMPOSITION_CATEGORY = f"{PACK_CATEGORY}/Composition"
PREPARATION_CATEGORY = f"{PACK_CATEGORY}/Preparation"

PERSONALIZATION_ALIASES = ["personalize", "personalization", "subject", "identity", "tuning-free"]


def node_id(name: str) -> str:
    """The id ComfyUI registers the node `name` under."""
    return NODE_ID_PREFIX + name
