"""evaluate_reconstruction with and without the CSR latents of a dense-L0 SAE (ReLU+L1, the
test config's resid2_relu-w1152-l1_2, L0 ~1120 of 1152) on 2,016 cached tokens, interleaved.

Usage: python benchmarks/bench_eval_csr.py SAE_DIR ACTS_H5 OUT_DIR (prints one line per run).
"""

import os
import sys
import time

import torch

from saeflow.sae_eval import evaluate_reconstruction
from saeflow.saes import load_sae


def main() -> None:
    torch.set_num_threads(1)
    sae, acts, out_dir = load_sae(sys.argv[1]), sys.argv[2], sys.argv[3]
    for i in (1, 2):
        for mode, limit in (("before", None), ("after", 512)):
            out = f"{out_dir}/{mode}{i}.h5"
            t = time.perf_counter()
            m = evaluate_reconstruction(sae, acts, out, 4096, {}, limit)
            print(mode, i, f"{time.perf_counter() - t:.2f} s", os.path.getsize(out), "bytes",
                  "mean_l0", round(m["mean_l0"], 1), "fvu", m["fvu"], flush=True)


if __name__ == "__main__":
    main()
