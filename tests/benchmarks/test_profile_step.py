"""profile_step end to end (``--tiny``, CPU: the XLA CPU thunks stand in for GPU kernels), and the
categorisation rules of benchmarks.trace on made-up HLO modules and kernel names."""

import pytest

from benchmarks import trace

# A module as ``compiled.as_text()`` prints it: stack-frame tables (parent ids printed plus one,
# as XLA writes them: frame 1, a root, prints its own id), fused computations, an entry.
# Frames: 1 loss_fn (root) <- 2 Block.__call__ <- 3 RMSNorm.__call__
#                                              <- 4 MambaMixer.__call__ <- 5 MambaMixer._conv
#                                                                       <- 6 selective_scan (pallas)
#         1 <- 7 softmax_cross_entropy (optax losses); 8 scale_by_adam (optax, root)
HLO = """HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[4,8]{1,0})->f32[]}

FileNames
1 "/x/bench.py"
2 "/x/ssmax/nn/block.py"
3 "/x/ssmax/nn/norm.py"
4 "/x/ssmax/nn/mixer.py"
5 "/x/ssmax/pallas/selective_scan_mosaic.py"
6 "/x/site-packages/optax/losses/_classification.py"
7 "/x/site-packages/optax/_src/transform.py"

FunctionNames
1 "loss_fn"
2 "Block.__call__"
3 "RMSNorm.__call__"
4 "MambaMixer.__call__"
5 "MambaMixer._conv"
6 "selective_scan"
7 "softmax_cross_entropy_with_integer_labels"
8 "scale_by_adam.<locals>.update_fn"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=9}
2 {file_name_id=2 function_name_id=2 line=20 end_line=20 column=1 end_column=9}
3 {file_name_id=3 function_name_id=3 line=30 end_line=30 column=1 end_column=9}
4 {file_name_id=4 function_name_id=4 line=40 end_line=40 column=1 end_column=9}
5 {file_name_id=4 function_name_id=5 line=50 end_line=50 column=1 end_column=9}
6 {file_name_id=5 function_name_id=6 line=60 end_line=60 column=1 end_column=9}
7 {file_name_id=6 function_name_id=7 line=70 end_line=70 column=1 end_column=9}
8 {file_name_id=7 function_name_id=8 line=80 end_line=80 column=1 end_column=9}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=3}
4 {file_location_id=4 parent_frame_id=3}
5 {file_location_id=5 parent_frame_id=5}
6 {file_location_id=6 parent_frame_id=5}
7 {file_location_id=7 parent_frame_id=2}
8 {file_location_id=8 parent_frame_id=1}


%fused_norm (param_0: f32[4,8], param_1: f32[4,8]) -> bf16[4,8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[4,8]{1,0} parameter(1)
  %add.1 = f32[4,8]{1,0} add(%param_0, %param_1), metadata={op_name="jit(step)/add" stack_frame_id=2}
  %mul.1 = f32[4,8]{1,0} multiply(%add.1, %add.1), metadata={op_name="jit(step)/mul" stack_frame_id=3}
  %rsqrt.1 = f32[4,8]{1,0} rsqrt(%mul.1), metadata={op_name="jit(step)/rsqrt" stack_frame_id=3}
  %mul.2 = f32[4,8]{1,0} multiply(%add.1, %rsqrt.1), metadata={op_name="jit(step)/mul" stack_frame_id=3}
  ROOT %convert.1 = bf16[4,8]{1,0} convert(%mul.2), metadata={op_name="jit(step)/convert_element_type" stack_frame_id=3}
}

%region_max (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %max.0 = f32[] maximum(%a, %b)
}

%fused_loss (param_0.1: f32[4,8]) -> f32[4] {
  %param_0.1 = f32[4,8]{1,0} parameter(0)
  %exp.1 = f32[4,8]{1,0} exponential(%param_0.1), metadata={op_name="jit(step)/exp" stack_frame_id=7}
  %c.1 = f32[] constant(0)
  %reduce.1 = f32[4]{0} reduce(%exp.1, %c.1), dimensions={1}, to_apply=%region_max, metadata={op_name="jit(step)/reduce_max" stack_frame_id=7}
  ROOT %log.1 = f32[4]{0} log(%reduce.1), metadata={op_name="jit(step)/log" stack_frame_id=7}
}

%fused_adam (param_0.2: f32[4,8], param_1.2: f32[4,8]) -> f32[4,8] {
  %param_0.2 = f32[4,8]{1,0} parameter(0)
  %param_1.2 = f32[4,8]{1,0} parameter(1)
  %sqrt.1 = f32[4,8]{1,0} sqrt(%param_1.2), metadata={op_name="jit(step)/sqrt" stack_frame_id=8}
  ROOT %div.1 = f32[4,8]{1,0} divide(%param_0.2, %sqrt.1), metadata={op_name="jit(step)/div" stack_frame_id=8}
}

%fused_gemm (param_0.3: bf16[4,8], param_1.3: bf16[8,8]) -> bf16[4,8] {
  %param_0.3 = bf16[4,8]{1,0} parameter(0)
  %param_1.3 = bf16[8,8]{1,0} parameter(1)
  %dot.1 = bf16[4,8]{1,0} dot(%param_0.3, %param_1.3), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/dot_general" stack_frame_id=4}
  ROOT %neg.1 = bf16[4,8]{1,0} negate(%dot.1), metadata={op_name="jit(step)/neg" stack_frame_id=3}
}

%fused_layout (param_0.4: f32[4,8]) -> bf16[8,4] {
  %param_0.4 = f32[4,8]{1,0} parameter(0)
  %transpose.1 = f32[8,4]{1,0} transpose(%param_0.4), dimensions={1,0}, metadata={op_name="jit(step)/transpose" stack_frame_id=6}
  ROOT %convert.2 = bf16[8,4]{1,0} convert(%transpose.1), metadata={op_name="jit(step)/convert_element_type" stack_frame_id=6}
}

%fused_conv_inner (param_0.6: f32[4,8]) -> f32[4,8] {
  %param_0.6 = f32[4,8]{1,0} parameter(0)
  ROOT %mul.5 = f32[4,8]{1,0} multiply(%param_0.6, %param_0.6), metadata={op_name="jit(step)/mul" stack_frame_id=5}
}

%fused_conv (param_0.5: f32[4,8]) -> f32[4,8] {
  %param_0.5 = f32[4,8]{1,0} parameter(0)
  %inner.1 = f32[4,8]{1,0} fusion(%param_0.5), kind=kLoop, calls=%fused_conv_inner
  %add.5 = f32[4,8]{1,0} add(%inner.1, %param_0.5), metadata={op_name="jit(step)/add" stack_frame_id=5}
  ROOT %logistic.5 = f32[4,8]{1,0} logistic(%add.5), metadata={op_name="jit(step)/logistic" stack_frame_id=4}
}

%fused_mixed (param_0.7: f32[4,8]) -> f32[4,8] {
  %param_0.7 = f32[4,8]{1,0} parameter(0)
  %mul.7 = f32[4,8]{1,0} multiply(%param_0.7, %param_0.7), metadata={op_name="jit(step)/mul" stack_frame_id=3}
  %rsqrt.7 = f32[4,8]{1,0} rsqrt(%mul.7), metadata={op_name="jit(step)/rsqrt" stack_frame_id=3}
  %add.7 = f32[4,8]{1,0} add(%rsqrt.7, %param_0.7), metadata={op_name="jit(step)/add" stack_frame_id=5}
  ROOT %mul.8 = f32[4,8]{1,0} multiply(%add.7, %add.7), metadata={op_name="jit(step)/mul" stack_frame_id=5}
}

%fused_gate (param_0.8: f32[4,8]) -> f32[4,8] {
  %param_0.8 = f32[4,8]{1,0} parameter(0)
  %logistic.8 = f32[4,8]{1,0} logistic(%param_0.8), metadata={op_name="jit(step)/logistic" stack_frame_id=4}
  %mul.9 = f32[4,8]{1,0} multiply(%param_0.8, %logistic.8), metadata={op_name="jit(step)/mul" stack_frame_id=4}
  ROOT %mul.10 = f32[4,8]{1,0} multiply(%mul.9, %mul.9), metadata={op_name="jit(step)/mul" stack_frame_id=3}
}

ENTRY %main.1 (x: f32[4,8]) -> f32[] {
  %x = f32[4,8]{1,0} parameter(0)
  %loop_add_fusion.3 = bf16[4,8]{1,0} fusion(%x, %x), kind=kLoop, calls=%fused_norm, metadata={op_name="jit(step)/mul" stack_frame_id=3}
  %input_reduce_fusion = f32[4]{0} fusion(%x), kind=kInput, calls=%fused_loss
  %loop_divide_fusion.2 = f32[4,8]{1,0} fusion(%x, %x), kind=kLoop, calls=%fused_adam
  %gemm_fusion_dot.4 = bf16[4,8]{1,0} fusion(%loop_add_fusion.3, %loop_add_fusion.3), kind=kCustom, calls=%fused_gemm, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %loop_transpose_fusion = bf16[8,4]{1,0} fusion(%x), kind=kLoop, calls=%fused_layout
  %loop_logistic_fusion = f32[4,8]{1,0} fusion(%x), kind=kLoop, calls=%fused_conv
  %loop_multiply_fusion.7 = f32[4,8]{1,0} fusion(%x), kind=kLoop, calls=%fused_mixed
  %loop_multiply_fusion.8 = f32[4,8]{1,0} fusion(%x), kind=kLoop, calls=%fused_gate
  %custom-call.9 = (f32[4,8]{1,0}, /*index=1*/f32[4]{0}) custom-call(%x), custom_call_target="mosaic_gpu_v2", metadata={op_name="jit(step)/pallas_call" stack_frame_id=6}
  %cublas-gemm.1 = (f32[4,8]{1,0}, s8[64]{0}) custom-call(%x, %x), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/dot_general" stack_frame_id=4}
  %convolution.2 = f32[4,8]{1,0} convolution(%x, %x), window={size=4}, dim_labels=b0f_0io->b0f, feature_group_count=8, metadata={op_name="jit(step)/conv" stack_frame_id=5}
  %copy.3 = f32[4,8]{1,0} copy(%x)
  ROOT %reduce.9 = f32[] reduce(%x, %x), dimensions={0,1}, to_apply=%region_max
}
"""

WANT = {
    "loop_add_fusion.3": ("norm", "RMSNorm.__call__"),  # 3 norm ops outvote the residual add
    "input_reduce_fusion": ("loss", "softmax_cross_entropy_with_integer_labels"),
    "loop_divide_fusion.2": ("optimizer", "scale_by_adam.<locals>.update_fn"),
    "gemm_fusion_dot.4": ("matmul", "MambaMixer.__call__"),  # a dot, whatever else is fused
    "loop_transpose_fusion": ("copies/transposes", "selective_scan"),  # no arithmetic: a copy
    "loop_logistic_fusion": ("conv", "MambaMixer._conv"),  # nested fusion opened: 2 of 3 conv
    "loop_multiply_fusion.7": ("other fusions", "RMSNorm.__call__"),  # 2 norm, 2 conv: no majority
    "loop_multiply_fusion.8": ("other fusions", "MambaMixer.__call__"),  # gating: no rule
    "custom-call.9": ("scan", "selective_scan"),  # a Pallas kernel traced from the scan
    "cublas-gemm.1": ("matmul", "MambaMixer.__call__"),
    "convolution.2": ("conv", "grouped convolution"),  # depthwise, as XLA's grouped conv
    "copy.3": ("copies/transposes", ""),
    "reduce.9": ("other fusions", ""),  # arithmetic with no frames
}


@pytest.fixture(scope="module")
def module():
  return trace.HloModule(HLO)


def test_module_parse(module):
  assert module.name == "jit_step"
  assert module.instructions["gemm_fusion_dot.4"].opcode == "fusion"
  assert module.instructions["gemm_fusion_dot.4"].calls == ("fused_gemm",)
  assert module.instructions["custom-call.9"].target == "mosaic_gpu_v2"
  assert module.instructions["convolution.2"].groups == 8
  assert module.instructions["reduce.9"].calls == ()  # to_apply is not opened
  # parent ids are printed plus one: frame 6 (the scan) <- 4 <- 2 <- 1
  assert [f for _, f in module.stack(module.instructions["custom-call.9"])] == [
      "selective_scan", "MambaMixer.__call__", "Block.__call__", "loss_fn"]
  assert [f for _, f in module.stack(module.instructions["loop_divide_fusion.2"])] == []
  assert [op.name for op in module.ops(module.instructions["loop_logistic_fusion"])] == [
      "param_0.5", "param_0.6", "mul.5", "add.5", "logistic.5"]


@pytest.mark.parametrize("name", sorted(WANT))
def test_classify(module, name):
  assert module.classify(module.instructions[name]) == WANT[name]


def test_find_kernel_names(module):
  """Trace names: the hlo_op as is, or a kernel name with the instance number after '_'."""
  assert module.find("loop_add_fusion.3").name == "loop_add_fusion.3"
  assert module.find("loop_add_fusion_3").name == "loop_add_fusion.3"
  assert module.find("%copy.3").name == "copy.3"
  assert module.find("loop_add_fusion_4") is None and module.find(None) is None


def test_parents_as_printed():
  """A table where no frame prints its own id is read as printed (0: no parent)."""
  text = HLO.replace("1 {file_location_id=1 parent_frame_id=1}",
                     "1 {file_location_id=1 parent_frame_id=0}")
  for k, parent in [(2, 1), (3, 2), (4, 2), (5, 4), (6, 4), (7, 1), (8, 0)]:
    text = text.replace(f"{k} {{file_location_id={k} parent_frame_id={parent + 1}}}",
                        f"{k} {{file_location_id={k} parent_frame_id={parent}}}")
  m = trace.HloModule(text)
  assert [f for _, f in m.stack(m.instructions["custom-call.9"])] == [
      "selective_scan", "MambaMixer.__call__", "Block.__call__", "loss_fn"]


@pytest.mark.parametrize("frames, want", [
    ([("/a/ssmax/nn/norm.py", "RMSNorm.__call__"), ("/a/ssmax/nn/block.py", "Block.__call__")],
     ("norm", "RMSNorm.__call__")),
    ([("/a/flax/nnx/nn/normalization.py", "LayerNorm.__call__")], ("norm", "LayerNorm.__call__")),
    ([("/a/ssmax/nn/mixer.py", "MambaMixer._conv.<locals>.<genexpr>")],
     ("conv", "MambaMixer._conv.<locals>.<genexpr>")),
    ([("/a/ssmax/nn/mixer.py", "MambaMixer.__call__")], (None, "MambaMixer.__call__")),
    ([("/a/optax/tree_utils/_tree_math.py", "tree_update_moment"),
      ("/a/optax/_src/transform.py", "scale_by_adam")], ("optimizer", "tree_update_moment")),
    ([("/a/flax/nnx/graphlib.py", "update"), ("/a/flax/nnx/training/optimizer.py",
                                              "Optimizer.update")],
     ("optimizer", "Optimizer.update")),
    ([("/a/optax/losses/_classification.py", "softmax_cross_entropy_with_integer_labels")],
     ("loss", "softmax_cross_entropy_with_integer_labels")),
    ([("/a/ssmax/scan/reference.py", "associative"), ("/a/ssmax/nn/mixer.py",
                                                      "MambaMixer.__call__")],
     ("scan", "associative")),
    # innermost match wins: the norm inside the loss function is a norm, not the loss
    ([("/a/ssmax/nn/norm.py", "RMSNorm.__call__"), ("/a/optax/losses/x.py", "loss")],
     ("norm", "RMSNorm.__call__")),
    ([("/a/bench.py", "loss_fn")], (None, "loss_fn")),
    ([], (None, "")),
])
def test_frame_category(frames, want):
  assert trace.frame_category(frames) == want


@pytest.mark.parametrize("name, want", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_tst_128x192_64x4_2x1_v_bz_coopA_TNN", "matmul"),
    ("cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8", "matmul"),
    ("gemm_fusion_dot_12", "matmul"),
    ("ssm_fwd_chunk", "scan"),
    ("ssm_bwd_local", "scan"),
    ("memcpy32_post", "copies/transposes"),
    ("input_transpose_fusion_2", "copies/transposes"),
    ("loop_add_fusion_3", "other fusions"),
    ("input_reduce_fusion", "other fusions"),
])
def test_name_category(name, want):
  assert trace.name_category(name) == want


def test_summarize_idle_and_top():
  k = trace.Kernel
  kernels = [k("gemm_fusion_dot.1", 0, 40), k("loop_add_fusion.2", 50, 10),
             k("loop_add_fusion.3", 70, 30), k("memcpy", 100, 20)]  # 20 ns of gaps in 120
  s = trace.summarize(kernels, 2, 2, lambda kern: (trace.name_category(kern.name), "f"),
                      trace.CATEGORIES)
  us = 1e-3 / 2  # ns per 2 steps -> µs per step
  assert s["categories_us"]["matmul"] == pytest.approx(40 * us)
  assert s["categories_us"]["other fusions"] == pytest.approx(40 * us)
  assert s["categories_us"]["copies/transposes"] == pytest.approx(20 * us)
  assert s["categories_us"]["idle"] == pytest.approx(20 * us)
  assert s["span_us"] == pytest.approx(120 * us) and s["kernels_per_step"] == 2
  assert [(t["name"], t["per_step"]) for t in s["top"]] == [("gemm_fusion_dot", 0.5),
                                                             ("loop_add_fusion", 1.0)]
  no_idle = trace.summarize(kernels, 2, 2, lambda kern: ("matmul", ""), trace.CATEGORIES,
                            idle=False)
  assert "idle" not in no_idle["categories_us"]
  with pytest.raises(ValueError, match="outside"):
    trace.summarize(kernels, 1, 1, lambda kern: ("attention", ""), trace.CATEGORIES)


def test_profile_step_tiny(run_script):
  stdout, run_dir, result = run_script("benchmarks.profile_step")
  rows = {(r["workload"], r["batch"]): r for r in result["rows"]}
  assert list(rows) == [("train", 2), ("prefill", 2)]
  assert result["platform"] == "cpu"
  for r in rows.values():
    assert r["status"] == "ok" and r["ms"] > 0 and r["length"] == 16
    # No GPU: the CPU thunks, every one found in the compiled module.
    assert r["trace_source"] == "cpu thunks" and r["hlo_matched"] == 1.0
    cats = r["categories_us"]
    assert "idle" not in cats
    assert sum(cats.values()) == pytest.approx(r["busy_us"])
    assert min(cats[c] for c in ("matmul", "scan", "conv", "norm")) > 0
    assert {t["category"] for t in r["top"]} <= set(result["categories"])
  train, prefill = rows[("train", 2)], rows[("prefill", 2)]
  # The real step's loss and AdamW update are found; the prefill has neither.
  assert train["categories_us"]["loss"] > 0 and train["categories_us"]["optimizer"] > 0
  assert prefill["categories_us"]["loss"] == 0 and prefill["categories_us"]["optimizer"] == 0
  assert train["first_loss"] > 0
  md = (run_dir / "profile_step.md").read_text()
  assert "### train, batch 2" in md and "| optimizer |" in md
  assert "not the GPU breakdown, which needs a GPU" in md
  assert run_dir.name.endswith("_cpu")
