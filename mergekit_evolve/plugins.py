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

LOG = logging.getLogger(__name__)
METHODS_MODULE = "mergekit_evolve.methods"


@functools.cache
def register_plugins() -> tuple[str, ...]:
    """Import ``mergekit_evolve.methods`` when it exists (once per process); return the method names it added."""
    from mergekit.merge_methods import registered_methods

    if importlib.util.find_spec(METHODS_MODULE) is None:
        return ()
    before = {m.spec.name for m in registered_methods()}
    importlib.import_module(METHODS_MODULE)
    added = tuple(sorted({m.spec.name for m in registered_methods()} - before))
    LOG.debug("registered merge methods from %s: %s", METHODS_MODULE, ", ".join(added) or "none")
    return added
