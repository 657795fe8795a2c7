// The bag loop shared by the CPU lookup kernels (ops/csrc/lookup_cpu.cpp, full-precision tables,
// and ops/csrc/lookup_quantized_cpu.cpp, int8/fp8 tables):
//
//   out[t] = sum_b weights[t, b] * table[indices[t, b]]
//
// The loop is templated over a row reader, which says how a row's elements read in the
// accumulation type and what weight a row gets (a quantized row's scale folds into its weight).
// ops/_cpu_build.py keys a build on this header too, so editing it rebuilds both kernels.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace memlayer {

constexpr int64_t kPrefetchDistance = 8;
constexpr int64_t kCacheLine = 64;

// Gathered rows are random: ask for the whole row a few rows ahead, not just its first line.
inline void prefetch_row(const void* row, int64_t row_bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t offset = 0; offset < row_bytes; offset += kCacheLine) {
    __builtin_prefetch(p + offset, /*rw=*/0, /*locality=*/1);
  }
}

template <typename out_t, typename acc_t>
inline void store_row(out_t* out, const acc_t* acc, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    out[d] = out_t(acc[d]);
  }
}

// The plain row reader: rows of `row_t` cast to `acc_t`, each with its bag weight as is. A reader
// of another storage derives from it and hides `value` and `weight`.
template <typename row_type, typename acc_type>
struct RowReader {
  using row_t = row_type;
  using acc_t = acc_type;

  const row_t* rows;  // [N, D], contiguous
  int64_t D;

  const row_t* row(int64_t i) const { return rows + i * D; }
  int64_t row_bytes() const { return D * int64_t(sizeof(row_t)); }
  acc_t weight(int64_t /*i*/, acc_t w) const { return w; }
  static acc_t value(const row_t* row, int64_t d) { return acc_t(row[d]); }
};

// acc = sum_b weights[b] * row(row_ids[b]) over one bag of B rows.
template <typename Reader, typename index_t>
inline void sum_bag(const Reader& reader, const index_t* row_ids,
                    const typename Reader::acc_t* weights, int64_t B,
                    typename Reader::acc_t* acc) {
  using acc_t = typename Reader::acc_t;
  using row_t = typename Reader::row_t;
  const int64_t D = reader.D;
  std::fill(acc, acc + D, acc_t(0));
  auto weight = [&](int64_t b) { return reader.weight(int64_t(row_ids[b]), weights[b]); };
  int64_t b = 0;
  // Four rows per pass: four independent streams of loads in flight, and a quarter of the
  // accumulator traffic.
  for (; b + 4 <= B; b += 4) {
    for (int64_t ahead = b + kPrefetchDistance; ahead < std::min(b + kPrefetchDistance + 4, B); ++ahead) {
      prefetch_row(reader.row(int64_t(row_ids[ahead])), reader.row_bytes());
    }
    const row_t* r0 = reader.row(int64_t(row_ids[b]));
    const row_t* r1 = reader.row(int64_t(row_ids[b + 1]));
    const row_t* r2 = reader.row(int64_t(row_ids[b + 2]));
    const row_t* r3 = reader.row(int64_t(row_ids[b + 3]));
    const acc_t w0 = weight(b), w1 = weight(b + 1), w2 = weight(b + 2), w3 = weight(b + 3);
    for (int64_t d = 0; d < D; ++d) {
      acc[d] += w0 * Reader::value(r0, d) + w1 * Reader::value(r1, d) +
                w2 * Reader::value(r2, d) + w3 * Reader::value(r3, d);
    }
  }
  for (; b < B; ++b) {
    const row_t* r = reader.row(int64_t(row_ids[b]));
    const acc_t wb = weight(b);
    for (int64_t d = 0; d < D; ++d) {
      acc[d] += wb * Reader::value(r, d);
    }
  }
}

// out[t] = sum_b weights[t, b] * row(indices[t, b]) for the T bags of B rows, over threads.
template <typename Reader, typename index_t, typename out_t>
void lookup_bags(const Reader& reader, const index_t* indices,
                 const typename Reader::acc_t* weights, out_t* out, int64_t T, int64_t B) {
  const int64_t D = reader.D;
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<typename Reader::acc_t> acc(D);
    for (int64_t t = begin; t < end; ++t) {
      sum_bag(reader, indices + t * B, weights + t * B, B, acc.data());
      store_row(out + t * D, acc.data(), D);
    }
  });
}

}  // namespace memlayer
