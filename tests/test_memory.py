"""Freed heap memory goes back to the OS (remp_megatron.memory), in a fresh process so the
allocator state is this test's own."""
import subprocess
import sys

CHILD = r"""
import time, torch
from remp_megatron import memory
big = torch.ones(16 * 2**20 // 4)
del big  # freeing a 16 MiB mmap raises glibc's mmap threshold to 16 MiB
held = [torch.ones(2 * 2**20 // 4) for _ in range(200)]  # 400 MiB of 2 MiB tensors: now in the heap
keep = held[-1]
del held  # all but the last are free, below a live chunk: the heap cannot shrink by itself
before = memory.rss_bytes()
memory.release_freed_async()
deadline = time.monotonic() + 10
while memory.rss_bytes() > before - 300 * 2**20 and time.monotonic() < deadline:
    time.sleep(0.01)
print(before, memory.rss_bytes())
"""


def test_freed_heap_is_returned_in_the_background():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=True)
    before, after = map(int, out.stdout.split())
    assert before - after > 300 * 2**20, f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB"
