// Grouped few-row linear for routed experts on CPU: rows grouped by expert, each group times
// its expert's weight, all experts in one call, reading each expert's weight once per tile.
//
// rows    [N, K]     fp32, bf16 or fp16, contiguous, grouped in runs (one run per expert hit)
// weight  [E, O, K]  the experts module's own storage ([out, in] per expert), same dtype
// starts  [R + 1]    int64, run r covers rows starts[r] .. starts[r + 1] - 1
// experts [R]        int64, the expert of each run
// returns [N, O]     rows' dtype; fp32 accumulation, rounded once
//
// Why: at high skip ratios each expert keeps a few rows, and oneDNN's GEMMs stream a weight
// for a few rows at a fraction of memory bandwidth (BENCHMARKS.md). Here a register tile of a
// few rows x a few weight rows accumulates dot products along K, so a weight row is read from
// memory once and reused from registers for every row of its group; no copy of the weights.
//
// One source for every CPU: vectors are ATen's `at::vec::Vectorized<float>` (what PyTorch's own
// CPU kernels use), so the same code builds for AVX2 + FMA, AVX-512, aarch64 NEON and SVE256; the
// build defines CPU_CAPABILITY_* as PyTorch's build does (`modes.engine.kernels`). bf16 and
// fp16 rows are widened to fp32 once per call and weights in registers as they stream, except
// bf16 with AVX-512 BF16, whose `vdpbf16ps` sums pairs of bf16 products directly (the fast path
// where the CPU has it).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/to.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#include <immintrin.h>
#define MODES_NATIVE_BF16_DOT 1
#endif

namespace {

using Vec = at::vec::Vectorized<float>;
using IntVec = at::vec::Vectorized<int32_t>;

// Register tiles: kRowTile rows x kOutputTile weight rows (outputs). With 16 vector registers
// (AVX2) tiles are tall and narrow, 6 x 2, so that one pass covers most experts' rows at high
// skip ratios: each further pass widens the weights again and costs FMA-port time the memory
// would otherwise overlap (BENCHMARKS.md). aarch64 builds take the same tiles (their 32
// registers would hold more; not measured: no aarch64 machine has run them, only qemu).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kRowTile = 4;  // 16 accumulators of 32 registers
constexpr int kOutputTile = 4;
#else
constexpr int kRowTile = 6;  // 12 accumulators of 16 registers
constexpr int kOutputTile = 2;
#endif

// How K elements become fp32 products: rows of TX times weights of TW, one step of kStep
// elements at a time, in kParts parts (`load` reads part p of a step, `fma` adds x * w into an
// fp32 accumulator). Rows are fp32 unless the CPU multiplies bf16 directly: reduced-precision
// rows are widened once per call, not once per output tile (`grouped_rows_linear`), and weights
// widened in registers as they stream.
template <typename TX, typename TW>
struct Dot {
  static_assert(std::is_same_v<TX, float>, "rows are widened to fp32 first");
  static constexpr int64_t kStep = Vec::size();
  static constexpr int kParts = 1;
  static int64_t row_stride(int64_t K) { return K; }
  template <typename T>
  static Vec load(const T* p, int /*part*/) {
    if constexpr (std::is_same_v<T, float>) {
      return Vec::loadu(p);
    } else {
      Vec out;
      at::vec::load_to_float<T>(p, out);
      return out;
    }
  }
  template <typename T>
  static Vec load_tail(const T* p, int64_t n, int part) {  // n < kStep elements, the rest zero
    T padded[kStep] = {};
    std::memcpy(padded, p, n * sizeof(T));
    return load(padded, part);
  }
  static Vec fma(const Vec& acc, const Vec& x, const Vec& w) { return at::vec::fmadd(x, w, acc); }
};

// bf16 weights without native bf16 dot products: a step of 2 * Vec::size() bf16 is one load
// widened as two fp32 vectors by one integer op each: the even elements (the low halves of its
// 32-bit lanes, shifted up) and the odd ones (the high halves, masked), where a zero-extension
// and a shift per vector would cost twice as much. Products pair even with even and odd with
// odd, so rows are widened once per call into that order, each step's even elements then its
// odd ones, padded with zeros to whole steps (`paired_rows`).
template <>
struct Dot<float, at::BFloat16> {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "bf16 pairs are read as little-endian lanes");
  static constexpr int64_t kStep = 2 * Vec::size();
  static constexpr int kParts = 2;  // even, odd
  static int64_t row_stride(int64_t K) { return (K + kStep - 1) / kStep * kStep; }
  static Vec load(const at::BFloat16* p, int part) {
    const IntVec lanes = IntVec::loadu(p);  // [kStep / 2] lanes: element 2t low, 2t + 1 high
    return at::vec::cast<float>(part == 0 ? lanes << IntVec(16) : lanes & IntVec(-65536));
  }
  static Vec load_tail(const at::BFloat16* p, int64_t n, int part) {  // n < kStep elements, the rest zero
    at::BFloat16 padded[kStep] = {};
    std::memcpy(padded, p, n * sizeof(at::BFloat16));
    return load(padded, part);
  }
  static Vec load(const float* p, int part) { return Vec::loadu(p + part * Vec::size()); }  // paired rows
  static Vec load_tail(const float* p, int64_t, int part) { return load(p, part); }  // padded: whole steps
  static Vec fma(const Vec& acc, const Vec& x, const Vec& w) { return at::vec::fmadd(x, w, acc); }
};

// bf16 rows [N, K] -> fp32 [N, row_stride(K)] in the paired order `Dot<float, BFloat16>` reads.
at::Tensor paired_rows(const at::Tensor& rows) {
  using D = Dot<float, at::BFloat16>;
  const int64_t N = rows.size(0), K = rows.size(1), stride = D::row_stride(K);
  at::Tensor out = at::empty({N, stride}, rows.options().dtype(at::kFloat));
  const at::BFloat16* src = rows.const_data_ptr<at::BFloat16>();
  float* dst = out.mutable_data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t k = 0; k < K; k += D::kStep) {
        for (int part = 0; part < D::kParts; ++part) {
          const Vec v = k + D::kStep <= K ? D::load(src + r * K + k, part) : D::load_tail(src + r * K + k, K - k, part);
          v.store(dst + r * stride + k + part * Vec::size());
        }
      }
    }
  });
  return out;
}

#if defined(MODES_NATIVE_BF16_DOT)
template <>
struct Dot<at::BFloat16, at::BFloat16> {
  static constexpr int64_t kStep = 32;  // pairs of products summed by vdpbf16ps
  static constexpr int kParts = 1;
  static int64_t row_stride(int64_t K) { return K; }
  static __m512bh load(const at::BFloat16* p, int /*part*/) { return (__m512bh)_mm512_loadu_si512(p); }
  static __m512bh load_tail(const at::BFloat16* p, int64_t n, int /*part*/) {
    return (__m512bh)_mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << n) - 1), p);
  }
  static Vec fma(const Vec& acc, __m512bh x, __m512bh w) { return Vec(_mm512_dpbf16_ps(acc, x, w)); }
};
#endif

// Pulls the weight tile kPrefetchAhead tasks ahead into L2 a few lines per step while the
// current tile computes, so that memory keeps streaming while a group of rows computes on its
// tile (the next tile into L1, as before, left memory idle: bf16 on AVX2 ran at 66% of a plain
// read against 73%; a stream running further ahead as compute allowed did worse, BENCHMARKS.md).
constexpr int64_t kPrefetchAhead = 4;

struct Prefetcher {
  const char* next;
  const char* end;
  int64_t lines_per_step;
  void step() {
    for (int64_t i = 0; i < lines_per_step && next < end; ++i, next += 64) __builtin_prefetch(next, 0, 1);
  }
};

// acc[i][j] += x[i, step] * w[j, step] over the step's parts; x(i, part) and w(j, part) load.
template <typename D, int M, int N, typename LoadX, typename LoadW>
inline void accumulate(Vec (&acc)[M][N], LoadX x, LoadW w) {
  for (int part = 0; part < D::kParts; ++part) {
    for (int j = 0; j < N; ++j) {
      const auto wv = w(j, part);
      for (int i = 0; i < M; ++i) acc[i][j] = D::fma(acc[i][j], x(i, part), wv);
    }
  }
}

// out[i, j] = sum_k x[i, k] * w[j, k] for M rows of x (x_stride apart) and N rows of w (K long).
template <typename TX, typename TW, int M, int N>
void tile(const TX* x, int64_t x_stride, const TW* w, int64_t K, TW* out, int64_t out_stride, Prefetcher& prefetch) {
  using D = Dot<TX, TW>;
  Vec acc[M][N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) acc[i][j] = Vec(0.f);
  int64_t k = 0;
  for (; k + D::kStep <= K; k += D::kStep) {
    prefetch.step();
    accumulate<D>(
        acc, [&](int i, int part) { return D::load(x + i * x_stride + k, part); },
        [&](int j, int part) { return D::load(w + j * K + k, part); });
  }
  if (k < K) {
    accumulate<D>(
        acc, [&](int i, int part) { return D::load_tail(x + i * x_stride + k, K - k, part); },
        [&](int j, int part) { return D::load_tail(w + j * K + k, K - k, part); });
  }
  const auto add = [](Vec& a, Vec& b) { return a + b; };
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j)
      out[i * out_stride + j] = static_cast<TW>(at::vec::vec_reduce_all<float>(add, acc[i][j]));
}

// The last rows of a group (fewer than kRowTile): one tile of exactly that height.
template <typename TX, typename TW, int N, int M = 1>
void last_tile(int64_t rows, const TX* x, int64_t x_stride, const TW* w, int64_t K, TW* out, int64_t O,
               Prefetcher& prefetch) {
  if constexpr (M < kRowTile) {
    if (rows == M) return tile<TX, TW, M, N>(x, x_stride, w, K, out, O, prefetch);
    last_tile<TX, TW, N, M + 1>(rows, x, x_stride, w, K, out, O, prefetch);
  }
}

// All rows of one group against N weight rows, kRowTile rows at a time (the weight tile stays
// in L1 while the row tiles pass over it), prefetching the tile at ``next`` meanwhile.
template <typename TX, typename TW, int N>
void group_against(const TX* x, int64_t rows, const TW* w, int64_t K, TW* out, int64_t O, const TW* next) {
  using D = Dot<TX, TW>;
  if (rows == 0) return;
  const int64_t k_steps = (K + D::kStep - 1) / D::kStep;
  const int64_t steps = std::max<int64_t>(1, (rows + kRowTile - 1) / kRowTile * k_steps);
  const int64_t lines = (kOutputTile * K * static_cast<int64_t>(sizeof(TW)) + 63) / 64;
  const char* start = reinterpret_cast<const char*>(next);
  Prefetcher prefetch{start, next ? start + lines * 64 : start, (lines + steps - 1) / steps};
  const int64_t stride = D::row_stride(K);
  int64_t m = 0;
  for (; m + kRowTile <= rows; m += kRowTile)
    tile<TX, TW, kRowTile, N>(x + m * stride, stride, w, K, out + m * O, O, prefetch);
  last_tile<TX, TW, N>(rows - m, x + m * stride, stride, w, K, out + m * O, O, prefetch);
}

template <typename TX, typename TW>
void grouped_rows(const TX* x, const TW* weight, const int64_t* starts, const int64_t* experts, int64_t runs,
                  int64_t K, int64_t O, TW* out) {
  const int64_t tiles = (O + kOutputTile - 1) / kOutputTile, stride = Dot<TX, TW>::row_stride(K);
  // one task per (run, output tile): consecutive tasks read consecutive weight rows
  auto weight_tile = [&](int64_t task) {
    return weight + (experts[task / tiles] * O + (task % tiles) * kOutputTile) * K;
  };
  at::parallel_for(0, runs * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t run = task / tiles, n0 = (task % tiles) * kOutputTile;
      const int64_t m0 = starts[run], rows = starts[run + 1] - m0;
      const TX* x_run = x + m0 * stride;
      const TW* w_tile = weight_tile(task);
      const TW* next = task + kPrefetchAhead < end ? weight_tile(task + kPrefetchAhead) : nullptr;
      TW* out_tile = out + m0 * O + n0;
      switch (std::min<int64_t>(kOutputTile, O - n0)) {
        case 4: group_against<TX, TW, std::min(4, kOutputTile)>(x_run, rows, w_tile, K, out_tile, O, next); break;
        case 3: group_against<TX, TW, std::min(3, kOutputTile)>(x_run, rows, w_tile, K, out_tile, O, next); break;
        case 2: group_against<TX, TW, std::min(2, kOutputTile)>(x_run, rows, w_tile, K, out_tile, O, next); break;
        default: group_against<TX, TW, 1>(x_run, rows, w_tile, K, out_tile, O, next); break;
      }
    }
  });
}

void check_runs(const at::Tensor& rows, const at::Tensor& weight, const at::Tensor& starts,
                const at::Tensor& experts) {
  TORCH_CHECK(rows.dim() == 2 && weight.dim() == 3 && rows.size(1) == weight.size(2),
              "grouped_rows_linear: rows [N, K] and weight [E, O, K] expected");
  TORCH_CHECK(rows.scalar_type() == weight.scalar_type(), "grouped_rows_linear: rows and weight dtypes differ");
  TORCH_CHECK(rows.device().is_cpu() && weight.device().is_cpu() && starts.device().is_cpu() &&
                  experts.device().is_cpu(),
              "grouped_rows_linear: CPU tensors expected");
  TORCH_CHECK(rows.is_contiguous() && weight.is_contiguous() && starts.is_contiguous() && experts.is_contiguous(),
              "grouped_rows_linear: contiguous tensors expected");
  TORCH_CHECK(starts.scalar_type() == at::kLong && experts.scalar_type() == at::kLong &&
                  starts.numel() == experts.numel() + 1,
              "grouped_rows_linear: int64 starts [R + 1] and experts [R] expected");
  const int64_t* first = starts.data_ptr<int64_t>();
  const int64_t* expert_ids = experts.data_ptr<int64_t>();
  TORCH_CHECK(first[0] == 0 && first[experts.numel()] == rows.size(0), "grouped_rows_linear: runs must cover the rows");
  for (int64_t run = 0; run < experts.numel(); ++run) {  // a bad index would read out of bounds
    TORCH_CHECK(first[run] <= first[run + 1], "grouped_rows_linear: run starts must not decrease");
    TORCH_CHECK(0 <= expert_ids[run] && expert_ids[run] < weight.size(0), "grouped_rows_linear: expert out of range");
  }
}

template <typename T>
void run(const at::Tensor& rows, const at::Tensor& weight, const at::Tensor& starts, const at::Tensor& experts,
         at::Tensor& out) {
  const auto launch = [&](const auto* x) {
    grouped_rows(x, weight.const_data_ptr<T>(), starts.const_data_ptr<int64_t>(), experts.const_data_ptr<int64_t>(),
                 experts.numel(), rows.size(1), weight.size(1), out.mutable_data_ptr<T>());
  };
#if defined(MODES_NATIVE_BF16_DOT)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    launch(rows.const_data_ptr<T>());  // bf16 rows straight into vdpbf16ps
    return;
  }
#endif
  if constexpr (std::is_same_v<T, float>) {
    launch(rows.const_data_ptr<float>());
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    const at::Tensor paired = paired_rows(rows);  // [N, padded K] fp32, in the order the weights widen
    launch(paired.const_data_ptr<float>());
  } else {
    const at::Tensor widened = rows.to(at::kFloat);  // [N, K] fp32: once, not once per output tile
    launch(widened.const_data_ptr<float>());
  }
}

at::Tensor grouped_rows_linear(const at::Tensor& rows, const at::Tensor& weight, const at::Tensor& starts,
                               const at::Tensor& experts) {
  check_runs(rows, weight, starts, experts);
  auto out = at::empty({rows.size(0), weight.size(1)}, rows.options());
  switch (rows.scalar_type()) {
    case at::kFloat: run<float>(rows, weight, starts, experts, out); break;
    case at::kBFloat16: run<at::BFloat16>(rows, weight, starts, experts, out); break;
    case at::kHalf: run<at::Half>(rows, weight, starts, experts, out); break;
    default: TORCH_CHECK(false, "grouped_rows_linear: float32, bfloat16 or float16 expected, got ", rows.scalar_type());
  }
  return out;
}

}  // namespace

// The library's name carries the instruction set it was built for (MODES_LIBRARY_NAME, set by
// the build), so that builds for several instruction sets can be loaded side by side.
#define MODES_LIBRARY(name, m) TORCH_LIBRARY(name, m)
MODES_LIBRARY(MODES_LIBRARY_NAME, m) {
  m.def("grouped_rows_linear(Tensor rows, Tensor weight, Tensor starts, Tensor experts) -> Tensor",
        &grouped_rows_linear);
}
