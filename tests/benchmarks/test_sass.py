"""The reading half of :mod:`benchmarks.sass` (occupancy, loops of a SASS listing), which needs no
toolchain; compiling (``python -m benchmarks.sass_report``) downloads the CUDA plugin's wheels and
is run by hand."""

import pytest

from benchmarks import sass

SASS = """\
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDS R2, [R3] ;
.L_x_2:
        /*0020*/                   FMUL R4, R2, R5 ;
        /*0030*/                   MUFU.EX2 R4, R4 ;
        /*0040*/                   FFMA R6, R4, R6, R7 ;
        /*0050*/                   MUFU.EX2 R8, R8 ;
        /*0060*/              @P0  BRA `(.L_x_2) ;
        /*0070*/                   FADD R9, R6, R8 ;
        /*0080*/               @!P1 BRA `(.L_x_1) ;
.L_x_3:
        /*0090*/                   BRA `(.L_x_4) ;
.L_x_4:
        /*00a0*/                   EXIT ;
"""


def test_inner_loops_are_the_loops_holding_no_other():
  loops = sass.inner_loops(SASS.replace(
      "        /*0020*/", "\n".join(f"        /*{i:04x}*/                   FMUL R4, R4, R4 ;"
                                     for i in range(0x100, 0x110)) + "\n        /*0020*/"))
  assert len(loops) == 1  # the outer loop holds the inner one; the forward branch is no loop
  (loop,) = loops
  assert loop["opcodes"] == {"FMUL": 17, "MUFU": 2, "FFMA": 1, "BRA": 1}
  assert loop["clocks"] == {"issue": 21, "mufu": 16, "fma": 18}
  assert loop["bound"] == "issue"


def test_loops_below_sixteen_instructions_are_left_out():
  assert sass.inner_loops(SASS) == []


def test_occupancy_names_the_limit():
  # 158 registers x 128 threads: 5120 a warp, 20480 a CTA -> 3 by registers; 84 KiB -> 2 by smem.
  assert sass.occupancy(158, 86016, 128) == dict(ctas_per_sm=2, limited_by="smem",
                                                        warps_per_sm=8)
  assert sass.occupancy(253, 0, 256)["limited_by"] == "registers"
  assert sass.occupancy(16, 0, 1024) == dict(ctas_per_sm=2, limited_by="threads",
                                                    warps_per_sm=64)


def test_threads_from_the_ptx_directive():
  assert sass._threads(".entry k() .reqntid 128, 1, 1 {") == 128
  assert sass._threads(".entry k() .maxntid 256 {") == 256
  with pytest.raises(ValueError, match="threads per CTA unknown"):
    sass._threads(".entry k() {")
