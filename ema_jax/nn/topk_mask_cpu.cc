// The top-k mask of the sparse FFN on CPU, as an XLA FFI custom call (ema_jax/nn/cpu_topk.py builds and
// registers it). For every row of an [N, H] array: true at the k largest entries, false elsewhere.
//
// The order is XLA's own TopK on CPU, so the mask equals the one built from jax.lax.top_k's indices bit
// for bit: values compared as a total order on their bits (-0.0 below +0.0, NaN above +inf for a positive
// NaN), equal values broken by the lower index. Per row the k-th highest entry is found in three linear
// passes (a count over the keys' top bits, an exact selection within the one bin that holds it, the mask)
// instead of a partial sort of all H indices, and rows are split over XLA's intra-op thread pool (XLA:CPU
// runs its own TopK on one thread).

#include <algorithm>
#include <atomic>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A float's bits as a signed integer whose order is the floats' total order.
inline int32_t OrderKey(float v) {
  int32_t x;
  std::memcpy(&x, &v, sizeof(x));
  return x < 0 ? x ^ 0x7fffffff : x;  // negatives: reversed, so -0.0 (-1) sits just below +0.0 (0)
}

inline int32_t OrderKey(uint16_t bf16_bits) {  // bfloat16: the upper half of a float's bits
  const int32_t x = static_cast<int32_t>(static_cast<uint32_t>(bf16_bits) << 16);
  return x < 0 ? x ^ 0x7fffffff : x;
}

// One entry's place in the order as a single integer: its value's key above, then its index reversed
// (so that of two equal values the lower index ranks higher). Every entry of a row gets a distinct rank.
template <typename T>
inline int64_t Rank(const T* row, int64_t j) {
  const uint64_t key = static_cast<uint64_t>(static_cast<int64_t>(OrderKey(row[j])));
  return static_cast<int64_t>((key << 32) | (0xffffffffu - static_cast<uint32_t>(j)));
}

constexpr int kBinBits = 11;  // a radix pass over the keys' top bits: sign, exponent, two mantissa bits

template <typename T>
inline uint32_t Bin(const T* row, int64_t j) {
  return static_cast<uint32_t>(OrderKey(row[j]) ^ INT32_MIN) >> (32 - kBinBits);  // unsigned, same order
}

template <typename T>
void MaskRows(const T* in, bool* out, int64_t first, int64_t last, int64_t h, int64_t k) {
  std::vector<int32_t> count(1 << kBinBits);
  std::vector<int64_t> tied;  // the ranks of the entries in the bin where the k-th highest lies
  tied.reserve(h);
  for (int64_t r = first; r < last; ++r) {
    const T* row = in + r * h;
    bool* mask = out + r * h;
    if (k >= h || k <= 0) {
      std::fill(mask, mask + h, k > 0);
      continue;
    }
    // 1. How many entries fall in each bin of the keys' top bits; from the highest bin down, the bin that
    // holds the k-th highest entry and how many lie above it.
    std::fill(count.begin(), count.end(), 0);
    uint32_t top = 0;
    for (int64_t j = 0; j < h; ++j) {
      const uint32_t b = Bin(row, j);
      ++count[b];
      top = std::max(top, b);
    }
    uint32_t bin = top;
    int64_t above = 0;
    while (above + count[bin] < k) above += count[bin--];
    // 2. Within that bin (a few entries for spread-out values), an exact selection on the full ranks.
    tied.clear();
    for (int64_t j = 0; j < h; ++j) {
      if (Bin(row, j) == bin) tied.push_back(Rank(row, j));
    }
    const int64_t need = k - above;  // 1 <= need <= tied.size()
    std::nth_element(tied.begin(), tied.begin() + (need - 1), tied.end(), std::greater<int64_t>());
    const int64_t kth = tied[need - 1];
    // 3. The mask: every entry ranked at or above the k-th (in 32-bit pieces, which vectorise).
    const int32_t kth_key = static_cast<int32_t>(kth >> 32);
    const int32_t kth_index = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(kth));
    for (int64_t j = 0; j < h; ++j) {
      const int32_t key = OrderKey(row[j]);
      mask[j] = (key > kth_key) | ((key == kth_key) & (static_cast<int32_t>(j) <= kth_index));
    }
  }
}

// Rows are handed out in blocks from a shared counter: the calling thread works too, and waits only for
// blocks another thread has claimed, so a pool that is busy (or has no threads) cannot stall the call.
struct Shared {
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;
};

template <typename T>
void RunBlocks(const std::shared_ptr<Shared>& s, const T* in, bool* out, int64_t n, int64_t h, int64_t k,
               int64_t block, int64_t blocks) {
  for (int64_t b = s->next.fetch_add(1); b < blocks; b = s->next.fetch_add(1)) {
    MaskRows(in, out, b * block, std::min(n, (b + 1) * block), h, k);
    std::lock_guard<std::mutex> lock(s->mu);
    if (++s->done == blocks) s->cv.notify_all();
  }
}

template <typename T>
void Mask(ffi::ThreadPool& pool, const T* in, bool* out, int64_t n, int64_t h, int64_t k) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(256, (n + 4 * threads - 1) / (4 * threads)));
  const int64_t blocks = (n + block - 1) / block;
  auto s = std::make_shared<Shared>();
  const int64_t helpers = std::min<int64_t>(threads, blocks) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    // A helper that starts after every block is claimed touches nothing but `s` (which it co-owns).
    pool.Schedule([s, in, out, n, h, k, block, blocks] { RunBlocks(s, in, out, n, h, k, block, blocks); });
  }
  RunBlocks(s, in, out, n, h, k, block, blocks);
  std::unique_lock<std::mutex> lock(s->mu);
  s->cv.wait(lock, [&] { return s->done == blocks; });
}

ffi::Error TopKMaskImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::Buffer<ffi::PRED>> mask,
                        int64_t k) {
  const auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("topk_mask: the input must have at least one axis");
  const int64_t h = dims.back();
  if (h > INT32_MAX) return ffi::Error::InvalidArgument("topk_mask: rows longer than 2^31 - 1 entries");
  const int64_t n = h == 0 ? 0 : static_cast<int64_t>(x.element_count()) / h;
  bool* out = mask->typed_data();
  switch (x.element_type()) {
    case ffi::F32:
      Mask(pool, x.typed_data<float>(), out, n, h, k);
      return ffi::Error::Success();
    case ffi::BF16:
      Mask(pool, reinterpret_cast<const uint16_t*>(x.untyped_data()), out, n, h, k);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("topk_mask: float32 or bfloat16 input expected");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EmaJaxTopKMask, TopKMaskImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::PRED>>()
                                  .Attr<int64_t>("k"));
