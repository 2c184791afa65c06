"""estimate/gpus.py: the GPU table by name or alias, --gpu specifications, peak FLOP/s per dtype."""
from __future__ import annotations

import pytest

from lorabench.estimate.gpus import DTYPES, list_gpus, lookup, parse_memory, resolve_gpu
from lorabench.spec.schema import ConfigError

GIB = 2**30


@pytest.mark.parametrize("spelling", ["RTX 4090", "rtx 4090", "  RTX   4090 ", "NVIDIA GeForce RTX 4090",
                                      "nvidia geforce rtx 4090", "GeForce RTX 4090"])
def test_lookup_ignores_case_and_spacing(spelling):
    g = lookup(spelling)
    assert g is not None and g.name == "RTX 4090" and g.memory_bytes == 24 * GIB


@pytest.mark.parametrize("name", ["", None, "RTX 9999", "4090", "NVIDIA"])
def test_lookup_of_an_unknown_name_is_none(name):
    assert lookup(name) is None


def test_every_name_and_alias_finds_its_own_gpu():
    gpus = list_gpus()
    assert len({g.name for g in gpus}) == len(gpus) > 0
    for g in gpus:
        assert lookup(g.name) is g and lookup(g.name.upper()) is g
        for alias in g.aliases:
            assert lookup(alias) is g, alias


def test_list_gpus_is_a_copy_of_the_table():
    gpus = list_gpus()
    gpus.clear()
    assert list_gpus()


@pytest.mark.parametrize("text, n", [("24GiB", 24 * GIB), ("80GB", 80 * 10**9), ("512MiB", 512 * 2**20),
                                     ("512 mb", 512 * 10**6), ("1.5TiB", int(1.5 * 2**40)), ("2TB", 2 * 10**12),
                                     (" 0.5 gib ", GIB // 2), (".5GiB", GIB // 2)])
def test_parse_memory_units(text, n):
    assert parse_memory(text) == n


@pytest.mark.parametrize("text", ["24", "GiB", "24 GiBs", "24XB", "", "twenty GiB", "24 GiB GPU", "1e3GB"])
def test_parse_memory_of_no_size_is_none(text):
    assert parse_memory(text) is None


def test_resolve_gpu():
    assert parse_memory("24GiB") == 24 * GIB and parse_memory("80GB") == 80 * 10**9 and parse_memory("x") is None
    assert resolve_gpu("rtx 4090").name == "RTX 4090"
    assert resolve_gpu("NVIDIA GeForce RTX 4090").memory_bytes == 24 * GIB
    assert resolve_gpu("H200").peak_flops("bf16") == pytest.approx(989.4e12)
    for name in ("T4", "L4", "A10", "RTX 3090", "RTX 4090", "A100 40GB", "A100 80GB", "H100 SXM", "H200"):
        assert lookup(name) is not None


def test_resolve_gpu_by_name_also_without_the_vendor_prefix():
    for g in list_gpus():
        assert resolve_gpu(g.name) is g
        for alias in g.aliases:
            if alias.startswith("NVIDIA "):
                assert resolve_gpu(alias[len("NVIDIA "):]) is g, alias


def test_resolve_gpu_by_memory_has_no_peak_rates():
    g = resolve_gpu("24GiB")
    assert g.memory_bytes == 24 * GIB and "24 GiB" in g.name and g.aliases == ()
    assert all(g.peak_flops(d) is None for d in DTYPES)
    assert resolve_gpu("80GB").memory_bytes == 80 * 10**9


@pytest.mark.parametrize("spec, message", [("Foo 9000", "unknown GPU 'Foo 9000'"), ("0GiB", "must be > 0"),
                                           ("-8GiB", "must be > 0"), ("", "must not be empty"),
                                           ("   ", "must not be empty")])
def test_resolve_gpu_bad_input_names_the_option(spec, message):
    with pytest.raises(ConfigError) as e:
        resolve_gpu(spec)
    assert str(e.value).startswith("--gpu") and message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="^calibrate"):
        resolve_gpu(spec, source="calibrate")


def test_unknown_gpu_error_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        resolve_gpu("GTX 123")
    assert all(g.name in str(e.value) for g in list_gpus()) and "24GiB" in str(e.value)


def test_peak_flops_per_dtype_is_the_table_in_flop_per_s():
    for g in list_gpus():
        for d in DTYPES:
            v = g.tflops[d]
            assert g.peak_flops(d) == (None if v is None else pytest.approx(v * 1e12)), (g.name, d)
        assert g.peak_flops("fp32") > 0  # every GPU has an fp32 path


@pytest.mark.parametrize("dtype", ["fp8", "int8", "float32", "", "BF16"])
def test_an_unknown_dtype_has_no_peak_on_any_gpu(dtype):
    """No fallback to another dtype's peak: an MFU against a guessed peak would be wrong."""
    assert all(g.peak_flops(dtype) is None for g in list_gpus())


def test_gpu_auto_reads_nvml(monkeypatch):
    import sys
    import types
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: "h", nvmlDeviceGetName=lambda h: b"NVIDIA GeForce RTX 4090",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=25_757_220_864))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    g = resolve_gpu("auto")
    assert g.name == "RTX 4090" and g.memory_bytes == 25_757_220_864 and g.peak_flops("bf16")


def test_gpu_auto_with_an_unknown_gpu_keeps_its_memory_and_has_no_rates(monkeypatch):
    import sys
    import types
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: "h", nvmlDeviceGetName=lambda h: "Mystery GPU 1",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=12 * GIB))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    g = resolve_gpu("AUTO")
    assert g.name == "Mystery GPU 1" and g.memory_bytes == 12 * GIB
    assert all(g.peak_flops(d) is None for d in DTYPES)


def test_gpu_auto_with_no_gpu_is_a_config_error(monkeypatch):
    import sys
    import types
    fake = types.SimpleNamespace(nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 0)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with pytest.raises(ConfigError, match="NVML sees no GPU"):
        resolve_gpu("auto")
