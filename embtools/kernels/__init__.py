"""Per-framework kernels: the scoring and selection loops that backends and the planner call.

One module per framework and job; each imports its framework at the top, so import a module only
where that framework is in use:

- :mod:`embtools.kernels.numpy_tiles`: NumPy top-k selection and the fused tile kernel (scores
  a block tile by tile and keeps a running top-k), used by the NumPy and torch-CPU backends.
- :mod:`embtools.kernels.torch_screen`: the torch bfloat16 screen pass (bfloat16 products summed
  in float32, pooled group maxima, running best rows), used by ``search/screen.py`` when the
  planner chose the screen.
- :mod:`embtools.kernels.torch_cuda`: pinned host memory and a side stream for asynchronous
  host-to-device copies, offered by CUDA torch backends (:class:`SupportsAsyncUpload`).

Kernels import only NumPy, their framework and ``embtools.errors``: they sit below the backends
and never import ``backends``, ``storage`` or ``search``.

Examples
--------
>>> import numpy as np
>>> from embtools.kernels.numpy_tiles import select_top_k
>>> select_top_k(np.array([[0.2, 0.7, 0.5]], dtype=np.float32), 2)[1].tolist()
[[1, 2]]
"""
