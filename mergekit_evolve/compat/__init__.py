"""The only code that touches a dependency's private API or patches it: one module per dependency.

Each accessor and patch is pinned by a test in tests/compat/, so an upgrade of mergekit,
Optuna or lm-eval that moves one fails there, in one place, naming it.
"""
