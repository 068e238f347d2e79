"""Writes the example workflows in workflows/ (graph-editor format), laid out on a grid. Run from the pack root:
    python tools/build_workflows.py
"""
import json

NEGATIVE = "blurry, lowres, deformed, bad anatomy, watermark, text"


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, type_, pos, size, widgets, inputs=(), outputs=(), title=None):
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0,
                "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs],
                "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
                "properties": {"Node name for S&R": type_}, "widgets_values": widgets}
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

    def save(self, path):
        workflow = {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                    "links": self.links, "groups": [], "config": {},
                    "extra": {"ds": {"scale": 0.9, "offset": [40, 40]}}, "version": 0.4}
        with open(path, "w") as f:
            json.dump(workflow, f, indent=2)
            f.write("\n")


def sample_and_save(g, x, settings, prefix, model, positive, negative, latent, vae):
    """KSampler -> VAE Decode -> Save Image in the two columns starting at x; (node, output name) pairs in."""
    sampler = g.node("KSampler", (x, 60), (320, 270), settings,
                     inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                             ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")])
    decode = g.node("VAEDecode", (x + 360, 60), (210, 50), [], inputs=[("samples", "LATENT"), ("vae", "VAE")],
                    outputs=[("IMAGE", "IMAGE")])
    save = g.node("SaveImage", (x + 360, 160), (420, 460), [prefix], inputs=[("images", "IMAGE")])
    for (source, output), name in zip((model, positive, negative, latent), ("model", "positive", "negative", "latent_image")):
        g.link(source, output, sampler, name)
    g.link(sampler, "LATENT", decode, "samples")
    g.link(*vae, decode, "vae")
    g.link(decode, "IMAGE", save, "images")


def fastcomposer(path, prompt, images):
    g = Graph()
    loader = g.node("FastComposerLoader", (40, 60), (320, 180), ["pytorch_model.bin"],
                    outputs=[("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("clip_vision", "CLIP_VISION"),
                             ("fastcomposer", "FASTCOMPOSER")])
    loads = [g.node("LoadImage", (40, 300 + 360 * i), (320, 320), [name, "image"],
                    outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], title=f"Subject {i + 1}")
             for i, name in enumerate(images)]
    subject_inputs = [(f"subject_{i}", "IMAGE") for i in range(1, 5)]
    encode = g.node("FastComposerEncode", (420, 60), (420, 300), [prompt, "", 0.2],
                    inputs=[("clip", "CLIP"), ("clip_vision", "CLIP_VISION"), ("fastcomposer", "FASTCOMPOSER"),
                            ("subjects", "SUBJECTS")] + subject_inputs,
                    outputs=[("CONDITIONING", "CONDITIONING")])
    negative = g.node("CLIPTextEncode", (420, 400), (420, 160), [NEGATIVE], inputs=[("clip", "CLIP")],
                      outputs=[("CONDITIONING", "CONDITIONING")], title="Negative prompt")
    latent = g.node("EmptyLatentImage", (420, 600), (420, 110), [512, 512, 1], outputs=[("LATENT", "LATENT")])
    for name in ("clip", "clip_vision", "fastcomposer"):
        g.link(loader, name, encode, name)
    for i, load in enumerate(loads):
        g.link(load, "IMAGE", encode, f"subject_{i + 1}")
    g.link(loader, "clip", negative, "clip")
    sample_and_save(g, 900, [42, "fixed", 50, 5.0, "ddim", "ddim_uniform", 1.0], "fastcomposer", (loader, "model"),
                    (encode, "CONDITIONING"), (negative, "CONDITIONING"), (latent, "LATENT"), (loader, "vae"))
    g.save(path)


def nested(path, prompt, subjects):
    """subjects: [(adapter file, word, image file)]; each subject uses its own adapter node."""
    g = Graph()
    checkpoint = g.node("CheckpointLoaderSimple", (40, 60), (320, 100), ["v1-5-pruned-emaonly.safetensors"],
                        outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")])
    vision = g.node("CLIPVisionLoader", (40, 200), (320, 60), ["CLIP-ViT-L-14.safetensors"],
                    outputs=[("CLIP_VISION", "CLIP_VISION")])
    previous = None
    for i, (adapter_file, word, image_file) in enumerate(subjects):
        top = 60 + 420 * i
        adapter = g.node("NestedAttentionLoader", (400, top), (320, 60), [adapter_file],
                         outputs=[("nested_adapter", "NESTED_ADAPTER")], title=f"Adapter: {word}")
        image = g.node("LoadImage", (400, top + 100), (320, 280), [image_file, "image"],
                       outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], title=f"Photo: {word}")
        subject = g.node("NestedAttentionSubject", (760, top), (320, 230), [word, 1.0, 0.0, 1.0, 0],
                         inputs=[("nested_adapter", "NESTED_ADAPTER"), ("clip_vision", "CLIP_VISION"), ("image", "IMAGE"),
                                 ("subjects", "SUBJECTS"), ("mask", "MASK")],
                         outputs=[("subjects", "SUBJECTS")], title=f"Subject: {word}")
        g.link(adapter, "nested_adapter", subject, "nested_adapter")
        g.link(vision, "CLIP_VISION", subject, "clip_vision")
        g.link(image, "IMAGE", subject, "image")
        if previous is not None:
            g.link(previous, "subjects", subject, "subjects")
        previous = subject
    column = 1120
    encode = g.node("NestedAttentionEncode", (column, 60), (400, 200), [prompt],
                    inputs=[("clip", "CLIP"), ("subjects", "SUBJECTS")], outputs=[("CONDITIONING", "CONDITIONING")])
    negative = g.node("CLIPTextEncode", (column, 300), (400, 160), [NEGATIVE], inputs=[("clip", "CLIP")],
                      outputs=[("CONDITIONING", "CONDITIONING")], title="Negative prompt")
    apply = g.node("ApplyNestedAttention", (column, 500), (400, 130), [1.0, 0.0, 1.0],
                   inputs=[("model", "MODEL"), ("positive", "CONDITIONING")], outputs=[("MODEL", "MODEL")])
    latent = g.node("EmptyLatentImage", (column, 670), (400, 110), [512, 512, 1], outputs=[("LATENT", "LATENT")])
    g.link(checkpoint, "CLIP", encode, "clip")
    g.link(previous, "subjects", encode, "subjects")
    g.link(checkpoint, "CLIP", negative, "clip")
    g.link(checkpoint, "MODEL", apply, "model")
    g.link(encode, "CONDITIONING", apply, "positive")
    sample_and_save(g, 1560, [42, "fixed", 30, 6.0, "dpmpp_2m", "karras", 1.0], "nested_attention", (apply, "MODEL"),
                    (encode, "CONDITIONING"), (negative, "CONDITIONING"), (latent, "LATENT"), (checkpoint, "VAE"))
    g.save(path)


def two_subjects_with_masks(path):
    """FastComposer with a subject list: each person held to one half of the picture, and where they landed shown."""
    g = Graph()
    loader = g.node("FastComposerLoader", (40, 60), (320, 180), ["pytorch_model.bin"],
                    outputs=[("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("clip_vision", "CLIP_VISION"),
                             ("fastcomposer", "FASTCOMPOSER")])
    previous = None
    for i, (word, image_file, left, right) in enumerate((("man", "subject_man.png", 0.0, 0.5),
                                                          ("woman", "subject_woman.png", 0.5, 1.0))):
        top = 300 + 400 * i
        image = g.node("LoadImage", (40, top), (320, 320), [image_file, "image"],
                       outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], title=f"Photo: {word}")
        region = g.node("SubjectRegionMask", (400, top), (320, 200), [512, 512, left, 0.0, right, 1.0],
                        outputs=[("MASK", "MASK")], title=f"Region: {word} ({'left' if left == 0 else 'right'} half)")
        subject = g.node("AddSubject", (760, top), (320, 230), [word, 1.0, 0.0, 1.0, 16],
                         inputs=[("image", "IMAGE"), ("subjects", "SUBJECTS"), ("mask", "MASK")],
                         outputs=[("subjects", "SUBJECTS")], title=f"Subject: {word}")
        g.link(image, "IMAGE", subject, "image")
        g.link(region, "MASK", subject, "mask")
        if previous is not None:
            g.link(previous, "subjects", subject, "subjects")
        previous = subject
    column = 1120
    encode = g.node("FastComposerEncode", (column, 60), (420, 300), ["a man and a woman reading a book together", "", 0.2],
                    inputs=[("clip", "CLIP"), ("clip_vision", "CLIP_VISION"), ("fastcomposer", "FASTCOMPOSER"),
                            ("subjects", "SUBJECTS")] + [(f"subject_{i}", "IMAGE") for i in range(1, 5)],
                    outputs=[("CONDITIONING", "CONDITIONING")])
    negative = g.node("CLIPTextEncode", (column, 400), (420, 160), [NEGATIVE], inputs=[("clip", "CLIP")],
                      outputs=[("CONDITIONING", "CONDITIONING")], title="Negative prompt")
    masks = g.node("ApplySubjectMasks", (column, 600), (420, 60), [],
                   inputs=[("model", "MODEL"), ("positive", "CONDITIONING")], outputs=[("MODEL", "MODEL")])
    record = g.node("RecordSubjectAttention", (column, 700), (420, 140), ["all", 0.0, 1.0],
                    inputs=[("model", "MODEL"), ("positive", "CONDITIONING")],
                    outputs=[("model", "MODEL"), ("recording", "SUBJECT_ATTENTION")])
    latent = g.node("EmptyLatentImage", (column, 880), (420, 110), [512, 512, 1], outputs=[("LATENT", "LATENT")])
    for name in ("clip", "clip_vision", "fastcomposer"):
        g.link(loader, name, encode, name)
    g.link(previous, "subjects", encode, "subjects")
    g.link(loader, "clip", negative, "clip")
    g.link(loader, "model", masks, "model")
    g.link(encode, "CONDITIONING", masks, "positive")
    g.link(masks, "MODEL", record, "model")
    g.link(encode, "CONDITIONING", record, "positive")
    sample_and_save(g, 1580, [42, "fixed", 50, 5.0, "ddim", "ddim_uniform", 1.0], "fastcomposer_masks",
                    (record, "model"), (encode, "CONDITIONING"), (negative, "CONDITIONING"), (latent, "LATENT"),
                    (loader, "vae"))
    decode = next(node for node in g.nodes if node["type"] == "VAEDecode")
    maps = g.node("SubjectAttentionMaps", (1940, 660), (420, 130), [0.6, 0.5],
                  inputs=[("recording", "SUBJECT_ATTENTION"), ("image", "IMAGE")],
                  outputs=[("heatmap", "IMAGE"), ("masks", "MASK")])
    preview = g.node("PreviewImage", (1940, 830), (420, 460), [], inputs=[("images", "IMAGE")], title="Where each subject landed")
    g.link(record, "recording", maps, "recording")
    g.link(decode, "IMAGE", maps, "image")
    g.link(maps, "heatmap", preview, "images")
    g.save(path)


fastcomposer("workflows/fastcomposer_single_subject.json", "a man <|image|> sitting in a cafe, photograph",
             ["subject_man.png"])
fastcomposer("workflows/fastcomposer_two_subjects.json", "a man <|image|> and a woman <|image|> reading a book together",
             ["subject_man.png", "subject_woman.png"])
nested("workflows/nested_single_subject.json", "a photo of a person hiking in the mountains, golden hour",
       [("nested_person_sd15.safetensors", "person", "subject_person.png")])
nested("workflows/nested_person_and_pet.json", "a photo of a person sitting on a bench with a dog in a park",
       [("nested_person_sd15.safetensors", "person", "subject_person.png"),
        ("nested_pet_sd15.safetensors", "dog", "subject_dog.png")])
two_subjects_with_masks("workflows/two_subjects_with_masks.json")
