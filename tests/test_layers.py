"""The package's shape: only ``keepbest.store`` touches files, no import cycles, layers import downward.

Two checks of the storage rule: a static one over every module's source (calls that do file I/O
outside ``store/``), and a run of every entry point under a Python audit hook that names the
keepbest module behind each file operation.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path


SRC = Path(__file__).resolve().parent.parent / "src" / "keepbest"

# Calls that do file I/O. Path methods are listed only where the name means I/O and nothing else.
IO_MODULE_CALLS = {
    "os": {"open", "replace", "rename", "renames", "link", "symlink", "unlink", "remove", "removedirs", "mkdir",
           "makedirs", "rmdir", "listdir", "scandir", "walk", "stat", "lstat", "fsync", "truncate", "chmod",
           "chown", "utime", "statvfs"},
    "os.path": {"exists", "lexists", "isfile", "isdir", "islink", "getsize", "getmtime", "realpath", "samefile"},
    "shutil": None, "fcntl": None, "mmap": None, "glob": None, "tempfile": None,  # None: every function
}
IO_PATH_METHODS = {"read_bytes", "write_bytes", "read_text", "write_text", "iterdir", "rglob", "mkdir", "rmdir",
                   "unlink", "touch", "is_dir", "is_file", "is_symlink", "symlink_to", "hardlink_to", "lstat"}
# The few places outside store/ allowed to touch files, and why.
ALLOWED = {
    ("cli/_sidecar.py", "os.path.realpath"): "keepbest sidecar imports the user's --model/--data factory file once",
    ("cli/__init__.py", "os.open"): "when the reader of stdout went away (keepbest ls | head), stdout is pointed at /dev/null",
}


def modules() -> dict[str, Path]:
    return {".".join(("keepbest", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in sorted(SRC.rglob("*.py"))}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _anonymous(call: ast.Call) -> bool:
    """``mmap.mmap(-1, ...)``: an anonymous mapping, memory that no file backs."""
    fileno = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "fileno"), None)
    return (isinstance(fileno, ast.UnaryOp) and isinstance(fileno.op, ast.USub)
            and isinstance(fileno.operand, ast.Constant) and fileno.operand.value == 1)


def io_calls(path: Path) -> list[str]:
    """``line: call`` for each call in ``path`` that does file I/O."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name == "open":
            found.append((node.lineno, "open"))
        elif name == "mmap.mmap" and _anonymous(node):
            continue  # memory with no file behind it (fd -1): not file I/O
        elif name is not None and "." in name:
            module, _, fn = name.rpartition(".")
            if module in IO_MODULE_CALLS and (IO_MODULE_CALLS[module] is None or fn in IO_MODULE_CALLS[module]):
                found.append((node.lineno, name))
        if isinstance(node.func, ast.Attribute) and node.func.attr in IO_PATH_METHODS:
            found.append((node.lineno, f"<path>.{node.func.attr}"))
    return [f"{line}: {call}" for line, call in found]


def test_no_module_outside_store_calls_the_filesystem():
    offenders = {}
    for name, path in modules().items():
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("store/"):
            continue
        calls = [c for c in io_calls(path) if (rel, c.split(": ", 1)[1]) not in ALLOWED]
        if calls:
            offenders[name] = calls
    assert offenders == {}, f"file I/O outside keepbest.store (move it into the store): {offenders}"


def test_the_static_check_finds_io_where_there_is_some():
    assert len(io_calls(SRC / "store" / "local.py")) > 20  # the check sees I/O where it is


def test_the_static_check_tells_a_file_mapping_from_anonymous_memory(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import mmap\nmmap.mmap(-1, 4096)\nmmap.mmap(fileno=-1, length=8)\nmmap.mmap(fd, 4096)\n")
    assert io_calls(source) == ["4: mmap.mmap"]


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """keepbest modules that ``name`` imports anywhere in its source (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                base = ".".join(parent[: len(parent) - node.level + 1] + ([base] if base else []))
            if base not in known:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)  # a submodule, or a name defined in ``base``
    return out - {name}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    out, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                out.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return out


def test_there_is_no_import_cycle():
    assert cycles(graph()) == []


def test_the_cycle_check_finds_a_cycle_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


# The layers of ../shared/DESIGN.md: a module imports only from lower layers (and, for the core's
# orchestration layer, from modules of its own layer, without cycles). Level 1 holds independent leaves.
LAYERS = {
    0: {"keepbest._version", "keepbest.errors", "keepbest.manifest", "keepbest._digest"},
    1: {"keepbest.policy", "keepbest.codec", "keepbest.writer", "keepbest.rng", "keepbest.matching", "keepbest.store",
        "keepbest.progress",
        "keepbest.distributed"},
    3: {"keepbest.cli", "keepbest.keras", "keepbest.torch", "keepbest.lightning"},
}


def level(name: str) -> int:
    for lvl, members in LAYERS.items():
        if any(name == m or name.startswith(m + ".") for m in members):
            return lvl
    return 2 if name != "keepbest" else 4


# Sibling entry points that may import each other, and why.
ALLOWED_IMPORTS = {
    ("keepbest.cli._sidecar", "keepbest.keras"): "`keepbest sidecar` runs a Keras evaluator (imported when it runs)",
    ("keepbest.cli._inspect", "keepbest.keras._export"): "`keepbest export --to x.keras` needs Keras (imported when "
                                                         "it runs)",
    ("keepbest.lightning._io", "keepbest.torch._host"): "Lightning's state is torch state: the same host copies",
    ("keepbest.lightning._io", "keepbest.torch._state"): "... and the same safetensors + JSON layout",
}


def test_every_module_imports_only_from_lower_layers():
    wrong = []
    for name, targets in graph().items():
        for target in targets - {t for (n, t) in ALLOWED_IMPORTS if n == name}:
            own_package = name.split(".")[:2] == target.split(".")[:2] and level(name) in (1, 3)
            same_ok = level(name) in (0, 2) or own_package
            if level(target) > level(name) or (level(target) == level(name) and not same_ok):
                wrong.append(f"{name} (layer {level(name)}) imports {target} (layer {level(target)})")
    assert wrong == []


def test_only_keepbest_keras_imports_keras():
    importers = sorted(name for name, path in modules().items()
                       if not name.startswith("keepbest.keras")
                       and any(isinstance(n, (ast.Import, ast.ImportFrom)) and (
                           (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "keras" for a in n.names))
                           or (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "keras"))
                           for n in ast.walk(ast.parse(path.read_text()))))
    assert importers == []


def importers_of(package: str) -> set[str]:
    """keepbest modules that import ``package`` (anywhere in their source)."""
    found = set()
    for name, path in modules().items():
        for n in ast.walk(ast.parse(path.read_text())):
            if (isinstance(n, ast.Import) and any(a.name.split(".")[0] == package for a in n.names)) or (
                    isinstance(n, ast.ImportFrom) and not n.level and (n.module or "").split(".")[0] == package):
                found.add(name)
    return found


def test_only_the_torch_adapters_import_torch_and_only_keepbest_lightning_imports_lightning():
    allowed = {"keepbest.distributed._torch",  # torch.distributed carries the messages of a save
               "keepbest.keras._host",  # Keras on its torch backend: variables are torch tensors
               "keepbest.keras._resume"}  # ... and torch's generator shuffles its DataLoaders
    assert {m for m in importers_of("torch") if not m.startswith(("keepbest.torch", "keepbest.lightning"))} == allowed
    assert {m for m in importers_of("lightning") | importers_of("pytorch_lightning")} == {"keepbest.lightning._compat"}


# -- the same rule, checked at run time ------------------------------------------------------------------

WORKLOAD = textwrap.dedent('''
    import json, os, sys, sysconfig, tempfile
    SRC = sys.argv[1]
    STD = (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"])
    EVENTS = {"open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.link", "os.symlink", "os.listdir",
              "os.scandir", "os.truncate", "os.chmod", "shutil.rmtree", "shutil.copyfile", "shutil.copytree",
              "mmap.__new__", "fcntl.flock"}
    seen, wrong = set(), []

    def hook(event, args):
        if event not in EVENTS:
            return
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(STD) \
                and "site-packages" not in frame.f_code.co_filename:  # pathlib, shutil, os, io ...
            frame = frame.f_back
        where = frame.f_code.co_filename if frame is not None else "?"
        if where.startswith(SRC):
            rel = os.path.relpath(where, SRC)
            seen.add(rel)
            if not rel.startswith("store" + os.sep):
                wrong.append(f"{rel}:{frame.f_lineno} {event} {str(args[0])[:80]}")

    import numpy as np
    import keepbest
    from keepbest import cli, CheckpointManager, KeepBest, KeepLast, Monitor
    from keepbest.follower import Follower
    from keepbest.publishing import Publisher
    sys.addaudithook(hook)

    class Recorder(Publisher):
        def committed(self, version):
            os.listdir(version.path)  # what an upload does with the snapshot (not keepbest's I/O)

    root = tempfile.mkdtemp()
    mgr = CheckpointManager(root, monitor=Monitor("loss", "min"), keep=[KeepLast(2), KeepBest(1)], publishers=[Recorder()])
    for step, loss in enumerate([3.0, 1.0, 2.0, 4.0], 1):
        mgr.save(step, {"w": np.full(300000, step, np.float32), "b": np.zeros(3)}, metrics={"loss": loss}, epoch=step)
    mgr.save_async(5, {"w": np.zeros(300000, np.float32), "b": np.ones(3)}, epoch=5).result()
    mgr.load(); mgr.load(step=2, fallback=True)
    mgr.promote("best", "production"); mgr.demote("production"); mgr.prune()
    mgr.mark_training_end()
    with Follower(root) as follower:
        while (ckpt := follower.next(idle_timeout=0)) is not None:
            follower.begin(ckpt); mgr.store.verify(ckpt.manifest); follower.done(ckpt, {"loss": 1.0})
    keepbest.list_checkpoints(root)
    for argv in (["ls", root], ["ls", "--json", root], ["verify", root], ["gc", "--dry-run", root], ["gc", root],
                 ["promote", root, "latest", "--alias", "prod"], ["demote", root, "--alias", "prod"],
                 ["show", root + "@latest"], ["diff", root + "@best", root + "@latest"],
                 ["export", root + "@latest", "--to", os.path.join(root, "out", "m.safetensors")],
                 ["export", root + "@latest", "--to", os.path.join(root, "copies")]):
        cli.main(argv)
    mgr.delete_all(); mgr.close()

    import keras, keepbest.keras
    x = np.random.default_rng(0).standard_normal((64, 8)).astype("float32")
    def build():
        m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
        m.compile(optimizer="adam", loss="mse")
        return m
    for path, kwargs in ((os.path.join(root, "k", "e{epoch}.keras"), {}),
                         (os.path.join(root, "k", "w{epoch}.weights.h5"), {"save_weights_only": True}),
                         (os.path.join(root, "f", "e{epoch}"), {"async_save": True})):
        build().fit(x, x[:, :4], epochs=2, verbose=0, callbacks=[
            keepbest.keras.ModelCheckpoint(path, monitor="loss", keep_last=1, keep_best=1, **kwargs)])
    keepbest.keras.load_model(os.path.join(root, "k", "e2.keras"))
    keepbest.keras.load_weights(build(), os.path.join(root, "k", "w2.weights.h5"))
    keepbest.keras.load_model(os.path.join(root, "f"))
    cli.main(["export", os.path.join(root, "f") + "@latest", "--to", os.path.join(root, "f.keras")])
    backup = os.path.join(root, "backup")
    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                raise RuntimeError("stop")
    try:
        build().fit(x, x[:, :4], epochs=2, verbose=0, callbacks=[keepbest.keras.BackupAndRestore(backup, verbose=0), Stop()])
    except RuntimeError:
        pass
    m = build(); m.build((None, 8))
    m.fit(x, x[:, :4], epochs=2, verbose=0, callbacks=[keepbest.keras.BackupAndRestore(backup, verbose=0)])
    keepbest.keras.SidecarEvaluator(build(), (x, x[:, :4]), os.path.join(root, "f"), max_evaluations=1, verbose=0).start()
    print(json.dumps({"wrong": wrong, "seen": sorted(seen)}))
''')


def test_every_file_operation_of_the_entry_points_comes_from_the_store(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "jax"), "PYTHONDONTWRITEBYTECODE": "1"}
    script = tmp_path / "workload.py"
    script.write_text(WORKLOAD)
    result = subprocess.run([sys.executable, str(script), str(SRC) + os.sep], capture_output=True, text=True,
                            timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert any(s.startswith("store") for s in report["seen"])  # the hook saw the store's I/O
    assert report["wrong"] == []
