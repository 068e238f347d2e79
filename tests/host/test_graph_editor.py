"""Browser tier: every workflow in workflows/ opened in ComfyUI's own graph editor, in headless Chromium.

A real ComfyUI server (its main.py, loopback, a temporary base directory, CPU) serves a graph editor with the pack
installed; Playwright drives Debian's Chromium (no browser download). The editor is the release this ComfyUI pins in
its requirements.txt and, on the newest ComfyUI the pack supports, also each newer release of tests/frontends.txt
(served with main.py's --front-end-root). For each workflow, opened the way Workflow > Open opens a file
(`app.handleFile`), and again from the template browser:
- no problem reported: no dialog (missing nodes or models in older editors), no error panel (newer ones: missing
  models, missing inputs), no page error, no console error from the server's origin, with the workflow's model files
  in place;
- every node as saved: type, widget values, position and size (the editor needs no more room than saved:
  `computeSize` fits in it), every link as saved;
- no node, title bar or pack badge overlaps another node's (badges placed as LGraphNode.drawBadges places them);
- with the whole graph in view, the editor draws every title and no label or value cut short with an ellipsis;
- the prompt `app.graphToPrompt()` makes is accepted by the server's /prompt validation. A held prompt keeps the queue
  busy meanwhile, so the accepted prompt is deleted from the queue before it runs: nothing is loaded or sampled, and
  the model files are empty placeholders under the names and folders the workflows give them (`properties.models`),
  since the editor and the validation read only names.
Screenshots of each workflow and of the template browser go to $SUBJECT_TEST_ARTIFACTS/graph_editor/<ComfyUI folder>/
<editor version> (CI keeps them), else to the test's temporary folder.
"""
import importlib.metadata
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from hostenv import TESTED_VERSIONS, comfyui_version, require_comfyui
from peers import install_peers, require_peer

COMFYUI_PATH = Path(require_comfyui())
from build_workflows import TITLE_BAR  # noqa: E402  (the builder's title bar: the checks below measure the editor's)

from subject_personalization.tools.comfy_server import running_server  # noqa: E402

PACK_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((PACK_ROOT / "workflows").glob("*.json"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The flags a root CI machine with no network needs: no sandbox, no GPU, no background connections.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 2560, "height": 1440}  # the whole of each workflow above the zoom where text is drawn
BADGE_GAP = 2  # LGraphNode.drawBadges' default gap: between the title bar and its badges, and between badges
LOAD_TIMEOUT = 120_000  # ms: the frontend's first load on a busy 2-core machine
SETTLE = 1_500  # ms after a workflow's nodes are in place: the editor's checks of models and inputs report by then
PACK_TEMPLATES = "comfyui-subject-personalization"  # the template browser's category: the pack's folder name
HOLD_NODE = '''import time
from pathlib import Path


class HoldQueue:
    """Executes until RELEASE exists: the prompts queued behind it are validated but wait."""
    RELEASE = Path(__file__).with_name("release")
    CATEGORY, FUNCTION, RETURN_TYPES, OUTPUT_NODE = "testing", "hold", (), True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def hold(self):
        while not self.RELEASE.exists():
            time.sleep(0.05)
        return ()


NODE_CLASS_MAPPINGS = {"HoldQueue": HoldQueue}
'''

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None
if sync_playwright is None or not Path(CHROMIUM).is_file():
    pytest.skip(f"the browser tier needs Playwright (pip install playwright) and Debian's Chromium at {CHROMIUM} "
                f"(apt-get install chromium); .ci/run installs both", allow_module_level=True)


def graph_editors() -> list[tuple[str, str | None]]:
    """(version, --front-end-root or None for the installed one) of each graph editor the workflows are opened in."""
    pinned = re.search(r"^comfyui-frontend-package==(\S+)", (COMFYUI_PATH / "requirements.txt").read_text(), re.M)[1]
    installed = importlib.metadata.version("comfyui-frontend-package")
    if installed != pinned:
        raise RuntimeError(f"this environment has graph editor {installed}, but the ComfyUI at {COMFYUI_PATH} pins "
                           f"{pinned}: run tools/setup_comfyui.sh for that ComfyUI with this environment")
    editors = [(installed, None)]
    if comfyui_version(COMFYUI_PATH) == TESTED_VERSIONS[-1]:
        for line in (PACK_ROOT / "tests" / "frontends.txt").read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                version = line.split("==")[1].strip()
                root = Path(sys.prefix) / "frontends" / version / "comfyui_frontend_package" / "static"
                if not (root / "index.html").is_file():
                    raise RuntimeError(f"graph editor {version} is not in {root.parents[1]}: run "
                                       f"tools/setup_comfyui.sh {COMFYUI_PATH} --with-tests")
                editors.append((version, str(root)))
    return editors


GRAPH_EDITORS = graph_editors()
pytestmark = pytest.mark.browser

# In the page: each node as the editor holds it, with the boxes it draws: its body and title bar, and its badges, as
# the editor's own LGraphNode.drawBadges places them (recorded from its drawing calls, nothing painted).
NODES_AS_DRAWN = """(badgeGap) => {
    const ctx = window.app.canvas.ctx, title = LiteGraph.NODE_TITLE_HEIGHT;
    return window.app.graph._nodes.map((node) => {
        const [x, y] = node.pos, [width, height] = node.size;
        const boxes = [[x, y - title, x + width, y + height]], badges = [];
        const record = (left, top, w, h) => boxes.push([x + left, y + top, x + left + w, y + top + h]);
        Object.assign(ctx, {roundRect: record, rect: record, fill() {}, fillText: (text) => badges.push(String(text))});
        try {
            node.drawBadges(ctx, {gap: badgeGap});
        } finally {
            for (const name of ["roundRect", "rect", "fill", "fillText"]) delete ctx[name];
        }
        return {id: Number(node.id), type: node.type, title: node.title, boxes, size: [width, height],
                needs: Array.from(node.computeSize()), badges: badges.filter((text) => text.trim())};
    });
}"""
OPEN_FILE = """async ([text, name]) => {
    await window.app.handleFile(new File([text], name, {type: "application/json"}));
}"""
NODE_IDS = "() => window.app.graph._nodes.map((node) => Number(node.id)).sort((a, b) => a - b)"
QUEUE_AS_RUN_DOES = """async (clientId) => {
    const {output} = await window.app.graphToPrompt();
    const reply = await fetch("/prompt", {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify({prompt: output, client_id: clientId})});
    return {status: reply.status, body: await reply.json()};
}"""
FIT_VIEW = """() => {  // the whole graph, in the part of the canvas the editor's bars leave free
    const nodes = window.app.graph._nodes, canvas = window.app.canvas, view = canvas.canvas.getBoundingClientRect();
    const padLeft = Math.max(90 - view.left, 20), padTop = Math.max(140 - view.top, 20);
    const left = Math.min(...nodes.map((n) => n.pos[0])) - 20, top = Math.min(...nodes.map((n) => n.pos[1])) - 100;
    const right = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + 20;
    const bottom = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 20;
    const scale = Math.min((view.width - padLeft - 20) / (right - left), (view.height - padTop - 20) / (bottom - top), 1);
    canvas.ds.scale = scale;
    canvas.ds.offset = [padLeft / scale - left, padTop / scale - top];
    canvas.setDirty(true, true);
}"""

TEXTS_DRAWN = """() => {  // every text the canvas draws in one full redraw, through the editor's own drawing code
    const texts = [], fillText = CanvasRenderingContext2D.prototype.fillText;
    CanvasRenderingContext2D.prototype.fillText = function (text, ...rest) {
        texts.push(String(text));
        return fillText.call(this, text, ...rest);
    };
    try {
        window.app.canvas.draw(true, true);
    } finally {
        CanvasRenderingContext2D.prototype.fillText = fillText;
    }
    return texts;
}"""
# What the editor shows a user about a loaded workflow: dialogs (missing nodes or models, older editors) and the error
# overlay whose "View details" opens the panel of errors (newer editors), as text on the page.
DIALOGS = ("() => [...document.querySelectorAll('.p-dialog')].filter((dialog) => dialog.offsetParent !== null)"
           ".map((dialog) => dialog.innerText)")
OVERLAY, SEE_ERRORS, PANEL = ("[data-testid='error-overlay']", "[data-testid='error-overlay-see-errors']",
                              "[data-testid='properties-panel']")


def overlapping(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def clashes(drawn: list[dict]) -> list[tuple[str, str, bool]]:
    """(title, title, whether a badge is involved) for every two nodes whose drawn boxes overlap."""
    found = []
    for i, a in enumerate(drawn):
        for b in drawn[i + 1:]:
            for index_a, box_a in enumerate(a["boxes"]):
                for index_b, box_b in enumerate(b["boxes"]):
                    if overlapping(box_a, box_b):
                        found.append((a["title"], b["title"], index_a > 0 or index_b > 0))
    return found


class Editor:
    """The graph editor's page, the server behind it, and what the page reported."""

    def __init__(self, page, server, held_prompt: str, screenshots: Path, version: str):
        self.page, self.server, self.held_prompt, self.screenshots = page, server, held_prompt, screenshots
        self.version = version
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.on("console", lambda message: message.type == "error" and self.report(
            f"console error: {message.text}", message.location.get("url", "")))
        page.on("requestfailed", lambda request: self.report(f"request failed: {request.url}", request.url))
        page.on("response", lambda response: response.status >= 400 and self.report(
            f"HTTP {response.status}: {response.url}", response.url))

    def report(self, error: str, url: str) -> None:
        """Keep what concerns the server; this machine has no network, so the frontend's calls to comfy.org fail."""
        if not url.startswith("http") or url.startswith(self.server.url):
            self.errors.append(error)

    def require_nodes_of(self, path: Path) -> None:
        """Skip (a failure in CI) a shipped workflow whose other pack's nodes this server lacks (tests/peers.py)."""
        registered = self.server.get("/object_info")
        require_peer(registered, *{node["type"] for node in json.loads(path.read_text())["nodes"]})

    def open_file(self, path: Path) -> None:
        self.dismiss_problems()
        self.errors.clear()
        text = path.read_text()
        self.page.evaluate(OPEN_FILE, [text, path.name])
        self.wait_for_graph(json.loads(text))

    def wait_for_graph(self, workflow: dict) -> None:
        expected = sorted(node["id"] for node in workflow["nodes"])
        self.page.wait_for_function(f"(ids) => JSON.stringify(({NODE_IDS})()) === JSON.stringify(ids)", arg=expected,
                                    timeout=LOAD_TIMEOUT)
        self.page.wait_for_load_state("networkidle")  # the editor's checks of the loaded workflow ask the server
        self.page.wait_for_timeout(SETTLE)

    def problems(self) -> list[str]:
        """What the page tells the user is wrong with the workflow: every dialog's text, and the error overlay's with
        the panel of errors it opens."""
        found = self.page.evaluate(DIALOGS)
        overlay = self.page.locator(OVERLAY)
        if overlay.count() and overlay.first.is_visible():
            found.append(overlay.first.inner_text())
            self.page.locator(SEE_ERRORS).first.click()
            panel = self.page.locator(PANEL).first
            panel.wait_for(timeout=10_000)
            self.page.wait_for_timeout(500)
            found.append(panel.inner_text())
        return found

    def dismiss_problems(self) -> None:
        """Close what the last workflow left open: dialogs, the error overlay, the panel of errors."""
        for close in self.page.locator(".p-dialog .p-dialog-close-button, .p-dialog button[aria-label='Close'], "
                                       "[data-testid='error-overlay-dismiss']").all():
            if close.is_visible():
                close.click()
        self.page.keyboard.press("Escape")

    def screenshot(self, name: str) -> None:
        self.screenshots.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(self.screenshots / f"{name}.png"))


def place_model_files(models: Path) -> None:
    """An empty placeholder at models/<directory>/<name> for each model file a workflow names in properties.models."""
    for path in WORKFLOWS:
        for node in json.loads(path.read_text())["nodes"]:
            for model in node.get("properties", {}).get("models", []):
                (models / model["directory"]).mkdir(parents=True, exist_ok=True)
                (models / model["directory"] / model["name"]).touch()


@pytest.fixture(scope="module", params=GRAPH_EDITORS, ids=[f"editor-{version}" for version, _ in GRAPH_EDITORS])
def editor(request, tmp_path_factory):
    version, frontend_root = request.param
    base = tmp_path_factory.mktemp("graph_editor")
    hold = base / "custom_nodes" / "hold_queue"
    hold.mkdir(parents=True)
    (hold / "__init__.py").write_text(HOLD_NODE)
    install_peers(base / "custom_nodes", ("ComfyUI_IPAdapter_plus",))  # the workflow beside IPAdapter uses its nodes
    # A returning user's files: no first-run template browser, and nothing the frontend asks for is missing (a new
    # user's 404s come at times of the frontend's choosing, some after the first workflow is opened).
    user = base / "user" / "default"
    for folder in ("workflows", "subgraphs"):
        (user / folder).mkdir(parents=True)
    (user / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    (user / "comfy.templates.json").write_text("[]")
    (user / "user.css").write_text("")
    place_model_files(base / "models")
    artifacts = os.environ.get("SUBJECT_TEST_ARTIFACTS")
    screenshots = (Path(artifacts) / "graph_editor" / COMFYUI_PATH.name if artifacts else base / "screenshots") / version
    arguments = ("--front-end-root", frontend_root) if frontend_root else ()
    with running_server(COMFYUI_PATH, base, arguments) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(server.url)
            page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && "
                                   "window.app.extensionManager", timeout=LOAD_TIMEOUT)
            page.wait_for_load_state("networkidle")  # the start-up's own requests are over
            served = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
            assert served == version, f"the server serves graph editor {served}, not {version}"
            held_prompt = server.queue({"1": {"class_type": "HoldQueue", "inputs": {}}}, "graph-editor-test")
            yield Editor(page, server, held_prompt, screenshots, version)
        finally:
            (hold / "release").touch()
            browser.close()
    print(f"\ngraph editor {version} screenshots: {screenshots}")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_the_workflow_opens_clean_in_the_editor(editor, path):
    editor.require_nodes_of(path)
    workflow = json.loads(path.read_text())
    editor.open_file(path)
    assert not editor.problems(), f"{path.name}: the editor reports {editor.problems()}"
    assert not editor.errors, f"{path.name}: {editor.errors}"
    check_graph_as_saved(editor, workflow, path.name)
    editor.page.evaluate(FIT_VIEW)
    texts = editor.page.evaluate(TEXTS_DRAWN)
    titles = [node.get("title", "") for node in workflow["nodes"]]
    assert all(title in texts for title in titles if title), f"{path.name}: titles not drawn (zoomed out too far)"
    assert not [text for text in texts if "\u2026" in text], f"{path.name}: truncated labels: {texts}"
    editor.screenshot(path.stem)


def check_graph_as_saved(editor, workflow: dict, name: str) -> None:
    graph = editor.page.evaluate("() => window.app.graph.serialize()")
    saved = {node["id"]: node for node in workflow["nodes"]}
    loaded = {int(node["id"]): node for node in graph["nodes"]}
    assert loaded.keys() == saved.keys()
    for id_, node in saved.items():
        for field in ("type", "widgets_values", "pos", "size"):  # newer editors leave out an empty widgets_values
            assert loaded[id_].get(field, []) == node[field], f"{name}: node {id_} ({node['type']}) {field}"
    links = sorted((int(link[0]), int(link[1]), link[2], int(link[3]), link[4], link[5]) for link in graph["links"])
    assert links == sorted(map(tuple, workflow["links"])), f"{name}: links"
    drawn = editor.page.evaluate(NODES_AS_DRAWN, BADGE_GAP)
    for node in drawn:
        assert node["needs"][0] <= node["size"][0] and node["needs"][1] <= node["size"][1], \
            f"{name}: {node['title']} needs {node['needs']}, saved {node['size']}"
    assert any(node["badges"] for node in drawn), f"{name}: no pack badge drawn, so none was checked"
    assert not clashes(drawn), f"{name}: overlapping (title, title, badge involved): {clashes(drawn)}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_the_prompt_the_editor_makes_passes_the_servers_validation(editor, path):
    editor.require_nodes_of(path)
    editor.open_file(path)
    reply = editor.page.evaluate(QUEUE_AS_RUN_DOES, "graph-editor-test")
    assert reply["status"] == 200 and not reply["body"].get("node_errors"), f"{path.name}: {reply}"
    prompt_id = reply["body"]["prompt_id"]
    editor.server.post("/queue", {"delete": [prompt_id]})
    queue = editor.server.get("/queue")
    assert [entry[1] for entry in queue["queue_running"]] == [editor.held_prompt], "the held prompt must still run"
    assert prompt_id not in [entry[1] for entry in queue["queue_pending"]]
    assert prompt_id not in editor.server.get("/history"), f"{path.name} ran"


def test_the_editor_knows_the_folder_of_every_model_file_the_workflows_name(editor):
    """The folders the editor's model library and its missing-model panel read (/experiment/models) hold each file in
    the folder its loader's properties.models names: the pack's own folders are registered with ComfyUI."""
    placed = {(model["directory"], model["name"]) for path in WORKFLOWS for node in json.loads(path.read_text())["nodes"]
              for model in node.get("properties", {}).get("models", [])}
    assert {"fastcomposer", "nested_attention", "ipadapter"} <= {folder for folder, _ in placed}
    for folder in {folder for folder, _ in placed}:
        listed = {entry["name"] for entry in editor.server.get(f"/experiment/models/{folder}")}
        assert {name for directory, name in placed if directory == folder} <= listed, folder


def test_a_workflow_with_an_unknown_node_is_reported(editor, tmp_path):
    """The check above can fail: the editor does report a node it does not know."""
    workflow = json.loads(WORKFLOWS[0].read_text())
    workflow["nodes"][0]["type"] = "NoSuchNodeAnywhere"
    path = tmp_path / "unknown_node.json"
    path.write_text(json.dumps(workflow))
    editor.open_file(path)
    assert any("NoSuchNodeAnywhere" in problem for problem in editor.problems()), editor.problems()


def test_a_missing_model_file_is_reported_with_its_folder_and_download(editor, tmp_path):
    """The check above can fail, and the workflows' properties.models reach the user: a pack loader's file that is not
    installed is reported by name (older editors: in a dialog); newer editors name its folder and offer its download,
    and also flag a photo that Load Image does not list (one in a subfolder of the input folder)."""
    source = next(path for path in WORKFLOWS if "SubjectPersonalization_NestedAttentionIPAdapterLoader" in path.read_text())
    workflow = json.loads(source.read_text())
    loader = next(node for node in workflow["nodes"] if node["type"] == "SubjectPersonalization_NestedAttentionIPAdapterLoader")
    missing = "ip-adapter-plus-face_sd15-not-installed.safetensors"
    loader["widgets_values"][0] = loader["properties"]["models"][0]["name"] = missing
    photo = next(node for node in workflow["nodes"] if node["type"] == "LoadImage")
    photo["widgets_values"][0] = f"subject_personalization/{photo['widgets_values'][0]}"
    path = tmp_path / "missing_model.json"
    path.write_text(json.dumps(workflow))
    editor.open_file(path)
    problems = "\n".join(editor.problems())
    assert missing in problems, problems
    if editor.page.locator(OVERLAY).count():
        assert "ipadapter" in problems and "Download" in problems, problems
        assert photo["widgets_values"][0].split("/")[-1] in problems, problems


def test_a_node_10_px_above_a_pack_node_is_caught_under_its_badge(editor, tmp_path):
    """The overlap check can fail: a node whose bottom is 10 px above a pack node's title bar is under its badge."""
    workflow = json.loads(WORKFLOWS[0].read_text())
    editor.open_file(WORKFLOWS[0])
    badged = next(node for node in editor.page.evaluate(NODES_AS_DRAWN, BADGE_GAP) if node["badges"])
    pack_node = next(node for node in workflow["nodes"] if node["id"] == badged["id"])
    other = next(node for node in workflow["nodes"] if node["id"] != badged["id"])
    other["pos"] = [pack_node["pos"][0], pack_node["pos"][1] - TITLE_BAR - 10 - other["size"][1]]
    path = tmp_path / "badge_overlap.json"
    path.write_text(json.dumps(workflow))
    editor.open_file(path)
    found = clashes(editor.page.evaluate(NODES_AS_DRAWN, BADGE_GAP))
    assert (other.get("title", other["type"]), badged["title"], True) in found or \
        (badged["title"], other.get("title", other["type"]), True) in found, found


def test_a_loader_too_narrow_for_its_file_name_is_caught(editor, tmp_path):
    """The truncation check can fail: Load Checkpoint at 320 px cuts its label or file name short."""
    source = next(path for path in WORKFLOWS if "CheckpointLoaderSimple" in path.read_text())
    workflow = json.loads(source.read_text())
    next(node for node in workflow["nodes"] if node["type"] == "CheckpointLoaderSimple")["size"][0] = 320
    path = tmp_path / "narrow_loader.json"
    path.write_text(json.dumps(workflow))
    editor.open_file(path)
    editor.page.evaluate(FIT_VIEW)
    assert [text for text in editor.page.evaluate(TEXTS_DRAWN) if "\u2026" in text]


def test_the_template_browser_shows_the_pack_cards_with_pictures_and_opens_them(editor):
    for path in WORKFLOWS:
        editor.require_nodes_of(path)
    for path in WORKFLOWS:
        workflow = json.loads(path.read_text())
        editor.page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        editor.page.get_by_text(PACK_TEMPLATES, exact=True).first.click()
        cards = editor.page.locator("[data-testid^='template-workflow-']")
        cards.first.wait_for(timeout=LOAD_TIMEOUT)
        names = sorted(cards.evaluate_all("(cards) => cards.map((card) => card.dataset.testid)"))
        assert names == sorted(f"template-workflow-{workflow.stem}" for workflow in WORKFLOWS)
        pictures = editor.page.locator(f"[data-testid='template-workflow-{path.stem}'] img")
        pictures.first.wait_for(timeout=LOAD_TIMEOUT)
        editor.page.wait_for_function("(images) => images.every((image) => image.complete && image.naturalWidth > 0)",
                                      arg=pictures.element_handles(), timeout=LOAD_TIMEOUT)
        if path == WORKFLOWS[0]:
            editor.screenshot("template_browser")
        editor.errors.clear()
        editor.page.locator(f"[data-testid='template-workflow-{path.stem}']").click()
        editor.wait_for_graph(workflow)
        assert not editor.problems() and not editor.errors, f"{path.name}: {editor.problems()} {editor.errors}"
        check_graph_as_saved(editor, workflow, path.name)
