// CPU kernel of memlayer::lookup_quantized (see ops/lookup_quantized.py for the op).
//
//   out[t] = sum_b weights[t, b] * scale[i] * rows[i],  i = indices[t, b]
//
// rows are int8 or fp8 e4m3 and are dequantized here, row by row, into the fp32 accumulator:
// the table is never copied. Registered as torch.ops.memlayer_quantized_cpu.lookup_forward and
// called only by ops/lookup_quantized_cpu.py, after ops/lookup_quantized.py has checked the
// arguments (indices in range included).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kPrefetchDistance = 8;
constexpr int64_t kCacheLine = 64;

inline void prefetch_row(const void* row, int64_t row_bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t offset = 0; offset < row_bytes; offset += kCacheLine) {
    __builtin_prefetch(p + offset, /*rw=*/0, /*locality=*/1);
  }
}

// fp8 e4m3 has 256 values: decoding through a table is one load, where the bit arithmetic of
// c10's conversion is a dozen instructions per element.
const std::array<float, 256>& fp8_e4m3_values() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> values{};
    for (int bits = 0; bits < 256; ++bits) {
      values[bits] = float(c10::Float8_e4m3fn(uint8_t(bits), c10::Float8_e4m3fn::from_bits()));
    }
    return values;
  }();
  return table;
}

// One element of a row as a float: int8 converts directly (the loops vectorise), fp8 through
// the table.
inline float dequantize(const int8_t* row, int64_t d) { return float(row[d]); }

inline float dequantize(const c10::Float8_e4m3fn* row, int64_t d) {
  static const float* decode = fp8_e4m3_values().data();
  return decode[reinterpret_cast<const uint8_t*>(row)[d]];
}

template <typename row_t, typename scale_t, typename index_t, typename out_t>
void forward_kernel(const row_t* rows, const scale_t* scale, const index_t* indices,
                    const float* weights, out_t* out, int64_t T, int64_t B, int64_t D) {
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t t = begin; t < end; ++t) {
      const index_t* row_ids = indices + t * B;
      const float* w = weights + t * B;
      std::fill(acc.begin(), acc.end(), 0.0f);
      // A row's scale folds into its weight: one multiply per row, not per element.
      auto row_weight = [&](int64_t b) { return w[b] * float(scale[int64_t(row_ids[b])]); };
      int64_t b = 0;
      // Four rows per pass, as the full-precision kernel: four independent streams of loads in
      // flight, and a quarter of the accumulator traffic.
      for (; b + 4 <= B; b += 4) {
        for (int64_t ahead = b + kPrefetchDistance; ahead < std::min(b + kPrefetchDistance + 4, B); ++ahead) {
          prefetch_row(rows + int64_t(row_ids[ahead]) * D, D * sizeof(row_t));
        }
        const row_t* r0 = rows + int64_t(row_ids[b]) * D;
        const row_t* r1 = rows + int64_t(row_ids[b + 1]) * D;
        const row_t* r2 = rows + int64_t(row_ids[b + 2]) * D;
        const row_t* r3 = rows + int64_t(row_ids[b + 3]) * D;
        const float w0 = row_weight(b), w1 = row_weight(b + 1), w2 = row_weight(b + 2),
                    w3 = row_weight(b + 3);
        for (int64_t d = 0; d < D; ++d) {
          acc[d] += w0 * dequantize(r0, d) + w1 * dequantize(r1, d) + w2 * dequantize(r2, d) +
                    w3 * dequantize(r3, d);
        }
      }
      for (; b < B; ++b) {
        const row_t* r = rows + int64_t(row_ids[b]) * D;
        const float wb = row_weight(b);
        for (int64_t d = 0; d < D; ++d) {
          acc[d] += wb * dequantize(r, d);
        }
      }
      out_t* o = out + t * D;
      for (int64_t d = 0; d < D; ++d) {
        o[d] = out_t(acc[d]);
      }
    }
  });
}

template <typename row_t>
void dispatch_forward(const at::Tensor& rows, const at::Tensor& scale, const at::Tensor& indices,
                      const at::Tensor& weights, at::Tensor& out) {
  const int64_t T = indices.size(0), B = indices.size(1), D = rows.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scale.scalar_type(), "scale", [&] {
    using scale_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "out", [&] {
      using out_t = scalar_t;
      AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "indices", [&] {
        forward_kernel<row_t, scale_t, index_t, out_t>(
            rows.const_data_ptr<row_t>(), scale.const_data_ptr<scale_t>(),
            indices.const_data_ptr<index_t>(), weights.const_data_ptr<float>(),
            out.mutable_data_ptr<out_t>(), T, B, D);
      });
    });
  });
}

at::Tensor lookup_forward(const at::Tensor& rows, const at::Tensor& scale,
                          const at::Tensor& indices, const at::Tensor& weights,
                          at::ScalarType out_dtype) {
  auto rows_c = rows.contiguous();
  auto scale_c = scale.contiguous();
  auto indices_c = indices.contiguous();
  auto weights_c = weights.to(at::kFloat).contiguous();
  auto out = at::empty({indices.size(0), rows.size(1)}, rows.options().dtype(out_dtype));
  if (rows.scalar_type() == at::kChar) {
    dispatch_forward<int8_t>(rows_c, scale_c, indices_c, weights_c, out);
  } else {
    TORCH_CHECK(rows.scalar_type() == at::kFloat8_e4m3fn,
                "lookup_quantized: rows must be int8 or float8_e4m3fn, got ", rows.scalar_type());
    dispatch_forward<c10::Float8_e4m3fn>(rows_c, scale_c, indices_c, weights_c, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(memlayer_quantized_cpu, m) {
  m.def("lookup_forward(Tensor rows, Tensor scale, Tensor indices, Tensor weights, "
        "ScalarType out_dtype) -> Tensor",
        &lookup_forward);
}
