"""Examples of bringing your own model, tasks and data (see docs/byo.md). A package, so that a config run from the repository root can name ``examples.my_model.TabularEncoder``."""
