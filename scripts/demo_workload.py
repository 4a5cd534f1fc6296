"""A worker process that loads the same reference data as its siblings, plus some of its own.

Many real services start N identical workers that each build the same in-memory tables (a
dictionary, a model, a cache warmed from the same file). Each copy is private anonymous memory,
so N workers hold N copies: exactly what KSM can merge, if the copies sit on identical pages.

Usage: python3 demo_workload.py SHARED_MIB OWN_MIB WORKER_ID
Prints "ready <checksum>" once the data is built, then waits until stdin closes.
"""
import hashlib
import sys

shared_mib, own_mib, worker = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

# Shared reference data: deterministic, identical in every worker, built in 1 MiB blocks of
# 256 pages that all differ from each other.
table = []
for i in range(shared_mib):
    table.append(
        bytearray(
            b"".join(
                hashlib.sha256(b"reference-table-%d-%d" % (i, p)).digest() * 128
                for p in range(256)
            )
        )
    )

# Per-worker data: different in every worker, so it must not merge.
own = []
for i in range(own_mib):
    seed = hashlib.sha256(b"worker-%s-%d" % (worker.encode(), i)).digest()
    block = bytearray(1024 * 1024)
    for off in range(0, len(block), 4096):
        block[off : off + 32] = hashlib.sha256(seed + off.to_bytes(8, "little")).digest()
    own.append(block)

# Read everything back so the contents really exist in memory.
digest = hashlib.sha256()
for block in table + own:
    digest.update(block[::4096])
print("ready", digest.hexdigest()[:16], flush=True)
sys.stdin.read()
