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

// Copies of at least this many bytes in all use streaming stores in the automatic mode: they are far
// larger than the last-level cache, so caching the destination only costs a read per written line.
constexpr std::size_t kStreamingThresholdBytes = std::size_t{64} << 20;

// Executes all blocks with `num_threads` threads (0 = hardware concurrency). Thread-safe.
// streaming: 1 = non-temporal stores, 0 = memcpy, -1 = automatic (by total size).
void strided_copy(const CopyBlock* blocks, std::size_t n_blocks, std::size_t num_threads,
                  std::size_t chunk_bytes, int streaming = -1);

}  // namespace k15
