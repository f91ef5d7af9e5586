// Compute switches that tch does not expose: bf16 autocast on a chosen device type (tch's
// `autocast` only toggles CUDA's default fp16 autocast), TF32 for cuDNN convolutions and cuBLAS
// matmuls, the channels-last memory format, and uploads from pinned host memory. Plain C entry
// points in the same style as tch's own wrapper; nothing here needs CUDA headers, so the
// binary stays one CPU build that uses CUDA only when libtorch_cuda is loaded at run time.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

static at::DeviceType device_type(int cuda) { return cuda ? at::kCUDA : at::kCPU; }

// Enables bf16 autocast for the device type; returns the previous state (0/1), or -1 on error.
extern "C" int plankton_autocast_enter(int cuda) {
  try {
    auto dt = device_type(cuda);
    bool previous = at::autocast::is_autocast_enabled(dt);
    at::autocast::set_autocast_enabled(dt, true);
    at::autocast::set_autocast_dtype(dt, at::kBFloat16);
    at::autocast::increment_nesting();
    return previous ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

extern "C" void plankton_autocast_exit(int cuda, int previous) {
  try {
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(device_type(cuda), previous == 1);
  } catch (...) {
  }
}

extern "C" int plankton_autocast_enabled(int cuda) {
  try {
    return at::autocast::is_autocast_enabled(device_type(cuda)) ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// TF32 for cuDNN convolutions and cuBLAS matmuls (PyTorch's defaults: on for convolutions, off
// for matmuls). Through the same setters as torch.backends.cudnn.allow_tf32 and
// torch.set_float32_matmul_precision: they keep libtorch's legacy and per-operator flags
// consistent (libtorch refuses to read flags that a mix of the two APIs left inconsistent).
// Returns 0 on success.
extern "C" int plankton_set_tf32(int allow) {
  try {
    at::globalContext().setAllowTF32CuDNN(allow != 0);
    at::globalContext().setFloat32MatmulPrecision(allow ? "high" : "highest");
    return 0;
  } catch (...) {
    return -1;
  }
}

extern "C" int plankton_tf32_conv() {
  try {
    return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV) ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

extern "C" at::Tensor *plankton_channels_last(const at::Tensor *x) {
  try {
    return new at::Tensor(x->contiguous(at::MemoryFormat::ChannelsLast));
  } catch (...) {
    return nullptr;
  }
}

extern "C" int plankton_is_channels_last(const at::Tensor *x) {
  try {
    return x->is_contiguous(at::MemoryFormat::ChannelsLast) ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// Host tensor -> CUDA device `index` through pinned memory with a non-blocking copy, so the
// host does not wait for the copy (the caching host allocator keeps the pinned block until the
// copy has run). channels_last: lay the result out channels-last (4-d inputs).
extern "C" at::Tensor *plankton_upload(const at::Tensor *host, int index, int channels_last) {
  try {
    auto pinned = host->is_pinned() ? *host : host->pin_memory();
    auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Preserve;
    auto options = at::TensorOptions().device(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index)));
    return new at::Tensor(pinned.to(options, /*non_blocking=*/true, /*copy=*/false, format));
  } catch (...) {
    return nullptr;
  }
}

// Device -> host copy into pinned memory without waiting for it; pair with an event (below)
// and wait on that before reading the result. The host can then enqueue the next batch's work
// before it needs this one's result.
extern "C" at::Tensor *plankton_download(const at::Tensor *x) {
  try {
    auto host = at::empty(x->sizes(), x->options().device(at::kCPU).pinned_memory(true));
    host.copy_(*x, /*non_blocking=*/true);
    return new at::Tensor(host);
  } catch (...) {
    return nullptr;
  }
}

// An event recorded on the current stream of CUDA device `index` (c10's device-generic event:
// no CUDA headers needed).
extern "C" void *plankton_event_record(int index) {
  try {
    auto device = c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
    auto stream = c10::impl::getDeviceGuardImpl(c10::kCUDA)->getStream(device);
    auto *event = new c10::Event(c10::kCUDA);
    event->record(stream);
    return event;
  } catch (...) {
    return nullptr;
  }
}

extern "C" int plankton_event_synchronize(void *event) {
  try {
    static_cast<c10::Event *>(event)->synchronize();
    return 0;
  } catch (...) {
    return -1;
  }
}

extern "C" void plankton_event_free(void *event) { delete static_cast<c10::Event *>(event); }
