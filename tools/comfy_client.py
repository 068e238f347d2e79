"""ComfyUI's HTTP API as the graph editor uses it: queue a prompt on /prompt, wait for its /history entry, fetch
its images from /view. Shared by the in-process runner (`comfy_headless.py`) and the server subprocess
(`comfy_server.py`)."""
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request


class ComfyClient:
    """A ComfyUI server on a loopback port."""

    def __init__(self, port: int, http_timeout: float = 60):
        self.port, self.http_timeout = port, http_timeout

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, route: str) -> dict:
        with urllib.request.urlopen(self.url + route, timeout=self.http_timeout) as reply:
            return json.loads(reply.read())

    def post(self, route: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(self.url + route, data=json.dumps(body or {}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.http_timeout) as reply:
            content = reply.read()
        return json.loads(content) if content else {}

    def queue(self, prompt: dict, client_id: str) -> str:
        """Send an API-format prompt to /prompt; its id. Raises with ComfyUI's validation errors when it is refused."""
        try:
            return self.post("/prompt", {"prompt": prompt, "client_id": client_id})["prompt_id"]
        except urllib.error.HTTPError as error:
            refusal = json.loads(error.read() or b"{}")
            raise RuntimeError(f"ComfyUI rejected the prompt: {refusal.get('error')} "
                               f"{json.dumps(refusal.get('node_errors'), default=str)[:2000]}") from None

    def wait(self, prompt_id: str, timeout: float | None = None) -> dict:
        """The prompt's history entry once it has run (outputs, status with ComfyUI's messages)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (entry := self.get(f"/history/{prompt_id}").get(prompt_id)) is None:
            self.check_alive()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")
            time.sleep(0.02)
        return entry

    def check_alive(self) -> None:
        """Raise when the server is known to be gone (a subprocess that exited); nothing to check in-process."""

    def wait_until_answering(self, route: str, timeout: float) -> dict:
        """GET route once the server answers it (it may still be starting)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                return self.get(route)
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ComfyUI did not answer on {self.url} within {timeout} s") from None
                time.sleep(0.1)

    def image(self, reference: dict) -> bytes:
        """The file of one entry of a history output's "images"."""
        query = urllib.parse.urlencode({key: reference[key] for key in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=self.http_timeout) as reply:
            return reply.read()


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
