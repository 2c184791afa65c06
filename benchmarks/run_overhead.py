"""What resume and locking cost a run (acceptance: nothing measurable against the run itself).

    .venv/bin/python benchmarks/run_overhead.py [RESULTS.jsonl]

In one process, for the cells of scenarios/quick.yaml (18 cells): the work that
`run` adds before and around its cells (open and flock the result file, read
the rows already in it, compare every cell's config hash, write 18 rows with an
fsync each) against the same file handling without the lock and the hash check
(plain appends, as before), each timed 20 times (median); then both against the
wall time of the quick matrix itself, read from a committed run's rows (the sum
of `cell_wall_s`). Prints one line per measurement.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lorabench.launch.run import open_results
from lorabench.row.codec import encode
from lorabench.spec.scenario import expand, load_scenario


def timed(fn, repeats: int = 20) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    results = sys.argv[1] if len(sys.argv) > 1 else "results/cpu-quick-2026-11-29.jsonl"
    ls = load_scenario("scenarios/quick.yaml")
    jobs = [ls.job(c, "cpu") for c in expand(ls)]
    rows = [dict(encode(j), status="ok") for j in jobs]
    lines = [json.dumps(r, separators=(",", ":")) + "\n" for r in rows]
    with tempfile.TemporaryDirectory() as d:
        def plain():  # the writer before: append + fsync per row, no lock, no resume check
            path = Path(d) / "plain.jsonl"
            path.unlink(missing_ok=True)
            for line in lines:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())

        def locked():  # now: lock, then every row through the writer
            path = Path(d) / "locked.jsonl"
            path.unlink(missing_ok=True)
            with open_results(path, jobs, resume=False) as (writer, todo):
                for row in rows:
                    writer.append(row)

        def resumed():  # --resume of the finished file: read 18 rows, check 18 hashes, run nothing
            with open_results(Path(d) / "locked.jsonl", jobs, resume=True) as (writer, todo):
                assert not todo

        t_plain, t_locked = timed(plain), timed(locked)
        t_resume = timed(resumed)
    wall = sum(r.get("cell_wall_s") or 0 for r in (json.loads(x) for x in Path(results).read_text().splitlines()))
    print(f"cells: {len(jobs)}")
    print(f"write {len(jobs)} rows, plain appends: {t_plain * 1e3:.2f} ms")
    print(f"write {len(jobs)} rows, locked writer + hash check: {t_locked * 1e3:.2f} ms "
          f"(+{(t_locked - t_plain) * 1e3:.2f} ms)")
    print(f"--resume of the finished file (read, check {len(jobs)} hashes): {t_resume * 1e3:.2f} ms")
    print(f"the quick matrix's cells ({results}): {wall:.1f} s; overhead "
          f"{100 * (t_locked - t_plain + t_resume) / wall:.4f} % of it")


if __name__ == "__main__":
    main()
