"""Make this package's merge methods known to mergekit.

mergekit has no plugin discovery: a method exists by name only after the module that calls
``mergekit.merge_methods.register`` has been imported, in every process that validates or
merges a config. Everything that loads a recipe, merges, or reads a stored trial config calls
``register_plugins()`` first.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging

from mergekit.merge_methods import registered_methods

LOG = logging.getLogger(__name__)
METHODS_MODULE = "mergekit_evolve.methods"


@functools.cache
def register_plugins() -> tuple[str, ...]:
    """Import ``mergekit_evolve.methods`` when it exists (a module is imported once, so each method is
    registered once); return the names of the registered methods it holds as module attributes."""
    if importlib.util.find_spec(METHODS_MODULE) is None:
        return ()
    module = importlib.import_module(METHODS_MODULE)
    registered = {id(m): m.spec.name for m in registered_methods()}
    names = tuple(sorted({registered[id(v)] for v in vars(module).values() if id(v) in registered}))
    LOG.debug("merge methods of %s: %s", METHODS_MODULE, ", ".join(names) or "none")
    return names
