"""Shared fixtures: random-weight GPEN checkpoints in the official layout and a local HTTP server.

- ``reference_64``: the numerical reference made with the original implementation.
- ``tiny_config``: the reference's small architecture (64 px, about 0.3 M values).
- ``random_state_dict(config, seed)``: official-layout state_dict with random values.
- ``tiny_gpen_checkpoint(...)``: factory writing such a state_dict to ``tmp_path``.
- ``gpen256_file``: one GPEN-BFR-256 checkpoint per test session (76 MB, made once).
- ``ray_runtime``: one local Ray runtime with 2 CPUs for the session, started by the first test
  that asks for it (Ray advises against starting one per test).
- ``http_server``: serves a directory on 127.0.0.1 with Range support; can truncate or fail.
"""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from gpen_video.restore.model import ModelConfig, blur_kernel, build_model, preset_config

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_runtime() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def reference_64() -> dict:
    return torch.load(DATA / "reference_64.pt", weights_only=True)


@pytest.fixture(scope="session")
def tiny_config(reference_64: dict) -> ModelConfig:
    c = reference_64["config"]
    return ModelConfig(c["size"], c["style_dim"], c["n_mlp"], c["channel_multiplier"], c["narrow"])


def random_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every parameter random (so no path is zero), blur kernels as the network defines them."""
    with torch.device("meta"):
        layout = build_model(config).state_dict()
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, meta in layout.items():
        if key.endswith("kernel"):
            state[key] = blur_kernel(2 if ".blur." in key or ".upsample." in key else 1)
        else:
            state[key] = torch.randn(meta.shape, generator=gen) * 0.5
    return state


@pytest.fixture
def tiny_gpen_checkpoint(tmp_path: Path, tiny_config: ModelConfig) -> Callable[..., Path]:
    """Factory: ``make(name="tiny.pth", config=None, seed=0, wrap=False)`` writes a checkpoint.

    ``wrap=True`` stores it as a training checkpoint (``{"g_ema": state_dict, ...}``).
    """

    def make(name: str = "tiny.pth", config: ModelConfig | str | None = None, seed: int = 0,
             wrap: bool = False) -> Path:
        cfg = preset_config(config) if isinstance(config, str) else (config or tiny_config)
        state = random_state_dict(cfg, seed)
        path = tmp_path / name
        torch.save({"g_ema": state, "iteration": torch.tensor(1)} if wrap else state, path)
        return path

    return make


@pytest.fixture(scope="session")
def gpen256_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gpen256") / "GPEN-BFR-256.pth"
    torch.save(random_state_dict(preset_config("GPEN-BFR-256"), seed=1), path)
    return path


@dataclass
class LocalServer:
    """A directory served over HTTP. Set ``truncate_at`` (bytes of the body sent before the
    connection drops, while Content-Length announces the whole), ``fail_status`` (answer every
    request with it) or ``ignore_range``. ``requests`` logs (path, Range header or None)."""

    root: Path
    port: int = 0
    truncate_at: int | None = None
    fail_status: int | None = None
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


def _handler(server: LocalServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            server.requests.append((self.path, rng))
            if server.fail_status:
                self.send_error(server.fail_status)
                return
            file = server.root / self.path.lstrip("/").split("?")[0]
            if not file.is_file():
                self.send_error(404)
                return
            data = file.read_bytes()
            start, status = 0, 200
            match = re.fullmatch(r"bytes=(\d+)-", rng or "")
            if match and not server.ignore_range:
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            body = data[start:]
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if server.truncate_at is not None:
                body = body[: server.truncate_at]
            self.wfile.write(body)

    return Handler


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[LocalServer]:
    """A LocalServer over ``tmp_path / "served"`` on a free port of 127.0.0.1."""
    root = tmp_path / "served"
    root.mkdir()
    state = LocalServer(root)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
