"""Starts 8 threads that allocate with malloc at the same time, after limit_malloc_arenas() when
argv[1] is "limit", and prints how many arenas glibc's malloc then has (from malloc_stats)."""
import ctypes
import os
import sys
import threading

from imgclf.project import limit_malloc_arenas

if sys.argv[1] == "limit":
    limit_malloc_arenas()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
ready = threading.Barrier(8)


def allocate():
    buffer = libc.malloc(64 * 1024)
    ready.wait()  # all eight hold a block at once
    libc.free(buffer)


threads = [threading.Thread(target=allocate) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
sys.stderr.flush()
read, write = os.pipe()
saved = os.dup(2)
os.dup2(write, 2)  # malloc_stats writes to the C library's stderr
libc.malloc_stats()
libc.fflush(None)
os.dup2(saved, 2)
os.close(write)
stats = os.read(read, 1 << 20).decode()
print("ARENAS", sum(line.startswith("Arena ") for line in stats.splitlines()))
