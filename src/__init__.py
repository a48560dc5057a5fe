"""mobilenetv2-quant's library. Import it before MindSpore: it sets how OpenMP's threads wait (below)."""
import os
import sys
import warnings

# Our CPU kernels (src/kernels) run in OpenMP's thread pool, between MindSpore ops that run in MindSpore's own.
# By default OpenMP's threads spin for a while after each kernel and take a core from the MindSpore op that
# follows: on 2 cores training ran 25-30% slower (measured at batch 32: float 14.2 img/s with OpenMP's default,
# 18.8 sleeping; QAT 14.3 and 20.8). libgomp reads the policy once, when it is loaded, and `import mindspore`
# loads it.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "mindspore" in sys.modules:
        warnings.warn("mindspore was imported before src, so OpenMP's threads spin between our CPU kernels and "
                      "slow MindSpore's ops down: import src first, or set OMP_WAIT_POLICY=PASSIVE")
