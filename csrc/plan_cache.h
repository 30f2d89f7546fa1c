// A bounded, thread-safe cache of per-configuration answers (cuDNN execution plans, "no fused engine" misses)
// shared by csrc/conv_bn.cpp and csrc/conv_bias_act.cu.
//
// * Bounded: at most `capacity` entries; inserting beyond that evicts the least recently used one. ATen's own
//   cuDNN v8 plan cache (TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT) evicts the same way: an evicted plan is destroyed
//   when its last shared_ptr goes (a call still holding it keeps it alive).
// * The lock is held only to look up and to insert, never while a value is built (find_or_build): a plan build
//   compiles kernels (seconds); other configurations are served meanwhile. Two threads missing the same key may both
//   build it; the first insert wins and both return the cached one.
// * Never destroyed (allocated with new): cuDNN descriptors must not be destroyed after cuDNN and the CUDA
//   context have gone at process exit.
#pragma once

#include <cstddef>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

namespace resfused {

template <typename V>
class BoundedCache {
 public:
  explicit BoundedCache(size_t capacity) : capacity_(capacity < 1 ? 1 : capacity) {}

  // The cached value for `key` (marked most recently used), or nullptr.
  std::shared_ptr<const V> find(const std::string& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = index_.find(key);
    if (it == index_.end()) return nullptr;
    order_.splice(order_.begin(), order_, it->second);
    return it->second->second;
  }

  // Inserts `value` unless `key` is present; returns what is cached for `key` afterwards.
  std::shared_ptr<const V> insert(const std::string& key, std::shared_ptr<const V> value) {
    std::shared_ptr<const V> evicted;  // destroyed after the lock is released
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = index_.find(key);
    if (it != index_.end()) {
      order_.splice(order_.begin(), order_, it->second);
      return it->second->second;
    }
    order_.emplace_front(key, std::move(value));
    index_.emplace(key, order_.begin());
    if (order_.size() > capacity_) {
      evicted = std::move(order_.back().second);
      index_.erase(order_.back().first);
      order_.pop_back();
    }
    return order_.front().second;
  }

  // The cached value for `key`, or else `build()` (which returns a std::shared_ptr<const V>) run with no lock
  // held, and inserted when `keep(value)` says so (a transient failure is returned, not cached). Builds of
  // different keys proceed in parallel, and finds are served while they run.
  template <typename Build, typename Keep>
  std::shared_ptr<const V> find_or_build(const std::string& key, Build&& build, Keep&& keep) {
    if (auto hit = find(key)) return hit;
    std::shared_ptr<const V> built = build();
    return keep(*built) ? insert(key, std::move(built)) : built;
  }

  size_t size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return order_.size();
  }

  size_t capacity() const { return capacity_; }

 private:
  using Entry = std::pair<std::string, std::shared_ptr<const V>>;
  const size_t capacity_;
  std::mutex mutex_;
  std::list<Entry> order_;  // most recently used first
  std::unordered_map<std::string, typename std::list<Entry>::iterator> index_;
};

// Runs `fused()` unless `misses` remembers `key` as a configuration without a fused engine, else `fallback()`.
// When `fused()` throws Unsupported, `on_miss(e)` runs, the miss is remembered (searched once, not on every call)
// and the fallback runs; a Transient exception (out of memory: derive it from Unsupported or not, it is caught
// first) also falls back but is not remembered. Any other exception propagates.
template <typename Transient, typename Unsupported, typename Fused, typename Fallback, typename OnMiss>
auto fused_or_fallback(BoundedCache<bool>& misses, const std::string& key, Fused&& fused, Fallback&& fallback,
                       OnMiss&& on_miss) -> decltype(fallback()) {
  if (!misses.find(key)) {
    try {
      return fused();
    } catch (const Transient&) {
    } catch (const Unsupported& e) {
      on_miss(e);
      misses.insert(key, std::make_shared<const bool>(true));
    }
  }
  return fallback();
}

}  // namespace resfused
