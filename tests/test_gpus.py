"""estimate/gpus.py: the GPU table by name or alias, --gpu specifications, peak FLOP/s per dtype."""
from __future__ import annotations

import pytest

from lorabench.estimator.gpus import DTYPES, list_gpus, lookup, parse_memory, resolve_gpu
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
                                           ("   ", "must not be empty"),
                                           # a lone letter is no GPU's leading part: a model number is needed
                                           ("B", "unknown GPU 'B'"), ("T", "unknown GPU 'T'"),
                                           ("24G", "a memory size takes GiB"), ("24KiB", "a memory size takes GiB"),
                                           # a size's unit after a number it does not take (it was an unknown GPU)
                                           ("1e3GiB", "'1e3GiB' is no memory size"), ("NaNGiB", "is no memory size"),
                                           ("infGiB", "is no memory size"), ("H100 GB", "unknown GPU 'H100 GB'")])
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


# ---------------------------------------------------------------- the issue "A user's first hour", item 2
@pytest.mark.parametrize("name, memory_gib, bf16", [
    ("RTX 5090", 32, 209.5), ("RTX 3090", 24, 71.0), ("RTX A6000", 48, 154.8), ("L40S", 48, 362.0), ("L4", 24, 121.0),
    ("T4", 16, None), ("A10G", 24, 70.0), ("H100 PCIe", 80, 756.0), ("H100 NVL", 94, 835.5), ("H200", 141, 989.4),
    ("B200", 180, 2250.0), ("GH200 96GB", 96, 990.0), ("GH200 144GB", 144, 990.0), ("MI300X", 192, 1307.4),
    ("MI250 (one GCD)", 64, 181.05)])
def test_the_cards_users_ask_for_are_known_with_dense_rates(name, memory_gib, bf16):
    """Memory and the dense (not 2:4-sparse) bf16 peak of the vendors' datasheets (gpus.yaml cites each)."""
    g = resolve_gpu(name)
    assert g.name == name and g.memory_bytes == memory_gib * GIB
    assert g.tflops["bf16"] == bf16 and g.peak_flops("fp32") > 0


def test_dense_rates_are_consistent():
    """Where a card has TF32, its 16-bit tensor rate is twice it, on every architecture in the table: a
    2:4-sparse figure copied for one of the two breaks this. fp16 and bf16 agree where both exist."""
    for g in list_gpus():
        t = g.tflops
        half = t["fp16"] or t["bf16"]
        assert t["bf16"] is None or t["bf16"] == t["fp16"], g.name
        assert t["tf32"] is None or half / t["tf32"] == pytest.approx(2, rel=0.02), g.name
        assert 1 <= half / t["fp32"] <= 32, g.name


@pytest.mark.parametrize("spelling, name", [
    ("4090", "RTX 4090"), ("rtx4090", "RTX 4090"), ("RTX-4090", "RTX 4090"), ("geforce rtx 4090", "RTX 4090"),
    ("NVIDIA RTX 4090", "RTX 4090"), ("5090", "RTX 5090"), ("3090", "RTX 3090"), ("a6000", "RTX A6000"),
    ("rtx a6000", "RTX A6000"), ("l40s", "L40S"), ("L40", "L40"), ("a10", "A10"), ("a10g", "A10G"),
    ("tesla t4", "T4"), ("h100-nvl", "H100 NVL"), ("h100 pcie", "H100 PCIe"), ("H100 80GB", "H100 SXM"),
    ("a100-80gb", "A100 80GB"), ("A100 40GB", "A100 40GB"), ("h200", "H200"), ("gh200 144", "GH200 144GB"),
    ("b200", "B200"), ("mi300x", "MI300X"), ("MI300", "MI300X"), ("amd instinct mi250", "MI250 (one GCD)"),
    ("MI250", "MI250 (one GCD)")])
def test_resolve_gpu_takes_short_names(spelling, name):
    assert resolve_gpu(spelling).name == name


@pytest.mark.parametrize("spelling, candidates", [
    ("A100", ["A100 40GB", "A100 80GB"]), ("H100", ["H100 PCIe", "H100 SXM", "H100 NVL"]),
    ("GH200", ["GH200 96GB", "GH200 144GB"])])
def test_an_ambiguous_name_lists_the_candidates(spelling, candidates):
    with pytest.raises(ConfigError) as e:
        resolve_gpu(spelling)
    text = str(e.value)
    assert text.startswith("--gpu") and "ambiguous" in text and "\n" not in text
    assert all(c in text for c in candidates)


@pytest.mark.parametrize("spelling", ["309", "a1", "nvidia", "rtx", "GB", "RTX 9999"])
def test_a_short_name_matches_only_at_a_word_or_number_end(spelling):
    """'309' is not the 3090 and 'a1' not the A10: a prefix must end where a word or a number ends."""
    with pytest.raises(ConfigError, match="unknown GPU"):
        resolve_gpu(spelling)


def test_no_two_gpus_share_a_short_name():
    from lorabench.estimator.gpus import matches
    for g in list_gpus():
        for name in (g.name, *g.aliases):
            assert matches(name) == [g], name
            assert matches(name.lower().replace(" ", "-")) == [g], name
