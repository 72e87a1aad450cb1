// EMA traces on CPU, constant write rates and selective (per-token) ones, forward and backward, as XLA FFI
// custom calls (ema_jax/traces/native.py registers and differentiates them: the method 'native').
//
//   forward   raw[b, t, k, :] = keep[b, t] (1 - alpha_k) raw[b, t - 1, k, :] + alpha_k x[b, t, :]
//             from raw[b, -1] = h0[b], keep = 0 where a reset starts a new document
//   backward  lam_t = g_t + keep_{t+1} (1 - alpha) lam_{t+1}   (the cotangent of the state after t)
//             dx_t = sum_k alpha_k lam_{k,t} (summed from k = K - 1 down),  dh0 = keep_0 (1 - alpha) lam_0,
//             dalpha = sum_{b,t} lam_t (x_t - keep_t raw_{t-1})   (only when the rates are differentiated)
//
// Rates are [K, E] with E = 1 (shared over channels) or E = D (per channel). Everything is float32 except
// x, which may be bfloat16; dalpha is accumulated in float64 and returned as [K, D] (the caller sums the
// channels of shared rates).
//
// Each recurrence is memory-bound work: every pass streams its inputs and outputs once, row after row, with
// a row's [K, D] state in the L1 cache and the outputs written past the caches. Time is cut into segments of
// a fixed number of tokens (the caller's `segment`, chosen from the shape alone, so the numbers never depend
// on the number of threads); the work items are (batch row, segment), handed out in time order (reverse
// time for the backward) to XLA's intra-op thread pool. An item first runs its segment from a zero state
// without writing anything (its input stays in the L2 cache), waits for the state leaving the segment before
// it, publishes the state leaving its own (decay^len times the one entering, plus its zero-start result),
// and then runs the segment again from the right state, writing its outputs. So the threads work on
// neighbouring segments at once, each input is read from memory once, and the only serial work is one
// [K, D] multiply-add per segment.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <emmintrin.h>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) {  // bfloat16: the upper half of a float's bits
  const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// A few vector operations: 8 floats with AVX2 (cpu_kernels.py passes -mavx2 where the CPU has it), else 4
// with SSE2. No fused multiply-add (and -ffp-contract=off): both builds round every product and sum alike.
#ifdef __AVX2__
#include <immintrin.h>
constexpr int64_t kW = 8;
using V = __m256;
inline V Set(float a) { return _mm256_set1_ps(a); }
inline V Ld(const float* p) { return _mm256_loadu_ps(p); }
inline V Ld(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline void St(float* p, V v) { _mm256_storeu_ps(p, v); }
inline void Stream(float* p, V v) { _mm256_stream_ps(p, v); }  // p aligned to 32 bytes
inline V Add(V a, V b) { return _mm256_add_ps(a, b); }
inline V Sub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V Mul(V a, V b) { return _mm256_mul_ps(a, b); }
#else
constexpr int64_t kW = 4;
using V = __m128;
inline V Set(float a) { return _mm_set1_ps(a); }
inline V Ld(const float* p) { return _mm_loadu_ps(p); }
inline V Ld(const uint16_t* p) {
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h));
}
inline void St(float* p, V v) { _mm_storeu_ps(p, v); }
inline void Stream(float* p, V v) { _mm_stream_ps(p, v); }  // p aligned to 16 bytes
inline V Add(V a, V b) { return _mm_add_ps(a, b); }
inline V Sub(V a, V b) { return _mm_sub_ps(a, b); }
inline V Mul(V a, V b) { return _mm_mul_ps(a, b); }
#endif

// Whether rows of d floats starting at `base` can be streamed: every row start aligned to a vector.
inline bool Streamable(const float* base, int64_t d) {
  return (reinterpret_cast<uintptr_t>(base) % (kW * sizeof(float))) == 0 && d % kW == 0;
}

// Work items handed out from a shared counter: the calling thread works too and waits only for items
// another thread has claimed, so a busy pool (or one without threads) cannot stall the call.
struct Shared {
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;
};

template <typename F>
void Drain(const std::shared_ptr<Shared>& s, const F& f, int64_t items) {
  for (int64_t i = s->next.fetch_add(1); i < items; i = s->next.fetch_add(1)) {
    f(i);
    std::lock_guard<std::mutex> lock(s->mu);
    if (++s->done == items) s->cv.notify_all();
  }
}

template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t items, const F& f) {
  auto s = std::make_shared<Shared>();
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), items) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    // f lives on this frame, which outlives every item (we wait below); a helper that starts after all
    // items are claimed touches only `s`, which it co-owns.
    pool.Schedule([s, &f, items] { Drain(s, f, items); });
  }
  Drain(s, f, items);
  std::unique_lock<std::mutex> lock(s->mu);
  s->cv.wait(lock, [&] { return s->done == items; });
}

struct Dims {
  int64_t b, t, k, d, e;  // e: 1 (rates shared over channels) or d
  int64_t segment;        // tokens per segment (the last one of a row may be shorter)
  int64_t segments() const { return (t + segment - 1) / segment; }
};

// Per-call constants, expanded to [K, D] for per-channel rates (shared ones are read as scalars).
struct Rates {
  std::vector<float> rate, decay, zero;
  Rates(const Dims& n, const float* alpha) : rate(n.k * n.d), decay(n.k * n.d), zero(n.k * n.d, 0.0f) {
    for (int64_t k = 0; k < n.k; ++k) {
      for (int64_t j = 0; j < n.d; ++j) {
        const float a = alpha[k * n.e + (n.e == 1 ? 0 : j)];
        rate[k * n.d + j] = a;
        decay[k * n.d + j] = 1.0f - a;
      }
    }
  }
};

// decay^len for every [K, D] entry (the decay across a segment of len tokens without a reset).
std::vector<float> Power(const Rates& r, int64_t len) {
  std::vector<float> out(r.decay.size());
  for (size_t i = 0; i < out.size(); ++i) {
    out[i] = static_cast<float>(std::pow(static_cast<double>(r.decay[i]), static_cast<double>(len)));
  }
  return out;
}

// The segments of every row, chained: item i is (row i / S, the (i % S)-th segment in the order they are
// run); each publishes the [K, D] state it hands to the next segment of its row, and waits for the one
// handed to it. Across a segment of len tokens the state maps as s -> decay^len s + (its run from zero),
// and a reset in the segment cuts it (decay^len -> 0).
class Chain {
 public:
  explicit Chain(const Dims& n)
      : kd_(n.k * n.d), state_(n.b * n.segments() * kd_), ready_(new std::atomic<int>[n.b * n.segments()]) {
    for (int64_t i = 0; i < n.b * n.segments(); ++i) ready_[i].store(0, std::memory_order_relaxed);
  }
  // Constant rates: the decay across a full segment and across the row's last one.
  Chain(const Dims& n, const Rates& r) : Chain(n) {
    full_ = Power(r, n.segment);
    tail_ = Power(r, n.t - (n.segments() - 1) * n.segment);
  }
  // Waits for item i - 1 (the one before i in its row's order: it was handed out earlier, to a thread that
  // is running it) and returns the state it published.
  const float* Wait(int64_t i) const {
    while (ready_[i - 1].load(std::memory_order_acquire) == 0) std::this_thread::yield();
    return state_.data() + (i - 1) * kd_;
  }
  // Publishes the state item i hands on: decay^len entering + result (len: a full segment, or the row's
  // shorter last one when `tail`; no decay term after a reset).
  void Publish(int64_t i, bool tail, bool reset, const float* entering, const float* result) {
    float* out = state_.data() + i * kd_;
    const float* power = tail ? tail_.data() : full_.data();
    for (int64_t j = 0; j < kd_; ++j) out[j] = reset ? result[j] : power[j] * entering[j] + result[j];
    ready_[i].store(1, std::memory_order_release);
  }
  // The same with the decay across the segment given per [K, D] entry (selective rates; zero after a reset).
  void Publish(int64_t i, const float* decay, const float* entering, const float* result) {
    float* out = state_.data() + i * kd_;
    for (int64_t j = 0; j < kd_; ++j) out[j] = decay[j] * entering[j] + result[j];
    ready_[i].store(1, std::memory_order_release);
  }

 private:
  const int64_t kd_;
  std::vector<float> full_, tail_;
  std::vector<float> state_;
  std::unique_ptr<std::atomic<int>[]> ready_;
};

// The recurrence over tokens [first, last) of row b from `state` ([K, D], updated in place); writes the
// outputs when `raw` is given (streamed past the caches when `stream`). Returns whether a reset fell in the
// range (the range then forgets its start).
template <bool kShared, typename X>
bool RunForward(const Dims& n, const Rates& r, const X* x, const bool* resets, int64_t b, int64_t first,
                int64_t last, float* state, float* raw, bool stream) {
  bool reset = false;
  const int64_t vend = n.d / kW * kW;
  for (int64_t t = first; t < last; ++t) {
    const int64_t bt = b * n.t + t;
    if (resets[bt]) {
      std::fill(state, state + n.k * n.d, 0.0f);
      reset = true;
    }
    const X* xr = x + bt * n.d;
    for (int64_t k = 0; k < n.k; ++k) {
      float* s = state + k * n.d;
      const float* dk = r.decay.data() + k * n.d;
      const float* rk = r.rate.data() + k * n.d;
      float* out = raw == nullptr ? nullptr : raw + (bt * n.k + k) * n.d;
      const V dv = Set(dk[0]), rv = Set(rk[0]);
      for (int64_t j = 0; j < vend; j += kW) {
        const V v = Add(Mul(kShared ? dv : Ld(dk + j), Ld(s + j)), Mul(kShared ? rv : Ld(rk + j), Ld(xr + j)));
        St(s + j, v);
        if (out != nullptr) {
          if (stream) {
            Stream(out + j, v);
          } else {
            St(out + j, v);
          }
        }
      }
      for (int64_t j = vend; j < n.d; ++j) {
        s[j] = dk[j] * s[j] + rk[j] * Load(xr, j);
        if (out != nullptr) out[j] = s[j];
      }
    }
  }
  return reset;
}

template <bool kShared, typename X>
void Forward(ffi::ThreadPool& pool, const Dims& n, const Rates& r, const X* x, const float* h0,
             const bool* resets, float* raw) {
  const int64_t kd = n.k * n.d, segs = n.segments();
  const bool stream = Streamable(raw, n.d);
  Chain chain(n, r);
  ParallelFor(pool, n.b * segs, [&](int64_t i) {
    const int64_t b = i / segs, s = i % segs;
    const int64_t first = s * n.segment, last = std::min(n.t, first + n.segment);
    std::vector<float> state(kd, 0.0f);
    const bool hands_on = s + 1 < segs;
    bool reset = false;
    if (hands_on) reset = RunForward<kShared>(n, r, x, resets, b, first, last, state.data(), nullptr, false);
    const float* entering = s == 0 ? h0 + b * kd : chain.Wait(i);
    if (hands_on) chain.Publish(i, false, reset, entering, state.data());
    std::copy(entering, entering + kd, state.begin());
    RunForward<kShared>(n, r, x, resets, b, first, last, state.data(), raw, stream);
    _mm_sfence();  // the streamed stores are visible before the call returns
  });
}

// How many channels the backward handles at a time. It walks memory downwards (time, then timescale, then
// these blocks from the last), ascending only within a block: rows read downwards with each row read
// upwards defeat the hardware prefetcher (3x slower on the 2-core AMD EPYC this was written on), blocks of
// 64 channels (four cache lines) read wholly downwards do not.
constexpr int64_t kDownBlock = 64;

// The reverse recurrence over tokens [last - 1, first] of row b. `carry` ([K, D], updated in place) is
// keep_{t+1} (1 - alpha) lam_{t+1}, what flows into step t from the step after it; lam_t = g_t + carry.
// Writes dx when given (streamed when `stream`); accumulates dalpha ([K, D] float64) when given. Returns
// whether a reset fell in the range.
template <bool kShared, typename X>
bool RunBackward(const Dims& n, const Rates& r, const float* g, const bool* resets, const X* x,
                 const float* raw, const float* h0, int64_t b, int64_t first, int64_t last, float* carry,
                 float* dx, bool stream, double* dalpha) {
  bool reset = false;
  std::vector<float> row(dx != nullptr ? n.d : 0);  // dx_t, built in the L1 cache, then written out
  for (int64_t t = last - 1; t >= first; --t) {
    const int64_t bt = b * n.t + t;
    const bool keep = !resets[bt];
    reset |= !keep;
    for (int64_t k = n.k - 1; k >= 0; --k) {
      const float* dks = (keep ? r.decay.data() : r.zero.data()) + k * n.d;
      const V dv = Set(dks[0]), rv = Set(r.rate[k * n.d]);
      for (int64_t hi = n.d; hi > 0; hi -= kDownBlock) {
        const int64_t lo = std::max<int64_t>(0, hi - kDownBlock);
        const int64_t off = k * n.d + lo, w = hi - lo, vend = w / kW * kW;
        const float* gk = g + (bt * n.k + k) * n.d + lo;
        float* c = carry + off;
        const float* rk = r.rate.data() + off;
        const float* dk = dks + lo;
        if (dalpha != nullptr) {
          const X* xr = x + bt * n.d + lo;
          const float* prev =
              !keep ? r.zero.data() + off : (t > 0 ? raw + ((bt - 1) * n.k + k) * n.d + lo : h0 + b * n.k * n.d + off);
          double* da = dalpha + off;
          for (int64_t j = 0; j < w; ++j) {
            const float v = gk[j] + c[j];
            da[j] += static_cast<double>(v * (Load(xr, j) - prev[j]));
          }
        }
        if (dx == nullptr) {
          for (int64_t j = 0; j < vend; j += kW) St(c + j, Mul(kShared ? dv : Ld(dk + j), Add(Ld(gk + j), Ld(c + j))));
          for (int64_t j = vend; j < w; ++j) c[j] = dk[j] * (gk[j] + c[j]);
          continue;
        }
        float* dxr = row.data() + lo;
        const bool first_k = k == n.k - 1;
        for (int64_t j = 0; j < vend; j += kW) {
          const V v = Add(Ld(gk + j), Ld(c + j));
          const V contrib = Mul(kShared ? rv : Ld(rk + j), v);
          St(dxr + j, first_k ? contrib : Add(Ld(dxr + j), contrib));
          St(c + j, Mul(kShared ? dv : Ld(dk + j), v));
        }
        for (int64_t j = vend; j < w; ++j) {
          const float v = gk[j] + c[j];
          dxr[j] = first_k ? rk[j] * v : dxr[j] + rk[j] * v;
          c[j] = dk[j] * v;
        }
      }
    }
    if (dx != nullptr) {
      float* out = dx + bt * n.d;
      if (stream) {
        for (int64_t j = 0; j < n.d; j += kW) Stream(out + j, Ld(row.data() + j));
      } else {
        std::memcpy(out, row.data(), n.d * sizeof(float));
      }
    }
  }
  return reset;
}

template <bool kShared, typename X>
void Backward(ffi::ThreadPool& pool, const Dims& n, const Rates& r, const float* g, const bool* resets, const X* x,
              const float* raw, const float* h0, float* dx, float* dh0, float* dalpha) {
  const int64_t kd = n.k * n.d, segs = n.segments();
  const bool rate_grad = dalpha != nullptr, stream = Streamable(dx, n.d);
  Chain chain(n, r);
  // dalpha: float64 sums per item, added up in a fixed order at the end (never in completion order).
  std::vector<double> partial(rate_grad ? n.b * segs * kd : 0, 0.0);
  ParallelFor(pool, n.b * segs, [&](int64_t i) {
    // Items run the segments of a row from the last one back: position o is segment segs - 1 - o.
    const int64_t b = i / segs, o = i % segs, s = segs - 1 - o;
    const int64_t first = s * n.segment, last = std::min(n.t, first + n.segment);
    std::vector<float> carry(kd, 0.0f);
    const bool hands_on = s > 0;
    bool reset = false;
    if (hands_on) {
      reset = RunBackward<kShared>(n, r, g, resets, x, raw, h0, b, first, last, carry.data(), nullptr, false, nullptr);
    }
    const float* entering = o == 0 ? r.zero.data() : chain.Wait(i);
    if (hands_on) chain.Publish(i, o == 0, reset, entering, carry.data());
    std::copy(entering, entering + kd, carry.begin());
    RunBackward<kShared>(n, r, g, resets, x, raw, h0, b, first, last, carry.data(), dx, stream,
                         rate_grad ? partial.data() + i * kd : nullptr);
    _mm_sfence();
    if (s == 0) std::copy(carry.begin(), carry.end(), dh0 + b * kd);
  });
  if (rate_grad) {
    std::vector<double> sum(kd, 0.0);
    for (int64_t i = 0; i < n.b * segs; ++i) {
      for (int64_t j = 0; j < kd; ++j) sum[j] += partial[i * kd + j];
    }
    for (int64_t j = 0; j < kd; ++j) dalpha[j] = static_cast<float>(sum[j]);
  }
}

// Calls f(std::true_type) for rates shared over channels, f(std::false_type) for per-channel rates.
template <typename F>
void ByLayout(const Dims& n, const F& f) {
  if (n.e == 1) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

ffi::Error CheckDims(const ffi::AnyBuffer& x, const ffi::Buffer<ffi::F32>& alpha, int64_t segment, Dims* n) {
  const auto xd = x.dimensions();
  const auto ad = alpha.dimensions();
  if (xd.size() != 3) return ffi::Error::InvalidArgument("ema_traces_cpu: x must be [B, T, D]");
  if (ad.size() != 2) return ffi::Error::InvalidArgument("ema_traces_cpu: alpha must be [K, 1 or D]");
  if (segment < 1) return ffi::Error::InvalidArgument("ema_traces_cpu: segment must be >= 1");
  *n = Dims{xd[0], xd[1], ad[0], xd[2], ad[1], segment};
  if (n->e != 1 && n->e != n->d) return ffi::Error::InvalidArgument("ema_traces_cpu: alpha must be [K, 1 or D]");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> alpha, ffi::Buffer<ffi::F32> h0,
                       ffi::Buffer<ffi::PRED> resets, ffi::Result<ffi::Buffer<ffi::F32>> raw, int64_t segment) {
  Dims n;
  if (ffi::Error e = CheckDims(x, alpha, segment, &n); e.failure()) return e;
  const Rates r(n, alpha.typed_data());
  switch (x.element_type()) {
    case ffi::F32:
      ByLayout(n, [&](auto shared) {
        Forward<decltype(shared)::value>(pool, n, r, x.typed_data<float>(), h0.typed_data(), resets.typed_data(),
                                         raw->typed_data());
      });
      return ffi::Error::Success();
    case ffi::BF16:
      ByLayout(n, [&](auto shared) {
        Forward<decltype(shared)::value>(pool, n, r, reinterpret_cast<const uint16_t*>(x.untyped_data()),
                                         h0.typed_data(), resets.typed_data(), raw->typed_data());
      });
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("ema_traces_cpu: x must be float32 or bfloat16");
  }
}

// rate_grad: x, raw and h0 are read and dalpha [K, D] written; otherwise they are not touched.
ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> alpha,
                        ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::PRED> resets, ffi::Buffer<ffi::F32> raw,
                        ffi::Result<ffi::Buffer<ffi::F32>> dx, ffi::Result<ffi::Buffer<ffi::F32>> dh0,
                        ffi::Result<ffi::Buffer<ffi::F32>> dalpha, bool rate_grad, int64_t segment) {
  Dims n;
  if (ffi::Error e = CheckDims(x, alpha, segment, &n); e.failure()) return e;
  float* da = rate_grad ? dalpha->typed_data() : nullptr;
  const Rates r(n, alpha.typed_data());
  switch (x.element_type()) {
    case ffi::F32:
      ByLayout(n, [&](auto shared) {
        Backward<decltype(shared)::value>(pool, n, r, g.typed_data(), resets.typed_data(), x.typed_data<float>(),
                                          raw.typed_data(), h0.typed_data(), dx->typed_data(), dh0->typed_data(), da);
      });
      return ffi::Error::Success();
    case ffi::BF16:
      ByLayout(n, [&](auto shared) {
        Backward<decltype(shared)::value>(pool, n, r, g.typed_data(), resets.typed_data(),
                                          reinterpret_cast<const uint16_t*>(x.untyped_data()), raw.typed_data(),
                                          h0.typed_data(), dx->typed_data(), dh0->typed_data(), da);
      });
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("ema_traces_cpu: x must be float32 or bfloat16");
  }
}

// ---------------------------------------------------------------------------------------------------------
// Selective traces: a write rate per token, timescale and (E = D) channel or (E = 1) shared over channels,
//   forward   h_t = keep_t (1 - r_t) h_{t-1} + r_t x_t
//   backward  lam_t = g_t + keep_{t+1} (1 - r_{t+1}) lam_{t+1},  dx_t = sum_k r_{k,t} lam_{k,t},
//             dr_t = lam_t (x_t - keep_t h_{t-1}) (summed over channels for E = 1),
//             dh0 = keep_0 (1 - r_0) lam_0.
// The same passes, chain and memory order as the constant-rate kernel above; across a segment the state maps
// as s -> (prod_t keep_t (1 - r_t)) s + (its run from zero), the product kept per [K, D] entry by the first run.

// The selective recurrence over tokens [first, last) of row b from `state`; writes outputs when `raw` is
// given; multiplies `product` ([K, D]) by each step's decay when given.
template <bool kShared, typename X>
void RunSelForward(const Dims& n, const X* x, const float* rates, const bool* resets, int64_t b, int64_t first,
                   int64_t last, float* state, float* product, float* raw, bool stream) {
  const int64_t vend = n.d / kW * kW;
  const V one = Set(1.0f);
  for (int64_t t = first; t < last; ++t) {
    const int64_t bt = b * n.t + t;
    if (resets[bt]) {
      std::fill(state, state + n.k * n.d, 0.0f);
      if (product != nullptr) std::fill(product, product + n.k * n.d, 0.0f);
    }
    const X* xr = x + bt * n.d;
    for (int64_t k = 0; k < n.k; ++k) {
      float* s = state + k * n.d;
      float* p = product == nullptr ? nullptr : product + k * n.d;
      const float* rk = rates + (bt * n.k + k) * n.e;
      float* out = raw == nullptr ? nullptr : raw + (bt * n.k + k) * n.d;
      const V rv = Set(rk[0]);
      for (int64_t j = 0; j < vend; j += kW) {
        const V rr = kShared ? rv : Ld(rk + j);
        const V a = Sub(one, rr);
        const V v = Add(Mul(a, Ld(s + j)), Mul(rr, Ld(xr + j)));
        St(s + j, v);
        if (p != nullptr) St(p + j, Mul(Ld(p + j), a));
        if (out != nullptr) {
          if (stream) {
            Stream(out + j, v);
          } else {
            St(out + j, v);
          }
        }
      }
      for (int64_t j = vend; j < n.d; ++j) {
        const float rr = rk[kShared ? 0 : j], a = 1.0f - rr;
        s[j] = a * s[j] + rr * Load(xr, j);
        if (p != nullptr) p[j] *= a;
        if (out != nullptr) out[j] = s[j];
      }
    }
  }
}

template <bool kShared, typename X>
void SelForward(ffi::ThreadPool& pool, const Dims& n, const X* x, const float* rates, const float* h0,
                const bool* resets, float* raw) {
  const int64_t kd = n.k * n.d, segs = n.segments();
  const bool stream = Streamable(raw, n.d);
  Chain chain(n);
  ParallelFor(pool, n.b * segs, [&](int64_t i) {
    const int64_t b = i / segs, s = i % segs;
    const int64_t first = s * n.segment, last = std::min(n.t, first + n.segment);
    std::vector<float> state(kd, 0.0f), product(kd, 1.0f);
    const bool hands_on = s + 1 < segs;
    if (hands_on) RunSelForward<kShared>(n, x, rates, resets, b, first, last, state.data(), product.data(), nullptr, false);
    const float* entering = s == 0 ? h0 + b * kd : chain.Wait(i);
    if (hands_on) chain.Publish(i, product.data(), entering, state.data());
    std::copy(entering, entering + kd, state.begin());
    RunSelForward<kShared>(n, x, rates, resets, b, first, last, state.data(), nullptr, raw, stream);
    _mm_sfence();
  });
}

// The reverse selective recurrence over tokens [last - 1, first] of row b; `carry` as in RunBackward.
// With dx given (the second run) writes dx and dr; otherwise multiplies `product` by each step's decay.
template <bool kShared, typename X>
void RunSelBackward(const Dims& n, const float* g, const float* rates, const bool* resets, const X* x,
                    const float* raw, const float* h0, int64_t b, int64_t first, int64_t last, float* carry,
                    float* product, float* dx, float* dr, bool stream_dx, bool stream_dr) {
  std::vector<float> row(dx != nullptr ? n.d : 0), drow(dx != nullptr ? n.k * n.e : 0);
  std::vector<double> dsum(kShared && dx != nullptr ? n.k : 0);
  const V one = Set(1.0f);
  for (int64_t t = last - 1; t >= first; --t) {
    const int64_t bt = b * n.t + t;
    const bool keep = !resets[bt];
    const V keepv = Set(keep ? 1.0f : 0.0f);
    std::fill(dsum.begin(), dsum.end(), 0.0);
    for (int64_t k = n.k - 1; k >= 0; --k) {
      const float* rkrow = rates + (bt * n.k + k) * n.e;
      const V rv = Set(rkrow[0]);
      const float* prevrow = t > 0 ? raw + ((bt - 1) * n.k + k) * n.d : h0 + (b * n.k + k) * n.d;
      for (int64_t hi = n.d; hi > 0; hi -= kDownBlock) {
        const int64_t lo = std::max<int64_t>(0, hi - kDownBlock);
        const int64_t w = hi - lo, vend = w / kW * kW;
        const float* gk = g + (bt * n.k + k) * n.d + lo;
        float* c = carry + k * n.d + lo;
        const float* rk = kShared ? rkrow : rkrow + lo;
        if (dx == nullptr) {
          float* p = product + k * n.d + lo;
          for (int64_t j = 0; j < vend; j += kW) {
            const V a = Mul(keepv, Sub(one, kShared ? rv : Ld(rk + j)));
            St(c + j, Mul(a, Add(Ld(gk + j), Ld(c + j))));
            St(p + j, Mul(Ld(p + j), a));
          }
          for (int64_t j = vend; j < w; ++j) {
            const float a = (keep ? 1.0f : 0.0f) * (1.0f - rk[kShared ? 0 : j]);
            c[j] = a * (gk[j] + c[j]);
            p[j] *= a;
          }
          continue;
        }
        const X* xr = x + bt * n.d + lo;
        const float* prev = prevrow + lo;
        float* dxr = row.data() + lo;
        const bool first_k = k == n.k - 1;
        for (int64_t j = 0; j < w; ++j) {
          const float rr = rk[kShared ? 0 : j];
          const float v = gk[j] + c[j];
          const float drive = Load(xr, j) - (keep ? prev[j] : 0.0f);
          if (kShared) {
            dsum[k] += static_cast<double>(v * drive);
          } else {
            drow[k * n.d + lo + j] = v * drive;
          }
          dxr[j] = first_k ? rr * v : dxr[j] + rr * v;
          c[j] = (keep ? 1.0f - rr : 0.0f) * v;
        }
      }
    }
    if (dx == nullptr) continue;
    float* out = dx + bt * n.d;
    if (stream_dx) {
      for (int64_t j = 0; j < n.d; j += kW) Stream(out + j, Ld(row.data() + j));
    } else {
      std::memcpy(out, row.data(), n.d * sizeof(float));
    }
    float* dro = dr + bt * n.k * n.e;
    if (kShared) {
      for (int64_t k = 0; k < n.k; ++k) dro[k] = static_cast<float>(dsum[k]);
    } else if (stream_dr) {
      for (int64_t j = 0; j < n.k * n.d; j += kW) Stream(dro + j, Ld(drow.data() + j));
    } else {
      std::memcpy(dro, drow.data(), n.k * n.d * sizeof(float));
    }
  }
}

template <bool kShared, typename X>
void SelBackward(ffi::ThreadPool& pool, const Dims& n, const float* g, const float* rates, const bool* resets,
                 const X* x, const float* raw, const float* h0, float* dx, float* dr, float* dh0) {
  const int64_t kd = n.k * n.d, segs = n.segments();
  const bool stream_dx = Streamable(dx, n.d), stream_dr = !kShared && Streamable(dr, n.k * n.d);
  Chain chain(n);
  ParallelFor(pool, n.b * segs, [&](int64_t i) {
    const int64_t b = i / segs, o = i % segs, s = segs - 1 - o;
    const int64_t first = s * n.segment, last = std::min(n.t, first + n.segment);
    std::vector<float> carry(kd, 0.0f), product(kd, 1.0f);
    const bool hands_on = s > 0;
    if (hands_on) {
      RunSelBackward<kShared>(n, g, rates, resets, x, raw, h0, b, first, last, carry.data(), product.data(), nullptr,
                              nullptr, false, false);
    }
    std::vector<float> start(kd, 0.0f);  // the carry into the segment's last token: zero for the row's last
    if (o > 0) {
      const float* handed = chain.Wait(i);
      std::copy(handed, handed + kd, start.begin());
    }
    if (hands_on) chain.Publish(i, product.data(), start.data(), carry.data());
    std::copy(start.begin(), start.end(), carry.begin());
    RunSelBackward<kShared>(n, g, rates, resets, x, raw, h0, b, first, last, carry.data(), nullptr, dx, dr,
                            stream_dx, stream_dr);
    _mm_sfence();
    if (s == 0) std::copy(carry.begin(), carry.end(), dh0 + b * kd);
  });
}

ffi::Error SelDims(const ffi::AnyBuffer& x, const ffi::Buffer<ffi::F32>& rates, int64_t segment, Dims* n) {
  const auto xd = x.dimensions();
  const auto rd = rates.dimensions();
  if (xd.size() != 3) return ffi::Error::InvalidArgument("selective_traces_cpu: x must be [B, T, D]");
  if (rd.size() != 4 || rd[0] != xd[0] || rd[1] != xd[1] || (rd[3] != 1 && rd[3] != xd[2])) {
    return ffi::Error::InvalidArgument("selective_traces_cpu: rates must be [B, T, K, 1 or D]");
  }
  if (segment < 1) return ffi::Error::InvalidArgument("selective_traces_cpu: segment must be >= 1");
  *n = Dims{xd[0], xd[1], rd[2], xd[2], rd[3], segment};
  return ffi::Error::Success();
}

ffi::Error SelForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> rates, ffi::Buffer<ffi::F32> h0,
                          ffi::Buffer<ffi::PRED> resets, ffi::Result<ffi::Buffer<ffi::F32>> raw, int64_t segment) {
  Dims n;
  if (ffi::Error e = SelDims(x, rates, segment, &n); e.failure()) return e;
  auto run = [&](auto xp) {
    ByLayout(n, [&](auto shared) {
      SelForward<decltype(shared)::value>(pool, n, xp, rates.typed_data(), h0.typed_data(), resets.typed_data(),
                                          raw->typed_data());
    });
  };
  switch (x.element_type()) {
    case ffi::F32:
      run(x.typed_data<float>());
      return ffi::Error::Success();
    case ffi::BF16:
      run(reinterpret_cast<const uint16_t*>(x.untyped_data()));
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("selective_traces_cpu: x must be float32 or bfloat16");
  }
}

ffi::Error SelBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> rates,
                           ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::PRED> resets, ffi::Buffer<ffi::F32> raw,
                           ffi::Result<ffi::Buffer<ffi::F32>> dx, ffi::Result<ffi::Buffer<ffi::F32>> dr,
                           ffi::Result<ffi::Buffer<ffi::F32>> dh0, int64_t segment) {
  Dims n;
  if (ffi::Error e = SelDims(x, rates, segment, &n); e.failure()) return e;
  auto run = [&](auto xp) {
    ByLayout(n, [&](auto shared) {
      SelBackward<decltype(shared)::value>(pool, n, g.typed_data(), rates.typed_data(), resets.typed_data(), xp,
                                           raw.typed_data(), h0.typed_data(), dx->typed_data(), dr->typed_data(),
                                           dh0->typed_data());
    });
  };
  switch (x.element_type()) {
    case ffi::F32:
      run(x.typed_data<float>());
      return ffi::Error::Success();
    case ffi::BF16:
      run(reinterpret_cast<const uint16_t*>(x.untyped_data()));
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("selective_traces_cpu: x must be float32 or bfloat16");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EmaJaxTracesForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("segment"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EmaJaxTracesBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("rate_grad")
                                  .Attr<int64_t>("segment"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EmaJaxSelectiveForward, SelForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("segment"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EmaJaxSelectiveBackward, SelBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("segment"));
