#include "thread_pool.h"

#include <algorithm>
#include <map>
#include <memory>

namespace k15 {

ThreadPool::ThreadPool(std::size_t num_threads) {
  const std::size_t extra = num_threads > 1 ? num_threads - 1 : 0;
  workers_.reserve(extra);
  for (std::size_t i = 0; i < extra; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::run_tasks() {
  // Called with mu_ NOT held. Claims task indices until none is left.
  for (;;) {
    std::size_t i;
    const std::function<void(std::size_t)>* fn;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (next_ >= job_size_) return;
      i = next_++;
      fn = job_;
    }
    try {
      (*fn)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (++finished_ == job_size_) done_.notify_all();
  }
}

void ThreadPool::worker_loop() {
  std::size_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      ++busy_workers_;
    }
    run_tasks();
    {
      std::lock_guard<std::mutex> lock(mu_);
      --busy_workers_;
    }
    done_.notify_all();
  }
}

void ThreadPool::parallel_for(std::size_t n, const std::function<void(std::size_t)>& fn) {
  if (n == 0) return;
  std::lock_guard<std::mutex> serial(run_mu_);
  if (workers_.empty() || n == 1) {
    for (std::size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = &fn;
    job_size_ = n;
    next_ = 0;
    finished_ = 0;
    error_ = nullptr;
    ++generation_;
  }
  wake_.notify_all();
  run_tasks();
  std::exception_ptr err;
  {
    std::unique_lock<std::mutex> lock(mu_);
    // Wait until every task is done AND no worker still holds a pointer to fn.
    done_.wait(lock, [&] { return finished_ == job_size_ && busy_workers_ == 0; });
    job_ = nullptr;
    job_size_ = 0;
    err = error_;
  }
  if (err) std::rethrow_exception(err);
}

ThreadPool& ThreadPool::global(std::size_t num_threads) {
  static std::mutex global_mu;
  // One pool per size, never destroyed: a caller may still be running on a pool of another size (e.g. a
  // reshard on all cores while the checkpoint engine packs on half of them), so none may be replaced.
  static std::map<std::size_t, std::unique_ptr<ThreadPool>> pools;
  if (num_threads == 0) num_threads = std::max<std::size_t>(1, std::thread::hardware_concurrency());
  std::lock_guard<std::mutex> lock(global_mu);
  auto& pool = pools[num_threads];
  if (!pool) pool = std::make_unique<ThreadPool>(num_threads);
  return *pool;
}

}  // namespace k15
