//! Where the networks run, and how tensors get there.
//!
//! One binary, built on a CPU machine, serves both kinds of machine: it links only
//! libtorch_cpu, and loads `libtorch_cuda.so` from beside that library at run time when a CUDA
//! device is asked for (`cuda`, `cuda:N`, or `auto` on a machine with a usable GPU). Loading
//! it registers libtorch's CUDA hooks, so it must happen before anything asks libtorch about
//! CUDA: resolve the device first (the CLI and the daemon do, before any other torch call).
//!
//! Also here: the compute options that training, prediction and the daemon share (`[compute]`
//! of a pipeline: precision, channels-last, cuDNN autotuning, TF32) and the host -> device
//! upload path (pinned host memory, non-blocking copies).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Serialize;
use tch::{Device, Tensor};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeviceError {
    #[error("`{0}` is not a device: expected auto, cpu, cuda or cuda:N (N from 0 to 127)")]
    Unknown(String),
    #[error("{asked}: CUDA could not be loaded: {reason}")]
    NoCuda { asked: String, reason: String },
    #[error("{asked}: libtorch_cuda is loaded ({library}) but only {found} CUDA device(s) are visible (is the NVIDIA driver there, and CUDA_VISIBLE_DEVICES unset or right?)")]
    NoSuchDevice {
        asked: String,
        found: i64,
        library: PathBuf,
    },
}

/// A device as the CLI and the config files spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// `cuda:0` when CUDA loads and a device is visible, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            // libtorch's device index is an 8-bit integer.
            _ => match s.strip_prefix("cuda:").map(str::parse::<i8>) {
                Some(Ok(i)) if i >= 0 => Ok(DeviceChoice::Cuda(i as usize)),
                _ => Err(DeviceError::Unknown(s.to_string())),
            },
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => write!(f, "auto"),
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// A device as the CLI spells it (`cpu`, `cuda:0`).
pub fn name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Cpu => "cpu".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Parses and resolves a device name (`auto`, `cpu`, `cuda`, `cuda:N`).
pub fn select(name: &str) -> Result<Device, DeviceError> {
    resolve(name.parse()?)
}

/// The device to run on: loads CUDA for `cuda`/`auto`, and checks that the device exists.
pub fn resolve(choice: DeviceChoice) -> Result<Device, DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(i) => {
            let asked = choice.to_string();
            let library = load_cuda().map_err(|reason| DeviceError::NoCuda {
                asked: asked.clone(),
                reason,
            })?;
            let found = tch::Cuda::device_count();
            if (i as i64) < found {
                Ok(Device::Cuda(i))
            } else {
                Err(DeviceError::NoSuchDevice {
                    asked,
                    found,
                    library: library.to_path_buf(),
                })
            }
        }
        DeviceChoice::Auto => match load_cuda() {
            Ok(_) if tch::Cuda::device_count() > 0 => {
                tracing::info!("device auto: cuda:0");
                Ok(Device::Cuda(0))
            }
            Ok(library) => {
                tracing::info!(library = %library.display(), "device auto: cpu (CUDA loaded, no device visible)");
                Ok(Device::Cpu)
            }
            Err(reason) => {
                tracing::info!(%reason, "device auto: cpu (no CUDA)");
                Ok(Device::Cpu)
            }
        },
    }
}

/// Checks a device chosen elsewhere (a library caller's `Device::Cuda(i)`): loads CUDA if
/// needed and checks that the device exists.
pub fn ensure(device: Device) -> Result<(), DeviceError> {
    match device {
        Device::Cuda(i) => resolve(DeviceChoice::Cuda(i)).map(|_| ()),
        _ => Ok(()),
    }
}

/// Where the binary looks for CUDA and what it found: for `plankton devices` and error reports.
#[derive(Debug, Clone, Serialize)]
pub struct CudaReport {
    /// The directory of the libtorch_cpu.so this process runs with.
    pub libtorch: Option<PathBuf>,
    /// The version of the torch install that directory belongs to (its `version.py`).
    pub torch_version: Option<String>,
    /// The libtorch_cuda.so loaded, if one was.
    pub cuda_library: Option<PathBuf>,
    /// Why none was.
    pub cuda_error: Option<String>,
    pub cuda_devices: i64,
    pub cudnn: bool,
    /// What `--device auto` picks here.
    pub auto: String,
}

/// Loads CUDA (once) and reports what is there.
pub fn cuda_report() -> CudaReport {
    let loaded = load_cuda();
    let cuda_devices = if loaded.is_ok() {
        tch::Cuda::device_count()
    } else {
        0
    };
    let libtorch = libtorch_dir();
    let torch_version = libtorch.as_ref().and_then(|d| torch_version_near(d));
    CudaReport {
        libtorch,
        torch_version,
        cuda_library: loaded.as_ref().ok().map(|p| p.to_path_buf()),
        cuda_error: loaded.err(),
        cuda_devices,
        cudnn: cuda_devices > 0 && tch::Cuda::cudnn_is_available(),
        auto: if cuda_devices > 0 {
            "cuda:0".into()
        } else {
            "cpu".into()
        },
    }
}

impl CudaReport {
    pub fn render(&self) -> String {
        let or_unknown = |p: &Option<PathBuf>| {
            p.as_ref()
                .map_or("(not found)".to_string(), |p| p.display().to_string())
        };
        let mut t = format!(
            "libtorch: {} (torch {})\n",
            or_unknown(&self.libtorch),
            self.torch_version.as_deref().unwrap_or("?")
        );
        match (&self.cuda_library, &self.cuda_error) {
            (Some(lib), _) => {
                t += &format!(
                    "CUDA: loaded {}; {} device(s); cuDNN {}\n",
                    lib.display(),
                    self.cuda_devices,
                    if self.cudnn { "yes" } else { "no" }
                )
            }
            (None, Some(e)) => t += &format!("CUDA: not available: {e}\n"),
            (None, None) => t += "CUDA: not available\n",
        }
        t += &format!("--device auto -> {}\n", self.auto);
        t
    }
}

/// `torch/version.py` of a pip-installed torch whose `torch/lib` is `lib`.
fn torch_version_near(lib: &Path) -> Option<String> {
    let text = std::fs::read_to_string(lib.parent()?.join("version.py")).ok()?;
    let line = text.lines().find(|l| l.starts_with("__version__"))?;
    Some(
        line.split('=')
            .nth(1)?
            .trim()
            .trim_matches(|c| c == '\'' || c == '"')
            .to_string(),
    )
}

static CUDA: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Loads `libtorch_cuda.so` from the directory of the libtorch_cpu.so in use, once per process;
/// returns its path, or what was looked for and why it failed.
pub fn load_cuda() -> Result<&'static Path, String> {
    CUDA.get_or_init(|| {
        let dir = libtorch_dir().ok_or_else(|| "libtorch_cpu.so is not among this process's libraries".to_string())?;
        let library = dir.join("libtorch_cuda.so");
        if !library.exists() {
            return Err(format!("looked for {} beside the libtorch_cpu.so in use: not there (a CPU-only libtorch)", library.display()));
        }
        let c_path = CString::new(library.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: dlopen/dlerror with a valid C string; the handle is kept for the process's life
        // (never dlclosed: libtorch's CUDA hooks live in it).
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            // SAFETY: dlerror returns a thread-local message or null.
            let why = unsafe {
                let e = libc::dlerror();
                if e.is_null() {
                    "unknown dlopen error".to_string()
                } else {
                    CStr::from_ptr(e).to_string_lossy().into_owned()
                }
            };
            return Err(format!(
                "{}: {why} (CUDA needs the NVIDIA libraries torch's wheel depends on: `make GPU=1 libtorch`, \
                 or run against a PyTorch install with LD_LIBRARY_PATH=<site-packages>/torch/lib)",
                library.display()
            ));
        }
        Ok(library)
    })
    .as_deref()
    .map_err(Clone::clone)
}

/// The directory of the libtorch_cpu.so loaded into this process.
pub fn libtorch_dir() -> Option<PathBuf> {
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: the loader passes a valid info record; data is the &mut Option we passed.
        unsafe {
            let name: *const c_char = (*info).dlpi_name;
            if name.is_null() {
                return 0;
            }
            let path = Path::new(std::ffi::OsStr::from_encoded_bytes_unchecked(
                CStr::from_ptr(name).to_bytes(),
            ));
            if path.file_name().is_some_and(|f| f == "libtorch_cpu.so") {
                *(data as *mut Option<PathBuf>) = path.parent().map(Path::to_path_buf);
                return 1;
            }
            0
        }
    }
    let mut found: Option<PathBuf> = None;
    // SAFETY: the callback only reads the records and writes `found`.
    unsafe {
        libc::dl_iterate_phdr(
            Some(visit),
            &mut found as *mut Option<PathBuf> as *mut c_void,
        )
    };
    found.map(|d| d.canonicalize().unwrap_or(d))
}

pub use plankton_data::config::compute::{ComputeConfig, Precision};

extern "C" {
    fn plankton_autocast_enter(cuda: c_int) -> c_int;
    fn plankton_autocast_exit(cuda: c_int, previous: c_int);
    fn plankton_autocast_enabled(cuda: c_int) -> c_int;
    fn plankton_set_tf32(allow: c_int) -> c_int;
    fn plankton_tf32_conv() -> c_int;
    fn plankton_channels_last(x: *const c_void) -> *mut c_void;
    fn plankton_is_channels_last(x: *const c_void) -> c_int;
    fn plankton_upload(host: *const c_void, index: c_int, channels_last: c_int) -> *mut c_void;
    fn plankton_download(x: *const c_void) -> *mut c_void;
    fn plankton_event_record(index: c_int) -> *mut c_void;
    fn plankton_event_synchronize(event: *mut c_void) -> c_int;
    fn plankton_event_free(event: *mut c_void);
}

/// Sets the process-wide switches of `[compute]` (cuDNN autotuning, TF32) for a run on `device`.
pub fn apply_globals(cfg: &ComputeConfig, device: Device) {
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(cfg.cudnn_benchmark);
        if !set_tf32(cfg.tf32) {
            tracing::warn!("could not set TF32 to {}", cfg.tf32);
        }
    }
}

/// A data-path batch as tensors (the batch stage itself knows nothing of libtorch).
pub trait BatchTensors {
    /// Input `k` as an `N x 1 x H x W` tensor (copied; the buffer goes back to the pool).
    fn input_tensor(&self, k: usize) -> Tensor;
    /// Labels as an `N` int64 tensor (-1 = unlabelled).
    fn labels_tensor(&self) -> Tensor;
}

impl BatchTensors for plankton_data::stages::batch::Batch {
    fn input_tensor(&self, k: usize) -> Tensor {
        let (r, c) = self.shapes[k];
        Tensor::from_slice(self.input(k)).view([self.len as i64, 1, r as i64, c as i64])
    }

    fn labels_tensor(&self) -> Tensor {
        Tensor::from_slice(&self.labels)
    }
}

/// Allows or forbids TF32 in fp32 convolutions and matmuls (process-wide); false if libtorch
/// refused.
pub fn set_tf32(allow: bool) -> bool {
    // SAFETY: plain C call into the shim.
    unsafe { plankton_set_tf32(c_int::from(allow)) == 0 }
}

/// Whether TF32 is allowed for cuDNN convolutions right now (for reports and tests).
pub fn tf32_convolutions() -> bool {
    // SAFETY: plain C call into the shim.
    unsafe { plankton_tf32_conv() == 1 }
}

/// bf16 autocast on `device`'s type while the guard lives.
pub struct Autocast {
    cuda: c_int,
    previous: c_int,
}

impl Autocast {
    pub fn enter(device: Device) -> Autocast {
        let cuda = c_int::from(device.is_cuda());
        // SAFETY: plain C call into the shim.
        let previous = unsafe { plankton_autocast_enter(cuda) };
        assert!(
            previous >= 0,
            "could not enable bf16 autocast on {device:?}"
        );
        Autocast { cuda, previous }
    }

    /// Whether autocast is on for `device`'s type (on this thread).
    pub fn is_enabled(device: Device) -> bool {
        // SAFETY: plain C call into the shim.
        unsafe { plankton_autocast_enabled(c_int::from(device.is_cuda())) == 1 }
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        // SAFETY: plain C call into the shim, pairing the enter above.
        unsafe { plankton_autocast_exit(self.cuda, self.previous) }
    }
}

fn from_shim(out: *mut c_void, what: &str, x: &Tensor) -> Tensor {
    assert!(
        !out.is_null(),
        "{what} failed on a {:?} tensor of {:?} on {:?}",
        x.size(),
        x.kind(),
        x.device()
    );
    // SAFETY: a non-null result is a new at::Tensor handle that we own.
    unsafe { Tensor::from_ptr(out as *mut _) }
}

/// The same values laid out channels-last (4-d tensors; others are returned as they are).
pub fn channels_last(x: &Tensor) -> Tensor {
    if x.dim() != 4 {
        return x.shallow_clone();
    }
    // SAFETY: the shim takes a tch tensor handle and returns a new one (null if ATen threw).
    from_shim(
        unsafe { plankton_channels_last(x.as_ptr() as *const c_void) },
        "channels-last",
        x,
    )
}

pub fn is_channels_last(x: &Tensor) -> bool {
    // SAFETY: the shim reads the tensor's strides.
    unsafe { plankton_is_channels_last(x.as_ptr() as *const c_void) == 1 }
}

/// A host tensor on `device`: for CUDA through pinned memory with a non-blocking copy, so the
/// host goes on preparing the next batch while the copy and the step run.
pub fn upload(host: &Tensor, device: Device, channels_last_layout: bool) -> Tensor {
    let cl = channels_last_layout && host.dim() == 4;
    match device {
        Device::Cuda(i) => {
            // SAFETY: the shim takes a tch tensor handle and returns a new one (null if ATen threw).
            from_shim(
                unsafe {
                    plankton_upload(host.as_ptr() as *const c_void, i as c_int, c_int::from(cl))
                },
                "upload",
                host,
            )
        }
        _ if cl => channels_last(host),
        _ => host.to_device(device),
    }
}

/// A device tensor on its way to the host: the copy is enqueued and the host goes on (to
/// enqueue the next batch's work); `wait` returns the host tensor once the copy has run.
pub struct Download {
    host: Tensor,
    event: Option<Event>,
}

/// Starts copying `x` to the host (pinned memory, non-blocking on CUDA; nothing to do on the CPU).
pub fn download(x: &Tensor) -> Download {
    match x.device() {
        Device::Cuda(i) => {
            // SAFETY: the shim takes a tch tensor handle and returns a new one (null if ATen threw).
            let host = from_shim(
                unsafe { plankton_download(x.as_ptr() as *const c_void) },
                "download",
                x,
            );
            Download {
                host,
                event: Some(Event::record(i)),
            }
        }
        _ => Download {
            host: x.shallow_clone(),
            event: None,
        },
    }
}

impl Download {
    pub fn wait(self) -> Tensor {
        if let Some(e) = &self.event {
            e.synchronize();
        }
        self.host
    }
}

/// A c10 event on the current stream of a CUDA device.
struct Event(*mut c_void);

// SAFETY: a c10::Event may be waited on from any thread; we only move it with its Download.
unsafe impl Send for Event {}

impl Event {
    fn record(index: usize) -> Event {
        // SAFETY: plain C call into the shim.
        let e = unsafe { plankton_event_record(index as c_int) };
        assert!(
            !e.is_null(),
            "could not record a CUDA event on cuda:{index}"
        );
        Event(e)
    }

    fn synchronize(&self) {
        // SAFETY: self.0 is a live event from plankton_event_record.
        let rc = unsafe { plankton_event_synchronize(self.0) };
        assert_eq!(rc, 0, "waiting for a CUDA event failed");
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: self.0 came from plankton_event_record and is freed once.
        unsafe { plankton_event_free(self.0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn device_names_parse_and_bad_ones_are_named() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        let err = "gpu0".parse::<DeviceChoice>().unwrap_err().to_string();
        assert!(
            err.contains("gpu0") && err.contains("cuda:N") && err.contains("auto"),
            "{err}"
        );
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert!("cuda:".parse::<DeviceChoice>().is_err());
        assert_eq!("cuda:127".parse(), Ok(DeviceChoice::Cuda(127)));
        for huge in [
            "cuda:128",
            "cuda:-1",
            "cuda:18446744073709551615",
            "cuda:9223372036854775808",
        ] {
            assert!(huge.parse::<DeviceChoice>().is_err(), "{huge}");
        }
    }

    #[test]
    fn libtorch_is_found_among_the_loaded_libraries() {
        let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let dir = libtorch_dir().expect("libtorch_cpu.so is loaded");
        assert!(dir.join("libtorch_cpu.so").exists(), "{}", dir.display());
    }

    /// On a machine without a GPU, `cuda` fails with what was looked for and where, and `auto`
    /// falls back to the CPU. (On a GPU machine both take the GPU; gpu_check.sh covers that.)
    #[test]
    fn without_a_gpu_cuda_is_a_clear_error_and_auto_is_the_cpu() {
        let report = cuda_report();
        if report.cuda_devices > 0 {
            assert_eq!(select("auto").unwrap(), Device::Cuda(0));
            return;
        }
        let err = select("cuda").unwrap_err().to_string();
        assert!(err.starts_with("cuda:0: "), "{err}");
        assert!(
            err.contains("libtorch_cuda"),
            "names the library it looked for: {err}"
        );
        assert_eq!(select("auto").unwrap(), Device::Cpu);
        assert_eq!(select("cpu").unwrap(), Device::Cpu);
    }

    #[test]
    fn bf16_autocast_runs_convolutions_in_bf16_and_restores_the_state() {
        let x = Tensor::randn([2, 1, 8, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([4, 1, 3, 3], (Kind::Float, Device::Cpu));
        assert!(!Autocast::is_enabled(Device::Cpu));
        let y = {
            let _a = Autocast::enter(Device::Cpu);
            assert!(Autocast::is_enabled(Device::Cpu));
            x.conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1)
        };
        assert!(!Autocast::is_enabled(Device::Cpu));
        assert_eq!(y.kind(), Kind::BFloat16);
        let exact = x.conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
        assert_eq!(exact.kind(), Kind::Float);
        let rel = ((y.to_kind(Kind::Float) - &exact)
            .abs()
            .max()
            .double_value(&[]))
            / exact.abs().max().double_value(&[]);
        assert!(
            rel > 0.0 && rel < 2e-2,
            "bf16 differs from fp32 by a bf16 rounding, got {rel}"
        );
    }

    #[test]
    fn tf32_switch_sets_and_clears_the_convolution_flag() {
        assert!(set_tf32(true));
        assert!(tf32_convolutions());
        assert!(set_tf32(false));
        assert!(!tf32_convolutions());
    }

    #[test]
    fn download_on_the_cpu_is_the_tensor_itself() {
        let x = Tensor::from_slice(&[1f32, 2.0, 3.0]);
        let y = download(&x).wait();
        assert!(y.equal(&x));
    }

    #[test]
    fn channels_last_keeps_values_and_changes_strides() {
        let x = Tensor::randn([2, 3, 5, 5], (Kind::Float, Device::Cpu));
        assert!(!is_channels_last(&x));
        let y = upload(&x, Device::Cpu, true);
        assert!(is_channels_last(&y));
        assert_eq!(y.stride(), vec![75, 1, 15, 3]);
        assert!(y.equal(&x));
        let z = upload(&x, Device::Cpu, false);
        assert!(!is_channels_last(&z) && z.equal(&x));
    }

    #[test]
    fn precision_and_compute_config_parse() {
        assert_eq!("bf16".parse(), Ok(Precision::Bf16));
        assert!("fp16"
            .parse::<Precision>()
            .unwrap_err()
            .contains("fp32 or bf16"));
        let c: ComputeConfig =
            toml::from_str("precision = \"bf16\"\nchannels_last = true").unwrap();
        assert_eq!(c.precision, Precision::Bf16);
        assert!(c.channels_last && c.cudnn_benchmark && !c.tf32);
        assert!(toml::from_str::<ComputeConfig>("presicion = \"bf16\"").is_err());
    }
}
