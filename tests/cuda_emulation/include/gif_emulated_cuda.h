// Runs the project's CUDA C++ kernels on the CPU, so that tests check them where no GPU is. It is
// force-included (-include) into the .cu sources, which tests/helpers/emulated_cuda.py compiles as C++
// after rewriting the constructs C++ cannot parse or this emulator must see: kernel launches, __shared__
// declarations (extern and static) and the library registration for the CUDA dispatch key.
//
// A block runs as one fiber (ucontext) per CUDA thread, blocks one after another on the calling
// thread. A fiber runs until it reaches __syncthreads() or a warp shuffle; the scheduler releases a
// barrier once every live thread of the block (or every lane of the warp) waits at it, and raises when
// none can be released: a __syncthreads() some threads never reach, a shuffle in divergent code or
// after lanes of the warp returned. Launches are checked against an H100's limits (grid and block
// sizes, dynamic shared memory above 48 KB only after cudaFuncSetAttribute). Shared memory, dynamic and
// static, starts each block filled with 0xFF bytes (NaN floats, -1 integers), so reads of shared memory
// no thread of the block wrote show in the results. Threads run in ascending order between barriers, or
// in descending order with GIF_EMULATED_CUDA_ORDER=descending set: a kernel without atomics whose results
// differ between the two orders reads or writes memory another thread writes without a barrier in between
// (a race).
//
// Not modelled: timing, registers, alignment faults, interleavings other than the two orders, and device
// math (exp, log and sqrt are the host's, within an ulp or two of the GPU's).
#pragma once

#include <ucontext.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount, cudaDevAttrMaxSharedMemoryPerBlockOptin };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

namespace gif_emulated_cuda {

// The emulated device: an H100 SXM's limits.
constexpr int kMultiProcessors = 132;
constexpr int64_t kSharedBytesDefault = 48 * 1024;
constexpr int64_t kSharedBytesOptin = 227 * 1024;
constexpr int64_t kMaxThreadsPerBlock = 1024;
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1, kMaxGridYZ = 65535;
constexpr int kWarpSize = 32;
constexpr size_t kFiberStackBytes = 256 * 1024;

enum class Wait { kNone, kBlock, kWarp };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  Wait wait = Wait::kNone;
  bool done = false;
};

// The block being run on this thread, its fibers and the scheduler's context.
struct Block {
  dim3 grid_dim, block_dim, block_index;
  int current = 0;  // the fiber running now
  std::vector<Fiber> fibers;
  std::vector<uint64_t> shuffle_slots;  // one per thread: the value it offers to its warp
  std::unique_ptr<unsigned char[]> dynamic_shared;
  int64_t dynamic_shared_bytes = 0;
  std::vector<const void*> poisoned_statics;  // the static __shared__ objects poisoned for this block
  ucontext_t scheduler;
  std::function<void()> body;
};

inline thread_local Block* active_block = nullptr;

inline Block& block() {
  TORCH_CHECK(active_block != nullptr, "emulated CUDA: device code called outside a kernel launch");
  return *active_block;
}

inline dim3 unravel(int64_t index, dim3 dims) {
  return dim3(unsigned(index % dims.x), unsigned(index / dims.x % dims.y), unsigned(index / dims.x / dims.y));
}

// Yields to the scheduler until the barrier this fiber waits at is released.
inline void wait_at(Wait kind) {
  Block& b = block();
  Fiber& self = b.fibers[b.current];
  self.wait = kind;
  swapcontext(&self.context, &b.scheduler);
}

inline void fiber_main() {
  Block& b = block();
  b.body();
  b.fibers[b.current].done = true;  // returning resumes the scheduler (uc_link)
}

// Releases the barriers every live thread (block) or every lane (warp) waits at; false if none can be.
inline bool release_barriers(Block& b) {
  const int n = int(b.fibers.size());
  bool released = false;
  for (int w0 = 0; w0 < n; w0 += kWarpSize) {
    const int w1 = std::min(n, w0 + kWarpSize);
    int at_shuffle = 0;
    for (int i = w0; i < w1; ++i) at_shuffle += b.fibers[i].wait == Wait::kWarp;
    if (at_shuffle == 0) continue;
    TORCH_CHECK(at_shuffle == w1 - w0, "emulated CUDA: block (", b.block_index.x, ", ", b.block_index.y, ", ",
                b.block_index.z, "), warp ", w0 / kWarpSize, ": ", at_shuffle, " of ", w1 - w0,
                " lanes wait at a full-mask warp shuffle, the others returned or wait elsewhere");
    for (int i = w0; i < w1; ++i) b.fibers[i].wait = Wait::kNone;
    released = true;
  }
  if (released) return true;
  int live = 0, at_sync = 0;
  for (const Fiber& f : b.fibers) {
    live += !f.done;
    at_sync += !f.done && f.wait == Wait::kBlock;
  }
  if (live == 0 || at_sync < live) return false;
  for (Fiber& f : b.fibers) f.wait = Wait::kNone;
  return true;
}

inline bool descending_order() {
  const char* order = std::getenv("GIF_EMULATED_CUDA_ORDER");
  return order != nullptr && std::strcmp(order, "descending") == 0;
}

inline void run_block(Block& b) {
  const int n = int(b.fibers.size());
  const bool descending = descending_order();
  if (b.dynamic_shared_bytes > 0) std::memset(b.dynamic_shared.get(), 0xFF, size_t(b.dynamic_shared_bytes));
  b.poisoned_statics.clear();
  for (Fiber& f : b.fibers) {
    f.wait = Wait::kNone;
    f.done = false;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kFiberStackBytes;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  while (true) {
    for (int k = 0; k < n; ++k) {
      const int i = descending ? n - 1 - k : k;
      if (b.fibers[i].done || b.fibers[i].wait != Wait::kNone) continue;
      b.current = i;
      swapcontext(&b.scheduler, &b.fibers[i].context);
    }
    if (release_barriers(b)) continue;
    int live = 0;
    for (const Fiber& f : b.fibers) live += !f.done;
    if (live == 0) return;
    TORCH_CHECK(false, "emulated CUDA: block (", b.block_index.x, ", ", b.block_index.y, ", ", b.block_index.z,
                ") deadlocks: ", live, " threads wait at __syncthreads() or warp shuffles that the others never reach");
  }
}

// Largest dynamic shared memory each kernel may launch with (cudaFuncSetAttribute).
inline std::map<const void*, int64_t>& shared_limits() {
  static std::map<const void*, int64_t> limits;
  return limits;
}

// A grid or block size given as dim3 or as an integer (checked to fit its unsigned field).
struct Size3 {
  dim3 d;
  Size3(dim3 v) : d(v) {}
  template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
  Size3(I v) {
    TORCH_CHECK(int64_t(v) >= 0 && int64_t(v) <= kMaxGridX, "emulated CUDA: launch size ", int64_t(v),
                " does not fit a dim3 field");
    d = dim3(unsigned(v));
  }
};

template <typename Kernel>
void check_launch(Kernel* kernel, dim3 grid, dim3 threads, int64_t shared_bytes) {
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= kMaxGridX && grid.y <= kMaxGridYZ &&
                  grid.z <= kMaxGridYZ,
              "emulated CUDA: invalid grid (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  const int64_t count = int64_t(threads.x) * threads.y * threads.z;
  TORCH_CHECK(count >= 1 && count <= kMaxThreadsPerBlock, "emulated CUDA: invalid block of ", count, " threads");
  const auto it = shared_limits().find(reinterpret_cast<const void*>(kernel));
  const int64_t limit = it == shared_limits().end() ? kSharedBytesDefault : it->second;
  TORCH_CHECK(shared_bytes >= 0 && shared_bytes <= limit, "emulated CUDA: ", shared_bytes,
              " bytes of dynamic shared memory, above the kernel's limit of ", limit,
              " (raise it with cudaFuncSetAttribute)");
}

// kernel<<<grid, threads, shared_bytes, stream>>>(args...) becomes launch(kernel, grid, threads,
// shared_bytes, stream)(args...): launches name a template kernel's arguments (kernel<scalar_t>), so
// that it is one function here.
template <typename Kernel, typename Stream = int>
auto launch(Kernel* kernel, Size3 grid, Size3 threads, int64_t shared_bytes = 0, const Stream& = {}) {
  return [=](auto&&... args) {
    check_launch(kernel, grid.d, threads.d, shared_bytes);
    Block b;
    b.grid_dim = grid.d;
    b.block_dim = threads.d;
    const int n = int(threads.d.x * threads.d.y * threads.d.z);
    b.fibers.resize(n);
    for (Fiber& f : b.fibers) f.stack.reset(new char[kFiberStackBytes]);
    b.shuffle_slots.assign(n, 0);
    b.dynamic_shared_bytes = shared_bytes;
    if (shared_bytes > 0) b.dynamic_shared.reset(new (std::align_val_t(16)) unsigned char[shared_bytes]);
    b.body = [&] { kernel(args...); };
    Block* const outer = active_block;
    active_block = &b;
    try {
      const int64_t blocks = int64_t(grid.d.x) * grid.d.y * grid.d.z;
      for (int64_t i = 0; i < blocks; ++i) {
        b.block_index = unravel(i, grid.d);
        run_block(b);
      }
    } catch (...) {
      active_block = outer;
      throw;
    }
    active_block = outer;
  };
}

inline dim3 thread_index() { return unravel(block().current, block().block_dim); }

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(block().dynamic_shared.get());
}

// `__shared__ T a[n], b;` becomes `static T a[n], b; poison_static_shared(a, b);`: function-local
// statics, one copy that every block of every launch reuses (blocks run one after another, so no two
// use it at once). The first thread of a block to reach the declaration fills them with 0xFF bytes, as
// run_block does dynamic shared memory, so that a block reading what it did not write sees the poison,
// not what the previous block left there. __shared__ itself is not defined: a declaration the helper
// does not rewrite (one in a header) fails to compile instead of going unpoisoned.
template <typename... T>
void poison_static_shared(T&... objects) {
  std::vector<const void*>& done = block().poisoned_statics;
  const auto poison = [&done](void* object, size_t bytes) {
    if (std::find(done.begin(), done.end(), object) != done.end()) return;
    std::memset(object, 0xFF, bytes);
    done.push_back(object);
  };
  (poison(&objects, sizeof(objects)), ...);
}

}  // namespace gif_emulated_cuda

#define threadIdx (::gif_emulated_cuda::thread_index())
#define blockIdx (::gif_emulated_cuda::block().block_index)
#define blockDim (::gif_emulated_cuda::block().block_dim)
#define gridDim (::gif_emulated_cuda::block().grid_dim)

inline void __syncthreads() { gif_emulated_cuda::wait_at(gif_emulated_cuda::Wait::kBlock); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t));
  TORCH_CHECK(mask == 0xffffffffu, "emulated CUDA: only full-mask shuffles are modelled");
  using gif_emulated_cuda::Wait;
  auto& b = gif_emulated_cuda::block();
  const int self = b.current, partner = (self & ~31) | ((self & 31) ^ (lane_mask & 31));
  std::memcpy(&b.shuffle_slots[self], &value, sizeof(T));
  gif_emulated_cuda::wait_at(Wait::kWarp);  // every lane has offered its value
  T result;
  std::memcpy(&result, &b.shuffle_slots[partner], sizeof(T));
  gif_emulated_cuda::wait_at(Wait::kWarp);  // every lane has read before the slots are reused
  return result;
}

inline int __float_as_int(float v) { return std::bit_cast<int>(v); }
inline float __int_as_float(int v) { return std::bit_cast<float>(v); }

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int /*device*/) {
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount: *value = gif_emulated_cuda::kMultiProcessors; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = int(gif_emulated_cuda::kSharedBytesOptin);
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > gif_emulated_cuda::kSharedBytesOptin) {
    return cudaErrorInvalidValue;
  }
  gif_emulated_cuda::shared_limits()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
