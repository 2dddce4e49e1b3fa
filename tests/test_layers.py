"""The package's layers (docs/architecture.md), checked statically over its source.

interface (cli, web) -> job (jobs, segments, work folder, report) -> pipeline (stage wiring)
-> stages (io, faces, restore, warp, ...) -> core (records, config, errors, formats, engine).
No module imports a higher layer, only ``__main__`` imports the CLI, and no imports form a
cycle. Every import counts, also one inside a function or under ``TYPE_CHECKING``: a lazy
import still couples the lower module to the higher one.

``gpen_video/__init__.py`` re-exports the library's API (``FacePipeline`` from the pipeline
layer) and is exempt from the layer rule; nothing in the package imports it for anything but
``__version__``, so it makes no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LAYERS: dict[str, list[str]] = {
    "interface": ["cli", "__main__", "web", "web.*"],
    "job": ["jobs", "jobs.*", "report"],
    "pipeline": ["pipeline", "plan"],
    "stages": ["io", "io.*", "faces", "faces.*", "restore", "restore.*", "warp", "warp.*",
               "upscale", "upscale.*", "temporal", "temporal.*"],
    "core": ["records", "config", "errors", "formats", "engine", "device", "__init__"],
}
"""Each module's layer, highest first: the one table this test reads."""

EXEMPT_FROM_LAYERS = {"__init__"}
"""``gpen_video/__init__.py`` re-exports the API (see the module docstring)."""

PACKAGE = Path(__file__).resolve().parent.parent / "gpen_video"
RANK = {layer: rank for rank, layer in enumerate(reversed(LAYERS))}  # core 0 ... interface 4


def _modules() -> dict[str, Path]:
    """Module name relative to the package (``io.decode``, ``web``, ``__init__``) -> file."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def layer_of(module: str) -> str:
    for layer, patterns in LAYERS.items():
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
                return layer
    raise AssertionError(f"gpen_video.{module} is in no layer: add it to LAYERS in {Path(__file__).name}")


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules ``module`` imports (relative to the package)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - node.level + 1] if node.level > 1 else base
                prefix = "gpen_video." + ".".join(base + ([node.module] if node.module else []))
                prefix = prefix.rstrip(".")
            else:
                prefix = node.module or ""
            # ``from PKG import name``: the submodule PKG.name if there is one, else PKG itself
            names = [f"{prefix}.{a.name}" for a in node.names]
        for name in names:
            if name == "gpen_video":
                found.add("__init__")
            elif name.startswith("gpen_video."):
                inner = name.removeprefix("gpen_video.")
                while inner and inner not in known:  # gpen_video.io.decode.VideoInfo -> io.decode
                    inner = inner.rpartition(".")[0]
                found.add(inner or "__init__")  # gpen_video.__version__: the package itself
    found.discard(module)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, set(modules)) for m, p in modules.items()}


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_no_module_imports_a_higher_layer(graph):
    upward = sorted(
        f"gpen_video.{m} ({layer_of(m)}) imports gpen_video.{i} ({layer_of(i)})"
        for m, imported in graph.items() if m not in EXEMPT_FROM_LAYERS
        for i in imported if RANK[layer_of(i)] > RANK[layer_of(m)]
    )
    assert not upward, "imports up a layer:\n" + "\n".join(upward)


def test_only_main_imports_the_cli(graph):
    importers = sorted(m for m, imported in graph.items() if "cli" in imported)
    assert importers == ["__main__"]


def test_the_web_page_does_not_import_the_cli(graph):
    """The command line starts the web page (``gpen-video web``), so it imports ``web``;
    nothing in ``web`` imports the command line back (what they share is in lower layers)."""
    web = {m for m in graph if m == "web" or m.startswith("web.")}
    assert not [m for m in web if "cli" in graph[m]]
    assert graph["cli"] & web <= {"web.access", "web.media", "web.app"}


def test_no_import_cycle(graph):
    """Tarjan's strongly connected components: any with two or more modules is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in sorted(graph[module]):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_imports_of_every_kind(tmp_path):
    """Absolute, relative, from-package and function-level imports are all found."""
    package = tmp_path / "gpen_video"
    (package / "io").mkdir(parents=True)
    (package / "io" / "decode.py").write_text(
        "from . import colour\nfrom ..records import Frame\n"
        "def f():\n    from gpen_video.pipeline import FacePipeline\n    import gpen_video.cli\n"
    )
    known = {"io", "io.decode", "io.colour", "records", "pipeline", "cli"}
    assert _imports("io.decode", package / "io" / "decode.py", known) == {"io.colour", "records", "pipeline", "cli"}
    (package / "io" / "decode.py").write_text("from gpen_video import __version__\nfrom gpen_video.io import files\n")
    assert _imports("io.decode", package / "io" / "decode.py", known | {"io.files"}) == {"__init__", "io.files"}
