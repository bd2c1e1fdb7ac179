"""Two rules of the package's structure.

- The models run on plain operations: no module under `inception_flax/models` imports
  the CPU backend (`inception_flax.cpu`) or the choice of kernels (`inception_flax.kernels`);
  a faster set of operations reaches them as `Ops`, from outside.
- Nothing by surprise: importing any module of the package, or an entry script
  without running it, changes no process state (environment, subprocesses, re-execution,
  native builds). Entry points make their changes in `cpu.process.prepare()`.
"""

import ast
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ROOT / "inception_flax" / "models"
ENTRY_SCRIPTS = ("train.py", "eval.py", "benchmark.py", "sweep.py", "predict.py")


def imported_modules(source: str, package: str) -> set[str]:
    """What `source`, a module of `package`, imports: absolute module names, and
    `module.name` for each name taken `from` a module."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from `package`, `level - 1` packages up
                parts = package.split(".")
                base = ".".join([*parts[:len(parts) - node.level + 1], *filter(None, [base])])
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def test_imported_modules_sees_every_form_of_import():
    """The scanner itself (else the rule below proves nothing)."""
    source = ("import inception_flax.cpu.forms\nfrom inception_flax import kernels\n"
              "from ..cpu import native\nfrom . import layers\n")
    assert {"inception_flax.cpu.forms", "inception_flax.kernels", "inception_flax.cpu.native",
            "inception_flax.models.layers"} <= imported_modules(source, "inception_flax.models")


def test_models_import_nothing_of_the_backend():
    """Beside the standard library, JAX, Flax and NumPy, a model module imports only
    `inception_flax.models`: never the CPU backend, nor any other part of the package."""
    allowed = ("jax", "flax", "numpy", "inception_flax.models")
    offenders = {}
    for path in sorted(MODELS.rglob("*.py")):
        package = ".".join(path.relative_to(ROOT).parts[:-1])
        names = sorted(n for n in imported_modules(path.read_text(), package)
                       if n.split(".")[0] not in sys.stdlib_module_names
                       and not any(n == a or n.startswith(a + ".") for a in allowed))
        if names:
            offenders[str(path.relative_to(ROOT))] = names
    assert MODELS.joinpath("layers.py").exists() and not offenders, offenders


PROBE = textwrap.dedent("""
    import importlib, importlib.util, json, linecache, os, pkgutil, subprocess, sys

    events = []
    popen_init = subprocess.Popen.__init__
    stdlib = os.path.dirname(os.__file__)
    root = os.getcwd()

    def ours():
        # Whether the nearest caller outside the standard library is this repository's
        # code, other than an import statement (a dependency's compiled code on import
        # runs e.g. `platform.processor()`, which asks `uname`).
        frame = sys._getframe(2)
        while frame and frame.f_code.co_filename.startswith((stdlib, "<")):
            frame = frame.f_back
        if frame is None or not frame.f_code.co_filename.startswith(root):
            return False
        line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
        return not line.startswith(("import ", "from "))

    def spy_popen(self, args, *rest, **kwargs):
        if ours():
            events.append(["subprocess", str(args)])
        return popen_init(self, args, *rest, **kwargs)

    def spy_exec(name):
        def refuse(*args, **kwargs):
            events.append([name, str(args[:2])])
            raise OSError("refused by the test")
        return refuse

    subprocess.Popen.__init__ = spy_popen
    for name in ("execv", "execve", "execvp", "execvpe", "system"):
        setattr(os, name, spy_exec(name))
    before = dict(os.environ)

    names = []
    if sys.argv[1] == "package":  # every module, `__main__`s included (not run: guarded)
        import inception_flax
        names = ["inception_flax"] + sorted(
            m.name for m in pkgutil.walk_packages(inception_flax.__path__, "inception_flax."))
        for name in names:
            importlib.import_module(name)
    else:  # an entry script, imported and not run (its __name__ is not "__main__")
        spec = importlib.util.spec_from_file_location("entry", sys.argv[1])
        spec.loader.exec_module(importlib.util.module_from_spec(spec))

    after = dict(os.environ)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    print(json.dumps({"modules": names, "changed": changed, "events": events}))
""")


@pytest.mark.parametrize("what", ["package", *ENTRY_SCRIPTS])
def test_importing_changes_no_process_state(what, tmp_path):
    """`what`: every module of the package, or one entry script (separately: each
    defines its own command-line flags)."""
    env = dict(os.environ)
    # Whatever this session set up for XLA, the child starts without the flag an import
    # used to add, so that adding it shows.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "ynn" not in f)
    env["INCEPTION_FLAX_CACHE"] = str(tmp_path / "native")
    env.pop("GLIBC_TUNABLES", None)
    env.pop("INCEPTION_FLAX_HUGEPAGES", None)
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", PROBE, what], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if what == "package":
        assert {"inception_flax.cpu.process", "inception_flax.cpu.__main__",
                "inception_flax.kernels", "inception_flax.models.layers"} <= set(report["modules"])
    assert report["changed"] == [], report["changed"]
    assert report["events"] == [], report["events"]
    assert not (tmp_path / "native").exists(), "importing built the native kernels"
