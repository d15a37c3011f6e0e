// One incremental decoding step of a pre-norm Transformer decoder stack on the CPU, as plain loops.
//
// The reference is TransformerStack.step (mmgen/blocks/transformer.py) with its StepCache: every layer's
// self-attention keys and values in one buffer kv (layers, 2, rows, heads, max_len, e), the memory's keys and values
// per layer (layers, 2, b, heads, t, e; each key block stored transposed, (e, t)) shared by the `group` consecutive
// rows of each utterance, and the weights packed by mmgen.kernels.native_decoder._pack in the order read below
// (matrices transposed, in x out, so a product is a sum of rows scaled by the input: each weight row is read once
// per step whatever the number of rows).
// A few rows make every product memory-bound on its weights, and every other operation a few hundred multiply-adds,
// which is why a step in PyTorch costs its operators' dispatch rather than their arithmetic.
//
// Beams move without copying keys (as in the Triton step, mmgen/kernels/decoder_step.py): row r writes position p's
// key and value into its own slot of kv, and lineage (max_len, rows) says which row's slot holds hypothesis i's entry
// for each position; a reorder gathers that table (mmgen.kernels.native_decoder.NativeDecoder.reorder). kv's rows are
// therefore slots, not hypotheses, unlike the PyTorch StepCache's.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Rows up to this many run on one thread: below it, waking a second costs more than it saves.
constexpr int64_t kSerialRows = 8;

struct Dims {
  int64_t rows, d, f, heads, e, max_len, b, t, group;
};

// 16 floats as one value (GCC/Clang vector extensions): the compiler keeps them in the machine's vector registers
// (two AVX2 or one AVX-512 register under -march=native), so the loops below need no intrinsics of one ISA.
typedef float vf16 __attribute__((vector_size(64)));

inline vf16 load16(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, vf16 v) { std::memcpy(p, &v, sizeof(v)); }

inline vf16 splat(float x) { return vf16{} + x; }

inline float hsum(vf16 v) {
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// Columns j0 .. j0 + 16 NV of y = x @ w (+ bias) for rows r0 .. r0 + rn (rn <= 4), accumulated in registers: each
// weight row's slice is loaded once for the four rows. x rows are xs apart, y rows ys apart, w rows n apart. With
// `width` < 16 (NV = 1, the last columns of a w whose width is not a multiple of 16) the loads of every w row but
// the last read past the block into the next row (unused lanes), and the last row is read into a padded copy.
template <int NV>
void linear_block(const float* x, int64_t xs, const float* w, const float* bias, float* y, int64_t ys, int64_t r0,
                  int64_t rn, int64_t k, int64_t n, int64_t j0, int64_t width = 16 * NV) {
  vf16 acc[4][NV];
  const float* xr[4];
  float pad[16] = {};
  for (int r = 0; r < 4; ++r) {
    xr[r] = x + (r0 + std::min<int64_t>(r, rn - 1)) * xs;  // rows past rn repeat the last one (not stored)
    for (int v = 0; v < NV; ++v) {
      if (bias == nullptr) {
        acc[r][v] = vf16{};
      } else if (width == 16 * NV) {
        acc[r][v] = load16(bias + j0 + 16 * v);
      } else {
        std::copy(bias + j0, bias + j0 + width, pad);
        acc[r][v] = load16(pad);
      }
    }
  }
  const int64_t full = width == 16 * NV ? k : k - 1;
  for (int64_t i = 0; i < k; ++i) {
    vf16 wv[NV];
    if (i < full) {
      for (int v = 0; v < NV; ++v) wv[v] = load16(w + i * n + j0 + 16 * v);
    } else {
      std::copy(w + i * n + j0, w + i * n + j0 + width, pad);
      wv[0] = load16(pad);
    }
    for (int r = 0; r < 4; ++r) {
      const vf16 xb = splat(xr[r][i]);
      for (int v = 0; v < NV; ++v) acc[r][v] += xb * wv[v];
    }
  }
  for (int64_t r = 0; r < rn; ++r) {
    if (width == 16 * NV) {
      for (int v = 0; v < NV; ++v) store16(y + (r0 + r) * ys + j0 + 16 * v, acc[r][v]);
    } else {
      float lanes[16];
      store16(lanes, acc[r][0]);
      std::copy(lanes, lanes + width, y + (r0 + r) * ys + j0);
    }
  }
}

// y (rows, n) = x (rows, k) @ w (k, n) (+ bias (n), if not null), rows xs and ys apart, four rows at a time.
void matmul(const float* x, int64_t xs, const float* w, const float* bias, float* y, int64_t ys, int64_t rows,
            int64_t k, int64_t n) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const int64_t rn = std::min<int64_t>(4, rows - r0);
    int64_t j0 = 0;
    for (; j0 + 64 <= n; j0 += 64) linear_block<4>(x, xs, w, bias, y, ys, r0, rn, k, n, j0);
    for (; j0 + 16 <= n; j0 += 16) linear_block<1>(x, xs, w, bias, y, ys, r0, rn, k, n, j0);
    if (j0 < n && k > 1 && n >= 16) {
      linear_block<1>(x, xs, w, bias, y, ys, r0, rn, k, n, j0, n - j0);
    } else if (j0 < n) {  // a w narrower than 16 columns
      for (int64_t r = r0; r < r0 + rn; ++r) {
        for (int64_t j = j0; j < n; ++j) {
          float s = bias ? bias[j] : 0.0f;
          for (int64_t i = 0; i < k; ++i) s += x[r * xs + i] * w[i * n + j];
          y[r * ys + j] = s;
        }
      }
    }
  }
}

// y (rows, n) = x (rows, k) @ w (k, n) + bias (n), contiguous; more than kSerialRows rows are split between threads
// (each reads the weights, which stay in its cache).
void linear(const float* x, const float* w, const float* bias, float* y, int64_t rows, int64_t k, int64_t n) {
  at::parallel_for(0, (rows + 3) / 4, kSerialRows / 4, [&](int64_t first, int64_t last) {
    const int64_t r0 = first * 4;
    matmul(x + r0 * k, k, w, bias, y + r0 * n, n, std::min(rows, last * 4) - r0, k, n);
  });
}

void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t d, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    double mean = 0.0, var = 0.0;
#pragma omp simd reduction(+ : mean)
    for (int64_t j = 0; j < d; ++j) mean += xr[j];
    mean /= d;
#pragma omp simd reduction(+ : var)
    for (int64_t j = 0; j < d; ++j) var += (xr[j] - mean) * (xr[j] - mean);
    const float scale = static_cast<float>(1.0 / std::sqrt(var / d + eps));
    const float m = static_cast<float>(mean);
    for (int64_t j = 0; j < d; ++j) y[r * d + j] = (xr[j] - m) * scale * w[j] + b[j];
  }
}

// exp(x) for x <= 0 (softmax after subtracting the maximum), in a form the compiler vectorises (libm's expf is
// one call per value): 2^n * p(r) with r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2] and p a degree-6 Taylor polynomial
// (relative error below 3e-7, about float32's rounding); below -87 (or -inf, a masked key) it is 0.
inline float exp_nonpositive(float x) {
  const float z = std::max(x, -87.0f);
  const float n = std::nearbyint(z * 1.44269504f);
  const float r = (z - n * 0.693145752f) - n * 1.42860677e-6f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

// scores[0 .. n) -> softmax weights in place (masked scores are -inf and get weight 0).
void softmax(float* scores, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) best = std::max(best, scores[j]);
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = exp_nonpositive(scores[j] - best);
    total += scores[j];
  }
  const float inv = 1.0f / total;
  for (int64_t j = 0; j < n; ++j) scores[j] *= inv;
}

inline float dot(const float* a, const float* b, int64_t e) {
  vf16 acc = vf16{};
  int64_t c = 0;
  for (; c + 16 <= e; c += 16) acc += load16(a + c) * load16(b + c);
  float s = hsum(acc);
  for (; c < e; ++c) s += a[c] * b[c];
  return s;
}

// out (e) = softmax(q . keys / sqrt(e)) @ values over n positions of one hypothesis: position j's key and value
// (e floats each) are at keys + slot[j] + j e and values + slot[j] + j e, in the cache slot of the row that wrote
// them (the lineage; see decoder_step).
void attend_rows(const float* q, const float* keys, const float* values, const int64_t* slot, int64_t n, int64_t e,
                 float* scores, float* out) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(e));
  for (int64_t j = 0; j < n; ++j) scores[j] = dot(q, keys + slot[j] + j * e, e) * scale;
  softmax(scores, n);
  std::fill(out, out + e, 0.0f);
  int64_t c0 = 0;
  for (; c0 + 16 <= e; c0 += 16) {
    vf16 acc = vf16{};
    for (int64_t j = 0; j < n; ++j) acc += splat(scores[j]) * load16(values + slot[j] + j * e + c0);
    store16(out + c0, acc);
  }
  for (int64_t j = 0; j < n; ++j) {
    const float* vj = values + slot[j] + j * e;
    for (int64_t c = c0; c < e; ++c) out[c] += scores[j] * vj[c];
  }
}

// Cross-attention of the g rows of one utterance (queries q, rows qs apart) to one head of its memory: keys
// transposed (e, t), values (t, e). Scores and weighted sums are products of the g queries with the memory, so each
// key and value is read once for the g rows; frames with allowed[j] false get weight 0. Outputs rows os apart.
void attend_memory(const float* q, int64_t qs, int64_t g, const float* keys_t, const float* values,
                   const bool* allowed, int64_t t, int64_t e, float* scores, float* out, int64_t os) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(e));
  matmul(q, qs, keys_t, nullptr, scores, t, g, e, t);
  for (int64_t r = 0; r < g; ++r) {
    float* sr = scores + r * t;
    for (int64_t j = 0; j < t; ++j) {
      sr[j] = allowed && !allowed[j] ? -std::numeric_limits<float>::infinity() : sr[j] * scale;
    }
    softmax(sr, t);
  }
  matmul(scores, t, values, nullptr, out, os, g, t, e);
}

inline float activate(float v, int64_t kind) {
  switch (kind) {
    case 0: return 0.5f * v * (1.0f + std::erf(v * static_cast<float>(M_SQRT1_2)));  // GELU (exact)
    case 1: return v / (1.0f + std::exp(-v));  // SiLU
    default: return v > 0.0f ? v : 0.0f;  // ReLU
  }
}

at::Tensor decoder_step(const at::Tensor& x_in, const at::Tensor& position_t, int64_t length, at::Tensor kv,
                        const at::Tensor& weights, const at::Tensor& memory_kv,
                        const c10::optional<at::Tensor>& memory_mask, const c10::optional<at::Tensor>& memory_alive,
                        at::Tensor lineage, int64_t heads, int64_t d_ff, double eps, int64_t activation,
                        int64_t group) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "decoder_step: x must be (rows, d) float32");
  TORCH_CHECK(kv.dim() == 6 && kv.scalar_type() == at::kFloat && kv.is_contiguous(),
              "decoder_step: kv must be a contiguous (layers, 2, rows, heads, max_len, e) float32 tensor");
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.is_contiguous(), "decoder_step: weights: float32");
  TORCH_CHECK(position_t.numel() == 1 && position_t.scalar_type() == at::kLong, "decoder_step: position: 1 long");
  at::Tensor x_c = x_in.contiguous();
  const int64_t layers = kv.size(0);
  Dims m{x_c.size(0), x_c.size(1), d_ff, heads, kv.size(5), kv.size(4), 0, 0, group};
  TORCH_CHECK(kv.size(2) == m.rows && kv.size(3) == heads && heads * m.e == m.d,
              "decoder_step: kv's rows/heads/width do not match x (", m.rows, " rows, width ", m.d, ")");
  const int64_t position = position_t.item<int64_t>();
  TORCH_CHECK(position >= 0 && position < m.max_len, "decoder_step: position ", position, " outside the cache of ",
              m.max_len);
  const int64_t n_self = position + 1;  // positions attended to: the hypothesis's so far and this one
  TORCH_CHECK(length <= 0 || length == n_self, "decoder_step: length ", length, " for position ", position,
              " (the positions filled after this step: ", n_self, ")");
  TORCH_CHECK(lineage.scalar_type() == at::kLong && lineage.is_contiguous() && lineage.dim() == 2 &&
                  lineage.size(0) == m.max_len && lineage.size(1) == m.rows,
              "decoder_step: lineage must be a contiguous (max_len, rows) long tensor");
  int64_t* line = lineage.data_ptr<int64_t>();
  for (int64_t j = 0; j < position * m.rows; ++j) {  // the entries read: positions before this one
    TORCH_CHECK(line[j] >= 0 && line[j] < m.rows, "decoder_step: lineage entry ", line[j], " is not a row");
  }
  for (int64_t r = 0; r < m.rows; ++r) line[position * m.rows + r] = r;  // this position: every row's own slot
  const bool cross = memory_kv.numel() > 0;
  const float* mk = nullptr;
  if (cross) {
    TORCH_CHECK(memory_kv.dim() == 6 && memory_kv.size(0) == layers && memory_kv.scalar_type() == at::kFloat &&
                    memory_kv.is_contiguous() && memory_kv.size(3) == heads && memory_kv.size(5) == m.e,
                "decoder_step: memory_kv must be a contiguous (layers, 2, b, heads, t, e) float32 tensor (keys "
                "stored transposed: each (b, head)'s block (e, t))");
    m.b = memory_kv.size(2);
    m.t = memory_kv.size(4);
    TORCH_CHECK(m.b * group == m.rows, "decoder_step: ", m.rows, " rows for ", m.b, " utterances of group ", group);
    mk = memory_kv.data_ptr<float>();
  }
  const bool* mask = nullptr;
  at::Tensor mask_c;
  if (memory_mask.has_value()) {
    mask_c = memory_mask->to(at::kBool).contiguous();
    TORCH_CHECK(mask_c.numel() == m.b * m.t, "decoder_step: memory_mask must hold (b, t) = (", m.b, ", ", m.t, ")");
    mask = mask_c.data_ptr<bool>();
  }
  const float* alive = nullptr;
  at::Tensor alive_c;
  if (memory_alive.has_value()) {
    alive_c = memory_alive->to(at::kFloat).contiguous();
    TORCH_CHECK(alive_c.numel() == m.rows, "decoder_step: memory_alive must hold one value per row");
    alive = alive_c.data_ptr<float>();
  }
  const int64_t d = m.d, f = m.f, rows = m.rows, e = m.e;
  const int64_t per_layer = 2 * d + d * 3 * d + 3 * d + d * d + d + (cross ? 2 * d + 2 * (d * d + d) : 0) + 2 * d +
                            d * f + f + f * d + d;
  TORCH_CHECK(weights.numel() == layers * per_layer + 2 * d, "decoder_step: packed weights hold ", weights.numel(),
              " values, expected ", layers * per_layer + 2 * d);

  at::Tensor out = at::empty({rows, d}, x_c.options());
  float* x = out.data_ptr<float>();
  std::copy(x_c.data_ptr<float>(), x_c.data_ptr<float>() + rows * d, x);
  std::vector<float> h(rows * d), qkv(rows * 3 * d), att(rows * d), hidden(rows * f);
  float* cache = kv.data_ptr<float>();
  const float* w = weights.data_ptr<float>();
  auto take = [&w](int64_t n) {
    const float* p = w;
    w += n;
    return p;
  };
  // Strides of kv: (layers, 2, rows, heads, max_len, e).
  const int64_t s_head = m.max_len * e, s_row = heads * s_head, s_kind = rows * s_row, s_layer = 2 * s_kind;
  for (int64_t layer = 0; layer < layers; ++layer) {
    const float *n1w = take(d), *n1b = take(d), *wqkv = take(d * 3 * d), *bqkv = take(3 * d), *wo = take(d * d),
                *bo = take(d);
    layer_norm(x, n1w, n1b, h.data(), rows, d, eps);
    linear(h.data(), wqkv, bqkv, qkv.data(), rows, d, 3 * d);
    float* keys = cache + layer * s_layer;
    float* values = keys + s_kind;
    at::parallel_for(0, rows, kSerialRows, [&](int64_t first, int64_t last) {
      std::vector<float> scores(n_self);
      std::vector<int64_t> slot(n_self);
      for (int64_t r = first; r < last; ++r) {
        // Row r writes its own slot; the earlier positions of its hypothesis lie in the slots the lineage names.
        for (int64_t j = 0; j <= position; ++j) slot[j] = line[j * rows + r] * s_row;
        for (int64_t a = 0; a < heads; ++a) {
          const float* q = qkv.data() + r * 3 * d + a * e;
          std::copy(q + d, q + d + e, keys + r * s_row + a * s_head + position * e);
          std::copy(q + 2 * d, q + 2 * d + e, values + r * s_row + a * s_head + position * e);
          attend_rows(q, keys + a * s_head, values + a * s_head, slot.data(), n_self, e, scores.data(),
                      att.data() + r * d + a * e);
        }
      }
    });
    linear(att.data(), wo, bo, h.data(), rows, d, d);
    for (int64_t i = 0; i < rows * d; ++i) x[i] += h[i];
    if (cross) {
      const float *ncw = take(d), *ncb = take(d), *wq = take(d * d), *bq = take(d), *wco = take(d * d),
                  *bco = take(d);
      layer_norm(x, ncw, ncb, h.data(), rows, d, eps);
      linear(h.data(), wq, bq, qkv.data(), rows, d, d);
      // Strides of memory_kv: (layers, 2, b, heads, t, e); a key block is stored (e, t).
      const int64_t t = m.t, mh = t * e, mu = heads * mh, mkind = m.b * mu;
      const float* mkeys = mk + layer * 2 * mkind;
      // Utterances between threads; each utterance's rows attend together.
      at::parallel_for(0, m.b, std::max<int64_t>(kSerialRows / group, 1), [&](int64_t first, int64_t last) {
        std::vector<float> scores(group * t);
        for (int64_t u = first; u < last; ++u) {
          for (int64_t a = 0; a < heads; ++a) {
            attend_memory(qkv.data() + u * group * d + a * e, d, group, mkeys + u * mu + a * mh,
                          mkeys + mkind + u * mu + a * mh, mask ? mask + u * t : nullptr, t, e, scores.data(),
                          att.data() + u * group * d + a * e, d);
          }
          if (alive) {
            for (int64_t r = u * group; r < (u + 1) * group; ++r) {
              for (int64_t j = 0; j < d; ++j) att[r * d + j] *= alive[r];
            }
          }
        }
      });
      linear(att.data(), wco, bco, h.data(), rows, d, d);
      for (int64_t i = 0; i < rows * d; ++i) x[i] += h[i];
    }
    const float *n2w = take(d), *n2b = take(d), *wfc = take(d * f), *bfc = take(f), *wproj = take(f * d),
                *bproj = take(d);
    layer_norm(x, n2w, n2b, h.data(), rows, d, eps);
    linear(h.data(), wfc, bfc, hidden.data(), rows, d, f);
    for (int64_t i = 0; i < rows * f; ++i) hidden[i] = activate(hidden[i], activation);
    linear(hidden.data(), wproj, bproj, h.data(), rows, f, d);
    for (int64_t i = 0; i < rows * d; ++i) x[i] += h[i];
  }
  const float *nw = take(d), *nb = take(d);
  at::Tensor y = at::empty({rows, d}, x_c.options());
  layer_norm(x, nw, nb, y.data_ptr<float>(), rows, d, eps);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmgen_cpu, m) {
  m.def("decoder_step(Tensor x, Tensor position, int length, Tensor(a!) kv, Tensor weights, Tensor memory_kv, "
        "Tensor? memory_mask, Tensor? memory_alive, Tensor(b!) lineage, int heads, int d_ff, float eps, "
        "int activation, int group) -> Tensor");
  m.impl("decoder_step", c10::DispatchKey::CPU, TORCH_FN(decoder_step));
}
