"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, none spills or fences, and the
compositing kernels meet their static SASS targets.

Runs `tritonsplat.aot.compile_report()`, which compiles in a subprocess without TRITON_INTERPRET and
reads registers/stack/shared memory and the SASS from the cubins with triton's cuobjdump. No
tolerances: zero spilled bytes, zero fences, zero compile errors, no runtime loop inside a
compositing main loop. The sm_90 per-pair targets are the CUDA-class design's (the compositor is
meant to issue no more instructions per Gaussian-pixel pair than a gsplat-style CUDA loop):
forward <= 45 (D = 3) and <= 60 (D = 6) with >= 2 CTAs per SM, backward <= 120 (D = 3).
Compiling every variant for both architectures takes 11-14 minutes on 2 cores with an empty Triton
cache (58 variants, the compositing backward fully unrolled), so the default run compiles the three
variants with per-pair targets for sm_90 and every non-compositing kernel for both architectures;
`-m slow` compiles everything.
"""

import pytest

from tritonsplat import aot

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0020*/                   FADD R2, R2, R3 ;
        /*0030*/                   MEMBAR.ALL.GPU ;
        /*0040*/              @P0 BRA 0x20 ;
        /*0050*/              @!P1 BRA P2, 0x10 ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x70;
"""


def test_sass_analysis_finds_the_main_loop_and_its_inner_loops():
    figures = aot.analyse_sass(SASS)
    assert figures["instructions"] == 8
    assert figures["barriers"] == 1 and figures["fences"] == 1
    assert figures["loop_instructions"] == 5          # 0x10 .. 0x50
    assert figures["inner_loops"] == 1                # 0x20 .. 0x40
    assert figures["loop_barriers"] == 1


def test_occupancy_limits():
    assert aot.ctas_per_sm(90, 32, 8, 0) == 8          # threads: 2048 / 256
    assert aot.ctas_per_sm(90, 128, 8, 0) == 2         # registers: 65536 / (128 x 256)
    assert aot.ctas_per_sm(90, 40, 1, 0) == 32         # resident block limit
    assert aot.ctas_per_sm(80, 32, 1, 100_000) == 1    # shared memory


TARGET_VARIANTS = ("composite_forward[D=3]", "composite_forward[D=6]", "composite_backward[D=3]")
OTHER_KERNELS = ("projection_", "antialiased_opacities", "value_checks", "bin_tiles", "tile_ranges", "rigidity_")


@pytest.fixture(scope="module")
def targets_report():
    """The compositing variants with sm_90 targets (names matched exactly)."""
    rows = []
    for name in TARGET_VARIANTS:
        rows += [r for r in aot.compile_report(archs=(90,), only=name) if r["name"] == name]
    return rows


@pytest.fixture(scope="module")
def other_kernels_report():
    rows = []
    for prefix in OTHER_KERNELS:
        rows += aot.compile_report(only=prefix)
    return rows


@pytest.fixture(scope="module")
def report():
    return aot.compile_report()


def _check_compiles(report, variants):
    expected = {(v.name, f"sm_{arch}") for v in variants for arch in aot.ARCHS}
    assert {(r["name"], r["arch"]) for r in report} == expected
    errors = [f"{r['name']} {r['arch']}: {r['error']}" for r in report if r["error"]]
    assert not errors, "\n".join(errors)


def _check_no_spills_or_fences(report):
    bad = [f"{r['name']} {r['arch']}: {r['spill_bytes']} B spilled ({r['registers']} registers), {r['fences']} fences"
           for r in report if r["spill_bytes"] or r["fences"]]
    assert not bad, "\n".join(bad) + "\n" + aot.format_table(report)
    # 255 is the hardware maximum; staying below it keeps more than one block resident per SM.
    assert all(r["registers"] < 255 for r in report), aot.format_table(report)


def test_non_compositing_kernels_compile_without_spills_or_fences(other_kernels_report):
    variants = [v for v in aot.kernel_variants() if v.name.startswith(OTHER_KERNELS)]
    _check_compiles(other_kernels_report, variants)
    _check_no_spills_or_fences(other_kernels_report)


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm80_and_sm90(report):
    _check_compiles(report, aot.kernel_variants())


@pytest.mark.slow
def test_no_kernel_spills_or_fences(report):
    _check_no_spills_or_fences(report)


@pytest.mark.slow
def test_compositing_reports_loop_figures_without_inner_loops(report):
    _check_loop_figures([r for r in report if r["name"].startswith("composite_")])


def _check_loop_figures(compositing):
    assert compositing
    for r in compositing:
        for key in ("name", "arch", "registers", "spill_bytes", "ctas_per_sm", "barriers", "fences",
                    "loop_instructions", "gaussians_per_iteration", "pixels_per_thread", "instructions_per_pair"):
            assert r.get(key) is not None, f"{r['name']} {r['arch']}: no {key}"
        assert r["inner_loops"] == 0, f"{r['name']} {r['arch']}: a runtime loop inside the main loop"


def test_target_variants_have_loop_figures_no_inner_loops_spills_or_fences(targets_report):
    assert {r["name"] for r in targets_report} == set(TARGET_VARIANTS)
    _check_loop_figures(targets_report)
    _check_no_spills_or_fences(targets_report)


@pytest.mark.parametrize("name,limit,min_ctas", [
    ("composite_forward[D=3]", 45.0, 2),
    ("composite_forward[D=6]", 60.0, 2),
    ("composite_backward[D=3]", 120.0, 1),
])
def test_sm90_compositing_targets(targets_report, name, limit, min_ctas):
    (row,) = [r for r in targets_report if r["name"] == name and r["arch"] == "sm_90"]
    assert row["instructions_per_pair"] <= limit, aot.format_table([row])
    assert row["ctas_per_sm"] >= min_ctas, aot.format_table([row])
