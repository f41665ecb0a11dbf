"""torch.empty / del loop of mixed sizes: microseconds per (empty + del) pair."""

import time

from common import parse, setup, write

SIZES = [512, 4096, 65536, 1 << 20, 3 << 20, 8 << 20]
ITERATIONS = 20000
WARMUP = 2000


def loop(torch, n):
    for i in range(n):
        t = torch.empty((SIZES[i % len(SIZES)],), dtype=torch.uint8, device="cuda")
        del t


def main():
    args = parse(__doc__)
    torch = setup(args.mode)
    loop(torch, WARMUP)
    torch.cuda.synchronize()
    start = time.perf_counter()
    loop(torch, ITERATIONS)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    write(
        args.out,
        {
            "step": "alloc_loop",
            "mode": args.mode,
            "iterations": ITERATIONS,
            "sizes": SIZES,
            "us_per_op": elapsed / ITERATIONS * 1e6,
        },
    )


if __name__ == "__main__":
    main()
