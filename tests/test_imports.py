"""Data flows one way (pipeline -> cache -> train -> eval): train never imports pipeline, cache imports
neither torch nor anything upstream, and the library never imports typer."""

import subprocess
import sys


def _modules_after(stmt: str) -> set[str]:
    code = f"import sys; {stmt}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_train_and_eval_do_not_import_pipeline():
    mods = _modules_after("import kvkd.train.trainer, kvkd.eval.evaluate")
    assert not [m for m in mods if m.startswith("kvkd.pipeline")]
    assert "typer" not in mods


def test_cache_does_not_import_train_or_pipeline():
    mods = _modules_after("import kvkd.cache.reader, kvkd.cache.writer")
    assert not [m for m in mods if m.startswith(("kvkd.pipeline", "kvkd.train", "kvkd.eval"))]


def test_cache_imports_neither_torch_nor_upstream_packages():
    mods = _modules_after("import kvkd.cache")
    assert not [m for m in mods if m == "torch" or m.startswith(("kvkd.pipeline", "kvkd.train", "kvkd.eval"))]


def test_config_and_train_options_import_no_torch_or_typer():
    mods = _modules_after("import kvkd.config, kvkd.train.options")
    assert "torch" not in mods and "typer" not in mods


def test_plan_does_not_import_train():
    mods = _modules_after("import kvkd.plan")
    assert not [m for m in mods if m.startswith("kvkd.train")]
