"""bench/gpu_profile.py on a CPU: its dry run profiles `tiny` through the Learner and prints every
table; the categorisation of op and kernel names it sums GPU time by; its one-line refusals."""

import importlib.util
import subprocess
import sys

from train_helpers import ROOT

SCRIPT = ROOT / "bench" / "gpu_profile.py"
spec = importlib.util.spec_from_file_location("gpu_profile", SCRIPT)
gpu_profile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_profile)


def test_op_and_kernel_names_fall_into_their_categories():
    expected = {
        # CUDA kernels as the profiler names them on Hopper
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "matmul",
        "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT": "matmul",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>(Flash_fwd_params)": "attention",
        "fmha_cutlassB_bf16_aligned_64x64_k128_sm80": "attention",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, LogSoftMaxForwardEpilogue>":
            "loss head",
        "void at::native::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>": "loss head",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor>":
            "optimizer",
        "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "NCCL / collectives",
        "Memcpy HtoD (Pinned -> Device)": "data wait",
        "Memcpy DtoD (Device -> Device)": "copies",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>": "norm / elementwise",
        "triton_red_fused__to_copy_mean_mul_pow_rsqrt_0": "norm / elementwise",
        # host-side ops and runtime calls
        "cudaStreamSynchronize": "host sync",
        "aten::_local_scalar_dense": "host sync",
        "aten::_scaled_dot_product_flash_attention": "attention",
        "aten::cross_entropy_loss": "loss head",
        "aten::_log_softmax_backward_data": "loss head",
        "Optimizer.step#AdamW.step": "optimizer",
        "aten::_foreach_mul_": "optimizer",
        "marjara.data_wait": "data wait",
        "aten::mm": "matmul",
        "cudaLaunchKernel": "other",
    }
    assert {name: gpu_profile.category(name) for name in expected} == expected


def test_the_sdpa_backend_is_read_off_op_and_kernel_names():
    counts = {"aten::_scaled_dot_product_flash_attention": 24, "aten::_flash_attention_forward": 24,
              "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>": 24, "aten::mm": 96}
    assert gpu_profile.sdpa_backends(counts) == {"flash": 48}  # the op and its kernel (forward and backward ops count alike)
    assert gpu_profile.sdpa_backends({"aten::_scaled_dot_product_efficient_attention": 3,
                                      "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": 3}) == {"mem-efficient": 6}
    assert gpu_profile.sdpa_backends({"aten::_scaled_dot_product_attention_math": 2}) == {"math": 2}
    assert gpu_profile.sdpa_backends({"aten::_scaled_dot_product_flash_attention_for_cpu": 8}) == {"flash (CPU)": 8}
    assert gpu_profile.sdpa_backends({"aten::mm": 1}) == {}


def test_ops_are_put_in_the_step_phase_of_their_innermost_range():
    assert gpu_profile.phase(["aten::mm", "marjara.loss_head", "ProfilerStep#3"]) == "loss head (forward)"
    assert gpu_profile.phase(["aten::mm", "autograd::engine::evaluate_function: MmBackward0"]) == "backward"
    assert gpu_profile.phase(["aten::lerp_", "Optimizer.step#AdamW.step", "marjara.optimizer_step"]) == "optimizer step"
    assert gpu_profile.phase(["aten::copy_", "marjara.data_wait"]) == "data wait"
    assert gpu_profile.phase(["aten::mm", "ProfilerStep#3"]) == "forward and the rest"
    assert gpu_profile.by_category([("aten::mm", 2.0), ("nvjet_x", 3.0), ("cudaLaunchKernel", 1.0)]) == [
        ("matmul", 5.0), ("other", 1.0)]


def test_dry_run_profiles_tiny_through_the_learner_and_prints_every_table(tmp_path):
    out = tmp_path / "profile.txt"
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--work_dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("tiny profile (CPU dry run") and "SDPA backend: flash (CPU) (8 calls/step)" in text
    for table in ("top ops by CPU self ms:", "CPU self ms by category:", "CPU self ms by step phase:",
                  "MARJARA's ranges", "host syncs per step:"):
        assert table in text and table in result.stdout
    for part in ("marjara.data_wait", "marjara.loss_head", "marjara.backward", "marjara.optimizer_step",
                 "  matmul", "loss head", "backward", "optimizer step"):
        assert part in text
    assert not list((tmp_path / "run").glob("global_step*"))  # the profiled run writes no checkpoint


def test_without_a_gpu_it_says_so_in_one_line():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: no CUDA GPU here; run this on a GPU machine, or pass --dry-run for a CPU profile of tiny"]
    bad = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--active", "0"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --active and --batch_size must be >= 1"
