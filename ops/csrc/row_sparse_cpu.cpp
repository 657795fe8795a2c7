// CPU kernels of the row-sparse value-table update (see ops/row_sparse.py for the ops).
//
// Registered as torch.ops.memlayer_row_sparse_cpu.* and called only by ops/row_sparse_cpu.py,
// after ops/row_sparse.py has checked the arguments. The value gradient is never stored: a
// touched row's gradient
//
//     g[u] = grad_scale * sum_{i in [row_starts[u], row_starts[u + 1])} weights[p_i] * grad_out[p_i / B]
//
// (p_i = positions[i], a flat position in the recorded [M, B] bags) is summed into a D-float
// scratch row, in the fixed order of `positions`, and used at once: bitwise deterministic, and
// the only [*, D] memory touched is the table's (and Adam's state's) touched rows. Rows are
// unique, so threads own disjoint rows.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kCacheLine = 64;
constexpr int64_t kRowsAhead = 4;

inline void prefetch_for_write(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t offset = 0; offset < bytes; offset += kCacheLine) {
    __builtin_prefetch(p + offset, /*rw=*/1, /*locality=*/1);
  }
}

// The rule codes and the positions of the packed hyperparameters of ops/table_rule.py (Rule,
// Hyper): one descriptor, TableRule.packed(), read the same way here and by the Triton launcher.
enum class Rule : int64_t { kSGD = 0, kRowwiseAdagrad = 1, kAdam = 2 };
enum Hyper : int64_t {
  kLr = 0,
  kEps,
  kBeta1,
  kBeta2,
  kWeightDecay,
  kBiasCorrection1,
  kBiasCorrection2Sqrt,
  kNumHyper
};

struct Bags {
  const float* grad_out;     // [M, D] the recorded output gradients
  const float* weights;      // [M, B] the recorded bag weights
  const int64_t* row_starts; // [U + 1]
  const int64_t* positions;  // [P] flat positions into the bags, grouped by row
  int64_t B, D;
};

// g = sum over row u's positions of weights[p] * grad_out[p / B] (unscaled).
inline void row_gradient(const Bags& bags, int64_t u, float* g) {
  const int64_t D = bags.D;
  std::fill(g, g + D, 0.0f);
  const int64_t end = bags.row_starts[u + 1];
  for (int64_t i = bags.row_starts[u]; i < end; ++i) {
    const int64_t p = bags.positions[i];
    if (i + 4 < end) {  // the next hits' output rows, while this one is summed
      const char* ahead = reinterpret_cast<const char*>(bags.grad_out + (bags.positions[i + 4] / bags.B) * D);
      for (int64_t offset = 0; offset < D * int64_t(sizeof(float)); offset += kCacheLine) {
        __builtin_prefetch(ahead + offset, 0, 1);
      }
    }
    const float w = bags.weights[p];
    const float* row = bags.grad_out + (p / bags.B) * D;
    for (int64_t d = 0; d < D; ++d) {
      g[d] += w * row[d];
    }
  }
}

// Sum of squares in fp64: the lanes keep it vectorisable and its order fixed.
inline double sum_of_squares(const float* g, int64_t D) {
  constexpr int64_t kLanes = 8;
  double lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      lanes[j] += double(g[d + j]) * double(g[d + j]);
    }
  }
  double total = 0;
  for (; d < D; ++d) {
    total += double(g[d]) * double(g[d]);
  }
  for (int64_t j = 0; j < kLanes; ++j) {
    total += lanes[j];
  }
  return total;
}

Bags bags_of(const at::Tensor& grad_out, const at::Tensor& weights, const at::Tensor& row_starts,
             const at::Tensor& positions) {
  return {grad_out.const_data_ptr<float>(), weights.const_data_ptr<float>(),
          row_starts.const_data_ptr<int64_t>(), positions.const_data_ptr<int64_t>(),
          weights.size(1), grad_out.size(1)};
}

at::Tensor row_sq_norms(const at::Tensor& grad_out, const at::Tensor& weights,
                        const at::Tensor& row_starts, const at::Tensor& positions) {
  const int64_t U = row_starts.size(0) - 1;
  auto norms = at::empty({U}, grad_out.options().dtype(at::kDouble));
  const Bags bags = bags_of(grad_out, weights, row_starts, positions);
  double* out = norms.mutable_data_ptr<double>();
  at::parallel_for(0, U, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> g(bags.D);
    for (int64_t u = begin; u < end; ++u) {
      row_gradient(bags, u, g.data());
      out[u] = sum_of_squares(g.data(), bags.D);
    }
  });
  return norms;
}

struct Hyperparameters {
  float lr, eps, beta1, beta2, weight_decay, bias1, bias2_sqrt, grad_scale;

  Hyperparameters(at::ArrayRef<double> packed, double grad_scale)
      : lr(float(packed[kLr])), eps(float(packed[kEps])), beta1(float(packed[kBeta1])),
        beta2(float(packed[kBeta2])), weight_decay(float(packed[kWeightDecay])),
        bias1(float(packed[kBiasCorrection1])), bias2_sqrt(float(packed[kBiasCorrection2Sqrt])),
        grad_scale(float(grad_scale)) {}
};

template <typename scalar_t>
void update_kernel(scalar_t* table, std::vector<float*> state, const Bags& bags,
                   const int64_t* rows, const double* row_mean_sq, int64_t U, Rule rule,
                   const Hyperparameters& h) {
  const int64_t D = bags.D;
  at::parallel_for(0, U, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> g(D);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = rows[u];
      scalar_t* w = table + r * D;
      if (u + kRowsAhead < end) {  // touched rows are scattered: fetch the next ones early
        const int64_t ahead = rows[u + kRowsAhead];
        prefetch_for_write(table + ahead * D, D * int64_t(sizeof(scalar_t)));
        if (rule == Rule::kAdam) {
          prefetch_for_write(state[0] + ahead * D, D * int64_t(sizeof(float)));
          prefetch_for_write(state[1] + ahead * D, D * int64_t(sizeof(float)));
        } else if (rule == Rule::kRowwiseAdagrad) {
          prefetch_for_write(state[0] + ahead, int64_t(sizeof(float)));
        }
      }
      row_gradient(bags, u, g.data());
      for (int64_t d = 0; d < D; ++d) {
        g[d] *= h.grad_scale;
      }
      switch (rule) {
        case Rule::kSGD:
          for (int64_t d = 0; d < D; ++d) {
            const float wd = float(w[d]);
            w[d] = scalar_t(wd - h.lr * (g[d] + h.weight_decay * wd));
          }
          break;
        case Rule::kRowwiseAdagrad: {
          // FBGEMM's row-wise AdaGrad with L2 weight decay (its weight_decay_mode 1).
          double mean_sq;
          if (h.weight_decay != 0.0f || row_mean_sq == nullptr) {
            std::vector<float> decayed(g);
            for (int64_t d = 0; d < D; ++d) {
              decayed[d] += h.weight_decay * float(w[d]);
            }
            mean_sq = sum_of_squares(decayed.data(), D) / double(D);
          } else {
            mean_sq = row_mean_sq[u] * double(h.grad_scale) * double(h.grad_scale);
          }
          float& accumulator = state[0][r];
          accumulator += float(mean_sq);
          const float multiplier = h.lr / (std::sqrt(accumulator) + h.eps);
          const float correction = 1.0f - multiplier * h.weight_decay;
          for (int64_t d = 0; d < D; ++d) {
            w[d] = scalar_t(correction * float(w[d]) - multiplier * g[d]);
          }
          break;
        }
        case Rule::kAdam: {
          float* m = state[0] + r * D;
          float* v = state[1] + r * D;
          const float step_size = h.lr / h.bias1;
          const float decay = 1.0f - h.lr * h.weight_decay;
          for (int64_t d = 0; d < D; ++d) {
            m[d] = h.beta1 * m[d] + (1.0f - h.beta1) * g[d];
            v[d] = h.beta2 * v[d] + (1.0f - h.beta2) * g[d] * g[d];
            const float denom = std::sqrt(v[d]) / h.bias2_sqrt + h.eps;
            w[d] = scalar_t(float(w[d]) * decay - step_size * m[d] / denom);
          }
          break;
        }
      }
    }
  });
}

void row_update(const at::Tensor& table, at::TensorList state, const at::Tensor& grad_out,
                const at::Tensor& weights, const at::Tensor& rows, const at::Tensor& row_starts,
                const at::Tensor& positions, const std::optional<at::Tensor>& row_mean_sq,
                int64_t rule, at::ArrayRef<double> hyperparameters, double grad_scale) {
  TORCH_CHECK(int64_t(hyperparameters.size()) == kNumHyper, "row_update: ", kNumHyper,
              " hyperparameters expected, got ", hyperparameters.size());
  const Bags bags = bags_of(grad_out, weights, row_starts, positions);
  std::vector<float*> state_ptrs;
  for (const auto& s : state) {
    state_ptrs.push_back(s.data_ptr<float>());
  }
  const double* mean_sq = row_mean_sq.has_value() ? row_mean_sq->const_data_ptr<double>() : nullptr;
  const Hyperparameters hyper(hyperparameters, grad_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.scalar_type(), "row_update", [&] {
    update_kernel<scalar_t>(table.data_ptr<scalar_t>(), state_ptrs, bags,
                            rows.const_data_ptr<int64_t>(), mean_sq, rows.size(0), Rule(rule), hyper);
  });
}

}  // namespace

TORCH_LIBRARY(memlayer_row_sparse_cpu, m) {
  m.def("row_sq_norms(Tensor grad_out, Tensor weights, Tensor row_starts, Tensor positions) -> Tensor",
        &row_sq_norms);
  m.def(
      "row_update(Tensor(a!) table, Tensor(b!)[] state, Tensor grad_out, Tensor weights, Tensor rows, "
      "Tensor row_starts, Tensor positions, Tensor? row_mean_sq, int rule, float[] hyperparameters, "
      "float grad_scale) -> ()",
      &row_update);
}
