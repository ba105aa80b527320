// Causal attention within each conversation of a packed batch, forward and backward, for fp32 on CPU.
//
// Why hand-written: training on a CPU packs short conversations (50-300 tokens) into long rows. torch's CPU
// flash attention is tuned for long sequences; called once per conversation it runs at ~6% of the GEMM peak
// (bench/profile_step.py) and its Python loop, splits and cats cost as much again. Here every (conversation,
// query head) pair is one work item: its Q, K, V are copied into small zero-padded buffers that stay in cache,
// the products run through one register-tiled micro-kernel, and the items are shared by a few threads.
//
// Layout: token-major, as the projections produce it. q, out, dq: [tokens, heads, head_dim]; k, v:
// [tokens, kv_heads, head_dim]; lse: [tokens, heads]. A conversation is (start token, length); query head h
// reads kv head h / (heads / kv_heads). Backward writes dk and dv per QUERY head ([tokens, heads, head_dim]):
// the caller sums the heads that share a kv head (no two threads ever write the same row).
#pragma once

#include <cstdint>

namespace fastchat::attention {

struct Shape {
  int64_t heads = 0, kv_heads = 0, head_dim = 0;
  float scale = 0.f;           // softmax scale, usually 1/sqrt(head_dim)
  const int64_t* starts = nullptr;
  const int64_t* lengths = nullptr;
  int64_t conversations = 0;
  int threads = 1;
  // Rotary embedding, when not null: [tokens, head_dim] each (even head_dim). q and k are then the projections'
  // raw outputs; the kernel applies x * cos + rotate_half(x) * sin (rotate_half(x) = [-x2, x1], HF's Llama
  // convention) as it copies them, and backward returns the gradients of the raw q and k.
  const float* cos = nullptr;
  const float* sin = nullptr;
};

// out = softmax(scale q k^T, causal) v per conversation; lse = the log-sum-exp of each row's scaled scores.
void forward(const Shape& s, const float* q, const float* k, const float* v, float* out, float* lse);

// From dout and the forward's out and lse: dq, and per query head dk_h, dv_h (see above).
void backward(const Shape& s, const float* q, const float* k, const float* v, const float* out, const float* lse,
              const float* dout, float* dq, float* dk_h, float* dv_h);

}  // namespace fastchat::attention
