"""The runner's forkserver preload must never ask CUDA for its devices.

torch.cuda.is_available() without NVML calls cudaGetDeviceCount, which marks
every later fork as bad: each cell forked from the server would then fail with
"Cannot re-initialize CUDA in forked subprocess". This runs on a CPU by faking
a CUDA build of torch and counting the calls.
"""
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import torch
    calls = []
    torch._C._cuda_getDeviceCount = lambda: calls.append(1) or 0
    torch.cuda._is_compiled = lambda: True
    torch._C._accelerator_getAccelerator = lambda: torch.device("cuda")
    if not hasattr(torch._C, "_cuda_getCurrentRawStream"):
        torch._C._cuda_getCurrentRawStream = lambda *a: 0
    import lorabench.measure.worker, lorabench.launch.preload
    print(len(calls))
""")


def test_preload_never_calls_cuda_get_device_count():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0", out.stdout + out.stderr
