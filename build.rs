//! Gives binaries, tests and benches an rpath to libtorch (torch-sys adds none), and compiles
//! the C++ shim. There is no GPU build: the binary links libtorch_cpu only and loads
//! libtorch_cuda at run time when a CUDA device is asked for (src/device.rs).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set; run `make libtorch` first");
        return;
    };
    let lib = PathBuf::from(libtorch).join("lib");
    if !lib.join("libtorch_cpu.so").exists() {
        println!(
            "cargo:warning=libtorch not found at {} - run `make libtorch` (or `make test`) first",
            lib.display()
        );
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    compile_shim(&PathBuf::from(std::env::var_os("LIBTORCH").unwrap()));
}

/// csrc/: the few libtorch calls tch does not expose (csrc/leaky_relu.cpp, csrc/compute.cpp), compiled against
/// the same headers and C++ ABI as the libtorch wheel (the CXX11 ABI since torch 2.x wheels).
fn compile_shim(libtorch: &std::path::Path) {
    println!("cargo:rerun-if-changed=csrc/leaky_relu.cpp");
    println!("cargo:rerun-if-changed=csrc/compute.cpp");
    let include = libtorch.join("include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/leaky_relu.cpp")
        .file("csrc/compute.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        // Debug info of two forwarding functions is not worth compiling libtorch's headers with.
        .debug(false)
        .compile("plankton_shim");
    // The shim calls into libtorch_cpu and c10, which torch-sys links as well.
    println!(
        "cargo:rustc-link-search=native={}",
        libtorch.join("lib").display()
    );
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
