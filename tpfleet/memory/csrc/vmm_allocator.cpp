// Device memory that tpfleet's memory saver maps itself with the CUDA virtual-memory API, so that its
// physical pages can be given back to the driver and taken again at the same addresses.
//
// PyTorch sees this library through its pluggable-allocator interface: one allocation entry point per
// tag slot (tpf_vmm_alloc_<slot>), so the tag of an allocation is fixed by the MemPool that asked for
// it, not by any global "current tag". Every allocation reserves its own address range, creates one
// physical allocation for it and maps it. Release unmaps and frees the physical memory of every live
// allocation of a (device, slot) and keeps the address range; resume creates new physical memory and
// maps it at the same range. An optional pinned host copy is taken at release and put back at resume.
//
// Driver functions are looked up in the already loaded driver at run time, so building the library
// needs the CUDA headers but no libcuda.so to link against (toolkits installed from pip have none).
//
// Every function that can fail returns 0 or an error code and leaves a message in a thread-local buffer
// (tpf_vmm_last_error). The pluggable-allocator entry points cannot return codes: allocation returns
// NULL (PyTorch raises its out-of-memory error) and free prints the message.

#include <cuda.h>
#include <dlfcn.h>

#include <cstdarg>
#include <cstdio>
#include <mutex>
#include <unordered_map>

namespace {

constexpr int kMaxSlots = 8;
constexpr int kMaxDevices = 64;

#define TPF_DRIVER_FUNCTIONS(X)                                                                           \
  X(cuInit) X(cuGetErrorName) X(cuGetErrorString) X(cuDeviceGet) X(cuDevicePrimaryCtxRetain) X(cuCtxGetCurrent) \
  X(cuCtxSetCurrent) X(cuCtxSynchronize) X(cuMemGetAllocationGranularity) X(cuMemAddressReserve)              \
  X(cuMemAddressFree) X(cuMemCreate) X(cuMemRelease) X(cuMemMap) X(cuMemUnmap) X(cuMemSetAccess)              \
  X(cuMemHostAlloc) X(cuMemFreeHost) X(cuMemcpyDtoHAsync) X(cuMemcpyHtoDAsync) X(cuStreamSynchronize)         \
  X(cuStreamIsCapturing) X(cuThreadExchangeStreamCaptureMode) X(cuIpcGetMemHandle)

#define TPF_STRING(x) #x
#define TPF_SYMBOL(x) TPF_STRING(x)

// One pointer per driver function, typed by its declaration in cuda.h. Where cuda.h maps a name to a
// versioned symbol (cuMemcpyDtoHAsync -> cuMemcpyDtoHAsync_v2), the member, its type and the symbol
// looked up all follow the mapping: the library binds exactly what linking with -lcuda would.
struct Driver {
#define TPF_DECLARE(name) decltype(&::name) name = nullptr;
  TPF_DRIVER_FUNCTIONS(TPF_DECLARE)
#undef TPF_DECLARE
};

Driver drv;
std::once_flag g_load_once;
int g_load_status = 0;
char g_load_error[1024];
thread_local char g_error[1024];

void set_error(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(g_error, sizeof(g_error), fmt, args);
  va_end(args);
}

// Records "<what> failed: <NAME> (<description>)" and returns the driver's code.
int fail(CUresult r, const char* fmt, ...) {
  char what[512];
  va_list args;
  va_start(args, fmt);
  vsnprintf(what, sizeof(what), fmt, args);
  va_end(args);
  const char* name = nullptr;
  const char* text = nullptr;
  if (drv.cuGetErrorName) drv.cuGetErrorName(r, &name);
  if (drv.cuGetErrorString) drv.cuGetErrorString(r, &text);
  set_error("%s failed: %s (%s)", what, name ? name : "unknown CUresult", text ? text : "no description");
  return static_cast<int>(r);
}

// The driver is already loaded by PyTorch; dlopen finds that copy.
int load_driver() {
  std::call_once(g_load_once, [] {
    void* driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (driver == nullptr) {
      set_error("cannot load the CUDA driver (libcuda.so.1): %s", dlerror());
      g_load_status = -1;
    }
#define TPF_LOAD(name)                                                                              \
  if (!g_load_status) {                                                                             \
    drv.name = reinterpret_cast<decltype(drv.name)>(dlsym(driver, TPF_SYMBOL(name)));               \
    if (drv.name == nullptr) {                                                                      \
      set_error("the CUDA driver has no %s: it is older than this toolkit's headers", TPF_SYMBOL(name)); \
      g_load_status = -1;                                                                           \
    }                                                                                               \
  }
    TPF_DRIVER_FUNCTIONS(TPF_LOAD)
#undef TPF_LOAD
    if (!g_load_status) {
      CUresult r = drv.cuInit(0);
      if (r != CUDA_SUCCESS) g_load_status = fail(r, "cuInit");
    }
    if (g_load_status) snprintf(g_load_error, sizeof(g_load_error), "%s", g_error);
  });
  if (g_load_status) set_error("%s", g_load_error);
  return g_load_status;
}

CUmemAllocationProp allocation_prop(int device) {
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  // No shareable handle type: this memory can never be exported to another process (CUDA IPC, NCCL
  // buffer registration), so no peer can keep a mapping of pages that a release gives back.
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
  return prop;
}

struct DeviceState {
  CUcontext ctx = nullptr;  // the device's primary context, the one PyTorch uses
  size_t granularity = 0;
};

DeviceState g_devices[kMaxDevices];
std::mutex g_devices_mutex;

int device_state(int device, DeviceState** out) {
  if (device < 0 || device >= kMaxDevices) {
    set_error("device %d is out of range (0..%d)", device, kMaxDevices - 1);
    return -1;
  }
  std::lock_guard<std::mutex> lock(g_devices_mutex);
  DeviceState& d = g_devices[device];
  if (d.ctx == nullptr) {
    CUdevice dev;
    CUresult r = drv.cuDeviceGet(&dev, device);
    if (r != CUDA_SUCCESS) return fail(r, "cuDeviceGet(%d)", device);
    CUcontext ctx;
    r = drv.cuDevicePrimaryCtxRetain(&ctx, dev);
    if (r != CUDA_SUCCESS) return fail(r, "cuDevicePrimaryCtxRetain(device %d)", device);
    CUmemAllocationProp prop = allocation_prop(device);
    size_t granularity = 0;
    r = drv.cuMemGetAllocationGranularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM);
    if (r != CUDA_SUCCESS) return fail(r, "cuMemGetAllocationGranularity(device %d)", device);
    d.granularity = granularity;
    d.ctx = ctx;
  }
  *out = &d;
  return 0;
}

// Makes the device's primary context current for the scope, and puts the caller's back after.
class ContextGuard {
 public:
  explicit ContextGuard(CUcontext ctx) {
    status_ = drv.cuCtxGetCurrent(&previous_);
    if (status_ == CUDA_SUCCESS && previous_ != ctx) {
      status_ = drv.cuCtxSetCurrent(ctx);
      switched_ = status_ == CUDA_SUCCESS;
    }
  }
  ~ContextGuard() {
    if (switched_) drv.cuCtxSetCurrent(previous_);
  }
  CUresult status() const { return status_; }

 private:
  CUcontext previous_ = nullptr;
  CUresult status_ = CUDA_SUCCESS;
  bool switched_ = false;
};

// PyTorch allocates new segments during CUDA-graph capture; the VMM calls are legal there only in
// relaxed capture mode, which this thread takes for the scope (as PyTorch does around cudaMalloc).
class RelaxedCapture {
 public:
  RelaxedCapture() { drv.cuThreadExchangeStreamCaptureMode(&mode_); }
  ~RelaxedCapture() { drv.cuThreadExchangeStreamCaptureMode(&mode_); }

 private:
  CUstreamCaptureMode mode_ = CU_STREAM_CAPTURE_MODE_RELAXED;
};

// For printing addresses with %llx.
unsigned long long ull(CUdeviceptr p) { return static_cast<unsigned long long>(p); }

struct Allocation {
  int device;
  int slot;
  size_t size;  // a multiple of the device's granularity: the reserved range and the mapping
  CUmemGenericAllocationHandle handle;
  bool mapped;
  void* host;  // pinned copy, made at the first release that asks for one and kept for the next
  bool backed_up;  // `host` holds the contents of the last release, still to be restored
};

std::mutex g_mutex;
std::unordered_map<CUdeviceptr, Allocation> g_live;

int map_physical(CUdeviceptr va, Allocation& a) {
  CUmemAllocationProp prop = allocation_prop(a.device);
  CUmemGenericAllocationHandle handle;
  CUresult r = drv.cuMemCreate(&handle, a.size, &prop, 0);
  if (r != CUDA_SUCCESS) return fail(r, "cuMemCreate(%zu bytes on device %d)", a.size, a.device);
  r = drv.cuMemMap(va, a.size, 0, handle, 0);
  if (r != CUDA_SUCCESS) {
    drv.cuMemRelease(handle);
    return fail(r, "cuMemMap(0x%llx, %zu bytes)", ull(va), a.size);
  }
  CUmemAccessDesc access = {};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = a.device;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  r = drv.cuMemSetAccess(va, a.size, &access, 1);
  if (r != CUDA_SUCCESS) {
    drv.cuMemUnmap(va, a.size);
    drv.cuMemRelease(handle);
    return fail(r, "cuMemSetAccess(0x%llx, %zu bytes, device %d)", ull(va), a.size, a.device);
  }
  a.handle = handle;
  a.mapped = true;
  return 0;
}

int unmap_physical(CUdeviceptr va, Allocation& a) {
  CUresult r = drv.cuMemUnmap(va, a.size);
  if (r != CUDA_SUCCESS) return fail(r, "cuMemUnmap(0x%llx, %zu bytes)", ull(va), a.size);
  a.mapped = false;
  r = drv.cuMemRelease(a.handle);
  if (r != CUDA_SUCCESS) return fail(r, "cuMemRelease(handle of 0x%llx)", ull(va));
  return 0;
}

void* alloc_in_slot(int slot, size_t size, int device) {
  if (load_driver()) return nullptr;
  RelaxedCapture relaxed;
  DeviceState* d;
  if (device_state(device, &d)) return nullptr;
  ContextGuard guard(d->ctx);
  if (guard.status() != CUDA_SUCCESS) {
    fail(guard.status(), "making device %d's primary context current", device);
    return nullptr;
  }
  size_t bytes = (size + d->granularity - 1) / d->granularity * d->granularity;
  if (bytes == 0) bytes = d->granularity;
  CUdeviceptr va = 0;
  CUresult r = drv.cuMemAddressReserve(&va, bytes, d->granularity, 0, 0);
  if (r != CUDA_SUCCESS) {
    fail(r, "cuMemAddressReserve(%zu bytes)", bytes);
    return nullptr;
  }
  Allocation a{device, slot, bytes, 0, false, nullptr, false};
  if (map_physical(va, a)) {
    drv.cuMemAddressFree(va, bytes);
    return nullptr;
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  g_live.emplace(va, a);
  return reinterpret_cast<void*>(va);
}

bool selected(const Allocation& a, int device, int slot) { return a.device == device && a.slot == slot; }

int check_slot(int slot) {
  if (slot < 0 || slot >= kMaxSlots) {
    set_error("tag slot %d is out of range (0..%d)", slot, kMaxSlots - 1);
    return -1;
  }
  return 0;
}

// load_driver, the slot check, and the device's context made current: the preamble of every control call.
#define TPF_ENTER(device, slot)                                                          \
  if (int e = load_driver()) return e;                                                   \
  if (int e = check_slot(slot)) return e;                                                \
  DeviceState* d;                                                                        \
  if (int e = device_state(device, &d)) return e;                                        \
  ContextGuard guard(d->ctx);                                                            \
  if (guard.status() != CUDA_SUCCESS)                                                    \
    return fail(guard.status(), "making device %d's primary context current", device);

}  // namespace

extern "C" {

#define TPF_ALLOC_ENTRY(slot)                                                  \
  void* tpf_vmm_alloc_##slot(size_t size, int device, CUstream stream) { \
    (void)stream;                                                              \
    return alloc_in_slot(slot, size, device);                                  \
  }
TPF_ALLOC_ENTRY(0)
TPF_ALLOC_ENTRY(1)
TPF_ALLOC_ENTRY(2)
TPF_ALLOC_ENTRY(3)
TPF_ALLOC_ENTRY(4)
TPF_ALLOC_ENTRY(5)
TPF_ALLOC_ENTRY(6)
TPF_ALLOC_ENTRY(7)
#undef TPF_ALLOC_ENTRY

int tpf_vmm_max_slots() { return kMaxSlots; }

const char* tpf_vmm_last_error() { return g_error; }

int tpf_vmm_init() { return load_driver(); }

// Frees the address range too: PyTorch calls this only for a segment it will never use again.
void tpf_vmm_free(void* ptr, size_t size, int device, CUstream stream) {
  (void)size;
  (void)device;
  Allocation a;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_live.find(reinterpret_cast<CUdeviceptr>(ptr));
    if (it == g_live.end()) {
      fprintf(stderr, "tpfleet memory saver: free of %p, which it did not allocate\n", ptr);
      return;
    }
    a = it->second;
    g_live.erase(it);
  }
  if (load_driver()) return;
  DeviceState* d;
  if (device_state(a.device, &d)) {
    fprintf(stderr, "tpfleet memory saver: %s\n", g_error);
    return;
  }
  ContextGuard guard(d->ctx);
  CUdeviceptr va = reinterpret_cast<CUdeviceptr>(ptr);
  // Work queued on the segment must finish before its pages go (cudaFree would wait the same way);
  // a stream under capture has no such work, and synchronizing there would break the capture.
  CUstreamCaptureStatus capturing = CU_STREAM_CAPTURE_STATUS_NONE;
  CUresult r = drv.cuStreamIsCapturing(stream, &capturing);
  if (r == CUDA_ERROR_DEINITIALIZED) return;  // the process is exiting: the driver frees everything
  int e = 0;
  if (r != CUDA_SUCCESS || capturing == CU_STREAM_CAPTURE_STATUS_NONE) {
    r = drv.cuCtxSynchronize();
    if (r != CUDA_SUCCESS) e = fail(r, "cuCtxSynchronize before freeing 0x%llx", ull(va));
  }
  if (!e && a.mapped) e = unmap_physical(va, a);
  if (!e) {
    r = drv.cuMemAddressFree(va, a.size);
    if (r != CUDA_SUCCESS) e = fail(r, "cuMemAddressFree(0x%llx, %zu bytes)", ull(va), a.size);
  }
  if (a.host) {
    r = drv.cuMemFreeHost(a.host);
    if (!e && r != CUDA_SUCCESS) e = fail(r, "cuMemFreeHost(backup of 0x%llx)", ull(va));
  }
  if (e) fprintf(stderr, "tpfleet memory saver: %s\n", g_error);
}

// Unmaps and frees the physical memory of every mapped allocation of (device, slot); with `backup`,
// first copies each into its pinned host buffer on `stream` and waits for the copies. `bytes` receives
// the bytes given back to the driver.
int tpf_vmm_release(int device, int slot, int backup, CUstream stream, unsigned long long* bytes) {
  *bytes = 0;
  TPF_ENTER(device, slot)
  std::lock_guard<std::mutex> lock(g_mutex);
  if (backup) {
    for (auto& [va, a] : g_live) {
      if (!selected(a, device, slot) || !a.mapped) continue;
      if (a.host == nullptr) {
        CUresult r = drv.cuMemHostAlloc(&a.host, a.size, 0);
        if (r != CUDA_SUCCESS) {
          a.host = nullptr;
          return fail(r, "cuMemHostAlloc(%zu bytes of pinned host memory for a backup)", a.size);
        }
      }
      CUresult r = drv.cuMemcpyDtoHAsync(a.host, va, a.size, stream);
      if (r != CUDA_SUCCESS) return fail(r, "backing up 0x%llx (%zu bytes) to the host", ull(va), a.size);
    }
    CUresult r = drv.cuStreamSynchronize(stream);
    if (r != CUDA_SUCCESS) return fail(r, "waiting for the backup copies of device %d", device);
  }
  for (auto& [va, a] : g_live) {
    if (!selected(a, device, slot) || !a.mapped) continue;
    if (int e = unmap_physical(va, a)) return e;
    a.backed_up = backup != 0;
    *bytes += a.size;
  }
  return 0;
}

// Maps new physical memory at every unmapped range of (device, slot) and copies back the host backups
// that the last release took, on `stream`, then waits for them. Safe to call again after a failure:
// ranges already mapped are kept, and their pending backups are copied again.
int tpf_vmm_resume(int device, int slot, CUstream stream, unsigned long long* bytes) {
  *bytes = 0;
  TPF_ENTER(device, slot)
  std::lock_guard<std::mutex> lock(g_mutex);
  bool copied = false;
  for (auto& [va, a] : g_live) {
    if (!selected(a, device, slot)) continue;
    if (!a.mapped) {
      if (int e = map_physical(va, a)) return e;
      *bytes += a.size;
    }
    if (a.backed_up) {
      CUresult r = drv.cuMemcpyHtoDAsync(va, a.host, a.size, stream);
      if (r != CUDA_SUCCESS) return fail(r, "restoring 0x%llx (%zu bytes) from the host", ull(va), a.size);
      copied = true;
    }
  }
  if (copied) {
    CUresult r = drv.cuStreamSynchronize(stream);
    if (r != CUDA_SUCCESS) return fail(r, "waiting for the restore copies of device %d", device);
    for (auto& [va, a] : g_live) {
      if (selected(a, device, slot)) a.backed_up = false;
    }
  }
  return 0;
}

// Bytes of the live allocations of (device, slot): all of them, or only those mapped now.
unsigned long long tpf_vmm_bytes(int device, int slot, int mapped_only) {
  std::lock_guard<std::mutex> lock(g_mutex);
  unsigned long long total = 0;
  for (auto& [va, a] : g_live) {
    if (selected(a, device, slot) && (a.mapped || !mapped_only)) total += a.size;
  }
  return total;
}

// Whether cuIpcGetMemHandle accepts `ptr` (memory from cudaMalloc does; VMM memory such as this
// library's, or expandable segments', is refused with CUDA_ERROR_INVALID_VALUE).
int tpf_vmm_ipc_exportable(int device, unsigned long long ptr, int* exportable) {
  *exportable = 0;
  TPF_ENTER(device, 0)
  CUipcMemHandle handle;
  CUresult r = drv.cuIpcGetMemHandle(&handle, static_cast<CUdeviceptr>(ptr));
  if (r == CUDA_SUCCESS) {
    *exportable = 1;
    return 0;
  }
  if (r == CUDA_ERROR_INVALID_VALUE) return 0;
  return fail(r, "cuIpcGetMemHandle(0x%llx)", ptr);
}

}  // extern "C"
