"""Reading compiled HLO (benchmarks.xla_offline): kernels of a loop body, their kinds and bytes.

The compile itself needs the CUDA plugin (downloaded by ``python -m benchmarks.hlo_report``); it is
run by hand, not here. These tests check the reading on a compiled-HLO excerpt of the shape XLA
writes (an H200 compile of the decode loop, cut down)."""

import pathlib

import pytest

from benchmarks import xla_offline

HLO = """HloModule jit_decode, is_scheduled=true

%fused_dus (param_0: bf16[2,4,6], param_1: bf16[2,1,6], param_2: s32[]) -> bf16[2,4,6] {
  %param_0 = bf16[2,4,6]{2,1,0} parameter(0)
  ROOT %dynamic-update-slice.1 = bf16[2,4,6]{2,1,0} dynamic-update-slice(%param_0, %param_1, %c, %param_2, %c)
}

%region_body.7 (arg_tuple.1: (s32[], bf16[2,4,6], f32[2,6,3], bf16[6,12])) -> (s32[], bf16[2,4,6], f32[2,6,3], bf16[6,12]) {
  %arg_tuple.1 = (s32[], bf16[2,4,6]{2,1,0}, f32[2,6,3]{2,1,0}, bf16[6,12]{1,0}) parameter(0)
  %get-tuple-element.1 = s32[] get-tuple-element(%arg_tuple.1), index=0
  %get-tuple-element.2 = bf16[2,4,6]{2,1,0} get-tuple-element(%arg_tuple.1), index=1
  %get-tuple-element.3 = f32[2,6,3]{2,1,0} get-tuple-element(%arg_tuple.1), index=2
  %get-tuple-element.4 = bf16[6,12]{1,0} get-tuple-element(%arg_tuple.1), index=3
  %gemm_fusion_dot.3 = f32[4,2,12]{2,1,0} fusion(%get-tuple-element.2, %get-tuple-element.4), kind=kCustom, calls=%g, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  %loop_dynamic_update_slice_fusion.2 = bf16[2,4,6]{2,1,0} fusion(%get-tuple-element.2, %gemm_fusion_dot.3, %get-tuple-element.1), kind=kLoop, calls=%fused_dus
  %input_add_reduce_fusion.9 = (f32[2,6]{1,0}, f32[2,6,3]{2,1,0}) fusion(%get-tuple-element.3, %loop_dynamic_update_slice_fusion.2), kind=kInput, calls=%r
  %fusion.11 = bf16[2,6]{1,0} fusion(%input_add_reduce_fusion.9), kind=kCustom, calls=%n, backend_config={"fusion_backend_config":{"kind":"__triton"}}
  %copy.4 = bf16[2,4,6]{2,1,0} copy(%loop_dynamic_update_slice_fusion.2)
  %fusion-start = ((s32[7,2]{1,0}), s32[7,2]{1,0}) fusion-start(%get-tuple-element.1), kind=kLoop, calls=%a
  %fusion-done = s32[7,2]{1,0} fusion-done(%fusion-start)
  %add.1 = s32[] add(%get-tuple-element.1, %get-tuple-element.1)
  ROOT %tuple.5 = (s32[], bf16[2,4,6]{2,1,0}, f32[2,6,3]{2,1,0}, bf16[6,12]{1,0}) tuple(%add.1, %copy.4, %get-tuple-element.3, %get-tuple-element.4)
}

ENTRY %main.3 (p: bf16[2,4,6]) -> bf16[2,4,6] {
  %while.53 = (s32[], bf16[2,4,6]{2,1,0}, f32[2,6,3]{2,1,0}, bf16[6,12]{1,0}) while(%tuple.33), condition=%region_cond.6, body=%region_body.7, backend_config={"known_trip_count":{"n":"7"},"known_init_step":{"init":"0","step":"1"}}
  %while.60 = (s32[]) while(%tuple.40), condition=%c2, body=%other_body.1, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %get-tuple-element.9 = bf16[2,4,6]{2,1,0} get-tuple-element(%while.53), index=1
}
"""


def test_shape_bytes():
  assert xla_offline.shape_bytes("f32[4,2]{1,0}") == 32
  assert xla_offline.shape_bytes("(f32[4,2]{1,0}, s32[], bf16[3]{0})") == 32 + 4 + 6
  assert xla_offline.shape_bytes("pred[5]{0}") == 5
  assert xla_offline.shape_bytes("") == 0


def test_loop_body_is_found_by_its_trip_count():
  assert xla_offline.loop_body(HLO, 7) == "%region_body.7"
  assert xla_offline.loop_body(HLO, 3) == "%other_body.1"
  with pytest.raises(ValueError, match="expected one while loop of 5 iterations; found 0"):
    xla_offline.loop_body(HLO, 5)


def test_kernels_of_a_loop_body_in_order_with_kinds_and_bytes():
  ks = xla_offline.kernels(HLO, "%region_body.7")
  assert [(k["name"], k["kind"]) for k in ks] == [
      ("gemm_fusion_dot.3", "product"),
      ("loop_dynamic_update_slice_fusion.2", "elementwise"),
      ("input_add_reduce_fusion.9", "reduction"),
      ("fusion.11", "triton"),
      ("copy.4", "copy"),
      ("fusion-start", "fusion-start"),
      ("add.1", "add"),
  ]
  by_name = {k["name"]: k for k in ks}
  # Result + operands: f32[4,2,12] + bf16[2,4,6] + bf16[6,12].
  assert by_name["gemm_fusion_dot.3"]["bytes"] == 4 * 2 * 12 * 4 + 2 * 4 * 6 * 2 + 6 * 12 * 2
  # A tuple result counts all of its arrays.
  assert by_name["input_add_reduce_fusion.9"]["bytes"] == (
      2 * 6 * 4 + 2 * 6 * 3 * 4) + 2 * 6 * 3 * 4 + 2 * 4 * 6 * 2
  assert by_name["copy.4"]["bytes"] == 2 * (2 * 4 * 6 * 2)
  assert by_name["input_add_reduce_fusion.9"]["shape"] == "(f32[2,6], f32[2,6,3])"


def test_custom_calls_are_products_or_named():
  assert xla_offline.kernel_kind("custom-call", 'x), custom_call_target="__cublas$gemm", a=1') == (
      "product")
  assert xla_offline.kernel_kind("custom-call", 'x), custom_call_target="mosaic_gpu_v2"') == (
      "custom call: mosaic_gpu_v2")
  assert xla_offline.kernel_kind("fusion", "x), kind=kLoop, calls=%f") == "elementwise"
  assert xla_offline.kernel_kind("fusion", "x), kind=kInput, calls=%f") == "reduction"


def test_summary_counts_kinds_and_families():
  ks = xla_offline.kernels(HLO, "%region_body.7")
  s = xla_offline.summary(ks, bandwidth=1e9)
  assert s["kernels"] == 7
  assert s["by_kind"]["product"]["kernels"] == 1
  assert s["bytes"] == sum(k["bytes"] for k in ks)
  assert s["bandwidth_us"] == pytest.approx(1e6 * s["bytes"] / 1e9)
  assert s["by_family"]["loop_dynamic_update_slice_fusion"] == 1
  assert xla_offline.family("loop_select_fusion.23") == "loop_select_fusion"
  assert xla_offline.family("fusion") == "fusion"


def test_target_config_and_env():
  text = xla_offline.target_config("h200")
  assert "core_count: 132" in text and "memory_bandwidth: 4800000000000" in text
  assert "cuda_compute_capability {\n    major: 9\n  }" in text
  with pytest.raises(ValueError, match="target must be one of"):
    xla_offline.target_config("a100")
  root = pathlib.Path("/cache")
  tools = dict(plugin=root / "jax_plugins" / "xla_cuda13" / "xla_cuda_plugin.so",
               driver=root / "driver", ptxas=pathlib.Path("/cuda/bin/ptxas"))
  env = xla_offline.compile_env(tools)
  assert env["JAX_PLATFORMS"] == "cpu"
  assert env["PYTHONPATH"].split(":")[0] == "/cache"
  assert env["LD_LIBRARY_PATH"].split(":")[0] == "/cache/driver"
  assert env["PATH"].split(":")[0] == "/cuda/bin"


def test_a_target_can_be_a_file(tmp_path):
  path = tmp_path / "gpu.txtpb"
  path.write_text(xla_offline.target_config("h100").replace("3352320000000", "1000"))
  assert xla_offline.target_config(str(path)) == path.read_text()
  assert xla_offline.bandwidth(str(path)) == 1000.0
  assert xla_offline.bandwidth("h200") == 4.8e12
  with pytest.raises(ValueError, match="or a GpuTargetConfig text proto file; got 'nope.txtpb'"):
    xla_offline.target_config("nope.txtpb")
  (tmp_path / "empty.txtpb").write_text("gpu_device_info {\n}\n")
  with pytest.raises(ValueError, match="no memory_bandwidth"):
    xla_offline.bandwidth(str(tmp_path / "empty.txtpb"))
