#include "strided_copy.h"

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define K15_STREAMING_STORES 1
#endif

#include "thread_pool.h"

namespace k15 {
namespace {

struct Chunk {
  std::size_t block;
  std::int64_t row_begin;
  std::int64_t row_end;
};

// memcpy with non-temporal (cache-bypassing) stores for the aligned body: a copy much larger than the
// caches then writes each destination line once instead of reading it first (read-for-ownership), and
// does not evict the source. Falls back to memcpy where SSE2 is not available.
void stream_copy(char* dst, const char* src, std::size_t n) {
#ifdef K15_STREAMING_STORES
  const std::size_t head = std::min(n, (16 - (reinterpret_cast<std::uintptr_t>(dst) & 15)) & 15);
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  n -= head;
  const std::size_t lines = n / 64;
  for (std::size_t i = 0; i < lines; ++i, dst += 64, src += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 48), d);
  }
  std::memcpy(dst, src, n - lines * 64);
#else
  std::memcpy(dst, src, n);
#endif
}

void copy_rows(const CopyBlock& b, std::int64_t r0, std::int64_t r1, bool streaming) {
  const auto* src = reinterpret_cast<const char*>(b.src);
  auto* dst = reinterpret_cast<char*>(b.dst);
  auto copy = streaming ? stream_copy : [](char* d, const char* s, std::size_t n) { std::memcpy(d, s, n); };
  if (b.src_stride == b.row_bytes && b.dst_stride == b.row_bytes) {  // contiguous: one copy
    copy(dst + r0 * b.row_bytes, src + r0 * b.row_bytes, static_cast<std::size_t>((r1 - r0) * b.row_bytes));
  } else {
    for (std::int64_t r = r0; r < r1; ++r) {
      copy(dst + r * b.dst_stride, src + r * b.src_stride, static_cast<std::size_t>(b.row_bytes));
    }
  }
#ifdef K15_STREAMING_STORES
  if (streaming) _mm_sfence();  // streamed stores are globally visible before the task is reported done
#endif
}

}  // namespace

void strided_copy(const CopyBlock* blocks, std::size_t n_blocks, std::size_t num_threads,
                  std::size_t chunk_bytes, int streaming) {
  chunk_bytes = std::max<std::size_t>(chunk_bytes, 4096);
  std::vector<Chunk> chunks;
  std::size_t total = 0;
  for (std::size_t i = 0; i < n_blocks; ++i) {
    const CopyBlock& b = blocks[i];
    if (b.rows <= 0 || b.row_bytes <= 0) continue;
    total += static_cast<std::size_t>(b.rows * b.row_bytes);
    // A single row larger than a chunk is split by rows only; rows are never split.
    const std::int64_t rows_per_chunk =
        std::max<std::int64_t>(1, static_cast<std::int64_t>(chunk_bytes) / b.row_bytes);
    for (std::int64_t r = 0; r < b.rows; r += rows_per_chunk) {
      chunks.push_back({i, r, std::min(b.rows, r + rows_per_chunk)});
    }
  }
  const bool stream = streaming > 0 || (streaming < 0 && total >= kStreamingThresholdBytes);
  ThreadPool& pool = ThreadPool::global(num_threads);
  pool.parallel_for(chunks.size(), [&](std::size_t c) {
    const Chunk& ch = chunks[c];
    copy_rows(blocks[ch.block], ch.row_begin, ch.row_end, stream);
  });
}

}  // namespace k15
