"""``python:`` objectives: a function of the recipe's author scores the resident model, example by example.

``python: fitness.py:score`` loads ``fitness.py`` from the recipe's folder; ``python: pkg.mod:score``
imports ``pkg.mod`` (the recipe's folder first on the path). The function is called as
``score(model, tokenizer, examples)`` and returns one float per example. An exception inside it
fails the trial with one line naming its file and line.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

from mergekit_evolve.evaluate.example_objectives import ExampleScorer, ObjectiveError, TaskSetupError


def load_function(spec: str, base_dir: Path) -> tuple[Callable[..., Any], Path | None]:
    """The function ``spec`` names and the file that defines it; a ``TaskSetupError`` on field ``python`` if absent."""
    module_name, _, function = spec.rpartition(":")
    if module_name.endswith(".py"):
        path = (base_dir / module_name).resolve()
        if not path.is_file():
            raise TaskSetupError(f"python: no file '{module_name}' (looked at {path})", field="python")
        # a name of its own per file, so two recipes' fitness.py never share a module
        name = f"mergekit_evolve_objective_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise TaskSetupError(f"python: {module_name} fails on import: {user_line(e, path, base_dir)}",
                                 field="python") from None
    else:
        added = str(base_dir) not in sys.path
        if added:  # packages beside the recipe import too
            sys.path.insert(0, str(base_dir))
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise TaskSetupError(f"python: cannot import '{module_name}' ({e})", field="python") from None
        except Exception as e:
            raise TaskSetupError(f"python: {module_name} fails on import: {type(e).__name__}: {e}",
                                 field="python") from None
        finally:
            if added:
                sys.path.remove(str(base_dir))
    found = getattr(module, function, None)
    if not callable(found):
        raise TaskSetupError(f"python: {module_name} has no function '{function}'", field="python")
    file = inspect.getsourcefile(found) or getattr(module, "__file__", None)
    return found, Path(file).resolve() if file else None


def user_line(error: BaseException, file: Path | None, base_dir: Path) -> str:
    """``fitness.py:12: ZeroDivisionError: ...``: the deepest frame of the user's file (else the deepest of all)."""
    frames = traceback.extract_tb(error.__traceback__)
    mine = [f for f in frames if file is not None and Path(f.filename).resolve() == file]
    where = ""
    frame = (mine or frames or [None])[-1]
    if frame is not None:
        path = Path(frame.filename).resolve()
        shown = path.relative_to(base_dir.resolve()) if path.is_relative_to(base_dir.resolve()) else path
        where = f"{shown}:{frame.lineno}: "
    return f"{where}{type(error).__name__}: {error}".splitlines()[0]


class PythonScorer(ExampleScorer):
    def __init__(self, *args: Any):
        super().__init__(*args)
        self.function, self.file = load_function(self.objective.python, self.base_dir)

    def files(self) -> list[Path]:
        return [*super().files(), *([self.file] if self.file else [])]

    def score(self, model: transformers.PreTrainedModel, tokenizer: Any, ids: list[int],
              examples: list[dict[str, Any]]) -> Sequence[float]:
        try:
            with torch.no_grad():
                return self.function(model, tokenizer, examples)
        except Exception as e:
            raise ObjectiveError(user_line(e, self.file, self.base_dir)) from e
