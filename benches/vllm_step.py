"""How long kvhygiene.vllm takes to compare one scheduler step's new blocks (the check that a
block given as new to two requests in one forward pass is refused), run in the model runner
before every forward pass. Reads layouts only: no memory, no library call.

    python3 benches/vllm_step.py [PACKAGE_DIR]

PACKAGE_DIR is the directory holding the ``kvhygiene`` package (default: ``python/``), so that
another version of the module can be measured the same way. Prints the median of 9 runs of
each step, in milliseconds.
"""

import statistics
import sys
import timeit
from pathlib import Path

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parent.parent / "python"))

import kvhygiene  # noqa: E402
from kvhygiene.vllm import _shared_in_step  # noqa: E402

TENSORS, BLOCKS, PAGE = 64, 40000, 4096
BASE = 1 << 40
REGIONS = [BASE + k * BLOCKS * PAGE for k in range(TENSORS)]
PAGES = kvhygiene.KvLayout(REGIONS, PAGE, BLOCKS)
HALF = kvhygiene.KvLayout(REGIONS[: TENSORS // 2], PAGE, BLOCKS)
STATES = kvhygiene.KvLayout(REGIONS, PAGE // 4, BLOCKS, block_stride=PAGE)


def median_ms(step, layouts) -> float:
    return statistics.median(timeit.repeat(lambda: _shared_in_step(step, layouts), number=1, repeat=9)) * 1000


def main() -> None:
    n = 8000
    apart = {"a": [list(range(1, n // 2 + 1))], "b": [list(range(n // 2 + 1, n + 1))]}
    same = {"a": [list(range(1, n + 1))], "b": [list(range(1, n + 1))]}
    # 256 requests, 8 new blocks in each of two groups.
    groups = {f"r{r}": [list(range(1 + 16 * r, 9 + 16 * r)), list(range(9 + 16 * r, 17 + 16 * r))] for r in range(256)}
    cases = [
        ("8000 blocks apart, one layout", apart, [PAGES]),
        ("8000 blocks given to two requests, one layout", same, [PAGES]),
        ("4096 blocks, two groups over one layout", groups, [PAGES, PAGES]),
        ("4096 blocks, a group over half the tensors", groups, [HALF, PAGES]),
        ("4096 blocks, two block geometries over the tensors", groups, [PAGES, STATES]),
    ]
    for label, step, layouts in cases:
        print(f"{label:<55} {median_ms(step, layouts):8.2f} ms")


if __name__ == "__main__":
    main()
