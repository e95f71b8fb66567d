// A fixed-size pool of worker threads with a blocking parallel_for.
// Used by the reshard executor (strided copies on raw pointers) with the GIL released.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace k15 {

class ThreadPool {
 public:
  explicit ThreadPool(std::size_t num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  std::size_t size() const { return workers_.size() + 1; }  // the caller works too

  // Runs fn(i) for i in [0, n) on all threads (the calling thread included) and returns when every
  // call has finished. Tasks are claimed dynamically, so uneven task sizes balance themselves.
  // The first exception thrown by a task is rethrown on the calling thread.
  void parallel_for(std::size_t n, const std::function<void(std::size_t)>& fn);

  // The process-wide pool of this size, created on first use and kept for the process's lifetime (one per
  // distinct size, so callers of different sizes never invalidate each other). 0 = hardware concurrency.
  static ThreadPool& global(std::size_t num_threads);

 private:
  void worker_loop();
  void run_tasks();

  std::vector<std::thread> workers_;
  std::mutex run_mu_;  // one parallel_for at a time (callers may come from several threads)
  std::mutex mu_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(std::size_t)>* job_ = nullptr;
  std::size_t job_size_ = 0;
  std::size_t next_ = 0;
  std::size_t finished_ = 0;
  std::size_t generation_ = 0;
  std::size_t busy_workers_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

}  // namespace k15
