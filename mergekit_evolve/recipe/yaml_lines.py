"""Safe YAML loading that remembers the line of every value, so errors can name it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Loc = tuple[str | int, ...]


class RecipeError(ValueError):
    """A problem in a recipe, reported as ``file:line: what is wrong``."""

    def __init__(self, message: str, source: str | None = None, line: int | None = None):
        self.message = message
        self.source = source
        self.line = line
        where = ""
        if source:
            where = f"{source}:{line}: " if line else f"{source}: "
        super().__init__(where + message)


@dataclass
class LocatedYaml:
    """A YAML document as plain Python values plus the 1-based line of each location."""

    data: Any
    source: str
    lines: dict[Loc, int] = field(default_factory=dict)

    def line_of(self, loc: Loc) -> int | None:
        """The line of ``loc`` or of its nearest enclosing location."""
        loc = tuple(loc)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get((), None)

    def error(self, loc: Loc, message: str) -> RecipeError:
        return RecipeError(message, self.source, self.line_of(loc))


def _construct(node: yaml.Node, loc: Loc, lines: dict[Loc, int], loader: yaml.SafeLoader) -> Any:
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode) and node.tag == "tag:yaml.org,2002:map":
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            out[key] = _construct(value_node, loc + (key,), lines, loader)
            lines[loc + (key,)] = key_node.start_mark.line + 1  # errors point at the key, not its value
        return out
    if isinstance(node, yaml.SequenceNode) and node.tag == "tag:yaml.org,2002:seq":
        return [_construct(v, loc + (i,), lines, loader) for i, v in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def load_located(text: str, source: str) -> LocatedYaml:
    """Parse ``text`` with PyYAML's safe loader, keeping line numbers."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise RecipeError("the file is empty", source)
        lines: dict[Loc, int] = {}
        data = _construct(node, (), lines, loader)
    except yaml.MarkedYAMLError as e:  # includes the safe loader refusing python/* tags
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise RecipeError(f"not valid YAML: {e.problem}", source, line) from None
    finally:
        loader.dispose()
    return LocatedYaml(data=data, source=source, lines=lines)


def load_located_file(path: Path) -> LocatedYaml:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"cannot read the recipe: {e.strerror}", str(path)) from None
    return load_located(text, str(path))
