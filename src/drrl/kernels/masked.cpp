// drrl CPU kernels: the masked row operations that RaNA's rank adapters, neuron masks and CATS decode with.
//
//   y[t, :] = bias + sum over kept i of c[t, i] * rows[i, :]
//   kept:  c[t, i]^2 >= tau                  (no scale: a rank adapter's components, RaNA's criterion)
//          |c[t, i]| * scale[i] >= tau       (scale: a neuron mask's weight-column norms)
//          keep[t, i]                        (a mask decided elsewhere: CATS thresholds the gate, not c)
//
// rows is (n, d) row-major (A^T or W_down^T, the layout decode streams), c is (T, n). Each kept row is read once
// (for all T tokens that keep it) and never copied; the mask is decided inside the kernel in the rows' dtype, with
// the rounding of the PyTorch expressions above, so the kept set equals the reference's. Threads split the output
// columns, so every element sums its rows in the same order whatever the thread count (bitwise reproducible).
// float32 and bfloat16 (accumulated in float32, rounded once).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float load(const float* p, int64_t j) { return p[j]; }

inline float load(const at::BFloat16* p, int64_t j) {
  uint16_t bits;
  std::memcpy(&bits, p + j, sizeof(bits));
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

// round a float through the storage type (identity for float32): what a PyTorch op in that dtype stores
template <typename T> inline float through(float x) { return static_cast<float>(static_cast<T>(x)); }

// acc[0:len) += sum_k cf[k] * rows[idx[k]][j0 : j0 + len), four rows per pass
template <typename scalar_t>
void accumulate(float* __restrict__ acc, const scalar_t* rows, int64_t d, int64_t j0, int64_t len,
                const int64_t* idx, const float* cf, int64_t count) {
  int64_t k = 0;
  for (; k + 4 <= count; k += 4) {
    const scalar_t* r0 = rows + idx[k] * d + j0;
    const scalar_t* r1 = rows + idx[k + 1] * d + j0;
    const scalar_t* r2 = rows + idx[k + 2] * d + j0;
    const scalar_t* r3 = rows + idx[k + 3] * d + j0;
    const float a0 = cf[k], a1 = cf[k + 1], a2 = cf[k + 2], a3 = cf[k + 3];
    for (int64_t j = 0; j < len; ++j) {
      acc[j] += a0 * load(r0, j) + a1 * load(r1, j) + a2 * load(r2, j) + a3 * load(r3, j);
    }
  }
  for (; k < count; ++k) {
    const scalar_t* r = rows + idx[k] * d + j0;
    const float a = cf[k];
    for (int64_t j = 0; j < len; ++j) acc[j] += a * load(r, j);
  }
}

template <typename scalar_t>
std::vector<torch::Tensor> run(const torch::Tensor& rows, const torch::Tensor& c, const torch::Tensor& scale,
                               double tau_in, const torch::Tensor& bias, const torch::Tensor& keep) {
  const int64_t n = rows.size(0), d = rows.size(1), T = c.size(0);
  const scalar_t* R = rows.data_ptr<scalar_t>();
  const scalar_t* C = c.data_ptr<scalar_t>();
  const bool scaled = scale.defined();
  const bool* K = keep.defined() ? keep.data_ptr<bool>() : nullptr;
  const float tau = through<scalar_t>(static_cast<float>(tau_in));
  std::vector<float> sc;
  if (scaled) {  // the PyTorch expression casts the float32 norms to the activations' dtype first
    const float* S = scale.data_ptr<float>();
    sc.resize(n);
    for (int64_t i = 0; i < n; ++i) sc[i] = through<scalar_t>(S[i]);
  }
  // kept components per token (ascending i), their coefficients in float32
  std::vector<std::vector<int64_t>> idx(T);
  std::vector<std::vector<float>> coef(T);
  auto active = torch::zeros({T}, torch::kLong);
  int64_t* A = active.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = load(C + t * n, i);
      bool kept;
      if (K) {
        kept = K[t * n + i];
      } else {
        const float s = scaled ? through<scalar_t>(through<scalar_t>(std::fabs(v)) * sc[i]) : through<scalar_t>(v * v);
        kept = s >= tau;
      }
      if (kept) {
        idx[t].push_back(i);
        coef[t].push_back(v);
      }
    }
    A[t] = static_cast<int64_t>(idx[t].size());
  }
  // with several tokens: each row once, for every token that keeps it
  std::vector<int64_t> union_rows, starts, who;
  std::vector<float> union_coef;
  if (T > 1) {
    std::vector<int64_t> pos(T, 0);
    starts.push_back(0);
    for (int64_t i = 0; i < n; ++i) {
      bool any = false;
      for (int64_t t = 0; t < T; ++t) {
        if (pos[t] < A[t] && idx[t][pos[t]] == i) {
          who.push_back(t);
          union_coef.push_back(coef[t][pos[t]]);
          ++pos[t];
          any = true;
        }
      }
      if (any) {
        union_rows.push_back(i);
        starts.push_back(static_cast<int64_t>(who.size()));
      }
    }
  }
  auto y = torch::empty({T, d}, rows.options());
  scalar_t* Y = y.data_ptr<scalar_t>();
  const scalar_t* Bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = ((d + threads - 1) / threads + 15) / 16 * 16;  // columns per task, a multiple of 16
  at::parallel_for(0, (d + chunk - 1) / chunk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> acc;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * chunk, len = std::min(chunk, d - j0);
      acc.assign(static_cast<size_t>(T * len), 0.0f);
      if (T == 1) {
        accumulate(acc.data(), R, d, j0, len, idx[0].data(), coef[0].data(), A[0]);
      } else {
        for (size_t u = 0; u < union_rows.size(); ++u) {
          const scalar_t* r = R + union_rows[u] * d + j0;
          for (int64_t k = starts[u]; k < starts[u + 1]; ++k) {
            float* __restrict__ a = acc.data() + who[k] * len;
            const float cf = union_coef[k];
            for (int64_t j = 0; j < len; ++j) a[j] += cf * load(r, j);
          }
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t j = 0; j < len; ++j) {
          const float v = acc[t * len + j] + (Bp ? load(Bp, j0 + j) : 0.0f);
          Y[t * d + j0 + j] = static_cast<scalar_t>(v);
        }
      }
    }
  });
  return {y, active};
}

std::vector<torch::Tensor> masked_rows(torch::Tensor rows, torch::Tensor c, c10::optional<torch::Tensor> scale,
                                       double tau, c10::optional<torch::Tensor> bias,
                                       c10::optional<torch::Tensor> keep) {
  TORCH_CHECK(rows.dim() == 2 && c.dim() == 2 && c.size(1) == rows.size(0),
              "masked_rows: rows (n, d) and c (T, n) expected, got ", rows.sizes(), " and ", c.sizes());
  TORCH_CHECK(rows.device().is_cpu() && c.device().is_cpu(), "masked_rows: CPU tensors expected");
  TORCH_CHECK(rows.scalar_type() == c.scalar_type(), "masked_rows: rows and c must share a dtype");
  TORCH_CHECK(rows.is_contiguous() && c.is_contiguous(), "masked_rows: contiguous rows and c expected");
  torch::Tensor s, b, k;
  if (keep.has_value()) {
    k = keep.value();
    TORCH_CHECK(k.sizes() == c.sizes() && k.scalar_type() == torch::kBool && k.is_contiguous(),
                "masked_rows: keep must be a contiguous bool tensor shaped like c");
  }
  if (scale.has_value()) {
    s = scale.value();
    TORCH_CHECK(s.dim() == 1 && s.size(0) == rows.size(0) && s.scalar_type() == torch::kFloat && s.is_contiguous(),
                "masked_rows: scale must be a contiguous float32 (n,) tensor");
  }
  if (bias.has_value()) {
    b = bias.value();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == rows.size(1) && b.scalar_type() == rows.scalar_type() &&
                    b.is_contiguous(),
                "masked_rows: bias must be a contiguous (d,) tensor of the rows' dtype");
  }
  if (rows.scalar_type() == torch::kFloat) return run<float>(rows, c, s, tau, b, k);
  TORCH_CHECK(rows.scalar_type() == torch::kBFloat16, "masked_rows: float32 or bfloat16 expected, got ",
              rows.scalar_type());
  return run<at::BFloat16>(rows, c, s, tau, b, k);
}

// out[t, i] = rows[i, :] . x[t, :] where keep[t, i], else 0: each kept row read once for every token that keeps it
// (CATS's up projection: only the rows of the neurons its gate keeps). Threads split the rows; every dot sums in
// one fixed order (eight partial sums, then the tail).
template <typename scalar_t>
torch::Tensor dots_run(const torch::Tensor& rows, const torch::Tensor& x, const torch::Tensor& keep) {
  const int64_t n = rows.size(0), d = rows.size(1), T = x.size(0);
  const scalar_t* R = rows.data_ptr<scalar_t>();
  const bool* K = keep.data_ptr<bool>();
  std::vector<float> xf(static_cast<size_t>(T * d));
  const scalar_t* X = x.data_ptr<scalar_t>();
  for (int64_t k = 0; k < T * d; ++k) xf[k] = load(X, k);
  auto out = torch::zeros({T, n}, rows.options());
  scalar_t* O = out.data_ptr<scalar_t>();
  at::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t* r = R + i * d;
      for (int64_t t = 0; t < T; ++t) {
        if (!K[t * n + i]) continue;
        const float* xt = xf.data() + t * d;
        float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
          for (int k = 0; k < 8; ++k) s[k] += load(r, j + k) * xt[j + k];
        }
        float tail = 0.0f;
        for (; j < d; ++j) tail += load(r, j) * xt[j];
        O[t * n + i] = static_cast<scalar_t>(((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail);
      }
    }
  });
  return out;
}

torch::Tensor masked_dots(torch::Tensor rows, torch::Tensor x, torch::Tensor keep) {
  TORCH_CHECK(rows.dim() == 2 && x.dim() == 2 && x.size(1) == rows.size(1),
              "masked_dots: rows (n, d) and x (T, d) expected, got ", rows.sizes(), " and ", x.sizes());
  TORCH_CHECK(keep.dim() == 2 && keep.size(0) == x.size(0) && keep.size(1) == rows.size(0) &&
                  keep.scalar_type() == torch::kBool && keep.is_contiguous(),
              "masked_dots: keep must be a contiguous (T, n) bool tensor");
  TORCH_CHECK(rows.device().is_cpu() && x.device().is_cpu(), "masked_dots: CPU tensors expected");
  TORCH_CHECK(rows.scalar_type() == x.scalar_type(), "masked_dots: rows and x must share a dtype");
  TORCH_CHECK(rows.is_contiguous() && x.is_contiguous(), "masked_dots: contiguous rows and x expected");
  if (rows.scalar_type() == torch::kFloat) return dots_run<float>(rows, x, keep);
  TORCH_CHECK(rows.scalar_type() == torch::kBFloat16, "masked_dots: float32 or bfloat16 expected, got ",
              rows.scalar_type());
  return dots_run<at::BFloat16>(rows, x, keep);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("masked_rows", &masked_rows, "y = bias + sum of c[t, i] * rows[i] over the kept i (see the file's header)",
        pybind11::arg("rows"), pybind11::arg("c"), pybind11::arg("scale"), pybind11::arg("tau"),
        pybind11::arg("bias"), pybind11::arg("keep") = pybind11::none());
  m.def("masked_dots", &masked_dots, "out[t, i] = rows[i] . x[t] where keep[t, i], else 0",
        pybind11::arg("rows"), pybind11::arg("x"), pybind11::arg("keep"));
}
