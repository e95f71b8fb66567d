#include "strided_copy.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "thread_pool.h"

namespace k15 {
namespace {

struct Chunk {
  std::size_t block;
  std::int64_t row_begin;
  std::int64_t row_end;
};

void copy_rows(const CopyBlock& b, std::int64_t r0, std::int64_t r1) {
  const auto* src = reinterpret_cast<const char*>(b.src);
  auto* dst = reinterpret_cast<char*>(b.dst);
  if (b.src_stride == b.row_bytes && b.dst_stride == b.row_bytes) {  // contiguous: one memcpy
    std::memcpy(dst + r0 * b.row_bytes, src + r0 * b.row_bytes,
                static_cast<std::size_t>((r1 - r0) * b.row_bytes));
    return;
  }
  for (std::int64_t r = r0; r < r1; ++r) {
    std::memcpy(dst + r * b.dst_stride, src + r * b.src_stride, static_cast<std::size_t>(b.row_bytes));
  }
}

}  // namespace

void strided_copy(const CopyBlock* blocks, std::size_t n_blocks, std::size_t num_threads,
                  std::size_t chunk_bytes) {
  chunk_bytes = std::max<std::size_t>(chunk_bytes, 4096);
  std::vector<Chunk> chunks;
  for (std::size_t i = 0; i < n_blocks; ++i) {
    const CopyBlock& b = blocks[i];
    if (b.rows <= 0 || b.row_bytes <= 0) continue;
    // A single row larger than a chunk is split by rows only; rows are never split.
    const std::int64_t rows_per_chunk =
        std::max<std::int64_t>(1, static_cast<std::int64_t>(chunk_bytes) / b.row_bytes);
    for (std::int64_t r = 0; r < b.rows; r += rows_per_chunk) {
      chunks.push_back({i, r, std::min(b.rows, r + rows_per_chunk)});
    }
  }
  ThreadPool& pool = ThreadPool::global(num_threads);
  pool.parallel_for(chunks.size(), [&](std::size_t c) {
    const Chunk& ch = chunks[c];
    copy_rows(blocks[ch.block], ch.row_begin, ch.row_end);
  });
}

}  // namespace k15
