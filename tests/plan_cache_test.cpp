// Unit test of csrc/plan_cache.h (BoundedCache, find_or_build, fused_or_fallback), built and run by tests/test_plan_cache.py with the system C++
// compiler. Prints "ok" and exits 0, or names the first failed check and exits 1.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "plan_cache.h"

#define CHECK(cond)                                                   \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::printf("FAILED line %d: %s\n", __LINE__, #cond);           \
      return 1;                                                       \
    }                                                                 \
  } while (0)

using resfused::BoundedCache;
using resfused::fused_or_fallback;

// The exception types of conv_bias_act.cu's use, in miniature: out of memory derives from the general error.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct OutOfMemory : Error {
  using Error::Error;
};

// Waits until `flag` is set, at most 10 s; past that prints FAILED and exits (a build that blocks others).
void wait_for(const std::atomic<bool>& flag, const char* what) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!flag) {
    if (std::chrono::steady_clock::now() > deadline) {
      std::printf("FAILED: timed out waiting until %s\n", what);
      std::fflush(stdout);
      std::_Exit(1);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

struct Counted {
  static std::atomic<int> alive;
  int v;
  explicit Counted(int v) : v(v) { ++alive; }
  ~Counted() { --alive; }
};
std::atomic<int> Counted::alive{0};

int main() {
  {
    BoundedCache<Counted> cache(2);
    CHECK(cache.capacity() == 2 && cache.size() == 0);
    CHECK(cache.find("a") == nullptr);
    auto a = cache.insert("a", std::make_shared<const Counted>(1));
    CHECK(a->v == 1);
    // A second insert of a present key keeps the first value (two threads that built the same plan).
    auto a2 = cache.insert("a", std::make_shared<const Counted>(10));
    CHECK(a2.get() == a.get() && a2->v == 1);
    cache.insert("b", std::make_shared<const Counted>(2));
    CHECK(cache.find("a")->v == 1);  // "a" is now the most recently used: "b" goes first
    cache.insert("c", std::make_shared<const Counted>(3));
    CHECK(cache.size() == 2);
    CHECK(cache.find("b") == nullptr);
    CHECK(cache.find("a") != nullptr && cache.find("c") != nullptr);
    // An evicted value a caller still holds stays alive until the caller drops it.
    auto held = cache.find("a");
    cache.insert("d", std::make_shared<const Counted>(4));  // evicts "c" (a was found last)
    cache.insert("e", std::make_shared<const Counted>(5));  // evicts "a"
    CHECK(cache.find("a") == nullptr && held->v == 1);
    a.reset();
    a2.reset();
    int before = Counted::alive;
    held.reset();
    CHECK(Counted::alive == before - 1);
    CHECK(cache.size() == 2);
  }
  CHECK(Counted::alive == 0);  // nothing leaked by the cache itself once it is gone
  {
    // Many threads inserting and finding overlapping keys: the bound holds, every find returns the first
    // value inserted under its key while that key is cached.
    BoundedCache<Counted> cache(16);
    std::vector<std::thread> threads;
    std::atomic<int> bad{0};
    for (int t = 0; t < 8; ++t) {
      threads.emplace_back([&, t] {
        for (int i = 0; i < 20000; ++i) {
          int k = (i * 7 + t) % 40;
          auto got = cache.insert(std::to_string(k), std::make_shared<const Counted>(k));
          if (got->v != k) ++bad;
          auto again = cache.find(std::to_string(k));
          if (again && again->v != k) ++bad;
          if (cache.size() > 16) ++bad;
        }
      });
    }
    for (auto& th : threads) th.join();
    CHECK(bad == 0);
    CHECK(cache.size() == 16);
  }
  CHECK(BoundedCache<Counted>(0).capacity() == 1);
  {
    // find_or_build: a build runs with no lock held. While one thread is inside a slow build, another finds a
    // cached key and builds and inserts a different one.
    BoundedCache<Counted> cache(8);
    cache.insert("cached", std::make_shared<const Counted>(7));
    std::atomic<bool> slow_started{false}, release_slow{false}, other_done{false};
    std::shared_ptr<const Counted> slow_result, fast_result, cached_result;
    std::thread slow([&] {
      slow_result = cache.find_or_build("slow", [&] {
        slow_started = true;
        wait_for(release_slow, "the slow build is released");
        return std::make_shared<const Counted>(1);
      }, [](const Counted&) { return true; });
    });
    wait_for(slow_started, "the slow build starts");
    std::thread other([&] {
      cached_result = cache.find_or_build("cached", [] { return std::make_shared<const Counted>(70); },
                                          [](const Counted&) { return true; });
      fast_result = cache.find_or_build("fast", [] { return std::make_shared<const Counted>(2); },
                                        [](const Counted&) { return true; });
      other_done = true;
    });
    wait_for(other_done, "another key is served during a slow build");
    release_slow = true;
    slow.join();
    other.join();
    CHECK(cached_result->v == 7 && fast_result->v == 2 && slow_result->v == 1);
    CHECK(cache.find("slow") && cache.find("fast") && cache.size() == 3);
    // A value that `keep` refuses (a transient failure) is returned, not cached: the next call builds again.
    int builds = 0;
    auto build = [&] { ++builds; return std::make_shared<const Counted>(3); };
    auto t1 = cache.find_or_build("transient", build, [](const Counted&) { return false; });
    auto t2 = cache.find_or_build("transient", build, [](const Counted&) { return false; });
    CHECK(t1->v == 3 && t2->v == 3 && builds == 2 && cache.find("transient") == nullptr);
  }
  {
    // fused_or_fallback: an unsupported configuration is tried once and remembered; out of memory falls back
    // without being remembered; a success is not recorded as a miss; other keys are independent.
    BoundedCache<bool> misses(16);
    int tries = 0, fallbacks = 0, warned = 0;
    auto run = [&](const std::string& key, int mode) {  // mode 0: fused works, 1: unsupported, 2: out of memory
      return fused_or_fallback<OutOfMemory, Error>(
          misses, key,
          [&] {
            ++tries;
            if (mode == 1) throw Error("no engine");
            if (mode == 2) throw OutOfMemory("out of memory");
            return 10;
          },
          [&] { ++fallbacks; return 20; }, [&](const Error&) { ++warned; });
    };
    CHECK(run("ok", 0) == 10 && run("ok", 0) == 10 && tries == 2 && fallbacks == 0 && misses.size() == 0);
    CHECK(run("none", 1) == 20 && run("none", 1) == 20 && run("none", 1) == 20);
    CHECK(tries == 3 && fallbacks == 3 && warned == 1 && misses.find("none") != nullptr);
    CHECK(run("oom", 2) == 20 && run("oom", 2) == 20);
    CHECK(tries == 5 && fallbacks == 5 && warned == 1 && misses.find("oom") == nullptr);
    CHECK(run("oom", 0) == 10 && tries == 6);  // memory freed: the fused op runs again
    bool other_propagates = false;
    try {
      fused_or_fallback<OutOfMemory, Error>(
          misses, "logic", []() -> int { throw std::logic_error("bug"); }, [] { return 20; }, [](const Error&) {});
    } catch (const std::logic_error&) {
      other_propagates = true;
    }
    CHECK(other_propagates && misses.find("logic") == nullptr);
  }
  std::printf("ok\n");
  return 0;
}
