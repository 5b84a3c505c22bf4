"""mergekit architectures whose weight lists are computed once per process.

mergekit's JSON architectures rebuild every layer's ``WeightInfo`` list on each call, by
regex-substituting the templates and re-validating the pydantic models; its planner calls
them for every layer of every slice of every trial, a third of a small model's planning.
For a JSON architecture the result depends only on the layer index and the number of
layers, so it is kept per (index, number of layers). ``WeightInfo`` is frozen, so sharing
the instances is safe. Architectures defined in Python (whose weights may depend on any
config value) are left as they are.
"""

from __future__ import annotations

from typing import Any

from mergekit.architecture import ModelArchitecture, ModuleArchitecture, WeightInfo
from mergekit.architecture.json_definitions import JsonModuleArchitecture


class MemoModuleArchitecture(ModuleArchitecture):
    def __init__(self, inner: JsonModuleArchitecture):
        self.inner = inner
        self._memo: dict[tuple[str, int | None, int], list[WeightInfo]] = {}

    def _weights(self, kind: str, config: Any, index: int | None = None) -> list[WeightInfo]:
        key = (kind, index, self.inner.num_layers(config))
        if key not in self._memo:
            if kind == "layer":
                self._memo[key] = self.inner.layer_weights(index, config)
            else:
                self._memo[key] = getattr(self.inner, f"{kind}_weights")(config)
        return list(self._memo[key])  # callers may extend the list they get

    def pre_weights(self, config: Any) -> list[WeightInfo]:
        return self._weights("pre", config)

    def post_weights(self, config: Any) -> list[WeightInfo]:
        return self._weights("post", config)

    def layer_weights(self, index: int, config: Any) -> list[WeightInfo]:
        return self._weights("layer", config, index)

    def num_layers_config_key(self) -> str:
        return self.inner.num_layers_config_key()

    def num_layers(self, config: Any) -> int:
        return self.inner.num_layers(config)


def memoised(arch: ModelArchitecture) -> ModelArchitecture:
    """``arch`` with each JSON module's weight lists memoised."""
    modules = {
        name: module.model_copy(update={"architecture": MemoModuleArchitecture(module.architecture)})
        if isinstance(module.architecture, JsonModuleArchitecture)
        else module
        for name, module in arch.modules.items()
    }
    return arch.model_copy(update={"modules": modules})
