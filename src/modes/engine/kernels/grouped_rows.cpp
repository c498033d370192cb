// Grouped few-row linear for routed experts on CPU: rows grouped by expert, each group times
// its expert's weight, all experts in one call, reading each expert's weight once per tile.
//
// rows    [N, K]     bf16 or fp32, contiguous, grouped in runs (one run per expert hit)
// weight  [E, O, K]  the experts module's own storage ([out, in] per expert), same dtype
// starts  [R + 1]    int64, run r covers rows starts[r] .. starts[r + 1] - 1
// experts [R]        int64, the expert of each run
// returns [N, O]     rows' dtype; fp32 accumulation, rounded once
//
// Why: at high skip ratios each expert keeps a few rows, and oneDNN's GEMMs stream a weight
// for a few rows at a fraction of memory bandwidth (BENCHMARKS.md). Here a register tile of
// up to 4 rows x 4 weight rows accumulates dot products along K (AVX-512 BF16 `vdpbf16ps`,
// or fp32 FMA), so a weight row is read from memory once and reused from registers for every
// row of its group; no copy of the weights is needed. Built with -march=native at first use
// (torch.utils.cpp_extension), so it runs on the CPU it was compiled on.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#if defined(__AVX512F__)
namespace {

constexpr int kRowTile = 4;     // rows of one group per register tile
constexpr int kOutputTile = 4;  // weight rows (outputs) per register tile

template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  static constexpr int64_t kStep = 16;  // K elements per vector
  static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 load_tail(const float* p, int64_t n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  }
  static __m512 dot(__m512 acc, __m512 x, __m512 w) { return _mm512_fmadd_ps(x, w, acc); }
};

#if defined(__AVX512BF16__)
template <>
struct Lanes<at::BFloat16> {
  static constexpr int64_t kStep = 32;  // K elements per vector (pairs summed by vdpbf16ps)
  static __m512bh load(const at::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static __m512bh load_tail(const at::BFloat16* p, int64_t n) {
    return (__m512bh)_mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << n) - 1), p);
  }
  static __m512 dot(__m512 acc, __m512bh x, __m512bh w) { return _mm512_dpbf16_ps(acc, x, w); }
};
#endif

// Pulls the next task's weight tile into L1 a few lines per step while the current tile
// computes: a group of many rows re-reads its tile from L1, so without this the memory would
// idle while it computes and the next tile's first pass would stall on it.
struct Prefetcher {
  const char* next;
  const char* end;
  int64_t lines_per_step;
  void step() {
    for (int64_t i = 0; i < lines_per_step && next < end; ++i, next += 64) _mm_prefetch(next, _MM_HINT_T0);
  }
};

// out[i, j] = sum_k x[i, k] * w[j, k] for M rows of x and N rows of w (both K long).
template <typename T, int M, int N>
void tile(const T* x, const T* w, int64_t K, T* out, int64_t out_stride, Prefetcher& prefetch) {
  using L = Lanes<T>;
  __m512 acc[M][N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + L::kStep <= K; k += L::kStep) {
    prefetch.step();
    decltype(L::load(w)) wv[N];
    for (int j = 0; j < N; ++j) wv[j] = L::load(w + j * K + k);
    for (int i = 0; i < M; ++i) {
      auto xv = L::load(x + i * K + k);
      for (int j = 0; j < N; ++j) acc[i][j] = L::dot(acc[i][j], xv, wv[j]);
    }
  }
  if (k < K) {
    decltype(L::load(w)) wv[N];
    for (int j = 0; j < N; ++j) wv[j] = L::load_tail(w + j * K + k, K - k);
    for (int i = 0; i < M; ++i) {
      auto xv = L::load_tail(x + i * K + k, K - k);
      for (int j = 0; j < N; ++j) acc[i][j] = L::dot(acc[i][j], xv, wv[j]);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) out[i * out_stride + j] = static_cast<T>(_mm512_reduce_add_ps(acc[i][j]));
}

// All rows of one group against N weight rows, kRowTile rows at a time (the weight tile stays
// in L1 while the row tiles pass over it), prefetching the tile at ``next`` meanwhile.
template <typename T, int N>
void group_against(const T* x, int64_t rows, const T* w, int64_t K, T* out, int64_t O, const T* next) {
  const int64_t steps = (rows + kRowTile - 1) / kRowTile * ((K + Lanes<T>::kStep - 1) / Lanes<T>::kStep);
  const int64_t lines = (kOutputTile * K * static_cast<int64_t>(sizeof(T)) + 63) / 64;
  const char* start = reinterpret_cast<const char*>(next);
  Prefetcher prefetch{start, next ? start + lines * 64 : start, (lines + steps - 1) / steps};
  int64_t m = 0;
  for (; m + kRowTile <= rows; m += kRowTile) tile<T, kRowTile, N>(x + m * K, w, K, out + m * O, O, prefetch);
  switch (rows - m) {
    case 3: tile<T, 3, N>(x + m * K, w, K, out + m * O, O, prefetch); break;
    case 2: tile<T, 2, N>(x + m * K, w, K, out + m * O, O, prefetch); break;
    case 1: tile<T, 1, N>(x + m * K, w, K, out + m * O, O, prefetch); break;
    default: break;
  }
}

template <typename T>
void grouped_rows(const T* x, const T* weight, const int64_t* starts, const int64_t* experts, int64_t runs,
                  int64_t K, int64_t O, T* out) {
  const int64_t tiles = (O + kOutputTile - 1) / kOutputTile;
  // one task per (run, output tile): consecutive tasks read consecutive weight rows
  auto weight_tile = [&](int64_t task) {
    return weight + (experts[task / tiles] * O + (task % tiles) * kOutputTile) * K;
  };
  at::parallel_for(0, runs * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t run = task / tiles, n0 = (task % tiles) * kOutputTile;
      const int64_t m0 = starts[run], rows = starts[run + 1] - m0;
      const T* x_run = x + m0 * K;
      const T* w_tile = weight_tile(task);
      const T* next = task + 1 < end ? weight_tile(task + 1) : nullptr;
      T* out_tile = out + m0 * O + n0;
      switch (std::min<int64_t>(kOutputTile, O - n0)) {
        case 4: group_against<T, 4>(x_run, rows, w_tile, K, out_tile, O, next); break;
        case 3: group_against<T, 3>(x_run, rows, w_tile, K, out_tile, O, next); break;
        case 2: group_against<T, 2>(x_run, rows, w_tile, K, out_tile, O, next); break;
        default: group_against<T, 1>(x_run, rows, w_tile, K, out_tile, O, next); break;
      }
    }
  });
}

}  // namespace
#endif

bool supports_float32() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

bool supports_bfloat16() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

torch::Tensor grouped_rows_linear(const torch::Tensor& rows, const torch::Tensor& weight,
                                  const torch::Tensor& starts, const torch::Tensor& experts) {
  TORCH_CHECK(rows.dim() == 2 && weight.dim() == 3 && rows.size(1) == weight.size(2),
              "grouped_rows_linear: rows [N, K] and weight [E, O, K] expected");
  TORCH_CHECK(rows.scalar_type() == weight.scalar_type(), "grouped_rows_linear: rows and weight dtypes differ");
  TORCH_CHECK(rows.device().is_cpu() && weight.device().is_cpu() && starts.device().is_cpu() &&
                  experts.device().is_cpu(),
              "grouped_rows_linear: CPU tensors expected");
  TORCH_CHECK(rows.is_contiguous() && weight.is_contiguous(), "grouped_rows_linear: contiguous tensors expected");
  TORCH_CHECK(starts.scalar_type() == torch::kLong && experts.scalar_type() == torch::kLong &&
                  starts.numel() == experts.numel() + 1,
              "grouped_rows_linear: int64 starts [R + 1] and experts [R] expected");
  const int64_t K = rows.size(1), O = weight.size(1);
  TORCH_CHECK(starts.is_contiguous() && experts.is_contiguous(), "grouped_rows_linear: contiguous runs expected");
  const int64_t* first = starts.data_ptr<int64_t>();
  const int64_t* expert_ids = experts.data_ptr<int64_t>();
  TORCH_CHECK(first[0] == 0 && first[experts.numel()] == rows.size(0), "grouped_rows_linear: runs must cover the rows");
  for (int64_t run = 0; run < experts.numel(); ++run) {  // a bad index would read out of bounds
    TORCH_CHECK(first[run] <= first[run + 1], "grouped_rows_linear: run starts must not decrease");
    TORCH_CHECK(0 <= expert_ids[run] && expert_ids[run] < weight.size(0), "grouped_rows_linear: expert out of range");
  }
  auto out = torch::empty({rows.size(0), O}, rows.options());
#if defined(__AVX512F__)
  if (rows.scalar_type() == torch::kFloat) {
    grouped_rows(rows.data_ptr<float>(), weight.data_ptr<float>(), first, expert_ids, experts.numel(), K, O,
                 out.data_ptr<float>());
    return out;
  }
#if defined(__AVX512BF16__)
  if (rows.scalar_type() == torch::kBFloat16) {
    grouped_rows(rows.data_ptr<at::BFloat16>(), weight.data_ptr<at::BFloat16>(), first, expert_ids,
                 experts.numel(), K, O, out.data_ptr<at::BFloat16>());
    return out;
  }
#endif
#endif
  TORCH_CHECK(false, "grouped_rows_linear: unsupported dtype ", rows.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("grouped_rows_linear", &grouped_rows_linear, "rows grouped by expert times their experts' weights");
  m.def("supports_float32", &supports_float32, "whether this build has the AVX-512 path");
  m.def("supports_bfloat16", &supports_bfloat16, "whether this build has the AVX-512 BF16 path");
}
