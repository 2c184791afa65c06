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


def test_the_hugging_face_preload_never_calls_cuda_get_device_count_nor_imports_bitsandbytes():
    """launch/preload_hf.py (a CPU run of an HF model preloads transformers in the server): no
    cudaGetDeviceCount either, and not bitsandbytes (PEFT would import it: it is left out)."""
    import pytest
    pytest.importorskip("transformers")
    probe = PROBE.replace("import lorabench.measure.worker, lorabench.launch.preload",
                          "import lorabench.measure.worker, lorabench.launch.preload, lorabench.launch.preload_hf")
    probe += "import sys; print(int('bitsandbytes' in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-2:] == ["0", "0"], out.stdout + out.stderr


def test_only_a_cpu_run_of_a_hugging_face_model_preloads_transformers():
    import dataclasses
    import pytest
    pytest.importorskip("transformers")
    from pathlib import Path
    from lorabench.launch.process import preload_modules
    from lorabench.spec.scenario import expand, load_scenario
    ls = load_scenario(str(Path(__file__).resolve().parents[1] / "scenarios" / "hf-tiny.yaml"))
    job = ls.job(expand(ls)[0], "cpu")
    assert "lorabench.launch.preload_hf" in preload_modules(job)
    assert "lorabench.launch.preload_hf" not in preload_modules(dataclasses.replace(job, device="cuda"))
    builtin = dataclasses.replace(job, model=dataclasses.replace(job.model, hf=None, attn_implementation=None))
    assert preload_modules(builtin) == preload_modules(None) == ["lorabench.launch.server_signals", "torch",
                                                               "lorabench.measure.worker", "lorabench.launch.preload"]
