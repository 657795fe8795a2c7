// CPU kernels of memlayer::lookup and its two backward ops (see ops/lookup.py for the ops).
//
// Registered as torch.ops.memlayer_cpu.* and called only by ops/lookup_cpu.py, after ops/lookup.py
// has checked the arguments (indices in range included). Every loop is memory bound: rows are
// gathered with a prefetch a few rows ahead, accumulated in fp32 (fp64 for fp64 tables) and the
// work is split over threads with at::parallel_for.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bag.h"

#include <sys/mman.h>

#ifdef __AVX__
#include <immintrin.h>
#endif

#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>

namespace {

using memlayer::kPrefetchDistance;
using memlayer::prefetch_row;
using memlayer::store_row;

// acc += w * row, in the accumulation type.
template <typename acc_t, typename scalar_t>
inline void add_scaled_row(acc_t* acc, acc_t w, const scalar_t* row, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    acc[d] += w * acc_t(row[d]);
  }
}

// <x, row> in the accumulation type. Independent lanes let the compiler vectorise the sum
// (a single running sum is a serial chain it may not reorder) and keep it deterministic.
template <typename acc_t, typename scalar_t>
inline acc_t dot_row(const acc_t* x, const scalar_t* row, int64_t D) {
  constexpr int64_t kLanes = 32;
  acc_t lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      lanes[j] += x[d + j] * acc_t(row[d + j]);
    }
  }
  acc_t dot = 0;
  for (; d < D; ++d) {
    dot += x[d] * acc_t(row[d]);
  }
  for (int64_t j = 0; j < kLanes; ++j) {
    dot += lanes[j];
  }
  return dot;
}

// Rows of the fresh [N, D] value gradient are written once and not read again here: with
// non-temporal (streaming) stores the write does not first read each line into the cache.
// fp32 rows that are whole 32-byte vectors only; everything else takes the plain stores.
template <typename scalar_t, typename acc_t>
inline void stream_row(scalar_t* out, const acc_t* acc, int64_t D) {
#ifdef __AVX__
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (D % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 32 == 0) {
      for (int64_t d = 0; d < D; d += 8) {
        _mm256_stream_ps(out + d, acc == nullptr ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + d));
      }
      return;
    }
  }
#endif
  if (acc == nullptr) {
    std::memset(out, 0, sizeof(scalar_t) * D);
  } else {
    store_row(out, acc, D);
  }
}

// Backs a large fresh tensor with transparent huge pages before its first touch. A freshly
// allocated [N, D] gradient otherwise pays one page fault per 4 KiB page (most of ATen's dense
// embedding_bag backward time); with 2 MiB pages the first touch is several times cheaper.
// Only a hint: where THP is off or unsupported nothing changes.
void advise_huge_pages(const at::Tensor& t) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHugePage - 1);
  if (last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
}

// out[t] = sum_b weights[t, b] * values[indices[t, b]], for bf16/fp16 tables (fp32 and fp64 go
// through ATen's embedding_bag, see ops/lookup.py).
template <typename scalar_t, typename index_t>
void forward_kernel(const scalar_t* values, const index_t* indices,
                    const at::opmath_type<scalar_t>* weights, scalar_t* out, int64_t T, int64_t B,
                    int64_t D) {
  const memlayer::RowReader<scalar_t, at::opmath_type<scalar_t>> reader{values, D};
  memlayer::lookup_bags(reader, indices, weights, out, T, B);
}

at::Tensor lookup_forward(const at::Tensor& values, const at::Tensor& indices,
                          const at::Tensor& weights) {
  const int64_t T = indices.size(0), B = indices.size(1), D = values.size(1);
  auto values_c = values.contiguous();
  auto indices_c = indices.contiguous();
  auto out = at::empty({T, D}, values.options());
  AT_DISPATCH_REDUCED_FLOATING_TYPES(values.scalar_type(), "lookup_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto weights_acc = weights.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "lookup_forward", [&] {
      forward_kernel<scalar_t, index_t>(values_c.const_data_ptr<scalar_t>(),
                                        indices_c.const_data_ptr<index_t>(),
                                        weights_acc.const_data_ptr<acc_t>(),
                                        out.mutable_data_ptr<scalar_t>(), T, B, D);
    });
  });
  return out;
}

// grad_values[n] = sum over the flat positions p with indices[p] == n of weights[p] * grad_out[p / B].
//
// The flat positions p of `indices` grouped by row, as CSR: row r's positions are
// positions[row_starts[r] : row_starts[r + 1]], in increasing p. A counting sort, O(N + T * B):
// the fixed order in which both backward kernels visit a row's hits (bitwise deterministic).
// int32 offsets: half the cache footprint of int64, which the random counting passes feel.
struct RowsCSR {
  at::Tensor row_starts;  // [N + 1] int32
  at::Tensor positions;   // [T * B] int32
};

template <typename index_t>
RowsCSR group_positions_by_row(const at::Tensor& indices, int64_t N) {
  const int64_t M = indices.numel();
  const index_t* rows = indices.const_data_ptr<index_t>();
  auto row_starts = at::zeros({N + 1}, indices.options().dtype(at::kInt));
  auto positions = at::empty({M}, indices.options().dtype(at::kInt));
  int32_t* starts = row_starts.mutable_data_ptr<int32_t>();
  int32_t* out = positions.mutable_data_ptr<int32_t>();
  for (int64_t p = 0; p < M; ++p) {
    ++starts[int64_t(rows[p]) + 1];
  }
  for (int64_t r = 0; r < N; ++r) {
    starts[r + 1] += starts[r];
  }
  std::vector<int32_t> cursor(starts, starts + N);
  for (int64_t p = 0; p < M; ++p) {
    out[cursor[rows[p]]++] = p;
  }
  return {row_starts, positions};
}

RowsCSR group_positions_by_row(const at::Tensor& indices, int64_t N) {
  TORCH_CHECK(indices.numel() < std::numeric_limits<int32_t>::max(),
              "lookup: the CPU backward takes fewer than 2^31 indices per call, got ",
              indices.numel());
  auto indices_c = indices.contiguous();
  return AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "group_positions_by_row", [&] {
    return group_positions_by_row<index_t>(indices_c, N);
  });
}

// grad_values[r] = sum over row r's positions p of weights[p] * grad_out[p / B]. One pass over all
// N rows: a row with hits is summed and stored once, a row without is zero-filled, so every row
// of the fresh [N, D] gradient is written exactly once (no separate zero fill).
template <typename scalar_t>
void values_grad_kernel(const scalar_t* grad_out, const int32_t* row_starts,
                        const int32_t* positions, const at::opmath_type<scalar_t>* weights,
                        int64_t B, int64_t N, int64_t D, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* g = grad + r * D;
      if (row_starts[r] == row_starts[r + 1]) {
        stream_row<scalar_t, acc_t>(g, nullptr, D);
        continue;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t i = row_starts[r]; i < row_starts[r + 1]; ++i) {
        const int64_t p = positions[i];
        add_scaled_row(acc.data(), weights[p], grad_out + (p / B) * D, D);
      }
      stream_row(g, acc.data(), D);
    }
#ifdef __AVX__
    _mm_sfence();  // streaming stores are weakly ordered: publish them before returning
#endif
  });
}

at::Tensor lookup_values_grad(const at::Tensor& grad_out, const at::Tensor& indices,
                              const at::Tensor& weights, int64_t N) {
  const int64_t B = indices.size(1), D = grad_out.size(1);
  const RowsCSR csr = group_positions_by_row(indices, N);
  auto grad = at::empty({N, D}, grad_out.options());
  advise_huge_pages(grad);
  auto grad_out_c = grad_out.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "lookup_values_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto weights_acc = weights.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    values_grad_kernel<scalar_t>(grad_out_c.const_data_ptr<scalar_t>(),
                                 csr.row_starts.const_data_ptr<int32_t>(),
                                 csr.positions.const_data_ptr<int32_t>(),
                                 weights_acc.const_data_ptr<acc_t>(), B, N, D,
                                 grad.mutable_data_ptr<scalar_t>());
  });
  return grad;
}

// grad_weights[t, b] = <grad_out[t], values[indices[t, b]]>, in the accumulation dtype.
template <typename scalar_t, typename index_t>
void weights_grad_kernel(const scalar_t* grad_out, const scalar_t* values, const index_t* indices,
                         at::opmath_type<scalar_t>* grad_weights, int64_t T, int64_t B, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dy(D);
    for (int64_t t = begin; t < end; ++t) {
      std::copy(grad_out + t * D, grad_out + (t + 1) * D, dy.begin());
      const index_t* row_ids = indices + t * B;
      for (int64_t b = 0; b < B; ++b) {
        if (b + kPrefetchDistance < B) {
          prefetch_row(values + int64_t(row_ids[b + kPrefetchDistance]) * D, D * sizeof(scalar_t));
        }
        grad_weights[t * B + b] = dot_row(dy.data(), values + int64_t(row_ids[b]) * D, D);
      }
    }
  });
}

at::Tensor lookup_weights_grad(const at::Tensor& grad_out, const at::Tensor& values,
                               const at::Tensor& indices) {
  const int64_t T = indices.size(0), B = indices.size(1), D = values.size(1);
  auto grad_out_c = grad_out.contiguous();
  auto values_c = values.contiguous();
  auto indices_c = indices.contiguous();
  at::Tensor grad_weights;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "lookup_weights_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    grad_weights = at::empty({T, B}, values.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "lookup_weights_grad", [&] {
      weights_grad_kernel<scalar_t, index_t>(grad_out_c.const_data_ptr<scalar_t>(),
                                             values_c.const_data_ptr<scalar_t>(),
                                             indices_c.const_data_ptr<index_t>(),
                                             grad_weights.mutable_data_ptr<acc_t>(), T, B, D);
    });
  });
  return grad_weights;
}

}  // namespace

TORCH_LIBRARY(memlayer_cpu, m) {
  m.def("lookup_forward(Tensor values, Tensor indices, Tensor weights) -> Tensor", &lookup_forward);
  m.def("lookup_values_grad(Tensor grad_out, Tensor indices, Tensor weights, int N) -> Tensor",
        &lookup_values_grad);
  m.def("lookup_weights_grad(Tensor grad_out, Tensor values, Tensor indices) -> Tensor",
        &lookup_weights_grad);
}
