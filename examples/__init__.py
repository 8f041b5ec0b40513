"""Examples of bringing your own model, tasks and data (see docs/byo.md).

A package so that a config run from the repository root can name its classes by class path,
e.g. ``examples.my_model.TabularEncoder``.
"""
