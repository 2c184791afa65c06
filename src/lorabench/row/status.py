"""What became of a cell: the `status` of its row, named here once. Every writer names these
(row/codec writes OK; measure/worker and launch/* the rest) and row/sanity refuses any other.

  OK       the cell ran its steps and measured them
  OOM      the device (torch's OutOfMemoryError) or the host (the kernel's OOM killer) ran out of memory
  ERROR    the cell raised, or its process died otherwise; `error` says how
  TIMEOUT  the cell's process ran past the launcher's timeout and was killed
  SKIPPED  not run: it would not fit (the estimate above the capacity) or the device cannot run it
"""
OK, OOM, ERROR, TIMEOUT, SKIPPED = "ok", "oom", "error", "timeout", "skipped"
STATUSES = (OK, OOM, ERROR, TIMEOUT, SKIPPED)
