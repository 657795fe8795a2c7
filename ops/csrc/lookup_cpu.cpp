// CPU kernels of memlayer::lookup and its two backward ops (see ops/lookup.py for the ops).
//
// Registered as torch.ops.memlayer_cpu.* and called only by ops/_native.py, which validates the
// arguments first. Every loop is memory bound: rows are gathered with a prefetch a few rows
// ahead, accumulated in fp32 (fp64 for fp64 tables) and the work is split over threads with
// at::parallel_for.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <cstring>
#include <vector>

namespace {

constexpr int64_t kPrefetchDistance = 8;
constexpr int64_t kCacheLine = 64;

// Gathered rows are random: ask for the whole row a few rows ahead, not just its first line.
inline void prefetch_row(const void* row, int64_t row_bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t offset = 0; offset < row_bytes; offset += kCacheLine) {
    __builtin_prefetch(p + offset, /*rw=*/0, /*locality=*/1);
  }
}

// acc += w * row, in the accumulation type.
template <typename acc_t, typename scalar_t>
inline void add_scaled_row(acc_t* acc, acc_t w, const scalar_t* row, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    acc[d] += w * acc_t(row[d]);
  }
}

template <typename scalar_t, typename acc_t>
inline void store_row(scalar_t* out, const acc_t* acc, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    out[d] = scalar_t(acc[d]);
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
// through ATen's embedding_bag, see ops/_native.py).
template <typename scalar_t, typename index_t>
void forward_kernel(const scalar_t* values, const index_t* indices,
                    const at::opmath_type<scalar_t>* weights, scalar_t* out, int64_t T, int64_t B,
                    int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    for (int64_t t = begin; t < end; ++t) {
      const index_t* row_ids = indices + t * B;
      const acc_t* w = weights + t * B;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      int64_t b = 0;
      // Four rows per pass: four independent streams of loads in flight, and a quarter of the
      // accumulator traffic.
      for (; b + 4 <= B; b += 4) {
        for (int64_t ahead = b + kPrefetchDistance; ahead < std::min(b + kPrefetchDistance + 4, B); ++ahead) {
          prefetch_row(values + int64_t(row_ids[ahead]) * D, D * sizeof(scalar_t));
        }
        const scalar_t* r0 = values + int64_t(row_ids[b]) * D;
        const scalar_t* r1 = values + int64_t(row_ids[b + 1]) * D;
        const scalar_t* r2 = values + int64_t(row_ids[b + 2]) * D;
        const scalar_t* r3 = values + int64_t(row_ids[b + 3]) * D;
        const acc_t w0 = w[b], w1 = w[b + 1], w2 = w[b + 2], w3 = w[b + 3];
        for (int64_t d = 0; d < D; ++d) {
          acc[d] += w0 * acc_t(r0[d]) + w1 * acc_t(r1[d]) + w2 * acc_t(r2[d]) + w3 * acc_t(r3[d]);
        }
      }
      for (; b < B; ++b) {
        add_scaled_row(acc.data(), w[b], values + int64_t(row_ids[b]) * D, D);
      }
      store_row(out + t * D, acc.data(), D);
    }
  });
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
// `sorted_rows` holds the flat indices sorted (stably), `order` the flat position of each. Each
// touched row is one segment, summed in the fixed stable-sort order (bitwise deterministic) and
// stored once; the untouched rows between segments are zero-filled by the same thread, so every
// row of the fresh [N, D] gradient is written exactly once.
template <typename scalar_t>
void values_grad_kernel(const scalar_t* grad_out, const int64_t* sorted_rows, const int64_t* order,
                        const at::opmath_type<scalar_t>* weights, const int64_t* segment_starts,
                        int64_t num_segments, int64_t num_positions, int64_t B, int64_t N,
                        int64_t D, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  // Segment s covers positions [segment_starts[s], segment_starts[s + 1]); the zero rows that
  // follow segment s (up to the next touched row) belong to it, and those before the first
  // touched row to segment 0.
  at::parallel_for(0, num_segments, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t first = segment_starts[s];
      const int64_t last = s + 1 < num_segments ? segment_starts[s + 1] : num_positions;
      const int64_t row = sorted_rows[first];
      if (s == 0 && row > 0) {
        std::memset(grad, 0, sizeof(scalar_t) * row * D);
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t p = first; p < last; ++p) {
        const int64_t position = order[p];
        add_scaled_row(acc.data(), weights[position], grad_out + (position / B) * D, D);
      }
      scalar_t* g = grad + row * D;
      store_row(g, acc.data(), D);
      const int64_t next_row = s + 1 < num_segments ? sorted_rows[last] : N;
      if (next_row > row + 1) {
        std::memset(g + D, 0, sizeof(scalar_t) * (next_row - row - 1) * D);
      }
    }
  });
}

at::Tensor lookup_values_grad(const at::Tensor& grad_out, const at::Tensor& sorted_rows,
                              const at::Tensor& order, const at::Tensor& weights,
                              const at::Tensor& segment_starts, int64_t B, int64_t N) {
  const int64_t D = grad_out.size(1);
  auto grad = at::empty({N, D}, grad_out.options());
  advise_huge_pages(grad);
  const int64_t num_segments = segment_starts.numel();
  if (num_segments == 0) {
    return grad.zero_();
  }
  auto grad_out_c = grad_out.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "lookup_values_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto weights_acc = weights.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    values_grad_kernel<scalar_t>(grad_out_c.const_data_ptr<scalar_t>(),
                                 sorted_rows.const_data_ptr<int64_t>(),
                                 order.const_data_ptr<int64_t>(), weights_acc.const_data_ptr<acc_t>(),
                                 segment_starts.const_data_ptr<int64_t>(), num_segments,
                                 sorted_rows.numel(), B, N, D, grad.mutable_data_ptr<scalar_t>());
  });
  return grad;
}

// grad_weights[p] = <grad_out[p / B], values[sorted_rows[p']]> for each flat position p = order[p'].
//
// Walking the positions in row order streams through the table in increasing address order and
// reads a row hit several times once, instead of gathering T * B rows at random.
template <typename scalar_t>
void weights_grad_kernel(const scalar_t* grad_out, const scalar_t* values,
                         const int64_t* sorted_rows, const int64_t* order,
                         at::opmath_type<scalar_t>* grad_weights, int64_t num_positions,
                         int64_t B, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, num_positions, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      if (p + kPrefetchDistance < end) {
        prefetch_row(values + sorted_rows[p + kPrefetchDistance] * D, D * sizeof(scalar_t));
      }
      const scalar_t* row = values + sorted_rows[p] * D;
      const scalar_t* dy = grad_out + (order[p] / B) * D;
      acc_t dot = 0;
      for (int64_t d = 0; d < D; ++d) {
        dot += acc_t(dy[d]) * acc_t(row[d]);
      }
      grad_weights[order[p]] = dot;
    }
  });
}

at::Tensor lookup_weights_grad(const at::Tensor& grad_out, const at::Tensor& values,
                               const at::Tensor& sorted_rows, const at::Tensor& order, int64_t T,
                               int64_t B) {
  const int64_t D = values.size(1);
  auto grad_out_c = grad_out.contiguous();
  auto values_c = values.contiguous();
  at::Tensor grad_weights;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "lookup_weights_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    grad_weights = at::empty({T, B}, values.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    weights_grad_kernel<scalar_t>(grad_out_c.const_data_ptr<scalar_t>(),
                                  values_c.const_data_ptr<scalar_t>(),
                                  sorted_rows.const_data_ptr<int64_t>(),
                                  order.const_data_ptr<int64_t>(),
                                  grad_weights.mutable_data_ptr<acc_t>(), sorted_rows.numel(), B, D);
  });
  return grad_weights;
}

}  // namespace

TORCH_LIBRARY(memlayer_cpu, m) {
  m.def("lookup_forward(Tensor values, Tensor indices, Tensor weights) -> Tensor", &lookup_forward);
  m.def(
      "lookup_values_grad(Tensor grad_out, Tensor sorted_rows, Tensor order, Tensor weights, "
      "Tensor segment_starts, int B, int N) -> Tensor",
      &lookup_values_grad);
  m.def(
      "lookup_weights_grad(Tensor grad_out, Tensor values, Tensor sorted_rows, Tensor order, "
      "int T, int B) -> Tensor",
      &lookup_weights_grad);
}
