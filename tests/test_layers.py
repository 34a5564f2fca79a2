"""The import graph of ``sdxl_ckpt`` runs one way: each layer imports only the layers below it, never a sibling.

Every ``import`` is counted, also those inside functions (the lazy imports that keep start-up fast), so a
function-level import cannot hide a cycle. README's "How the code is laid out" shows the same table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sdxl_ckpt

PACKAGE = Path(sdxl_ckpt.__file__).resolve().parent

# lowest first; a unit is a subpackage or a top-level module of sdxl_ckpt
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "errors"),  # the version and the error types every layer raises
    ("progress", "report", "generated_files"),  # progress bars, tables and JSON reports; writing generated data
    ("formats",),  # tensor entries, dtypes, safetensors / ckpt / diffusers-folder / npz IO, atomic output
    ("sdxl",),  # SDXL facts: configs, components, variants and their detection
    ("keymaps",),  # rule tables between layouts, generated keymaps
    ("convert", "manage", "sdxl_runtime", "lora"),  # conversions; inspect / diff; the MindSpore network; LoRA files
    ("verify", "reference"),  # MindSpore side and torch side of the numerical proof
    ("testmodels",),  # tiny / full-size synthetic models (tests, demo, bench)
    ("demo", "proof_commands"),  # command bodies composing the layers
    ("cli",),
)
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}
# imports that go upwards today, each with its reason; nothing else may
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("sdxl_ckpt"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sdxl_ckpt"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    # "from pkg import name" names a module only when that module exists
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_unit_has_a_layer() -> None:
    units = {_unit(m) for m in _graph()}
    assert units <= set(LAYER_OF), f"units without a layer: {sorted(units - set(LAYER_OF))}"


def test_imports_only_go_down() -> None:
    wrong = []
    for module, targets in _graph().items():
        for target in targets:
            a, b = _unit(module), _unit(target)
            if a != b and LAYER_OF[b] >= LAYER_OF[a] and (module, target) not in ALLOWED_UPWARD:
                wrong.append(f"{module} (layer {LAYER_OF[a]}) imports {target} (layer {LAYER_OF[b]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_module_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_layers_are_enforced() -> None:
    """The checker itself sees an upward import (a test that could not fail would prove nothing)."""
    graph = _graph()
    assert "sdxl_ckpt.formats.atomic" in graph["sdxl_ckpt.formats.safetensors_io"]
    assert LAYER_OF[_unit("sdxl_ckpt.cli")] > LAYER_OF[_unit("sdxl_ckpt.convert.sd_ms")]
