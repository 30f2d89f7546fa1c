// Unit test of csrc/plan_cache.h (BoundedCache), built and run by tests/test_plan_cache.py with the system C++
// compiler. Prints "ok" and exits 0, or names the first failed check and exits 1.
#include <atomic>
#include <cstdio>
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
  std::printf("ok\n");
  return 0;
}
