"""Demo-ViT training step time for 1 and 2 CPU threads, with OpenMP's default and passive waiting.

On a machine whose cores are shared with other work, spinning OpenMP threads can make multi-threaded steps far
slower than single-threaded ones. Each setting runs in its own process (OpenMP reads the policy at start-up);
settings are interleaved over rounds and medians printed side by side.

    python benchmarks/omp_wait_policy.py --steps 30 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from lpl.utils.cli_args import positive_int
from lpl.utils.errors import run_script

CHILD = r"""
import time, sys, torch, torch.nn.functional as F
from lpl.models import ViTClassifier
torch.manual_seed(0); torch.set_num_threads(int(sys.argv[1])); steps = int(sys.argv[2])
model = ViTClassifier(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=128, depth=4, num_heads=4,
                      model_kwargs={"global_pool": "avg", "class_token": False}).model
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
for _ in range(3):
    F.cross_entropy(model(x), y).backward()
start = time.perf_counter()
for _ in range(steps):
    loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
print((time.perf_counter() - start) / steps * 1000)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, default=30, help="timed training steps per process")
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds of every setting")
    args = parser.parse_args()
    settings = [(threads, policy) for policy in ("default", "PASSIVE") for threads in (1, 2)]
    times: dict[tuple[int, str], list[float]] = {s: [] for s in settings}
    for _ in range(args.rounds):
        for threads, policy in settings:
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
            if policy != "default":
                env["OMP_WAIT_POLICY"] = policy
            out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(args.steps)], env=env,
                                 capture_output=True, text=True, check=True)
            times[(threads, policy)].append(float(out.stdout.strip().splitlines()[-1]))
    load = os.getloadavg()[0]
    print(f"demo ViT training step (batch 32), median of {args.rounds} rounds, load average {load:.1f}")
    base = statistics.median(times[(1, "default")])
    for (threads, policy), values in times.items():
        median = statistics.median(values)
        print(f"threads={threads} OMP_WAIT_POLICY={policy:8s} {median:8.1f} ms/step  "
              f"({base / median:.2f}x of 1 thread)")


if __name__ == "__main__":
    run_script(main)
