"""Writes the example workflows in workflows/ (graph-editor format), from the table that also gives their template cards
(tools/build_thumbnails.py). Run from the pack root:
    python tools/build_workflows.py

Layout, in the editor's units: nodes stand in columns, each node's title bar (drawn above its pos) NODE_GAP below the
node over it; a group is what the editor's "fit group to nodes" makes of its nodes. Sizes leave room beyond what the
editor computes for a node's slots and widgets (20 px a slot row, 24 a widget, 64 a text box), so it draws them as saved.
"""
import json
from dataclasses import dataclass
from typing import Callable

NEGATIVE = "blurry, lowres, deformed, bad anatomy, watermark, text"
HF = "https://huggingface.co"
# Each model file a workflow names: its folder under models/ and the public file, saved in the loader's
# properties.models as ComfyUI's own templates do, so that the editor's Missing Models panel names the folder and
# offers the download (it downloads only .safetensors-like files from huggingface.co: for the others it gives the link).
MODEL_FILES = {
    "pytorch_model.bin": ("fastcomposer", f"{HF}/mit-han-lab/fastcomposer/resolve/main/pytorch_model.bin"),
    "v1-5-pruned-emaonly.safetensors":
        ("checkpoints", f"{HF}/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly.safetensors"),
    "sd_xl_base_1.0.safetensors":
        ("checkpoints", f"{HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"),
    # IP-Adapter's image encoder, saved under the name the IP-Adapter packs give it
    "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors":
        ("clip_vision", f"{HF}/h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors"),
    "ip-adapter-plus_sd15.safetensors":
        ("ipadapter", f"{HF}/h94/IP-Adapter/resolve/main/models/ip-adapter-plus_sd15.safetensors"),
    "ip-adapter-plus-face_sd15.safetensors":
        ("ipadapter", f"{HF}/h94/IP-Adapter/resolve/main/models/ip-adapter-plus-face_sd15.safetensors"),
    # The authors' demo checkpoint: its file name in their Space is not known here, so the link is the Space's file
    # list, on the hf.co address, which the editor offers to copy but never downloads (it would save the page).
    "nested_attention_official_sdxl.safetensors":
        ("nested_attention", "https://hf.co/spaces/orpatashnik/NestedAttentionEncoder/tree/main"),
}
TITLE_BAR = 30  # the editor draws a node's title bar this far above its pos
NODE_GAP = 40  # from a node's bottom to the next title bar: room for the pack badge the editor draws there
COLUMN_GAP = 80  # room for the links between columns
GROUP_PAD, GROUP_TITLE = 10, 34  # the editor's fit-to-nodes padding, and its group title bar (24 px font x 1.4)
GROUP_HEAD = GROUP_TITLE + GROUP_PAD  # above a group's first title bar
TOP = 20 + GROUP_HEAD  # every column's first title bar, so that a group's title fits above it
WIDE = 480  # wide enough for a file name such as CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors beside its widget label
SUBJECTS, PROMPT, SAMPLING, MAPS, IPADAPTER = "#3f789e", "#8A8", "#88A", "#a1309b", "#b58b2a"  # the editor's palette


@dataclass(frozen=True)
class Example:
    name: str  # workflows/<name>.json; its template card is workflows/<name>.jpg
    method: str  # on the card
    title: str  # on the card
    prompt: str
    subjects: tuple[tuple[str, str], ...]  # (word, photo in photos/), in subject order
    build: Callable[["Example"], "Graph"]
    adapters: tuple[str, ...] = ()  # Nested Attention: each subject's adapter file (adapter_loader picks its loader)
    regions: bool = False  # each subject held to its own side of the picture
    checkpoint: str = "v1-5-pruned-emaonly.safetensors"  # Nested Attention: the base model (models/checkpoints)
    size: int = 512  # image side
    ipadapter: tuple[str, str] = ()  # Nested Attention: (photo, IP-Adapter file) for IPAdapter_plus's node on the model


def drawn_box(node) -> tuple[int, int, int, int]:
    """The node as the editor draws it, title bar included: left, top, right, bottom."""
    (x, y), (width, height) = node["pos"], node["size"]
    return x, y - TITLE_BAR, x + width, y + height


def apart(a, b, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


class Graph:
    def __init__(self):
        self.nodes, self.links, self.groups, self.members = [], [], [], []

    def node(self, type_, size, widgets, inputs=(), outputs=(), title=None):
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": [0, 0], "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0,
                "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs],
                "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
                "properties": {"Node name for S&R": type_}, "widgets_values": widgets}
        models = [{"name": value, "url": MODEL_FILES[value][1], "directory": MODEL_FILES[value][0]}
                  for value in widgets if value in MODEL_FILES]
        if models:
            node["properties"]["models"] = models
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def link(self, source, output_name, target, input_name):
        out_slot = next(i for i, o in enumerate(source["outputs"]) if o["name"] == output_name)
        in_slot = next(i for i, o in enumerate(target["inputs"]) if o["name"] == input_name)
        link_id = len(self.links) + 1
        kind = source["outputs"][out_slot]["type"]
        self.links.append([link_id, source["id"], out_slot, target["id"], in_slot, kind])
        source["outputs"][out_slot]["links"].append(link_id)
        target["inputs"][in_slot]["link"] = link_id

    def group(self, title, color, *nodes):
        boxes = [drawn_box(node) for node in nodes]
        left, top = min(b[0] for b in boxes) - GROUP_PAD, min(b[1] for b in boxes) - GROUP_HEAD
        right, bottom = max(b[2] for b in boxes) + GROUP_PAD, max(b[3] for b in boxes) + GROUP_PAD
        bounding = [left, top, right - left, bottom - top]
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": bounding, "color": color,
                            "font_size": 24, "flags": {}})
        self.members.append({node["id"] for node in nodes})

    def check_layout(self, name):
        """Title bars and badges clear of every other node; groups apart, each over its own nodes only."""
        boxes = {node["id"]: drawn_box(node) for node in self.nodes}
        ids = sorted(boxes)
        for i, a in enumerate(ids):
            for b in ids[i + 1:]:
                if not apart(boxes[a], boxes[b], NODE_GAP):
                    raise ValueError(f"{name}: nodes {a} and {b} are less than {NODE_GAP} px apart")
        areas = [(x, y, x + w, y + h) for x, y, w, h in (group["bounding"] for group in self.groups)]
        for i, (area, members) in enumerate(zip(areas, self.members)):
            strangers = [id_ for id_ in ids if id_ not in members and not apart(area, boxes[id_], 0)]
            if strangers or not all(apart(area, other, 0) for other in areas[i + 1:]):
                raise ValueError(f"{name}: group {self.groups[i]['title']!r} covers nodes {strangers} or another group")

    def save(self, path):
        self.check_layout(path)
        workflow = {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                    "links": self.links, "groups": self.groups, "config": {},
                    "extra": {"ds": {"scale": 0.9, "offset": [40, 40]}}, "version": 0.4}
        with open(path, "w") as f:
            json.dump(workflow, f, indent=2)
            f.write("\n")


def column(x, top, *nodes):
    """Stack the nodes at x, the first title bar at top; the top of whatever comes below them."""
    for node in nodes:
        node["pos"] = [x, top + TITLE_BAR]
        top += TITLE_BAR + node["size"][1] + NODE_GAP
    return top


def right_of(*nodes):
    return max(node["pos"][0] + node["size"][0] for node in nodes) + COLUMN_GAP


def photo(g, word, file, width):
    return g.node("LoadImage", (width, 340), [file, "image"],
                  outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], title=f"Photo: {word}")


def negative_prompt(g, width, clip):
    node = g.node("CLIPTextEncode", (width, 160), [NEGATIVE], inputs=[("clip", "CLIP")],
                  outputs=[("CONDITIONING", "CONDITIONING")], title="Negative prompt")
    g.link(*clip, node, "clip")
    return node


def fastcomposer_loader(g):
    return g.node("SubjectPersonalization_FastComposerLoader", (400, 160), ["pytorch_model.bin"],
                  outputs=[("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("clip_vision", "CLIP_VISION"),
                           ("fastcomposer", "FASTCOMPOSER")], title="FastComposer models")


def fastcomposer_encode(g, loader, prompt):
    encode = g.node("SubjectPersonalization_FastComposerEncode", (420, 320), [prompt, "", 0.2],
                    inputs=[("clip", "CLIP"), ("clip_vision", "CLIP_VISION"), ("fastcomposer", "FASTCOMPOSER"),
                            ("subjects", "SUBJECTS")] + [(f"subject_{i}", "IMAGE") for i in range(1, 5)],
                    outputs=[("positive", "CONDITIONING")], title="Prompt with subjects")
    for name in ("clip", "clip_vision", "fastcomposer"):
        g.link(loader, name, encode, name)
    return encode


def sample_and_save(g, x, settings, prefix, model, positive, negative, vae, patches=(), size=512):
    """The Sampling group at x: the model patches, image size and sampler, then decode and save; the decode node."""
    latent = g.node("EmptyLatentImage", (patches[0]["size"][0] if patches else 320, 120), [size, size, 1],
                    outputs=[("LATENT", "LATENT")], title="Image size")
    sampler = g.node("KSampler", (latent["size"][0], 280), settings,
                     inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                             ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")], title="Sampler")
    decode = g.node("VAEDecode", (420, 60), [], inputs=[("samples", "LATENT"), ("vae", "VAE")],
                    outputs=[("IMAGE", "IMAGE")], title="Decode")
    save = g.node("SaveImage", (420, 460), [prefix], inputs=[("images", "IMAGE")], outputs=[("images", "IMAGE")],
                  title="Result")
    column(x, TOP, *patches, latent, sampler)
    column(right_of(sampler), TOP, decode, save)
    g.group("Sampling", SAMPLING, *patches, latent, sampler, decode, save)
    for (source, output), name in zip((model, positive, negative), ("model", "positive", "negative")):
        g.link(source, output, sampler, name)
    g.link(latent, "LATENT", sampler, "latent_image")
    g.link(sampler, "LATENT", decode, "samples")
    g.link(*vae, decode, "vae")
    g.link(decode, "IMAGE", save, "images")
    return decode


def fastcomposer(example):
    g = Graph()
    loader = fastcomposer_loader(g)
    photos = [photo(g, f"{word} (subject_{i})", file, 400) for i, (word, file) in enumerate(example.subjects, 1)]
    column(40, column(40, TOP, loader) + GROUP_HEAD, *photos)
    g.group("Subjects", SUBJECTS, *photos)
    encode = fastcomposer_encode(g, loader, example.prompt)
    for i, image in enumerate(photos, 1):
        g.link(image, "IMAGE", encode, f"subject_{i}")
    negative = negative_prompt(g, 420, (loader, "clip"))
    column(right_of(loader), TOP, encode, negative)
    g.group("Prompt", PROMPT, encode, negative)
    sample_and_save(g, right_of(encode), [42, "fixed", 50, 5.0, "ddim", "ddim_uniform", 1.0], "fastcomposer",
                    (loader, "model"), (encode, "positive"), (negative, "CONDITIONING"), (loader, "vae"))
    return g


SIDES = (("left", 0.0, 0.5), ("right", 0.5, 1.0))  # a region per subject: name, left and right edges


def region_mask(g, word, side, left, right):
    return g.node("SubjectPersonalization_SubjectRegionMask", (340, 200), [512, 512, left, 0.0, right, 1.0], outputs=[("mask", "MASK")],
                  title=f"Region: {word} ({side} half)")


OFFICIAL_SDXL_FILE = "nested_attention_official_sdxl.safetensors"  # the authors' demo checkpoint, as the README names it
# Each photo's face box (left, top, right, bottom as fractions; the photos are 384x384): what Prepare Face crops when
# insightface or its model pack is missing. A face adapter was trained on face crops, not on whole photos.
FACE_BOXES = {"subject-personalization-astronaut.jpg": (0.31, 0.04, 0.57, 0.37)}
PHOTO_SIZE = 384


def face_crop(g, word, file):
    """Prepare Face on the photo, with the face's box for when insightface is not installed: (box node, crop node)."""
    box = g.node("SubjectPersonalization_SubjectRegionMask", (340, 200), [PHOTO_SIZE, PHOTO_SIZE, *FACE_BOXES[file]],
                 outputs=[("mask", "MASK")], title=f"Face box: {word}")
    crop = g.node("SubjectPersonalization_PrepareFace", (340, 180), ["antelopev2", -1, 224],
                  inputs=[("image", "IMAGE"), ("face_box", "MASK")], outputs=[("image", "IMAGE")],
                  title=f"Face: {word}")
    g.link(box, "mask", crop, "face_box")
    return box, crop


def adapter_loader(g, word, file):
    """The loader of one subject's adapter: the authors' SDXL checkpoint, or an IP-Adapter Plus file."""
    if file == OFFICIAL_SDXL_FILE:
        return g.node("SubjectPersonalization_NestedAttentionOfficialLoader", (WIDE, 110), [file, word], inputs=[("clip", "CLIP")],
                      outputs=[("nested_adapter", "NESTED_ADAPTER")], title=f"Adapter for {word} (official SDXL)")
    kind = "IP-Adapter Plus Face" if "face" in file else "IP-Adapter Plus"
    return g.node("SubjectPersonalization_NestedAttentionIPAdapterLoader", (400, 110), [file, word], inputs=[("clip", "CLIP")],
                  outputs=[("nested_adapter", "NESTED_ADAPTER")], title=f"Adapter for {word} ({kind})")


def nested_attention(example):
    """Nested Attention from existing weights, one adapter loader per subject word (and file)."""
    g = Graph()
    family = "SDXL" if "xl" in example.checkpoint else "SD1.5"
    checkpoint = g.node("CheckpointLoaderSimple", (WIDE, 110), [example.checkpoint],
                        outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], title=f"{family} checkpoint")
    vision = g.node("CLIPVisionLoader", (WIDE, 70), ["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"],
                    outputs=[("CLIP_VISION", "CLIP_VISION")], title="Image encoder (CLIP ViT-H/14)")
    column(40, TOP, checkpoint, vision)
    members, previous, top = [], None, TOP
    for (word, file), adapter_file, (side, left, right) in zip(example.subjects, example.adapters, SIDES):
        adapter = adapter_loader(g, word, adapter_file)
        image = photo(g, word, file, adapter["size"][0])
        subject = g.node("SubjectPersonalization_NestedAttentionSubject", (360, 314), [word, 1.0, 0.0, 1.0, 0, "adapter's own", 1.0],
                         inputs=[("nested_adapter", "NESTED_ADAPTER"), ("clip_vision", "CLIP_VISION"),
                                 ("image", "IMAGE"), ("subjects", "SUBJECTS"), ("mask", "MASK")],
                         outputs=[("subjects", "SUBJECTS")], title=f"Subject: {word}")
        regions = [region_mask(g, word, side, left, right)] if example.regions else []
        face = face_crop(g, word, file) if "face" in adapter_file else ()
        bottom = column(right_of(checkpoint), top, adapter, image)
        if face:
            bottom = max(bottom, column(right_of(adapter), top, *face))
        top = max(bottom, column(right_of(adapter, *face), top, subject, *regions))
        for region in regions:
            g.link(region, "mask", subject, "mask")
        g.link(checkpoint, "CLIP", adapter, "clip")
        g.link(adapter, "nested_adapter", subject, "nested_adapter")
        g.link(vision, "CLIP_VISION", subject, "clip_vision")
        if face:
            g.link(image, "IMAGE", face[1], "image")
            g.link(face[1], "image", subject, "image")
        else:
            g.link(image, "IMAGE", subject, "image")
        if previous is not None:
            g.link(previous, "subjects", subject, "subjects")
        members += [adapter, image, *face, subject, *regions]
        previous = subject
    g.group("Subjects", SUBJECTS, *members)
    encode = g.node("SubjectPersonalization_NestedAttentionEncode", (420, 200), [example.prompt],
                    inputs=[("clip", "CLIP"), ("subjects", "SUBJECTS")], outputs=[("positive", "CONDITIONING")],
                    title="Prompt with subjects")
    negative = negative_prompt(g, 420, (checkpoint, "CLIP"))
    column(right_of(*members), TOP, encode, negative)
    g.group("Prompt", PROMPT, encode, negative)
    g.link(checkpoint, "CLIP", encode, "clip")
    g.link(previous, "subjects", encode, "subjects")
    model = (checkpoint, "MODEL")
    if example.ipadapter:
        model = ipadapter_beside(g, example, (vision, "CLIP_VISION"), model, top)
    apply = g.node("SubjectPersonalization_ApplyNestedAttention", (360, 150), [1.0, 0.0, 1.0],
                   inputs=[("model", "MODEL"), ("positive", "CONDITIONING")], outputs=[("model", "MODEL")],
                   title="Nested Attention on the model")
    g.link(*model, apply, "model")
    g.link(encode, "positive", apply, "positive")
    sample_and_save(g, right_of(encode), [42, "fixed", 30, 6.0, "dpmpp_2m", "karras", 1.0], "nested_attention",
                    (apply, "model"), (encode, "positive"), (negative, "CONDITIONING"), (checkpoint, "VAE"),
                    patches=(apply,), size=example.size)
    return g


def ipadapter_beside(g, example, vision, model, top):
    """IPAdapter_plus's own nodes (cubiq/ComfyUI_IPAdapter_plus) under the subjects, on the model before the pack's
    patch (either order works): its reference photo acts on the whole picture, ungated; the output model."""
    file, ipadapter_file = example.ipadapter
    loader = g.node("IPAdapterModelLoader", (400, 80), [ipadapter_file], outputs=[("IPADAPTER", "IPADAPTER")],
                    title="IPAdapter model (IPAdapter_plus)")
    image = photo(g, "IPAdapter reference", file, 400)
    advanced = g.node("IPAdapterAdvanced", (360, 280), [0.6, "linear", "concat", 0.0, 1.0, "V only"],
                      inputs=[("model", "MODEL"), ("ipadapter", "IPADAPTER"), ("image", "IMAGE"),
                              ("image_negative", "IMAGE"), ("attn_mask", "MASK"), ("clip_vision", "CLIP_VISION")],
                      outputs=[("MODEL", "MODEL")], title="IPAdapter on the model")
    column(40, top + GROUP_HEAD + GROUP_PAD, loader, image)
    column(right_of(loader), top + GROUP_HEAD + GROUP_PAD, advanced)
    g.group("IPAdapter (IPAdapter_plus)", IPADAPTER, loader, image, advanced)
    g.link(*model, advanced, "model")
    g.link(loader, "IPADAPTER", advanced, "ipadapter")
    g.link(image, "IMAGE", advanced, "image")
    g.link(*vision, advanced, "clip_vision")
    return advanced, "MODEL"


def two_subjects_with_masks(example):
    """FastComposer with a subject list: each person held to one half of the picture, and where they landed shown."""
    g = Graph()
    loader = fastcomposer_loader(g)
    top = column(40, TOP, loader) + GROUP_HEAD
    members, previous = [], None
    for (word, file), (side, left, right) in zip(example.subjects, SIDES):
        image = photo(g, word, file, 400)
        region = region_mask(g, word, side, left, right)
        subject = g.node("SubjectPersonalization_AddSubject", (340, 230), [word, 1.0, 0.0, 1.0, 16],
                         inputs=[("image", "IMAGE"), ("subjects", "SUBJECTS"), ("mask", "MASK")],
                         outputs=[("subjects", "SUBJECTS")], title=f"Subject: {word}")
        next_top = column(40, top, image)
        column(right_of(image), top, region)
        column(right_of(region), top, subject)
        top = next_top
        g.link(image, "IMAGE", subject, "image")
        g.link(region, "mask", subject, "mask")
        if previous is not None:
            g.link(previous, "subjects", subject, "subjects")
        members += [image, region, subject]
        previous = subject
    g.group("Subjects", SUBJECTS, *members)
    encode = fastcomposer_encode(g, loader, example.prompt)
    g.link(previous, "subjects", encode, "subjects")
    negative = negative_prompt(g, 420, (loader, "clip"))
    column(right_of(*members), TOP, encode, negative)
    g.group("Prompt", PROMPT, encode, negative)
    masks = g.node("SubjectPersonalization_ApplySubjectMasks", (420, 60), [], inputs=[("model", "MODEL"), ("positive", "CONDITIONING")],
                   outputs=[("model", "MODEL")], title="Each subject in its region")
    record = g.node("SubjectPersonalization_RecordSubjectAttention", (420, 150), ["all", 0.0, 1.0],
                    inputs=[("model", "MODEL"), ("positive", "CONDITIONING")],
                    outputs=[("model", "MODEL"), ("recording", "SUBJECT_ATTENTION")],
                    title="Record where subjects are attended")
    g.link(loader, "model", masks, "model")
    g.link(encode, "positive", masks, "positive")
    g.link(masks, "model", record, "model")
    g.link(encode, "positive", record, "positive")
    decode = sample_and_save(g, right_of(encode), [42, "fixed", 50, 5.0, "ddim", "ddim_uniform", 1.0],
                             "fastcomposer_masks", (record, "model"), (encode, "positive"), (negative, "CONDITIONING"),
                             (loader, "vae"), patches=(masks, record))
    maps = g.node("SubjectPersonalization_SubjectAttentionMaps", (420, 130), [0.6, 0.5],
                  inputs=[("recording", "SUBJECT_ATTENTION"), ("image", "IMAGE")],
                  outputs=[("heatmap", "IMAGE"), ("masks", "MASK")], title="Attention maps")
    preview = g.node("PreviewImage", (420, 460), [], inputs=[("images", "IMAGE")], outputs=[("images", "IMAGE")],
                     title="Where each subject landed")
    column(right_of(decode), TOP, maps, preview)
    g.group("Attention maps", MAPS, maps, preview)
    g.link(record, "recording", maps, "recording")
    g.link(decode, "IMAGE", maps, "image")
    g.link(maps, "heatmap", preview, "images")
    return g


# The shipped photos (photos/, copied as they are named into ComfyUI's input folder by nodes/example_photos.py)
CAMERAMAN, ASTRONAUT, CAT = (f"subject-personalization-{name}.jpg" for name in ("camera", "astronaut", "chelsea"))
EXAMPLES = (
    Example("fastcomposer_single_subject", "FastComposer", "One subject in a new scene",
            "a man <|image|> sitting in a cafe, photograph", (("man", CAMERAMAN),), fastcomposer),
    Example("fastcomposer_two_subjects", "FastComposer", "Two subjects in one picture",
            "a man <|image|> and a woman <|image|> reading a book together",
            (("man", CAMERAMAN), ("woman", ASTRONAUT)), fastcomposer),
    Example("nested_ipadapter_single_subject", "Nested Attention", "One subject, IP-Adapter Plus Face weights",
            "a photo of a woman hiking in the mountains, golden hour", (("woman", ASTRONAUT),),
            nested_attention, adapters=("ip-adapter-plus-face_sd15.safetensors",)),
    Example("nested_ipadapter_person_and_cat", "Nested Attention", "A woman and a cat, one IP-Adapter file each",
            "a photo of a woman sitting on a bench with a cat in a park",
            (("woman", ASTRONAUT), ("cat", CAT)), nested_attention,
            adapters=("ip-adapter-plus-face_sd15.safetensors", "ip-adapter-plus_sd15.safetensors"), regions=True),
    Example("nested_with_ipadapter", "Nested Attention", "A woman by Nested Attention, a cat by IPAdapter",
            "a photo of a woman holding a cat in a garden", (("woman", ASTRONAUT),), nested_attention,
            adapters=("ip-adapter-plus-face_sd15.safetensors",), ipadapter=(CAT, "ip-adapter-plus_sd15.safetensors")),
    Example("nested_official_sdxl", "Nested Attention", "One person, the authors' SDXL checkpoint",
            "a photo of a person as a chef in a sunny kitchen", (("person", ASTRONAUT),), nested_attention,
            adapters=(OFFICIAL_SDXL_FILE,), checkpoint="sd_xl_base_1.0.safetensors", size=1024),
    Example("two_subjects_with_masks", "FastComposer", "Two subjects, one region each, attention maps",
            "a man and a woman reading a book together", (("man", CAMERAMAN), ("woman", ASTRONAUT)),
            two_subjects_with_masks),
)

if __name__ == "__main__":
    for example in EXAMPLES:
        example.build(example).save(f"workflows/{example.name}.json")
