"""A long session against a real ComfyUI server: its own main.py in a subprocess, driven over HTTP only.

One server runs a queue of 58 prompts built from 11 distinct graphs, interleaved with repeats: unpatched SD1.5,
Nested Attention with one subject and with two (two adapters, three photos), with and without region masks, at
strengths 0.5 to 1.25, with and without Record Subject Attention + Subject Attention Maps, and one graph with two
samplers on two differently patched models; one prompt is interrupted mid-sampling through /interrupt. Claims:
- every result equals, pixel for pixel, the same graph run once in a fresh server (CPU with PyTorch's SDPA is
  deterministic), so nothing a prompt leaves behind (patches, cached nodes, recordings, an interrupted sampler) changes
  a later one; in particular an unpatched graph after patched ones equals a fresh unpatched run, and a recording holds
  only its own prompt's maps even when its Record node is reused from ComfyUI's cache;
- each sampler of the two-sampler graph gives exactly what its patched model gives alone;
- the interrupted prompt ends with ComfyUI's execution_interrupted, raised in the sampler, and the next prompt runs;
- the server's resident memory after the queue is within RSS_GROWTH_BOUND of its value after warm-up;
- the server still answers afterwards.

Models: "tiny" models cannot pass the loaders (ComfyUI's checkpoint loader recognises SD1.5 only at its real size), so
the servers read the session's full-size seeded random files (SD1.5 checkpoint, CLIP ViT-L vision tower, the person and
pet adapters) through an extra_model_paths.yaml; images are 64x64 with 2 steps, so a prompt takes seconds on a CPU.
"""
import io
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from hostenv import require_comfyui

COMFYUI_PATH = Path(require_comfyui())
import numpy as np  # noqa: E402
import psutil  # noqa: E402
from PIL import Image  # noqa: E402
from model_files import model_paths_config  # noqa: E402
from synthetic_photos import synthetic_subject  # noqa: E402

from subject_personalization.tools.comfy_server import ComfyServer, running_server  # noqa: E402

SIZE, STEPS, LONG_STEPS = 64, 2, 40
BOOT_TIMEOUT = 180      # s: imports, the pack, the database
PROMPT_TIMEOUT = 180    # s per prompt from the previous one's end (seen: 3 s alone, 55 s on a busy machine)
INTERRUPT_AFTER = 3.0   # s after the long prompt starts: its upstream nodes are cached, so it is sampling by then
HTTP_TIMEOUT = 120      # s: a busy 2-core machine was seen to leave a GET unanswered for 30 s mid-prompt
GC_SETTLE = 11          # s: ComfyUI's prompt worker collects garbage at most 10 s after a prompt
# Measured on a 2-core machine with RETURN_FREED_MEMORY: -186 MiB over the queue on 0.8.0 (+965 MiB without it, glibc
# keeping freed blocks); the bound leaves room for allocator noise while catching a leak of one model copy (the vision
# tower alone is 1.2 GB).
RSS_GROWTH_BOUND = 500 * 2**20

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
VISION = "CLIP-ViT-L-14.safetensors"
NEGATIVE = "blurry, lowres, watermark"
HIKE = "a photo of a person hiking in the mountains"
PAIR = "a photo of a person sitting on a bench with a dog"
PHOTOS = {"person_a.png": 0, "person_b.png": 1, "dog.png": 2}  # input file -> seed
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)        # region boxes: left, top, right, bottom
CLIENT = "server-session-test"
# glibc keeps freed blocks below its (growing) mmap threshold in its per-thread heaps, so a server's RSS counts memory it
# no longer uses; a fixed 1 MiB threshold returns every freed tensor, so RSS growth is memory still held.
RETURN_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


@dataclass(frozen=True)
class SubjectSpec:
    adapter: str
    photo: str
    word: str
    region: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class Branch:
    """One sampler's chain: its prompt, the subjects patched into its model, and what it records."""
    text: str
    subjects: tuple[SubjectSpec, ...] = ()
    strength: float = 1.0
    record: str | None = None  # Record Subject Attention's layers; None: not recorded
    seed: int = 42
    steps: int = STEPS


PERSON = SubjectSpec("nested_person_sd15.safetensors", "person_a.png", "person")
PERSON_B = SubjectSpec("nested_person_sd15.safetensors", "person_b.png", "person")
DOG = SubjectSpec("nested_pet_sd15.safetensors", "dog.png", "dog")
PAIR_MASKED = (replace(PERSON_B, region=LEFT), replace(DOG, region=RIGHT))

GRAPHS = {
    "plain": (Branch(HIKE),),
    "plain_pair": (Branch(PAIR, seed=7),),
    "person": (Branch(HIKE, (PERSON,)),),
    "person_b_half_strength": (Branch(HIKE, (PERSON_B,), strength=0.5),),
    "person_left": (Branch(HIKE, (replace(PERSON, region=LEFT),), strength=1.25),),
    "person_and_dog": (Branch(PAIR, (PERSON, DOG)),),
    "person_and_dog_masked": (Branch(PAIR, PAIR_MASKED, strength=0.75),),
    "person_recorded": (Branch(HIKE, (PERSON,), record="all"),),
    "person_recorded_seed_43": (Branch(HIKE, (PERSON,), record="all", seed=43),),
    "person_and_dog_masked_recorded": (Branch(PAIR, PAIR_MASKED, strength=0.75, record="output (up)"),),
    # Each branch is exactly another graph's: the samplers must give what each patched model gives alone.
    "two_samplers": (Branch(HIKE, (PERSON,)), Branch(PAIR, PAIR_MASKED, strength=0.75)),
}
NAMES = list(GRAPHS)
# Sampled until /interrupt stops it; after "person_recorded" everything upstream of its sampler is cached.
LONG = (Branch(HIKE, (PERSON,), record="all", steps=LONG_STEPS),)


def interleaved(start: int, stride: int) -> list[str]:
    """Every graph once, in an order where each has other neighbours than in the other rounds (11 is prime)."""
    return [NAMES[(start + i * stride) % len(NAMES)] for i in range(len(NAMES))]


WARM_UP = NAMES  # person_recorded then person_recorded_seed_43: the second reuses the cached Record node
BEFORE_INTERRUPT = interleaved(5, 3) + interleaved(9, 5)
INTERRUPT_SEGMENT = ("person_recorded", "person_recorded_seed_43")  # the long prompt goes between them
AFTER_INTERRUPT = interleaved(1, 7) + interleaved(4, 2)
# The fresh server: unpatched graphs before any patched one; no graph next to one that shares its sampler's model
# (two_samplers and its twins, the two seeds of person_recorded), so each computes its own results.
FRESH_ORDER = ["plain", "plain_pair", "two_samplers", "person_recorded_seed_43", "person_and_dog", "person_recorded",
               "person_left", "person_and_dog_masked_recorded", "person_b_half_strength", "person_and_dog_masked", "person"]


class Graph:
    """An API-format prompt built node by node; identical nodes are one node (a loader feeds every branch)."""

    def __init__(self):
        self.prompt, self.labels = {}, {}  # labels: output node id -> what it shows ("image 0", "heatmap 0")

    def add(self, class_type: str, label: str | None = None, **inputs) -> str:
        node = {"class_type": class_type, "inputs": inputs}
        node_id = next((known for known, existing in self.prompt.items() if existing == node), str(len(self.prompt) + 1))
        self.prompt[node_id] = node
        if label:
            self.labels[node_id] = label
        return node_id


def build(name: str, branches: tuple[Branch, ...]) -> Graph:
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    clip, vae = [checkpoint, 1], [checkpoint, 2]
    negative = graph.add("CLIPTextEncode", clip=clip, text=NEGATIVE)
    latent = graph.add("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1)
    for index, branch in enumerate(branches):
        model = [checkpoint, 0]
        if branch.subjects:
            positive = [nested_encode(graph, clip, branch), 0]
            model = [graph.add("SubjectPersonalization_ApplyNestedAttention", model=model, positive=positive, strength=branch.strength,
                               start_percent=0.0, end_percent=1.0), 0]
        else:
            positive = [graph.add("CLIPTextEncode", clip=clip, text=branch.text), 0]
        if branch.record:
            record = graph.add("SubjectPersonalization_RecordSubjectAttention", model=model, positive=positive, layers=branch.record,
                               start_percent=0.0, end_percent=1.0)
            model = [record, 0]
        samples = graph.add("KSampler", model=model, positive=positive, negative=[negative, 0], latent_image=[latent, 0],
                            seed=branch.seed, steps=branch.steps, cfg=5.0, sampler_name="euler", scheduler="normal",
                            denoise=1.0)
        image = graph.add("VAEDecode", samples=[samples, 0], vae=vae)
        graph.add("SaveImage", f"image {index}", images=[image, 0], filename_prefix=f"{name}_{index}")
        if branch.record:
            heatmap = graph.add("SubjectPersonalization_SubjectAttentionMaps", recording=[record, 1], image=[image, 0], opacity=0.6,
                                mask_threshold=0.5)
            graph.add("PreviewImage", f"heatmap {index}", images=[heatmap, 0])
    return graph


def nested_encode(graph: Graph, clip: list, branch: Branch) -> str:
    """A Nested Attention Subject per subject (chained, each with its adapter and optional region), then the encode."""
    vision = graph.add("CLIPVisionLoader", clip_name=VISION)
    subjects = None
    for subject in branch.subjects:
        adapter = graph.add("SubjectPersonalization_NestedAttentionLoader", adapter=subject.adapter)
        photo = graph.add("LoadImage", image=subject.photo)
        inputs = {"subjects": [subjects, 0]} if subjects else {}
        if subject.region:
            left, top, right, bottom = subject.region
            inputs["mask"] = [graph.add("SubjectPersonalization_SubjectRegionMask", width=SIZE, height=SIZE, left=left, top=top, right=right,
                                        bottom=bottom), 0]
        subjects = graph.add("SubjectPersonalization_NestedAttentionSubject", nested_adapter=[adapter, 0], clip_vision=[vision, 0],
                             image=[photo, 0], word=subject.word, weight=1.0, start_percent=0.0, end_percent=1.0,
                             mask_feather=0, **inputs)
    return graph.add("SubjectPersonalization_NestedAttentionEncode", clip=clip, subjects=[subjects, 0], text=branch.text)


def session_server(base: Path, model_paths_config: Path):
    """A server reading the session's model files, with the subject photos in its input folder."""
    (base / "input").mkdir(parents=True)
    for photo, seed in PHOTOS.items():
        synthetic_subject(base / "input" / photo, seed)
    # The classic cache (0.8.0's default) keeps the last prompt's nodes, so repeats reuse them: 0.33.0's default, the
    # RAM-pressure cache, drops every node the running prompt does not use once free RAM is below the machine's total,
    # and reloads the checkpoint for each prompt (the main job and the SDXL workflow's server run with that default).
    return running_server(COMFYUI_PATH, base, ("--use-pytorch-cross-attention", "--fp32-text-enc", "--cache-classic",
                                               "--extra-model-paths-config", str(model_paths_config)),
                          boot_timeout=BOOT_TIMEOUT, http_timeout=HTTP_TIMEOUT, environment=RETURN_FREED_MEMORY)


def image_of(server: ComfyServer, reference: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(server.image(reference))))


def idle_rss(server: ComfyServer) -> int:
    """Resident memory of the idle server, once its prompt worker has collected garbage."""
    time.sleep(GC_SETTLE)
    return psutil.Process(server.process.pid).memory_info().rss


def is_running(server: ComfyServer, prompt_id: str) -> bool:
    return any(item[1] == prompt_id for item in server.get("/queue")["queue_running"])


@dataclass
class Run:
    """One queued prompt: which graph, its history entry, and its images by label."""
    name: str
    entry: dict
    images: dict[str, np.ndarray]

    @property
    def events(self) -> dict:
        return {event: data for event, data in self.entry["status"]["messages"]}

    @property
    def seconds(self) -> float:
        return (self.events["execution_success"]["timestamp"] - self.events["execution_start"]["timestamp"]) / 1000


def run_all(server: ComfyServer, names: list[str]) -> list[Run]:
    """Queue every prompt at once, as a user batching the queue does; then wait for each and fetch its images."""
    graphs = {name: build(name, GRAPHS[name]) for name in set(names)}
    ids = [server.queue(graphs[name].prompt, CLIENT) for name in names]
    return [finished(server, name, graphs[name], server.wait(prompt_id, PROMPT_TIMEOUT))
            for name, prompt_id in zip(names, ids)]


def finished(server: ComfyServer, name: str, graph: Graph, entry: dict) -> Run:
    run = Run(name, entry, {})
    assert entry["status"]["status_str"] == "success" and "execution_success" in run.events, \
        f"{name} failed: {json.dumps(run.events.get('execution_error'), default=str)[-3000:]}"
    for node_id, label in graph.labels.items():
        (reference,) = entry["outputs"][node_id]["images"]
        run.images[label] = image_of(server, reference)
    return run


@dataclass
class Session:
    runs: list[Run]
    interrupted: dict
    after_interrupt: Run
    rss_after_warm_up: int
    rss_after_queue: int
    answers_after: dict
    fresh: dict[str, Run]


@pytest.fixture(scope="module")
def session(tmp_path_factory, sd15_checkpoint_file, clip_vision_file, nested_adapter_files) -> Session:
    config = model_paths_config(tmp_path_factory.mktemp("model_paths") / "extra_model_paths.yaml",
                                [sd15_checkpoint_file, clip_vision_file, *nested_adapter_files.values()])
    started = time.monotonic()
    with session_server(tmp_path_factory.mktemp("long_session"), config) as server:
        runs = run_all(server, WARM_UP)
        rss_after_warm_up = idle_rss(server)
        runs += run_all(server, BEFORE_INTERRUPT)
        interrupted, after_interrupt, segment = interrupt_mid_sampling(server)
        runs += segment
        runs += run_all(server, AFTER_INTERRUPT)
        rss_after_queue = idle_rss(server)
        answers_after = {"system_stats": server.get("/system_stats"), "queue": server.get("/queue"),
                         "history": server.get("/history")}
    session_seconds = time.monotonic() - started
    with session_server(tmp_path_factory.mktemp("fresh_server"), config) as server:
        fresh = {run.name: run for run in run_all(server, FRESH_ORDER)}
    print(f"\nlong session: {len(runs) + 1} prompts ({len(runs)} completed, 1 interrupted) in {session_seconds:.0f} s, "
          f"{np.mean([run.seconds for run in runs]):.2f} s per completed prompt (execution time); fresh server: "
          f"{len(fresh)} prompts in {time.monotonic() - started - session_seconds:.0f} s\n"
          f"server RSS after warm-up {rss_after_warm_up / 2**30:.2f} GiB, after the queue {rss_after_queue / 2**30:.2f} GiB "
          f"(growth {(rss_after_queue - rss_after_warm_up) / 2**20:+.0f} MiB, bound {RSS_GROWTH_BOUND / 2**20:.0f} MiB)")
    return Session(runs, interrupted, after_interrupt, rss_after_warm_up, rss_after_queue, answers_after, fresh)


def interrupt_mid_sampling(server: ComfyServer) -> tuple[dict, Run, list[Run]]:
    """person_recorded, then the long prompt (interrupted once sampling), then person_recorded_seed_43.

    Returns the long prompt's history entry, the next prompt's run, and the completed runs in queue order."""
    before, after = INTERRUPT_SEGMENT
    graphs = {before: build(before, GRAPHS[before]), after: build(after, GRAPHS[after])}
    before_id = server.queue(graphs[before].prompt, CLIENT)
    long_id = server.queue(build("long", LONG).prompt, CLIENT)
    after_id = server.queue(graphs[after].prompt, CLIENT)
    first = finished(server, before, graphs[before], server.wait(before_id, PROMPT_TIMEOUT))
    deadline = time.monotonic() + PROMPT_TIMEOUT
    while not is_running(server, long_id):
        assert time.monotonic() < deadline, f"the long prompt never started:\n{server.log_tail()}"
        time.sleep(0.05)
    time.sleep(INTERRUPT_AFTER)
    server.post("/interrupt", {"prompt_id": long_id})
    interrupted = server.wait(long_id, PROMPT_TIMEOUT)
    following = finished(server, after, graphs[after], server.wait(after_id, PROMPT_TIMEOUT))
    return interrupted, following, [first, following]


def is_patched(name: str) -> bool:
    return any(branch.subjects for branch in GRAPHS[name])


def assert_same_image(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert got.shape == expected.shape, f"{what}: shape {got.shape} vs {expected.shape}"
    differing = np.argwhere(got != expected)
    assert differing.size == 0, (f"{what}: {len(differing)} of {got.size} values differ, up to "
                                 f"{np.abs(got.astype(int) - expected.astype(int)).max()} levels, first at {differing[0]}")


def test_the_queue_runs_over_50_prompts_with_every_graph_repeated(session):
    counts = {name: sum(run.name == name for run in session.runs) for name in NAMES}
    assert len(session.runs) + 1 > 50 and min(counts.values()) >= 5, counts


def test_every_result_equals_the_same_graph_in_a_fresh_server(session):
    for position, run in enumerate(session.runs):
        expected = session.fresh[run.name].images
        assert run.images.keys() == expected.keys()
        for label, image in run.images.items():
            assert_same_image(image, expected[label], f"prompt {position} ({run.name}), {label}")


def test_an_unpatched_graph_after_patched_ones_equals_a_fresh_unpatched_run(session):
    """The fresh server ran the unpatched graphs before any patched one."""
    after_patched = [(previous, run) for previous, run in zip(session.runs, session.runs[1:])
                     if is_patched(previous.name) and not is_patched(run.name)]
    assert len(after_patched) >= 6
    for previous, run in after_patched:
        assert_same_image(run.images["image 0"], session.fresh[run.name].images["image 0"],
                          f"{run.name} after {previous.name}")


def test_two_samplers_on_two_patched_models_give_each_model_alone(session):
    fresh = session.fresh
    assert not np.array_equal(fresh["person"].images["image 0"], fresh["plain"].images["image 0"])
    for run in [fresh["two_samplers"]] + [run for run in session.runs if run.name == "two_samplers"]:
        assert_same_image(run.images["image 0"], fresh["person"].images["image 0"], "two_samplers, first sampler")
        assert_same_image(run.images["image 1"], fresh["person_and_dog_masked"].images["image 0"],
                          "two_samplers, second sampler")


def test_the_recording_of_a_later_prompt_holds_only_its_own_maps(session):
    """person_recorded_seed_43 right after person_recorded (in the warm-up, and around the interrupted recording) takes
    its Record node from ComfyUI's cache: its heatmap must still be the fresh one, not a mix with earlier maps."""
    fresh = session.fresh
    assert not np.array_equal(fresh["person_recorded"].images["heatmap 0"],
                              fresh["person_recorded_seed_43"].images["heatmap 0"])
    (record_node,) = [node_id for node_id, node in build("person_recorded_seed_43", GRAPHS["person_recorded_seed_43"]).prompt.items()
                      if node["class_type"] == "SubjectPersonalization_RecordSubjectAttention"]
    after_a_recording = [run for previous, run in zip(session.runs, session.runs[1:])
                         if run.name == "person_recorded_seed_43" and previous.name == "person_recorded"]
    assert len(after_a_recording) >= 2
    for run in after_a_recording:
        assert record_node in run.events["execution_cached"]["nodes"]
        assert_same_image(run.images["heatmap 0"], fresh[run.name].images["heatmap 0"], "heatmap after another recording")


def test_an_interrupt_stops_the_sampler_and_the_next_prompt_runs(session):
    status = session.interrupted["status"]
    events = {event: data for event, data in status["messages"]}
    assert status["status_str"] == "error" and "execution_interrupted" in events, status
    assert events["execution_interrupted"]["node_type"] == "KSampler", events["execution_interrupted"]
    after = session.after_interrupt
    for label, image in after.images.items():
        assert_same_image(image, session.fresh[after.name].images[label], f"{after.name} after the interrupt, {label}")


def test_resident_memory_after_the_queue_stays_near_its_value_after_warm_up(session):
    growth = session.rss_after_queue - session.rss_after_warm_up
    assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth / 2**20:.0f} MiB over the queue"


def test_the_server_answers_after_the_session(session):
    assert session.answers_after["system_stats"]["system"]["comfyui_version"]
    assert session.answers_after["queue"] == {"queue_running": [], "queue_pending": []}
    assert len(session.answers_after["history"]) == len(session.runs) + 1  # every prompt, the interrupted one too
