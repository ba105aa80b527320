// pybind11 bindings of the CPU compute kernels (cpu_attention.*, cpu_lora.*, cpu_swiglu.*, cpu_rms_norm.*). Tensors arrive as
// data pointers (torch's data_ptr()): the Python wrappers (fastchat_ft/model/cpu_attention.py, kernels/swiglu.py,
// kernels/rms_norm.py, kernels/lora_linear.py) check dtype, device, layout and shapes before calling and keep the tensors alive for the
// call; the GIL is released around the work.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_attention.h"
#include "cpu_lora.h"
#include "cpu_parallel.h"
#include "cpu_rms_norm.h"
#include "cpu_swiglu.h"

namespace py = pybind11;

void bind_cpu_kernels(py::module_& m) {
  using Lengths = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
  auto shape = [](const Lengths& starts, const Lengths& lengths, int64_t heads, int64_t kv_heads, int64_t head_dim,
                  float scale, int threads, uintptr_t cos, uintptr_t sin) {
    if (starts.ndim() != 1 || lengths.ndim() != 1 || starts.size() != lengths.size())
      throw py::value_error("cpu attention: starts and lengths must be 1-D and of one size");
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || head_dim <= 0)
      throw py::value_error("cpu attention: heads must be a positive multiple of kv_heads, head_dim positive");
    if ((cos == 0) != (sin == 0) || (cos && head_dim % 2))
      throw py::value_error("cpu attention: rotary needs both cos and sin, and an even head_dim");
    fastchat::attention::Shape s;
    s.heads = heads, s.kv_heads = kv_heads, s.head_dim = head_dim, s.scale = scale;
    s.starts = starts.data(), s.lengths = lengths.data(), s.conversations = starts.size();
    s.threads = std::max(1, threads);
    s.cos = reinterpret_cast<const float*>(cos), s.sin = reinterpret_cast<const float*>(sin);
    return s;
  };
  auto f32 = [](uintptr_t p) { return reinterpret_cast<float*>(p); };
  m.def("attention_forward", [shape, f32](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                                           const Lengths& starts, const Lengths& lengths, int64_t heads,
                                           int64_t kv_heads, int64_t head_dim, float scale, int threads,
                                           uintptr_t cos, uintptr_t sin) {
    const auto s = shape(starts, lengths, heads, kv_heads, head_dim, scale, threads, cos, sin);
    py::gil_scoped_release release;
    fastchat::attention::forward(s, f32(q), f32(k), f32(v), f32(out), f32(lse));
  }, "Causal attention per conversation, fp32, token-major tensors given by data pointer (see cpu_attention.h); "
     "cos and sin (0: none) apply the rotary embedding to q and k inside.", py::arg("q"), py::arg("k"), py::arg("v"),
     py::arg("out"), py::arg("lse"), py::arg("starts"), py::arg("lengths"), py::arg("heads"), py::arg("kv_heads"),
     py::arg("head_dim"), py::arg("scale"), py::arg("threads"), py::arg("cos") = 0, py::arg("sin") = 0);
  m.def("attention_backward", [shape, f32](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                                            uintptr_t dout, uintptr_t dq, uintptr_t dk_h, uintptr_t dv_h,
                                            const Lengths& starts, const Lengths& lengths, int64_t heads,
                                            int64_t kv_heads, int64_t head_dim, float scale, int threads,
                                            uintptr_t cos, uintptr_t sin) {
    const auto s = shape(starts, lengths, heads, kv_heads, head_dim, scale, threads, cos, sin);
    py::gil_scoped_release release;
    fastchat::attention::backward(s, f32(q), f32(k), f32(v), f32(out), f32(lse), f32(dout), f32(dq), f32(dk_h),
                                  f32(dv_h));
  }, "Gradients of attention_forward; dk_h, dv_h per query head (see cpu_attention.h).", py::arg("q"), py::arg("k"),
     py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dout"), py::arg("dq"), py::arg("dk_h"), py::arg("dv_h"),
     py::arg("starts"), py::arg("lengths"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
     py::arg("scale"), py::arg("threads"), py::arg("cos") = 0, py::arg("sin") = 0);
  // SwiGLU (csrc/cpu_swiglu.*): contiguous fp32 arrays of n elements by data pointer, checked by kernels/swiglu.py
  m.def("swiglu_forward", [f32](uintptr_t gate, uintptr_t up, uintptr_t h, int64_t n, int threads) {
    py::gil_scoped_release release;
    fastchat::swiglu::forward(f32(gate), f32(up), f32(h), n, threads);
  }, "h = silu(gate) * up, fp32, one pass.");
  m.def("swiglu_backward", [f32](uintptr_t dh, uintptr_t gate, uintptr_t up, uintptr_t dgate, uintptr_t dup,
                                 int64_t n, int threads) {
    py::gil_scoped_release release;
    fastchat::swiglu::backward(f32(dh), f32(gate), f32(up), dgate ? f32(dgate) : nullptr, dup ? f32(dup) : nullptr,
                               n, threads);
  }, "Gradients of swiglu_forward in one pass; a 0 pointer skips that output.");
  // RMSNorm (csrc/cpu_rms_norm.*): contiguous fp32 [rows x cols] by data pointer, checked by kernels/rms_norm.py
  m.def("rms_norm_forward", [f32](uintptr_t x, uintptr_t w, uintptr_t y, uintptr_t rstd, int64_t rows, int64_t cols,
                                  float eps, int threads) {
    py::gil_scoped_release release;
    fastchat::rms_norm::forward(f32(x), f32(w), f32(y), f32(rstd), rows, cols, eps, threads);
  }, "y = w * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps) per row, fp32, one pass.");
  m.def("rms_norm_backward", [f32](uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t rstd, uintptr_t dx,
                                   uintptr_t dw_partial, int64_t rows, int64_t cols, int threads) {
    py::gil_scoped_release release;
    fastchat::rms_norm::backward(f32(dy), f32(x), f32(w), f32(rstd), f32(dx), dw_partial ? f32(dw_partial) : nullptr,
                                 rows, cols, threads);
  }, "dx of rms_norm_forward in one pass; dw per thread into a zeroed [threads x cols] buffer (0: no dw).");
  m.def("cpu_simd_level", &fastchat::cpu::simd_level,
        "The CPU kernels' build in use: 2 AVX-512, 1 AVX2+FMA, 0 baseline (FASTCHAT_FT_CPU_SIMD caps it).");
  // LoRA's rank-r products (csrc/cpu_lora.*): contiguous fp32 by data pointer, checked by kernels/lora_linear.py;
  // one entry per layer of the group in a, b, y / dy, db, out, scale.
  using Pointers = std::vector<uintptr_t>;
  auto group = [f32](uintptr_t x, const Pointers& a, const Pointers& b, uintptr_t s, int64_t m, int64_t in,
                     const std::vector<int64_t>& out, int64_t r, const std::vector<float>& scale) {
    const size_t layers = a.size();
    if (b.size() != layers || out.size() != layers || scale.size() != layers ||
        !fastchat::lora::supports(static_cast<int>(layers), r))
      throw py::value_error("cpu lora: 1-4 layers of one rank (a multiple of 16, 64 at most stacked), one a, b, "
                            "out and scale each");
    fastchat::lora::Group g;
    g.layers = static_cast<int>(layers);
    g.m = m, g.in = in, g.r = r, g.x = f32(x), g.s = f32(s);
    for (size_t l = 0; l < layers; ++l) g.a[l] = f32(a[l]), g.b[l] = f32(b[l]), g.out[l] = out[l], g.scale[l] = scale[l];
    return g;
  };
  m.def("lora_forward", [f32, group](uintptr_t x, const Pointers& a, const Pointers& b, uintptr_t s,
                                     const Pointers& y, int64_t m, int64_t in, const std::vector<int64_t>& out,
                                     int64_t r, const std::vector<float>& scale, int threads) {
    auto g = group(x, a, b, s, m, in, out, r, scale);
    if (y.size() != a.size()) throw py::value_error("cpu lora: one y per layer");
    for (size_t l = 0; l < y.size(); ++l) g.y[l] = f32(y[l]);
    py::gil_scoped_release release;
    fastchat::lora::forward(g, threads);
  }, "s = x [A_0; ...]^T; y_g += scale_g s_g B_g^T (y_g holds x W_g^T), fp32, one call (see cpu_lora.h).");
  m.def("lora_backward", [f32, group](const Pointers& dy, uintptr_t x, uintptr_t s, const Pointers& a,
                                      const Pointers& b, uintptr_t dx, uintptr_t da, const Pointers& db, int64_t m,
                                      int64_t in, const std::vector<int64_t>& out, int64_t r,
                                      const std::vector<float>& scale, int threads) {
    auto g = group(x, a, b, s, m, in, out, r, scale);
    if (dy.size() != a.size() || db.size() != a.size()) throw py::value_error("cpu lora: one dy and db per layer");
    for (size_t l = 0; l < dy.size(); ++l) g.dy[l] = f32(dy[l]), g.db[l] = f32(db[l]);
    g.dx = dx ? f32(dx) : nullptr;
    g.da = f32(da);
    py::gil_scoped_release release;
    fastchat::lora::backward(g, threads);
  }, "dx += sum_g scale_g (dy_g B_g) A_g (dx 0: skipped); da = the layers' dA stacked; db_g (see cpu_lora.h).");
}
