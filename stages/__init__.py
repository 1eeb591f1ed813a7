"""One module per DVC stage (installed as sasgate.stages); each has run(params, paths).

Importing this package fixes OpenMP's wait policy before any stage module imports torch
(sasgate/omp.py): `python -m sasgate.stages.<name>` imports it first.
"""

from sasgate import omp as _omp

_omp.preset()
