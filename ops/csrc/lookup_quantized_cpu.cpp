// CPU kernel of memlayer::lookup_quantized (see ops/lookup_quantized.py for the op).
//
//   out[t] = sum_b weights[t, b] * scale[i] * rows[i],  i = indices[t, b]
//
// rows are int8 or fp8 e4m3 and are dequantized here, row by row, into the fp32 accumulator:
// the table is never copied. Registered as torch.ops.memlayer_quantized_cpu.lookup_forward and
// called only by ops/lookup_quantized_cpu.py, after ops/lookup_quantized.py has checked the
// arguments (indices in range included). The bag loop is ops/csrc/bag.h's, shared with the
// full-precision kernel.

#include <ATen/ATen.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <array>
#include <cstdint>

#include "bag.h"

namespace {

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

// Quantized rows for the shared bag loop: each element dequantized into fp32, and a row's scale
// folded into its weight (one multiply per row, not per element).
template <typename row_t, typename scale_t>
struct ScaledRowReader : memlayer::RowReader<row_t, float> {
  const scale_t* scale;  // [N]

  float weight(int64_t i, float w) const { return w * float(scale[i]); }
  static float value(const row_t* row, int64_t d) { return dequantize(row, d); }
};

template <typename row_t, typename scale_t, typename index_t, typename out_t>
void forward_kernel(const row_t* rows, const scale_t* scale, const index_t* indices,
                    const float* weights, out_t* out, int64_t T, int64_t B, int64_t D) {
  const ScaledRowReader<row_t, scale_t> reader{{rows, D}, scale};
  memlayer::lookup_bags(reader, indices, weights, out, T, B);
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
