// modes' CPU kernel as its aarch64 builds (NEON, SVE256) compile it, against at::linear: every tail of K
// and O and every tile height, in fp32, bf16 and fp16 (what tests/engine/test_compiled.py checks
// for the builds the test machine runs). Built and run by check.sh, under qemu where no aarch64
// machine is at hand; exits 1 on any mismatch.
#include "grouped_rows.cpp"  // the kernel's translation unit, with the build flags of the NEON build

#include <ATen/ATen.h>

#include <cstdio>
#include <vector>

int main() {
  struct Case { at::ScalarType dtype; double rtol, atol; };
  const Case cases[] = {{at::kFloat, 1e-5, 1e-5}, {at::kBFloat16, 2e-2, 2e-2}, {at::kHalf, 5e-3, 5e-3}};
  const int64_t heights[] = {1, 2, 3, 4, 5, 6, 7, 13};
  const std::pair<int64_t, int64_t> shapes[] = {{64, 32}, {37, 6}, {16, 1}, {33, 129}, {7, 3}};  // K, O
  int checked = 0, failed = 0;
  for (const Case& c : cases) {
    for (int64_t rows : heights) {
      for (auto [K, O] : shapes) {
        at::manual_seed(rows);
        const at::Tensor weight = at::randn({5, O, K}).to(c.dtype);  // [E, O, K]
        const at::Tensor experts = at::tensor(std::vector<int64_t>{3, 0, 4, 1});  // one run empty
        const std::vector<int64_t> counts = {rows, std::max<int64_t>(rows - 1, 1), 0, rows + 2};
        std::vector<int64_t> starts_v = {0};
        for (int64_t n : counts) starts_v.push_back(starts_v.back() + n);
        const at::Tensor x = at::randn({starts_v.back(), K}).to(c.dtype);  // [N, K]
        const at::Tensor got = grouped_rows_linear(x, weight, at::tensor(starts_v), experts);
        std::vector<at::Tensor> parts;
        for (int64_t r = 0; r < 4; ++r) {
          const at::Tensor run = x.slice(0, starts_v[r], starts_v[r + 1]).to(at::kFloat);
          parts.push_back(at::linear(run, weight[experts[r].item<int64_t>()].to(at::kFloat)));
        }
        const bool ok = got.scalar_type() == c.dtype && at::allclose(got.to(at::kFloat), at::cat(parts), c.rtol, c.atol);
        ++checked;
        if (!ok) {
          ++failed;
          std::printf("MISMATCH dtype=%s rows=%ld K=%ld O=%ld\n", c10::toString(c.dtype), rows, K, O);
        }
      }
    }
  }
  std::printf("%s build, %d floats per vector: %d of %d cases equal at::linear\n",
#if defined(CPU_CAPABILITY_SVE256)
              "SVE256",
#elif defined(__ARM_NEON)
              "NEON",
#else
              "non-NEON",
#endif
              static_cast<int>(Vec::size()), checked - failed, checked);
  return failed ? 1 : 0;
}
