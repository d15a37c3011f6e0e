// The non-decoder work of a beam search step on the CPU: the step's bookkeeping (mmgen_cpu::beam_select), a joint
// CTC/attention step's scores (mmgen_cpu::joint_scores) and the CTC prefix scorer (mmgen_cpu::ctc_scores,
// mmgen_cpu::ctc_advance), as plain loops over the state tensors of mmgen.beam_search.BeamSearch and
// mmgen.ctc.CTCPrefixScorer, updated in place. They mirror the Triton kernels of mmgen/kernels/beam_step.py and
// mmgen/kernels/ctc_prefix.py (same arguments, tie rules, dead rows, FLOOR), whose docstrings explain the semantics;
// the PyTorch code is the reference and tests/test_native_kernels.py compares the two; the Python wrappers are in
// mmgen/kernels/native_beam.py. The time goes to exp and log over frames (the CTC prefix scores and recursion), so
// those loops are vectorised (`omp simd`, built with -fopenmp-simd) with exp and log1p written as plain arithmetic.
// One thread: a batch-8 joint step is about 0.2 ms, and a second thread gained nothing measurable on the 2-core
// machine this was written on (benchmarks/native_beam_probe.py).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr double kFloor = -1e4;       // CTCPrefixScorer.FLOOR: "impossible" inside the sums
constexpr double kDead = kFloor / 2;  // a prefix score at or below this went through an impossible frame

// A tensor's device, dtype, shape and layout, with a message naming it; every kernel reads raw memory.
void check(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef sizes) {
  TORCH_CHECK(t.defined(), name, ": undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, name, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Every entry of a long tensor in [0, bound): it indexes memory.
void check_range(const at::Tensor& t, const char* name, int64_t bound) {
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0, n = t.numel(); i < n; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < bound, name, "[", i, "] = ", p[i], " is out of range [0, ", bound, ")");
  }
}

// Logits of any float dtype, read as float64 (the reference's double()); rows may be strided, labels contiguous.
void check_logits(const at::Tensor& t, const char* name, int64_t rows, int64_t v) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == v, name, " must have shape [", rows, ", ", v,
              "], got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1 || v == 1, name, ": labels must be contiguous (stride 1), got strides ", t.strides());
}

// ------------------------------------------------------------------------------------------------------------------
// exp and log1p as plain arithmetic, so that the compiler vectorises the `omp simd` loops that call them (a call to
// libm stops vectorisation): the sums over frames and labels, and the forward recursion across rows, are almost all
// exp and log1p, and vectorised they are several times faster than through libm. Over the ranges used here exp is
// within 2 ulp of libm's and log1p within 4 (tests compare with PyTorch to 1e-12). Always inlined: a call left in a
// loop (GCC's inliner leaves some, by size) stops its vectorisation.

#define MMGEN_ALWAYS_INLINE inline __attribute__((always_inline))

// a * b + c, fused where the machine has FMA (one rounding; the polynomials' Horner steps are the latency of the
// forward recursion).
MMGEN_ALWAYS_INLINE double mul_add(double a, double b, double c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

MMGEN_ALWAYS_INLINE double bits_to_double(int64_t bits) {
  double x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

MMGEN_ALWAYS_INLINE int64_t double_to_bits(double x) {
  int64_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

// exp(x) for x <= 0 (every use: an argument less the max of its sum, or minus a distance), 0 below -708 (where exp
// leaves the normal doubles; next to the sum's term exp(0) = 1 such terms are nothing) and at -inf. x = n ln2 + r,
// |r| <= ln2 / 2 (Cody and Waite's two-part ln2), exp(r) by its Taylor polynomial of degree 13 (truncation below
// 1e-17 relative), times 2^n built in the exponent bits.
MMGEN_ALWAYS_INLINE double exp_nonpositive(double x) {
  constexpr double kShift = 0x1.8p52;  // adding it rounds to an integer, which lands in the low mantissa bits
  constexpr double kLog2e = 1.4426950408889634;
  constexpr double kLn2Hi = 0.693147180369123816490, kLn2Lo = 1.90821492927058770002e-10;  // fdlibm's
  const bool tiny = !(x >= -708.0);  // -inf included (nan: tiny too, and gives 0; no caller passes one)
  const double y = tiny ? 0.0 : x;
  const double shifted = mul_add(y, kLog2e, kShift);
  const double n = shifted - kShift;
  const double r = (y - n * kLn2Hi) - n * kLn2Lo;
  double p = 1.0 / 6227020800.0;  // 1 / 13!
  p = mul_add(p, r, 1.0 / 479001600.0);
  p = mul_add(p, r, 1.0 / 39916800.0);
  p = mul_add(p, r, 1.0 / 3628800.0);
  p = mul_add(p, r, 1.0 / 362880.0);
  p = mul_add(p, r, 1.0 / 40320.0);
  p = mul_add(p, r, 1.0 / 5040.0);
  p = mul_add(p, r, 1.0 / 720.0);
  p = mul_add(p, r, 1.0 / 120.0);
  p = mul_add(p, r, 1.0 / 24.0);
  p = mul_add(p, r, 1.0 / 6.0);
  p = mul_add(p, r, 0.5);
  p = mul_add(p, r, 1.0);
  p = mul_add(p, r, 1.0);
  const int64_t e = double_to_bits(shifted) - double_to_bits(kShift);  // n, >= -1022: a normal 2^n
  const double scaled = p * bits_to_double((e + 1023) << 52);
  return tiny ? 0.0 : scaled;
}

// log(1 + y) for 0 <= y <= 1 (the log-add-exp's): 2 atanh(s) with s = y / (2 + y), or past sqrt(2) - 1, ln 2 +
// 2 atanh((y - 1) / (y + 3)) (the log of (1 + y) / 2); |s| <= 0.172, so the odd series of atanh to s^21 is exact to
// below 1e-17 relative. Below 1e-100 it is y itself (to the last bit): the series' powers of s would leave the
// normal doubles there, and arithmetic on subnormal numbers is some hundred times slower on x86 (microcode).
MMGEN_ALWAYS_INLINE double log1p_unit(double y) {
  constexpr double kSqrt2Minus1 = 0.41421356237309503, kLn2 = 0.69314718055994531;
  const bool tiny = y < 1e-100;
  const bool big = y > kSqrt2Minus1;
  const double u = tiny ? 0.0 : y;
  const double s = (big ? u - 1.0 : u) / (big ? u + 3.0 : u + 2.0);
  const double z = s * s;
  double p = 1.0 / 21.0;
  p = mul_add(p, z, 1.0 / 19.0);
  p = mul_add(p, z, 1.0 / 17.0);
  p = mul_add(p, z, 1.0 / 15.0);
  p = mul_add(p, z, 1.0 / 13.0);
  p = mul_add(p, z, 1.0 / 11.0);
  p = mul_add(p, z, 1.0 / 9.0);
  p = mul_add(p, z, 1.0 / 7.0);
  p = mul_add(p, z, 1.0 / 5.0);
  p = mul_add(p, z, 1.0 / 3.0);
  const double log1p = (big ? kLn2 : 0.0) + 2.0 * mul_add(s * z, p, s);
  return tiny ? y : log1p;
}

// log(exp(a) + exp(b)), -inf when both are: torch.logaddexp's formula, max + log1p(exp(-|a - b|)).
MMGEN_ALWAYS_INLINE double logaddexp(double a, double b) {
  const double m = a > b ? a : b;
  const double d = a > b ? b - a : a - b;  // -|a - b| (nan where both are -inf: masked below)
  const double sum = m + log1p_unit(exp_nonpositive(d));
  return m == kNegInf ? kNegInf : sum;
}

// A row's max and log-sum-exp, as log_softmax takes them: log_softmax(x) = (x - max) - lse. A nan or +inf logit, or
// a row of -inf only, makes them nan (every entry of the row nan), as in PyTorch.
template <typename T>
void row_lse(const T* x, int64_t v, double& max, double& lse) {
  double m = kNegInf;
  bool nan = false;
  bool pos_inf = false;
#pragma omp simd reduction(max : m) reduction(| : nan, pos_inf)
  for (int64_t i = 0; i < v; ++i) {
    const double xi = static_cast<double>(x[i]);
    nan |= xi != xi;
    pos_inf |= xi == -kNegInf;
    m = xi > m ? xi : m;
  }
  if (nan || pos_inf || m == kNegInf) {  // exp(x - max) would take inf - inf: nan, as in PyTorch
    max = lse = std::numeric_limits<double>::quiet_NaN();
    return;
  }
  double total = 0.0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < v; ++i) total += exp_nonpositive(static_cast<double>(x[i]) - m);
  max = m;
  lse = std::log(total);
}

// Keeps the n best of the (value, index) pairs offered in increasing index order, best first: value descending,
// ties to the lowest index (those offered first). nan is offered as -inf by the callers.
struct TopN {
  int64_t n, size = 0;
  double* value;
  int64_t* index;

  void offer(double x, int64_t i) {
    if (size == n && !(x > value[n - 1])) return;  // not better than the n-th (an equal one came first)
    int64_t p = size < n ? size++ : n - 1;
    for (; p > 0 && value[p - 1] < x; --p) {  // behind every value at least as large
      value[p] = value[p - 1];
      index[p] = index[p - 1];
    }
    value[p] = x;
    index[p] = i;
  }
};

inline double nan_as_neg_inf(double x) { return x == x ? x : kNegInf; }

// ------------------------------------------------------------------------------------------------------------------
// beam_select: BeamSearch._bookkeeping (and with normalise, log_softmax and the lexicon penalty before it), as the
// Triton kernel mmgen.kernels.beam_step._beam_step_kernel: per utterance the 2k best candidates beam * v + label
// (ties to the lowest), the finished book, the live selection, trie nodes, history, label, position, flags.

template <typename T>
void beam_select_impl(const at::Tensor& step, const at::Tensor& penalty, const std::optional<at::Tensor>& trie,
                      at::Tensor& scores, at::Tensor& node, at::Tensor& label, at::Tensor& position,
                      at::Tensor& count, at::Tensor& fin_scores, at::Tensor& fin_length, at::Tensor& fin_row,
                      at::Tensor& settled, at::Tensor& done, at::Tensor& history_label,
                      at::Tensor& history_parent, at::Tensor& index, at::Tensor& keep_label, int64_t eos,
                      bool normalise) {
  const int64_t b = scores.size(0), k = scores.size(1), v = step.size(1), rows = b * k;
  const int64_t nodes = penalty.size(0);
  const T* logits = step.data_ptr<T>();
  const int64_t stride = step.stride(0);
  const double* pen = penalty.data_ptr<double>();
  const int64_t* trie_step = trie ? trie->data_ptr<int64_t>() : nullptr;
  double* sc = scores.data_ptr<double>();
  int64_t* nd = node.data_ptr<int64_t>();
  int64_t* cnt = count.data_ptr<int64_t>();
  double* fs = fin_scores.data_ptr<double>();
  int64_t* fl = fin_length.data_ptr<int64_t>();
  int64_t* fr = fin_row.data_ptr<int64_t>();
  bool* st = settled.data_ptr<bool>();
  const int64_t pos = position.data_ptr<int64_t>()[0];
  TORCH_CHECK(pos >= 0 && pos < history_label.size(0), "beam_select: position ", pos, " is past max_len ",
              history_label.size(0));
  int64_t* out_index = index.data_ptr<int64_t>();
  int64_t* out_label = keep_label.data_ptr<int64_t>();
  int64_t* lab_out = label.data_ptr<int64_t>();
  int64_t* hl = history_label.data_ptr<int64_t>() + pos * rows;
  int64_t* hp = history_parent.data_ptr<int64_t>() + pos * rows;

  std::vector<double> cand(k * v), top_v(2 * k), kept(k);
  std::vector<int64_t> top_i(2 * k), parent(k), lab(k), new_node(k);
  for (int64_t u = 0; u < b; ++u) {
    // 1. Every candidate's score: the hypothesis's score plus the step's, as in the reference.
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = u * k + j;
      const T* x = logits + row * stride;
      double* c = cand.data() + j * v;
      if (normalise) {
        double mx, lse;
        row_lse(x, v, mx, lse);
        const int64_t at = trie ? nd[row] : 0;
        TORCH_CHECK(at >= 0 && at < nodes, "beam_select: node[", row, "] = ", at, " is not a lexicon node");
        const double* p = pen + at * v;
        for (int64_t i = 0; i < v; ++i) c[i] = sc[row] + (((static_cast<double>(x[i]) - mx) - lse) + p[i]);
      } else {
        for (int64_t i = 0; i < v; ++i) c[i] = sc[row] + static_cast<double>(x[i]);
      }
    }
    // 2. The 2k best (k * v >= 2k: v >= 2).
    TopN top{2 * k, 0, top_v.data(), top_i.data()};
    for (int64_t c = 0; c < k * v; ++c) top.offer(nan_as_neg_inf(cand[c]), c);
    // 3. Finished: eos among the best k candidates of an utterance not yet settled, while it has free slots; live:
    // the best k that do not end, then (fewer than k) the ending ones, masked.
    int64_t n_count = cnt[u], goes_on = 0;
    double best = kNegInf;
    for (int64_t j = 0; j < k; ++j) best = std::max(best, fs[u * (k + 1) + j]);
    for (int64_t p = 0; p < 2 * k; ++p) {
      const bool ends = top_i[p] % v == eos;
      goes_on += !ends;
      if (ends && p < k && std::isfinite(top_v[p]) && !st[u] && n_count < k) {
        const int64_t slot = u * (k + 1) + n_count++;
        fs[slot] = top_v[p];
        fl[slot] = pos;
        fr[slot] = u * k + top_i[p] / v;
        best = std::max(best, top_v[p]);
      }
    }
    // The spare slot takes the last write of the reference's sequential scatter: rank 2k - 1 (never finished).
    fs[u * (k + 1) + k] = top_v[2 * k - 1];
    fl[u * (k + 1) + k] = pos;
    fr[u * (k + 1) + k] = u * k + top_i[2 * k - 1] / v;
    int64_t live = 0, ending = 0;
    for (int64_t p = 0; p < 2 * k; ++p) {
      const bool ends = top_i[p] % v == eos;
      const int64_t dest = ends ? goes_on + ending++ : live++;
      if (dest >= k) continue;
      parent[dest] = u * k + top_i[p] / v;
      lab[dest] = top_i[p] % v;
      kept[dest] = ends ? kNegInf : top_v[p];
      if (trie) {  // read before any node is replaced
        const int64_t at = nd[parent[dest]];
        TORCH_CHECK(at >= 0 && at < nodes, "beam_select: node[", parent[dest], "] = ", at, " is not a lexicon node");
        new_node[dest] = trie_step[at * v + lab[dest]];
      }
    }
    double best_live = kNegInf;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = u * k + j;
      sc[row] = kept[j];
      best_live = std::max(best_live, kept[j]);
      out_index[row] = hp[row] = parent[j];
      out_label[row] = lab_out[row] = hl[row] = lab[j];
      if (trie) nd[row] = new_node[j];
    }
    cnt[u] = n_count;
    // Settled once a finished hypothesis scores at least the best live one.
    st[u] = st[u] || (n_count > 0 && best >= best_live);
  }
  bool all_settled = true, all_full = true;
  for (int64_t u = 0; u < b; ++u) {
    all_settled = all_settled && st[u];
    all_full = all_full && cnt[u] >= k;
  }
  done.data_ptr<bool>()[0] = all_settled || all_full;
  position.data_ptr<int64_t>()[0] = pos + 1;
}

void beam_select(const at::Tensor& step, const at::Tensor& penalty, const std::optional<at::Tensor>& trie,
                 at::Tensor scores, at::Tensor node, at::Tensor label, at::Tensor position, at::Tensor count,
                 at::Tensor fin_scores, at::Tensor fin_length, at::Tensor fin_row, at::Tensor settled, at::Tensor done,
                 at::Tensor history_label, at::Tensor history_parent, at::Tensor index, at::Tensor keep_label,
                 int64_t eos, bool normalise) {
  TORCH_CHECK(scores.dim() == 2, "beam_select: scores must be (b, k), got ", scores.sizes());
  const int64_t b = scores.size(0), k = scores.size(1), rows = b * k, v = step.dim() == 2 ? step.size(1) : 0;
  TORCH_CHECK(k >= 1 && v >= 2, "beam_select: needs a beam of at least 1 and a vocabulary of at least 2, got k=", k,
              ", v=", v);
  TORCH_CHECK(eos >= 0 && eos < v, "beam_select: eos ", eos, " is not a label of ", v);
  check(scores, "scores", at::kDouble, {b, k});
  check(penalty, "penalty", at::kDouble, {penalty.size(0), v});
  TORCH_CHECK(penalty.size(0) >= 1, "penalty: needs a row");
  // The trie's entries become nodes, each checked where it is read: no scan of the whole trie per step.
  if (trie) check(*trie, "trie step", at::kLong, {penalty.size(0), v});
  check(node, "node", at::kLong, {rows});
  check(label, "label", at::kLong, {rows});
  check(position, "position", at::kLong, {1});
  check(count, "count", at::kLong, {b});
  check(fin_scores, "fin_scores", at::kDouble, {b, k + 1});
  check(fin_length, "fin_length", at::kLong, {b, k + 1});
  check(fin_row, "fin_row", at::kLong, {b, k + 1});
  check(settled, "settled", at::kBool, {b});
  check(done, "done", at::kBool, {});
  const int64_t max_len = history_label.dim() == 2 ? history_label.size(0) : 0;
  check(history_label, "history_label", at::kLong, {max_len, rows});
  check(history_parent, "history_parent", at::kLong, {max_len, rows});
  check(index, "index", at::kLong, {rows});
  check(keep_label, "keep_label", at::kLong, {rows});
  TORCH_CHECK(normalise || step.scalar_type() == at::kDouble, "beam_select: the step's final scores must be float64, "
              "got ", step.scalar_type());
  check_logits(step, "step", rows, v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, step.scalar_type(), "beam_select", [&] {
    beam_select_impl<scalar_t>(step, penalty, trie, scores, node, label, position, count, fin_scores, fin_length,
                               fin_row, settled, done, history_label, history_parent, index, keep_label, eos,
                               normalise);
  });
}

// ------------------------------------------------------------------------------------------------------------------
// The CTC prefix scorer's state (CTCPrefixScorer: x (rows, v, t), r_blank and r_any (rows, t), start, last, prefix
// (rows,)), checked once per call.

struct CTCState {
  int64_t rows, v, t;
  const double *x, *r_blank, *r_any, *start, *prefix;
  const int64_t* last;
};

CTCState ctc_state(const at::Tensor& x, const at::Tensor& r_blank, const at::Tensor& r_any, const at::Tensor& start,
                   const at::Tensor& last, const at::Tensor& prefix, int64_t blank, int64_t eos) {
  TORCH_CHECK(x.dim() == 3, "x must be (rows, v, t), got ", x.sizes());
  const int64_t rows = x.size(0), v = x.size(1), t = x.size(2);
  TORCH_CHECK(t >= 1, "the CTC scorer needs at least one frame");
  TORCH_CHECK(blank >= 0 && blank < v && eos >= 0 && eos < v, "blank ", blank, " and eos ", eos, " must be labels of ",
              v);
  check(x, "x", at::kDouble, {rows, v, t});
  check(r_blank, "r_blank", at::kDouble, {rows, t});
  check(r_any, "r_any", at::kDouble, {rows, t});
  check(start, "start", at::kDouble, {rows});
  check(last, "last", at::kLong, {rows});
  check(prefix, "prefix", at::kDouble, {rows});
  return {rows, v, t, x.data_ptr<double>(), r_blank.data_ptr<double>(), r_any.data_ptr<double>(),
          start.data_ptr<double>(), prefix.data_ptr<double>(), last.data_ptr<int64_t>()};
}

// eos's score of a row: log P_ctc of exactly g, its forward variable at the last frame (-inf when dead).
inline double ends_score(const CTCState& s, int64_t row) {
  const double e = s.r_any[row * s.t + s.t - 1];
  return e <= kDead ? kNegInf : e;
}

// psi of label c in a row (neither eos nor the blank): logsumexp over frames f of phi[f] + x[c, f], where phi[f] =
// the start state at f = 0, else the forward variable at f - 1 (ending in a blank for a repeat of g's last label).
// As torch.logsumexp: the max, then the sum of exp(. - max); -inf at or below kDead.
double prefix_score(const CTCState& s, int64_t row, int64_t c) {
  const int64_t t = s.t;
  const double* xc = s.x + (row * s.v + c) * t;
  const double* r = (c == s.last[row] ? s.r_blank : s.r_any) + row * t;
  const double first = s.start[row] + xc[0];
  double m = first;
#pragma omp simd reduction(max : m)
  for (int64_t f = 1; f < t; ++f) {
    const double y = r[f - 1] + xc[f];
    m = y > m ? y : m;
  }
  if (m == kNegInf) return kNegInf;
  double total = exp_nonpositive(first - m);
#pragma omp simd reduction(+ : total)
  for (int64_t f = 1; f < t; ++f) total += exp_nonpositive(r[f - 1] + xc[f] - m);
  const double psi = std::log(total) + m;
  return psi <= kDead ? kNegInf : psi;
}

// psi of any label: eos's is the row's end score, the blank's -inf.
inline double label_score(const CTCState& s, int64_t row, int64_t c, int64_t blank, int64_t eos, double ends) {
  if (c == blank) return kNegInf;
  return c == eos ? ends : prefix_score(s, row, c);
}

// ------------------------------------------------------------------------------------------------------------------
// ctc_scores: CTCPrefixScorer.scores into psi (rows, v): the candidates' (rows, n) prefix scores (every label's
// without candidates), -inf elsewhere, eos's end score, -inf at the blank.

void ctc_scores(const at::Tensor& x, const at::Tensor& r_blank, const at::Tensor& r_any, const at::Tensor& start,
                const at::Tensor& last, const at::Tensor& prefix, const std::optional<at::Tensor>& candidates,
                at::Tensor psi, int64_t blank, int64_t eos) {
  const CTCState s = ctc_state(x, r_blank, r_any, start, last, prefix, blank, eos);
  check(psi, "psi", at::kDouble, {s.rows, s.v});
  int64_t n = s.v;
  const int64_t* cand = nullptr;
  if (candidates) {
    n = candidates->dim() == 2 ? candidates->size(1) : -1;
    check(*candidates, "candidates", at::kLong, {s.rows, n});
    check_range(*candidates, "candidates", s.v);
    cand = candidates->data_ptr<int64_t>();
  }
  double* out = psi.data_ptr<double>();
  for (int64_t row = 0; row < s.rows; ++row) {
    double* o = out + row * s.v;
    const double ends = ends_score(s, row);
    if (cand) std::fill(o, o + s.v, kNegInf);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t c = cand ? cand[row * n + j] : j;
      o[c] = label_score(s, row, c, blank, eos, ends);  // a repeated candidate writes the same value again
    }
    if (eos != blank) o[eos] = ends;  // scored whether a candidate or not
  }
}

// ------------------------------------------------------------------------------------------------------------------
// joint_scores: BeamSearch._scores with a CTC scorer, as the Triton kernel ctc_prefix._joint_scores_kernel: per row
// log_softmax (float64) plus the lexicon penalty; with pre_beam (n > 0) the n best labels ranked by logit plus
// penalty (nan as -inf), ties to the lowest label, else every label; their psi; the joint scores (1 - lam) s +
// lam (psi - prefix), -inf where s is and where the prefix is dead.

template <typename T>
void joint_scores_impl(const at::Tensor& logits, const at::Tensor& penalty, const std::optional<at::Tensor>& node,
                       const CTCState& s, double* psi, double* scores, int64_t blank, int64_t eos, double lam,
                       int64_t pre_beam) {
  const int64_t v = s.v, stride = logits.stride(0);
  const T* base = logits.data_ptr<T>();
  const double* pen_all = penalty.data_ptr<double>();
  const int64_t* nd = node ? node->data_ptr<int64_t>() : nullptr;
  const double w_att = 1 - lam, w_ctc = lam;
  std::vector<double> key(std::max<int64_t>(pre_beam, 1));
  std::vector<int64_t> chosen(std::max<int64_t>(pre_beam, 1));
  for (int64_t row = 0; row < s.rows; ++row) {
    const T* x = base + row * stride;
    const double* pen = pen_all + (nd ? nd[row] : 0) * v;
    double* ps = psi + row * v;
    double* out = scores + row * v;
    const double ends = ends_score(s, row);
    if (pre_beam > 0) {
      TopN top{pre_beam, 0, key.data(), chosen.data()};
      for (int64_t i = 0; i < v; ++i) top.offer(nan_as_neg_inf(static_cast<double>(x[i]) + pen[i]), i);
      std::fill(ps, ps + v, kNegInf);
      if (eos != blank) ps[eos] = ends;
      for (int64_t j = 0; j < pre_beam; ++j) ps[chosen[j]] = label_score(s, row, chosen[j], blank, eos, ends);
    } else {
      for (int64_t c = 0; c < v; ++c) ps[c] = label_score(s, row, c, blank, eos, ends);
    }
    double mx, lse;
    row_lse(x, v, mx, lse);
    const double prefix = s.prefix[row];
    const bool live = std::isfinite(prefix);
    for (int64_t c = 0; c < v; ++c) {
      const double step = ((static_cast<double>(x[c]) - mx) - lse) + pen[c];
      const double gain = live ? ps[c] - prefix : kNegInf;
      // Masked labels stay masked whatever the weights (where lam = 1, 0 * -inf would be nan).
      out[c] = step > kNegInf ? w_att * step + w_ctc * gain : kNegInf;
    }
  }
}

void joint_scores(const at::Tensor& logits, const at::Tensor& penalty, const std::optional<at::Tensor>& node,
                  const at::Tensor& x, const at::Tensor& r_blank, const at::Tensor& r_any, const at::Tensor& start,
                  const at::Tensor& last, const at::Tensor& prefix, at::Tensor psi, at::Tensor scores, int64_t blank,
                  int64_t eos, double lam, int64_t pre_beam) {
  const CTCState s = ctc_state(x, r_blank, r_any, start, last, prefix, blank, eos);
  TORCH_CHECK(pre_beam >= 0 && pre_beam <= s.v, "joint_scores: pre_beam ", pre_beam, " must be in [0, ", s.v, "]");
  check(penalty, "penalty", at::kDouble, {penalty.dim() == 2 ? penalty.size(0) : 0, s.v});
  TORCH_CHECK(penalty.size(0) >= 1, "penalty: needs a row");
  if (node) {
    check(*node, "node", at::kLong, {s.rows});
    check_range(*node, "node", penalty.size(0));
  }
  check(psi, "psi", at::kDouble, {s.rows, s.v});
  check(scores, "scores", at::kDouble, {s.rows, s.v});
  check_logits(logits, "logits", s.rows, s.v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "joint_scores", [&] {
    joint_scores_impl<scalar_t>(logits, penalty, node, s, psi.data_ptr<double>(), scores.data_ptr<double>(), blank,
                                eos, lam, pre_beam);
  });
}

// ------------------------------------------------------------------------------------------------------------------
// ctc_advance: CTCPrefixScorer.advance. Row i becomes hypothesis index[i] extended by labels[i]: the forward
// recursion over frames, run as a plain loop (the reference's closed form with cumulative sums exists only to avoid
// a Python loop; the two agree up to float64 rounding):
//   label[f] = (label[f-1] (+) phi[f]) + x_c[f],  blank[f] = (label[f-1] (+) blank[f-1]) + x_blank[f],
// label[-1] = blank[-1] = log 0, (+) the log-add-exp. The recursion is serial in frames but independent across rows,
// so the rows run side by side in vector lanes: their inputs (the parent's phi, the frames of the label and the
// blank) are first copied frame-major into a workspace, which also lets the new state be written in place after
// every row has read its parent's old one. With group = 1 a row's frames are its parent's (x moves, through
// x_scratch), with groups the row's own.

// The recursion over t frames of R rows (a multiple of kLanes) side by side, frame-major (t, R): from phi and the
// frames of the label and of the blank to the new r_blank and r_any; label and blank (R,): the running values, log 0
// at the start. kLanes doubles per vector: 4 (AVX2) for a beam of 4 at batch 1, 8 (AVX-512, or two AVX2 registers
// at once) beyond; on AMD Zen 4 the wider vectors are about 1.4 times faster per row, but half empty at 4 rows.
template <int kLanes>
void forward_recursion(int64_t t, int64_t R, const double* phi, const double* xl, const double* xb, double* out_blank,
                       double* out_any, double* label, double* blank) {
  for (int64_t f = 0; f < t; ++f) {
    const double* phi_f = phi + f * R;
    const double* xl_f = xl + f * R;
    const double* xb_f = xb + f * R;
    double* blank_f = out_blank + f * R;
    double* any_f = out_any + f * R;
#pragma omp simd simdlen(kLanes)
    for (int64_t i = 0; i < R; ++i) {
      const double label_new = logaddexp(label[i], phi_f[i]) + xl_f[i];
      const double blank_new = logaddexp(label[i], blank[i]) + xb_f[i];
      blank_f[i] = blank_new;
      any_f[i] = logaddexp(label_new, blank_new);
      label[i] = label_new;
      blank[i] = blank_new;
    }
  }
}

void ctc_advance(at::Tensor x, at::Tensor r_blank, at::Tensor r_any, at::Tensor start, at::Tensor last,
                 at::Tensor prefix, const at::Tensor& index, const at::Tensor& labels, const at::Tensor& psi,
                 const std::optional<at::Tensor>& x_scratch, int64_t blank, int64_t group) {
  const CTCState s = ctc_state(x, r_blank, r_any, start, last, prefix, blank, 0);
  const int64_t rows = s.rows, v = s.v, t = s.t;
  TORCH_CHECK(group >= 1 && rows % group == 0, "ctc_advance: rows=", rows, " must be a multiple of group=", group);
  check(index, "index", at::kLong, {rows});
  check(labels, "labels", at::kLong, {rows});
  check_range(index, "index", rows);
  check_range(labels, "labels", v);
  check(psi, "psi", at::kDouble, {rows, v});
  const bool move_x = group == 1;
  if (move_x) {
    TORCH_CHECK(x_scratch.has_value(), "ctc_advance: group=1 needs x_scratch");
    check(*x_scratch, "x_scratch", at::kDouble, {rows, v, t});
  }
  const int64_t* parent = index.data_ptr<int64_t>();
  const int64_t* lab = labels.data_ptr<int64_t>();
  // Workspace, frame-major (t, R): phi, x of the label, x of the blank, then the recursion's two outputs; and the
  // running label and blank values (R,). Kept per thread between calls: no allocation once it is large enough.
  const int64_t lanes = rows <= 4 ? 4 : 8;
  const int64_t R = (rows + lanes - 1) / lanes * lanes;
  thread_local std::vector<double> workspace;
  workspace.resize(5 * t * R + 2 * R);
  double* phi = workspace.data();
  double* xl = phi + t * R;
  double* xb = xl + t * R;
  double* out_blank = xb + t * R;
  double* out_any = out_blank + t * R;
  double* label_before = out_any + t * R;
  double* blank_before = label_before + R;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t p = parent[i], c = lab[i], src = move_x ? p : i;
    const double* r = (c == s.last[p] ? s.r_blank : s.r_any) + p * t;  // phi[f] = r[f - 1], start at f = 0
    const double* xc = s.x + (src * v + c) * t;
    const double* xk = s.x + (src * v + blank) * t;
    phi[i] = s.start[p];
    for (int64_t f = 1; f < t; ++f) phi[f * R + i] = r[f - 1];
    for (int64_t f = 0; f < t; ++f) {
      xl[f * R + i] = xc[f];
      xb[f * R + i] = xk[f];
    }
  }
  for (int64_t i = rows; i < R; ++i) {  // padding lanes: log 0 throughout (finite frames: no inf - inf)
    for (int64_t f = 0; f < t; ++f) {
      phi[f * R + i] = kNegInf;
      xl[f * R + i] = xb[f * R + i] = 0.0;
    }
  }
  std::fill(label_before, label_before + 2 * R, kNegInf);  // and blank_before
  if (lanes == 4) {
    forward_recursion<4>(t, R, phi, xl, xb, out_blank, out_any, label_before, blank_before);
  } else {
    forward_recursion<8>(t, R, phi, xl, xb, out_blank, out_any, label_before, blank_before);
  }
  // Every row has read its parent's old state (into the workspace): write the new one.
  double* x_out = x.data_ptr<double>();
  double* rb_out = r_blank.data_ptr<double>();
  double* ra_out = r_any.data_ptr<double>();
  double* start_out = start.data_ptr<double>();
  double* prefix_out = prefix.data_ptr<double>();
  int64_t* last_out = last.data_ptr<int64_t>();
  const double* ps = psi.data_ptr<double>();
  const size_t frames = sizeof(double) * v * t;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t f = 0; f < t; ++f) {
      rb_out[i * t + f] = out_blank[f * R + i];
      ra_out[i * t + f] = out_any[f * R + i];
    }
    prefix_out[i] = ps[parent[i] * v + lab[i]];
  }
  if (move_x) {  // the parents' frames, for the rows that change hypothesis: to scratch, then into place
    double* xs = x_scratch->data_ptr<double>();
    for (int64_t i = 0; i < rows; ++i) {
      if (parent[i] != i) std::memcpy(xs + i * v * t, x_out + parent[i] * v * t, frames);
    }
    for (int64_t i = 0; i < rows; ++i) {
      if (parent[i] != i) std::memcpy(x_out + i * v * t, xs + i * v * t, frames);
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    last_out[i] = lab[i];
    start_out[i] = kNegInf;
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmgen_cpu, m) {
  m.def("beam_select(Tensor step, Tensor penalty, Tensor? trie, Tensor(a!) scores, Tensor(b!) node, "
        "Tensor(c!) label, Tensor(d!) position, Tensor(e!) count, Tensor(f!) fin_scores, Tensor(g!) fin_length, "
        "Tensor(h!) fin_row, Tensor(i!) settled, Tensor(j!) done, Tensor(k!) history_label, "
        "Tensor(l!) history_parent, Tensor(m!) index, Tensor(n!) keep_label, int eos, bool normalise) -> ()",
        &beam_select);
  m.def("joint_scores(Tensor logits, Tensor penalty, Tensor? node, Tensor x, Tensor r_blank, Tensor r_any, "
        "Tensor start, Tensor last, Tensor prefix, Tensor(a!) psi, Tensor(b!) scores, int blank, int eos, "
        "float lam, int pre_beam) -> ()",
        &joint_scores);
  m.def("ctc_scores(Tensor x, Tensor r_blank, Tensor r_any, Tensor start, Tensor last, Tensor prefix, "
        "Tensor? candidates, Tensor(a!) psi, int blank, int eos) -> ()",
        &ctc_scores);
  m.def("ctc_advance(Tensor(a!) x, Tensor(b!) r_blank, Tensor(c!) r_any, Tensor(d!) start, Tensor(e!) last, "
        "Tensor(f!) prefix, Tensor index, Tensor labels, Tensor psi, Tensor(g!)? x_scratch, int blank, "
        "int group) -> ()",
        &ctc_advance);
}
