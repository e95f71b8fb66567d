// Python bindings of k15sys._C.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>

#include "strided_copy.h"
#include "thread_pool.h"

namespace py = pybind11;

namespace {

// blocks: int64 array of shape [n, 6] with columns (src_ptr, dst_ptr, rows, row_bytes,
// src_stride_bytes, dst_stride_bytes).
void py_strided_copy(py::array_t<std::int64_t, py::array::c_style | py::array::forcecast> blocks,
                     std::size_t num_threads, std::size_t chunk_bytes, std::optional<bool> streaming) {
  if (blocks.ndim() != 2 || blocks.shape(1) != 6) {
    throw std::invalid_argument("blocks: expected an int64 array of shape [n, 6], got ndim=" +
                                std::to_string(blocks.ndim()));
  }
  const auto n = static_cast<std::size_t>(blocks.shape(0));
  auto view = blocks.unchecked<2>();
  for (std::size_t i = 0; i < n; ++i) {
    if (view(i, 2) < 0 || view(i, 3) < 0) {
      throw std::invalid_argument("blocks: row " + std::to_string(i) + " has a negative size");
    }
    if ((view(i, 0) == 0 || view(i, 1) == 0) && view(i, 2) * view(i, 3) > 0) {
      throw std::invalid_argument("blocks: row " + std::to_string(i) + " has a null pointer");
    }
  }
  static_assert(sizeof(k15::CopyBlock) == 6 * sizeof(std::int64_t), "CopyBlock layout");
  const auto* data = reinterpret_cast<const k15::CopyBlock*>(blocks.data());
  py::gil_scoped_release release;
  k15::strided_copy(data, n, num_threads, chunk_bytes, streaming ? (*streaming ? 1 : 0) : -1);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "k15sys native extension: threaded strided copies for weight resharding";
  m.def("strided_copy", &py_strided_copy, py::arg("blocks"), py::arg("num_threads") = 0,
        py::arg("chunk_bytes") = 1 << 20, py::arg("streaming") = py::none(),
        "Execute 2-D strided copies on raw pointers with a thread pool, GIL released.\n\n"
        "blocks: int64 [n, 6] array of (src_ptr, dst_ptr, rows, row_bytes, src_stride, dst_stride),\n"
        "strides in bytes. Destination ranges must not overlap. num_threads=0 uses all cores.\n"
        "streaming: non-temporal stores (True), plain memcpy (False), or by total size (None: >= 64 MiB).");
  m.def("hardware_concurrency", [] { return std::thread::hardware_concurrency(); });
}
