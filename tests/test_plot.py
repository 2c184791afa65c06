"""`lorabench plot`: committed result files drawn as SVG (bars checked in the SVG's geometry),
PNG (size and the colour of the pixels where the data puts each bar) and HTML; bad input."""
from __future__ import annotations

import io
import json
import re
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lorabench.present.bars import SEGMENTS, row_segments
from lorabench.row.results import load_rows

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "results" / "cpu-quick-2026-11-29.jsonl")
SEG_KEYS = [k for k, *_ in SEGMENTS]
FIT = ("--model", "gpt2", "--gpu", "3GiB", "--seq", "512", "--batch", "2")


@pytest.fixture(scope="module")
def mpl():
    return pytest.importorskip("matplotlib")


def cli(*args):
    from click.testing import CliRunner
    from lorabench.cli import main
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def quick_rows():
    return [r for r in load_rows(QUICK) if r["status"] == "ok"]


def draw(tmp_path_factory, name, *args):
    out = tmp_path_factory.mktemp("plot") / name
    res = cli("plot", *args, "-o", str(out))
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def memory_svg(mpl, tmp_path_factory):
    return svg_items(draw(tmp_path_factory, "m.svg", QUICK, "--chart", "memory"))


@pytest.fixture(scope="module")
def time_svg(mpl, tmp_path_factory):
    return svg_items(draw(tmp_path_factory, "t.svg", QUICK, "--chart", "time"))


def svg_items(path_or_text) -> dict[str, list[tuple[float, float]]]:
    """{id: the points of the path in the <g id=...>} for every group with an id of ours."""
    text = path_or_text if isinstance(path_or_text, str) else Path(path_or_text).read_text()
    root = ET.fromstring(text)
    out = {}
    for g in root.iter("{http://www.w3.org/2000/svg}g"):
        gid = g.get("id", "")
        if gid.split(".")[0] in ("memory", "time", "fit"):
            path = g.find("{http://www.w3.org/2000/svg}path")
            nums = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", path.get("d"))]
            out[gid] = list(zip(nums[::2], nums[1::2]))
    return out


def box(points):
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return min(xs), max(xs), min(ys), max(ys)  # SVG y grows downwards


def test_memory_bars_stack_the_row_segments_on_one_scale(memory_svg, quick_rows):
    base = box(memory_svg[f"memory.{quick_rows[0]['cell']}.params"])[3]
    peak0 = quick_rows[0]["peak_allocated_bytes"]
    scale = (base - box(memory_svg[f"memory.{quick_rows[0]['cell']}.rest"])[2]) / peak0  # pt per byte
    last_x = -1.0
    for r in quick_rows:
        seg = row_segments(r)
        bottom = base
        for key in SEG_KEYS:
            x0, x1, top, low = box(memory_svg[f"memory.{r['cell']}.{key}"])
            assert low == pytest.approx(bottom, abs=2e-3), (r["cell"], key)
            assert low - top == pytest.approx(seg[key] * scale, abs=2e-3), (r["cell"], key)
            bottom = top
        assert base - bottom == pytest.approx(r["peak_allocated_bytes"] * scale, abs=5e-3)
        assert x0 > last_x  # left to right in the file's order
        last_x = x1
        ex0, ex1, ey, _ = box(memory_svg[f"memory.{r['cell']}.estimate"])
        assert ey == pytest.approx(base - r["est_peak_bytes"] * scale, abs=2e-3)
        assert ex0 < x0 < x1 < ex1  # the marker spans its bar
    assert len([k for k in memory_svg if k.startswith("memory.")]) == len(quick_rows) * 6


def test_estimate_marker_is_at_the_estimate_not_the_peak(mpl, tmp_path_factory, quick_rows):
    """The committed estimates are exact (peak == estimate): shifted copies tell the two apart."""
    rows = [{**r, "est_peak_bytes": int(r["peak_allocated_bytes"] * f)} for r, f in zip(quick_rows[:4], (0.5, 0.8, 1, 1.2))]
    src = tmp_path_factory.mktemp("est") / "shifted.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = svg_items(draw(tmp_path_factory, "est.svg", str(src), "--chart", "memory"))
    for r in rows:
        top, base = box(items[f"memory.{r['cell']}.rest"])[2], box(items[f"memory.{r['cell']}.params"])[3]
        ey = box(items[f"memory.{r['cell']}.estimate"])[2]
        assert (base - ey) / (base - top) == pytest.approx(r["est_peak_bytes"] / r["peak_allocated_bytes"], rel=1e-4)


def test_time_bars_are_medians_and_whiskers_span_p10_to_p90(time_svg, quick_rows):
    first = box(time_svg[f"time.{quick_rows[0]['cell']}.bar"])
    base = first[3]
    scale = (base - first[2]) / quick_rows[0]["step_time_ms_median"]  # pt per ms
    for r in quick_rows:
        x0, x1, top, low = box(time_svg[f"time.{r['cell']}.bar"])
        assert low == pytest.approx(base, abs=2e-3)
        assert base - top == pytest.approx(r["step_time_ms_median"] * scale, abs=2e-3)
        pts = time_svg[f"time.{r['cell']}.whisker"]
        wx0, wx1, hi, lo = box(pts)
        assert lo == pytest.approx(base - r["step_time_ms_p10"] * scale, abs=2e-3)
        assert hi == pytest.approx(base - r["step_time_ms_p90"] * scale, abs=2e-3)
        stem = [p for p in pts if abs(p[0] - (x0 + x1) / 2) < 1e-3]  # the vertical stroke, at the bar's centre
        assert {round(p[1], 3) for p in stem} == {round(lo, 3), round(hi, 3)}
        assert x0 < wx0 < wx1 < x1


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_png_has_its_size_and_each_bar_its_colour_where_the_data_puts_it(mpl, tmp_path, quick_rows):
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread
    from lorabench.present.plot import DPI, chart_size, figure, load_cells, render
    from lorabench.present.plot_charts import SEGMENT_COLOURS, unit_for
    assert len({to_rgb(c) for c in SEGMENT_COLOURS.values()}) == len(SEGMENTS)  # a pixel names its segment
    cells = load_cells(QUICK)
    w, h = chart_size("memory", cells)
    out = tmp_path / "m.png"
    assert cli("plot", QUICK, "--chart", "memory", "-o", str(out)).exit_code == 0
    assert png_size(out.read_bytes()) == (round(w * DPI), round(h * DPI))

    fig = figure(["memory"], {"memory": cells})
    data = render(fig, "png")
    assert data == out.read_bytes()  # the figure the command wrote
    img = imread(io.BytesIO(data))[:, :, :3]
    ax = fig.axes[0]
    f = unit_for(max(r["peak_allocated_bytes"] for r in quick_rows))[1]
    checked = 0
    for x, r in enumerate(quick_rows):
        bottom = 0
        for key, v in row_segments(r).items():
            (px, y0), (_, y1) = ax.transData.transform([(x, bottom / f), (x, (bottom + v) / f)])
            bottom += v
            if y1 - y0 < 6:  # a segment too thin to hold a clean pixel
                continue
            pixel = img[img.shape[0] - 1 - int((y0 + y1) / 2), int(px)]
            assert pixel == pytest.approx(to_rgb(SEGMENT_COLOURS[key]), abs=2 / 255), (r["cell"], key)
            checked += 1
        _, ey = ax.transData.transform((x, r["est_peak_bytes"] / f))
        assert img[img.shape[0] - 1 - int(ey), int(px)] == pytest.approx((0, 0, 0), abs=0.2), r["cell"]  # antialiased
    assert checked >= 3 * len(quick_rows)


def test_fit_chart_bars_against_the_gpu_line(mpl, tmp_path_factory):
    from lorabench.present.plot import fit_report
    from lorabench.present.plot_charts import fit_techniques
    items = svg_items(draw(tmp_path_factory, "fit.svg", "--chart", "fit", *FIT))
    rep = fit_report("gpt2", "3GiB", 512, 2)
    shown = fit_techniques(rep)
    assert len(shown) == 3 * 3 * 2 * 2  # precisions × {full, r8 fp32 base, r8 16-bit base} × ckpt × {mb 2, mb 1}
    ids = [c.combo.cell().id for c in shown]
    left = box(items[f"fit.{ids[0]}.params"])[0]
    scale = (box(items[f"fit.{ids[0]}.rest"])[1] - left) / shown[0].est_needed_bytes
    tops = []
    for c, i in zip(shown, ids):
        x0, x1 = box(items[f"fit.{i}.params"])[0], box(items[f"fit.{i}.rest"])[1]
        assert x0 == pytest.approx(left, abs=2e-3)
        assert x1 - x0 == pytest.approx(c.est_needed_bytes * scale, abs=2e-3), i
        for key in SEG_KEYS:
            a, b, _, _ = box(items[f"fit.{i}.{key}"])
            assert b - a == pytest.approx(c.segments[key] * scale, abs=2e-3), (i, key)
        tops.append(box(items[f"fit.{i}.params"])[2])
    assert tops == sorted(tops)  # in the order of `shown`, top down: smallest need on top
    assert [c.est_needed_bytes for c in shown] == sorted(c.est_needed_bytes for c in shown)
    assert box(items["fit.gpu-memory"])[0] == pytest.approx(left + rep.gpu.memory_bytes * scale, abs=2e-3)
    assert box(items["fit.budget"])[0] == pytest.approx(left + rep.budget_bytes * scale, abs=2e-3)


def test_html_page_embeds_each_chart_as_inline_svg_for_a_folder_of_results(mpl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    rows = []
    for name in ("cpu-quick-2026-11-29.jsonl", "cpu-small-2026-11-29.jsonl"):
        (folder / name).write_text((ROOT / "results" / name).read_text())
        rows += [r for r in load_rows(str(folder / name)) if r["status"] == "ok"]
    page = draw(tmp_path_factory, "all.html", str(folder)).read_text()
    assert page.startswith("<!DOCTYPE html>") and "<?xml" not in page
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    assert len(svgs) == 2  # memory and time; fit only with --model
    memory, time_ = (svg_items(s) for s in svgs)
    labels = [f"{r['scenario']}_{r['cell']}" for r in rows]  # two scenarios: 'scenario/cell', '/' made '_'
    assert set(memory) == {f"memory.{c}.{k}" for c in labels for k in SEG_KEYS + ["estimate"]}
    assert set(time_) == {f"time.{c}.{k}" for c in labels for k in ("bar", "whisker")}


def bad_cases(tmp: Path):
    oom = tmp / "oom.jsonl"
    oom.write_text("".join(json.dumps({**r, "status": "oom"}) + "\n" for r in load_rows(QUICK)))
    (tmp / "file").write_text("")
    return [
        ((QUICK, "-o", str(tmp / "out.jpg")), "--output"),
        ((QUICK, "-o", str(tmp / "out")), "--output"),
        ((QUICK, "-o", str(tmp / "file" / "out.svg")), "--output"),
        ((QUICK, "-o", str(tmp / "no-such-dir" / "out.svg")), "--output"),
        ((QUICK, "-o", str(tmp / "out.svg"), "--chart", "pie"), "--chart"),
        ((str(oom), "-o", str(tmp / "out.svg")), "oom.jsonl"),
        ((str(tmp / "missing.jsonl"), "-o", str(tmp / "out.svg")), "missing.jsonl"),
        ((QUICK, "-o", str(tmp / "out.svg"), "--chart", "fit"), "--model"),
        (("-o", str(tmp / "out.svg"), "--chart", "memory"), "RESULTS"),
        (("-o", str(tmp / "out.svg"), "--chart", "fit", "--model", "gpt2", "--gpu", "RTX 9999"), "--gpu"),
        (("-o", str(tmp / "out.svg"), "--chart", "fit", "--model", "gpt2", "--gpu", "8xH100-SXM"), "one GPU's"),
        ((QUICK, "-o", str(tmp / "out.svg"), "--chart", "memory", "--model", "nope"), "fit chart only"),
    ]


def test_bad_input_is_one_line_exit_2_and_nothing_written(mpl, tmp_path):
    for args, named in bad_cases(tmp_path):
        before = sorted(tmp_path.rglob("*"))
        res = cli("plot", *args)
        assert res.exit_code == 2, (args, res.output)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and named in lines[0], (args, res.output)
        assert sorted(tmp_path.rglob("*")) == before, args


def test_without_matplotlib_one_line_names_the_extra(tmp_path, monkeypatch):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "m.svg"
    res = cli("plot", QUICK, "-o", str(out))
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == ["lorabench: error: lorabench plot: needs matplotlib: "
                                               "pip install 'lorabench[plot]'"]
    assert not out.exists()
