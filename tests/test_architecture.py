"""The house rules of ARCHITECTURE.md, checked on the source: lower rooms never import higher ones, the
library never imports a recipe, and old import paths still work with a DeprecationWarning."""

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "drrl"
# lowest first: a room may import only rooms before it in this list (and leaf modules outside it)
LAYERS = ["kernels", "linalg", "controllers", "attention", "rl", "models", "train"]
LIBRARY_ROOMS = ["kernels", "linalg", "controllers", "attention", "rl", "adapters", "pruning", "linear_attention", "models",
                 "integrations", "data", "train", "eval"]  # fmt: skip


def imported_rooms(room: str) -> dict[str, set[str]]:
    """{file: rooms of drrl it imports (top-level and inside functions)} for every file of ``room``."""
    out = {}
    for f in sorted((SRC / room).rglob("*.py")):
        pkg = ["drrl", *f.relative_to(SRC).with_suffix("").parts]
        if pkg[-1] == "__init__":
            pkg = pkg[:-1]
        else:
            pkg = pkg[:-1]
        targets = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                names = [base]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for n in names:
                parts = n.split(".")
                if parts[0] == "drrl" and len(parts) > 1:
                    targets.add(parts[1])
        out[str(f.relative_to(SRC))] = targets - {room}
    return out


@pytest.mark.parametrize("i", range(len(LAYERS)))
def test_no_room_imports_a_higher_one(i):
    higher = set(LAYERS[i + 1 :])
    for f, rooms in imported_rooms(LAYERS[i]).items():
        assert not rooms & higher, f"{f} imports {sorted(rooms & higher)}, above {LAYERS[i]}"


def test_attention_imports_nothing_from_rl():
    for f, rooms in imported_rooms("attention").items():
        assert "rl" not in rooms, f


def test_the_library_never_imports_a_recipe_or_the_cli():
    for room in LIBRARY_ROOMS:
        for f, rooms in imported_rooms(room).items():
            assert not rooms & {"recipes", "cli", "api"}, f"{f} imports {sorted(rooms & {'recipes', 'cli', 'api'})}"


def test_no_controller_is_tested_by_name_outside_the_registry():
    for f in SRC.rglob("*.py"):
        text = f.read_text()
        for needle in ('== "rl"', "== 'rl'", 'controller") == "rl"'):
            assert needle not in text, f"{f.relative_to(SRC)} tests a controller by its name"


@pytest.mark.parametrize(
    "old,name",
    [
        ("drrl.demo", "run_demo"),
        ("drrl.classify", "run_table"),
        ("drrl.compress", "run_compress"),
        ("drrl.plot", "plot_run"),
        ("drrl.rl.controllers", "RLController"),
        ("drrl.rl.controllers", "EnergyController"),
    ],
)
def test_old_import_paths_warn_and_still_work(old, name):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(old)
        assert getattr(mod, name) is not None
    assert any(issubclass(w.category, DeprecationWarning) and "moved to" in str(w.message) for w in caught)


def test_moved_names_of_a_module_that_stays_warn():
    import drrl.integrations.hf as hf
    from drrl.integrations import hub

    with pytest.warns(DeprecationWarning, match="drrl.integrations.hub"):
        assert hf.load_causal_lm is hub.load_causal_lm
