"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 and none spills to local memory.

Runs `tritonsplat.aot.compile_report()`, which compiles in a subprocess without TRITON_INTERPRET and
reads registers/stack/shared memory from the cubins with triton's cuobjdump. No tolerances: zero
spilled bytes and zero compile errors. About 20-60 s on 2 cores with an empty Triton cache.
"""

import pytest

from tritonsplat import aot


@pytest.fixture(scope="module")
def report():
    return aot.compile_report()


def test_every_kernel_variant_compiles_for_sm80_and_sm90(report):
    expected = {(v.name, f"sm_{arch}") for v in aot.kernel_variants() for arch in aot.ARCHS}
    assert {(r["kernel"], r["arch"]) for r in report} == expected
    errors = [f"{r['kernel']} {r['arch']}: {r['error']}" for r in report if r["error"]]
    assert not errors, "\n".join(errors)


def test_no_kernel_spills(report):
    spills = [f"{r['kernel']} {r['arch']}: {r['spilled_bytes']} B ({r['registers']} registers)"
              for r in report if r["spilled_bytes"]]
    assert not spills, "kernels spill to local memory:\n" + "\n".join(spills) + "\n" + aot.format_table(report)


def test_register_budget(report):
    # 255 is the hardware maximum; staying below it keeps more than one block resident per SM.
    assert all(r["registers"] < 255 for r in report), aot.format_table(report)
