// tpfleet's custom all-reduce over CUDA IPC (NVLink P2P), for small and medium messages.
//
// Push design. Each rank owns one IPC-exported region: a flag array and receive slots, one slot per
// source rank, in two halves. A call pushes the rank's input (any local tensor: nothing to register)
// into its peers' slots, raises one flag per peer, waits for the peers' flags, and sums locally.
// The half is chosen by a per-block call counter kept on the device (`epoch`), so a captured graph
// bakes in no host state, and the slot a peer writes in call n+2 was read by its owner before the
// owner signalled call n+1: double buffering makes an end barrier unnecessary.
//
// The grid (blocks x threads, chosen when the communicator is made) is the same for every call, and
// pack i always belongs to block (i / threads) % blocks, so per-block barriers order exactly the data
// each block touches, whatever the message size.
// Every rank sums in rank order, so all ranks get bitwise identical results.
//
// Waits are bounded: past `timeout_ns` a block records who it waited for in host-mapped memory and
// the kernel returns instead of hanging. The host reads that record without synchronising; the hot
// path never touches host memory.

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>

#define MAX_RANKS 8
#define MAX_BLOCKS 128
#define MAX_THREADS 512

struct ErrorRecord {  // host-mapped, one per block: the host reads it without synchronising
  volatile int code;  // 0 ok, 1 timed out waiting for `peer`
  int rank;
  int peer;
  int block;
  unsigned long long barrier;
  unsigned long long epoch;
};

struct BlockState {  // local device memory, one per block
  unsigned long long barrier;  // barriers passed; the value written to peers' flags
  unsigned long long epoch;  // calls made; its parity picks the slot half
};

struct Args {
  char* region[MAX_RANKS];  // every rank's IPC region, mapped into this process (own included)
  BlockState* state;
  ErrorRecord* err;
  const void* in;
  void* out;
  long long packs;  // 16-byte packs in the message
  long long slot_bytes;
  unsigned long long timeout_ns;
  int rank;
  int world;
  int dtype;  // 0 bf16, 1 fp16, 2 fp32
  int two_shot;
  int blocks;  // fixed for the communicator's lifetime: see the grid rule above
  int threads;
  int pdl;  // launch with programmatic dependent launch (tpfleet/pdl.py)
};

// Region layout: [flags: MAX_BLOCKS x MAX_RANKS u64][slots: 2 halves x world x slot_bytes]
#define FLAGS_BYTES (MAX_BLOCKS * MAX_RANKS * 8)

__device__ __forceinline__ unsigned long long* flag_ptr(char* region, int block, int src) {
  return reinterpret_cast<unsigned long long*>(region) + block * MAX_RANKS + src;
}

__device__ __forceinline__ uint4* slot_ptr(const Args& a, int owner, int half, int src) {
  return reinterpret_cast<uint4*>(a.region[owner] + FLAGS_BYTES + (half * a.world + src) * a.slot_bytes);
}

__device__ __forceinline__ void st_release(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ unsigned long long ld_acquire(unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// All ranks' block b meet here. Returns false (in every thread) if a peer did not arrive in time.
__device__ bool barrier(const Args& a, BlockState& st) {
  __shared__ int failed;
  const int b = blockIdx.x, t = threadIdx.x;
  const unsigned long long v = st.barrier + 1;
  if (t == 0) failed = 0;
  __syncthreads();  // every thread's pushes are issued before any flag goes up
  if (t < a.world && t != a.rank) {
    st_release(flag_ptr(a.region[t], b, a.rank), v);
    unsigned long long* mine = flag_ptr(a.region[a.rank], b, t);
    const unsigned long long start = now_ns();
    while (ld_acquire(mine) < v) {
      if (now_ns() - start > a.timeout_ns) {
        if (atomicCAS(&failed, 0, 1) == 0) {
          ErrorRecord* e = a.err + b;
          e->rank = a.rank;
          e->peer = t;
          e->block = b;
          e->barrier = v;
          e->epoch = st.epoch;
          __threadfence_system();
          e->code = 1;
          __threadfence_system();
        }
        break;
      }
    }
  }
  __syncthreads();
  if (t == 0) st.barrier = v;
  return !failed;
}

template <typename T>
struct Pack;  // 16 bytes of T, added in fp32

// The two 16-bit types differ only in their conversion intrinsics; everything else is shared.
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 h) { return __bfloat1622float2(h); }
__device__ __forceinline__ float2 to_float2(__half2 h) { return __half22float2(h); }
template <typename H2>
__device__ __forceinline__ H2 from_floats(float a, float b);
template <>
__device__ __forceinline__ __nv_bfloat162 from_floats(float a, float b) { return __floats2bfloat162_rn(a, b); }
template <>
__device__ __forceinline__ __half2 from_floats(float a, float b) { return __floats2half2_rn(a, b); }

template <typename H2>  // a pack of four 2-element 16-bit vectors
struct HalfPack {
  static __device__ __forceinline__ void add(float* acc, uint4 v) {
    const H2* h = reinterpret_cast<const H2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 f = to_float2(h[i]);
      acc[2 * i] += f.x;
      acc[2 * i + 1] += f.y;
    }
  }
  static __device__ __forceinline__ uint4 pack(const float* acc) {
    uint4 v;
    H2* h = reinterpret_cast<H2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = from_floats<H2>(acc[2 * i], acc[2 * i + 1]);
    return v;
  }
  static constexpr int N = 8;
};

template <>
struct Pack<__nv_bfloat16> : HalfPack<__nv_bfloat162> {};

template <>
struct Pack<__half> : HalfPack<__half2> {};

template <>
struct Pack<float> {
  static __device__ __forceinline__ void add(float* acc, uint4 v) {
    acc[0] += __uint_as_float(v.x);
    acc[1] += __uint_as_float(v.y);
    acc[2] += __uint_as_float(v.z);
    acc[3] += __uint_as_float(v.w);
  }
  static __device__ __forceinline__ uint4 pack(const float* acc) {
    return make_uint4(__float_as_uint(acc[0]), __float_as_uint(acc[1]), __float_as_uint(acc[2]),
                      __float_as_uint(acc[3]));
  }
  static constexpr int N = 4;
};

// Sum pack j over sources in rank order: the rank's own value from `own`, the others from its slots.
template <typename T, int W>
__device__ __forceinline__ uint4 reduce_pack(const Args& a, int half, long long slot_off, long long j, uint4 own) {
  float acc[Pack<T>::N] = {};
#pragma unroll
  for (int s = 0; s < W; ++s) {
    uint4 v = s == a.rank ? own : __ldcg(slot_ptr(a, a.rank, half, s) + slot_off + j);
    Pack<T>::add(acc, v);
  }
  return Pack<T>::pack(acc);
}

// Under PDL this kernel starts while the one that wrote its input drains: wait for that one, then let
// the next kernel start fetching its weights while the ranks exchange data. No-ops without PDL.
__device__ __forceinline__ void pdl_enter() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

template <typename T, int W>
__global__ void __launch_bounds__(MAX_THREADS) one_shot(Args a) {
  pdl_enter();
  BlockState& st = a.state[blockIdx.x];
  const int half = st.epoch & 1;
  const uint4* in = reinterpret_cast<const uint4*>(a.in);
  uint4* out = reinterpret_cast<uint4*>(a.out);
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (long long j = first; j < a.packs; j += stride) {
    const uint4 v = in[j];
#pragma unroll
    for (int d = 0; d < W; ++d)
      if (d != a.rank) slot_ptr(a, d, half, a.rank)[j] = v;
  }
  if (!barrier(a, st)) return;
  for (long long j = first; j < a.packs; j += stride) out[j] = reduce_pack<T, W>(a, half, 0, j, in[j]);
  if (threadIdx.x == 0) st.epoch += 1;
}

// Reduce-scatter by push (chunk c goes to rank c), reduce the own chunk, all-gather by push.
template <typename T, int W>
__global__ void __launch_bounds__(MAX_THREADS) two_shot(Args a) {
  pdl_enter();
  BlockState& st = a.state[blockIdx.x];
  const int half = st.epoch & 1;
  const uint4* in = reinterpret_cast<const uint4*>(a.in);
  uint4* out = reinterpret_cast<uint4*>(a.out);
  const long long chunk = (a.packs + W - 1) / W;  // packs per chunk; the last may be shorter
  const long long gather_off = chunk;  // all-gather area follows the reduce-scatter area in each slot
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  auto len = [&](int c) { return max(0LL, min(chunk, a.packs - c * chunk)); };

#pragma unroll
  for (int d = 0; d < W; ++d) {
    if (d == a.rank) continue;
    uint4* dst = slot_ptr(a, d, half, a.rank);
    for (long long j = first; j < len(d); j += stride) dst[j] = in[d * chunk + j];
  }
  if (!barrier(a, st)) return;
  const long long mine = len(a.rank);
  for (long long j = first; j < mine; j += stride) {
    const uint4 r = reduce_pack<T, W>(a, half, 0, j, in[a.rank * chunk + j]);
    out[a.rank * chunk + j] = r;
#pragma unroll
    for (int d = 0; d < W; ++d)
      if (d != a.rank) slot_ptr(a, d, half, a.rank)[gather_off + j] = r;
  }
  if (!barrier(a, st)) return;
#pragma unroll
  for (int s = 0; s < W; ++s) {
    if (s == a.rank) continue;
    const uint4* src = slot_ptr(a, a.rank, half, s) + gather_off;
    for (long long j = first; j < len(s); j += stride) out[s * chunk + j] = __ldcg(src + j);
  }
  if (threadIdx.x == 0) st.epoch += 1;
}

template <typename T, int W>
static cudaError_t launch_typed(const Args& a, cudaStream_t stream) {
  cudaLaunchAttribute pdl;
  pdl.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  pdl.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(a.blocks);
  cfg.blockDim = dim3(a.threads);
  cfg.stream = stream;
  cfg.attrs = &pdl;
  cfg.numAttrs = a.pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, a.two_shot ? two_shot<T, W> : one_shot<T, W>, a);
}

template <typename T>
static cudaError_t launch_world(const Args& a, cudaStream_t stream) {
  switch (a.world) {
    case 2: return launch_typed<T, 2>(a, stream);
    case 3: return launch_typed<T, 3>(a, stream);
    case 4: return launch_typed<T, 4>(a, stream);
    case 5: return launch_typed<T, 5>(a, stream);
    case 6: return launch_typed<T, 6>(a, stream);
    case 7: return launch_typed<T, 7>(a, stream);
    case 8: return launch_typed<T, 8>(a, stream);
  }
  return cudaErrorInvalidValue;
}

extern "C" {

int tpf_max_blocks() { return MAX_BLOCKS; }
int tpf_max_threads() { return MAX_THREADS; }
int tpf_flags_bytes() { return FLAGS_BYTES; }
int tpf_state_bytes() { return MAX_BLOCKS * (int)sizeof(BlockState); }
int tpf_error_bytes() { return MAX_BLOCKS * (int)sizeof(ErrorRecord); }
int tpf_args_bytes() { return (int)sizeof(Args); }

// Plain cudaMalloc, never a virtual-memory allocator: the only kind cudaIpcGetMemHandle can export.
int tpf_malloc_zeroed(int device, size_t bytes, void** ptr) {
  cudaError_t e = cudaSetDevice(device);
  if (e == cudaSuccess) e = cudaMalloc(ptr, bytes);
  if (e == cudaSuccess) e = cudaMemset(*ptr, 0, bytes);
  if (e == cudaSuccess) e = cudaDeviceSynchronize();
  return e;
}

int tpf_free(void* ptr) { return cudaFree(ptr); }

int tpf_host_mapped(int device, size_t bytes, void** host, void** dev) {
  cudaError_t e = cudaSetDevice(device);
  if (e == cudaSuccess) e = cudaHostAlloc(host, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
  if (e != cudaSuccess) return e;
  memset(*host, 0, bytes);
  return cudaHostGetDevicePointer(dev, *host, 0);
}

int tpf_free_host(void* host) { return cudaFreeHost(host); }

int tpf_ipc_handle(void* ptr, void* handle_out /* 64 bytes */) {
  return cudaIpcGetMemHandle(reinterpret_cast<cudaIpcMemHandle_t*>(handle_out), ptr);
}

int tpf_ipc_open(int device, const void* handle, void** ptr) {
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return e;
  cudaIpcMemHandle_t h;
  memcpy(&h, handle, sizeof(h));
  return cudaIpcOpenMemHandle(ptr, h, cudaIpcMemLazyEnablePeerAccess);
}

int tpf_ipc_close(void* ptr) { return cudaIpcCloseMemHandle(ptr); }

int tpf_memcpy(int device, void* dst, const void* src, size_t bytes) {
  cudaError_t e = cudaSetDevice(device);
  return e == cudaSuccess ? cudaMemcpy(dst, src, bytes, cudaMemcpyDefault) : e;
}

const char* tpf_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

int tpf_all_reduce(int device, const Args* a, void* stream) {
  // The launch goes through this library's own (static) runtime, whose current device is per thread.
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return e;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (a->dtype) {
    case 0: return launch_world<__nv_bfloat16>(*a, s);
    case 1: return launch_world<__half>(*a, s);
    case 2: return launch_world<float>(*a, s);
  }
  return cudaErrorInvalidValue;
}

}  // extern "C"
