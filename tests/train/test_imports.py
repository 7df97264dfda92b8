"""The shape of ``train/``'s imports (ARCHITECTURE.md section 3): it never imports ``recipes/`` (a lower floor
never imports a higher one), its modules import each other one way (no cycle), and none imports another
tunesmith module inside a function — the way a cycle hides. Read from the source with ``ast``, so an import
inside a function counts although it never ran."""

import ast
from pathlib import Path

import tunesmith

SOURCE = Path(tunesmith.__file__).parent
TRAIN = "tunesmith.train"


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node: ast.AST, modules: set[str]) -> list[str]:
    """The tunesmith modules an import statement names (``from tunesmith.train import rows`` names the module
    ``tunesmith.train.rows``; ``from tunesmith.train.rows import NAME`` the module itself)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "tunesmith"]
    if not isinstance(node, ast.ImportFrom) or node.level or not (node.module or "").startswith("tunesmith"):
        return []
    submodules = [f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in modules]
    return submodules or [node.module]


def internal_imports(root: Path = SOURCE) -> dict[str, list[tuple[str, bool]]]:
    """Every module under ``root`` → the tunesmith modules it imports, each with whether the import sits
    inside a function."""
    files = {_module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    found = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        inside = {id(node) for function in ast.walk(tree)
                  if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                  for node in ast.walk(function) if node is not function}
        found[name] = [(target, id(node) in inside) for node in ast.walk(tree)
                       for target in _targets(node, set(files))]
    return found


def _train_modules(imports: dict) -> list[str]:
    return [name for name in imports if name.startswith(TRAIN + ".")]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or None."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_reader_sees_imports_inside_functions(tmp_path):
    package = tmp_path / "tunesmith"
    (package / "train").mkdir(parents=True)
    (package / "train" / "a.py").write_text("from tunesmith.train import b\n")
    (package / "train" / "b.py").write_text("def f():\n    from tunesmith.train.a import X\n")
    imports = internal_imports(package)
    assert imports["tunesmith.train.a"] == [("tunesmith.train.b", False)]
    assert imports["tunesmith.train.b"] == [("tunesmith.train.a", True)]
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"] and _cycle({"a": {"b"}, "b": set()}) is None


def test_train_never_imports_recipes():
    imports = internal_imports()
    wrong = {name: target for name in _train_modules(imports) for target, _ in imports[name]
             if target.startswith("tunesmith.recipes")}
    assert not wrong, f"train/ imports recipes/: {wrong}"


def test_train_modules_import_each_other_one_way():
    imports = internal_imports()
    graph = {name: {target for target, _ in imports[name] if target.startswith(TRAIN + ".")}
             for name in _train_modules(imports)}
    assert _cycle(graph) is None, f"import cycle in train/: {' -> '.join(_cycle(graph))}"


def test_train_imports_tunesmith_modules_at_the_top_only():
    imports = internal_imports()
    inside = {name: target for name in _train_modules(imports) for target, in_function in imports[name]
              if in_function}
    assert not inside, f"tunesmith imports inside functions in train/: {inside}"


def test_a_one_process_command_does_not_import_fsdp_or_distributed_checkpoint():
    """FSDP2 and distributed checkpointing cost about 0.8 s to import; only a sharded run imports them."""
    import subprocess
    import sys

    code = ("import sys, tunesmith.cli, tunesmith.demo, tunesmith.recipes.sft, tunesmith.train.resume; "
            "print(sorted(m for m in ('torch.distributed.fsdp', 'torch.distributed.checkpoint') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
