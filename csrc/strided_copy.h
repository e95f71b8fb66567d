// Batched 2-D strided copies on raw pointers: the primitive a reshard plan executes.
//
// One block copies `rows` rows of `row_bytes` bytes; row r goes from src + r*src_stride to
// dst + r*dst_stride (strides in bytes). Blocks are split into chunks of about `chunk_bytes` and
// spread over the thread pool; the caller guarantees that destination ranges do not overlap.
#pragma once

#include <cstddef>
#include <cstdint>

namespace k15 {

struct CopyBlock {
  std::uintptr_t src;
  std::uintptr_t dst;
  std::int64_t rows;
  std::int64_t row_bytes;
  std::int64_t src_stride;
  std::int64_t dst_stride;
};

// Executes all blocks with `num_threads` threads (0 = hardware concurrency). Thread-safe.
void strided_copy(const CopyBlock* blocks, std::size_t n_blocks, std::size_t num_threads,
                  std::size_t chunk_bytes);

}  // namespace k15
