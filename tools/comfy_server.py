"""ComfyUI's own `main.py` as a server subprocess on a loopback port, with its own base directory and this pack linked
into its custom_nodes, as a user's server runs; driven over HTTP only (`ComfyClient`)."""
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

if __package__:
    from .comfy_client import ComfyClient, free_loopback_port
else:  # imported with tools/ on sys.path
    from comfy_client import ComfyClient, free_loopback_port

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_FOLDER = "comfyui-subject-personalization"  # the pack's folder in custom_nodes/, as a user's clone names it
PACK_NODE = "SubjectPersonalization_ApplyNestedAttention"  # listed by /object_info once ComfyUI imported the pack


class ComfyServer(ComfyClient):
    """`python main.py --cpu --listen 127.0.0.1 --port <free> --base-directory BASE ...`, its output in BASE/server.log."""

    def __init__(self, comfyui_path: Path, base: Path, extra_args: tuple[str, ...] = (), http_timeout: float = 60,
                 environment: dict[str, str] | None = None):
        super().__init__(free_loopback_port(), http_timeout)
        for folder in ("custom_nodes", "input", "user"):
            (base / folder).mkdir(parents=True, exist_ok=True)
        (base / "custom_nodes" / PACK_FOLDER).symlink_to(PACK_ROOT, target_is_directory=True)
        self.base, self.log_path = base, base / "server.log"
        # Resolved: the server runs in its base folder, so a path relative to the caller's folder would not hold there.
        command = [sys.executable, str(Path(comfyui_path).resolve() / "main.py"), "--cpu", "--listen", "127.0.0.1",
                   "--port", str(self.port), "--base-directory", str(base), "--disable-auto-launch",
                   "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}", *extra_args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=base, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **(environment or {})})

    def log_tail(self, characters: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:]

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")

    def wait_until_ready(self, timeout: float) -> None:
        """Until the server answers and lists the pack's nodes (an import failure only shows in the log)."""
        try:
            listed = self.wait_until_answering(f"/object_info/{PACK_NODE}", timeout)
        except TimeoutError as error:
            raise TimeoutError(f"{error}:\n{self.log_tail()}") from None
        if not listed:
            raise RuntimeError(f"ComfyUI started without the pack's nodes:\n{self.log_tail()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


@contextmanager
def running_server(comfyui_path: Path, base: Path, extra_args: tuple[str, ...] = (), boot_timeout: float = 180,
                   http_timeout: float = 60, environment: dict[str, str] | None = None) -> Iterator[ComfyServer]:
    """A ready server, stopped on leaving the block whatever happened inside it."""
    server = ComfyServer(comfyui_path, base, extra_args, http_timeout, environment)
    try:
        server.wait_until_ready(boot_timeout)
        yield server
    finally:
        server.stop()
