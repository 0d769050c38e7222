#!/usr/bin/env python
"""What one attack pass costs per row on this CPU, by batch size, precision and memory format (issue 24).

    python bench/pass_cost.py

For the committed MNIST pgd_at model and the fast CIFAR-10 ce model, in eval mode: the time of a
forward pass under ``torch.no_grad`` (and under ``torch.inference_mode``, bf16 autocast, with a
channels_last input, and with the filters held channels_last as ``evaluate`` holds them for colour
images), and of a forward pass with the input gradient of one class score (with contiguous and with
channels_last filters), at three batch sizes each: the median of the repetitions after one warm-up
call (``run.median_time``).
Prints one line per model and batch; writes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402 - puts the checkout's src on the path

import torch  # noqa: E402

import repulsor  # noqa: E402
from repulsor.attacks import channels_last_weights  # noqa: E402

MODELS = (("MNIST small CNN", "results/compare-mnist-cpu/pgd_at", (1, 28, 28), (81, 256, 729), 20),
          ("fast CIFAR-10 body", "results/compare-cifar10-fast-cpu/ce", (3, 32, 32), (64, 256, 800), 3))


def seconds(fn, reps: int) -> float:
    return bench.median_time(fn, warmup=1, repeats=reps)[0]


def measure(model, shape, batch: int, reps: int) -> dict:
    x = torch.rand(batch, *shape)
    x_last = x.contiguous(memory_format=torch.channels_last)

    def with_gradient():
        xr = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xr)[:, 0].sum(), xr)

    with torch.no_grad():
        forward = seconds(lambda: model(x), reps)
        channels_last = seconds(lambda: model(x_last), reps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = seconds(lambda: model(x), reps)
    with torch.inference_mode():
        inference = seconds(lambda: model(x), reps)
    with channels_last_weights(model):
        with torch.no_grad():
            filters_last = seconds(lambda: model(x), reps)
        gradient_filters_last = seconds(with_gradient, reps)
    return {"forward": forward, "inference_mode": inference, "bf16": bf16, "channels_last": channels_last,
            "filters_last": filters_last, "gradient": seconds(with_gradient, reps),
            "gradient_filters_last": gradient_filters_last}


def main() -> int:
    print(f"{bench.machine().get('cpu', 'cpu?')}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, folder, shape, batches, reps in MODELS:
        model = repulsor.load_model(bench.ROOT / folder).eval()
        for batch in batches:
            t = measure(model, shape, batch, reps)
            print(f"{name}, batch {batch}: forward {1e3 * t['forward'] / batch:.3f} ms/row"
                  f" (inference_mode {t['forward'] / t['inference_mode']:.2f}x, bf16 {t['forward'] / t['bf16']:.2f}x,"
                  f" channels_last input {t['forward'] / t['channels_last']:.2f}x,"
                  f" channels_last filters {t['forward'] / t['filters_last']:.2f}x faster);"
                  f" forward + input gradient {1e3 * t['gradient'] / batch:.3f} ms/row"
                  f" (channels_last filters {t['gradient'] / t['gradient_filters_last']:.2f}x faster)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
