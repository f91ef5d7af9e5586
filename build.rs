//! Gives binaries, tests and benches an rpath to libtorch (torch-sys adds none), and in the
//! GPU build mode forces libtorch_cuda onto the link line: with the linker's default
//! `--as-needed` it is dropped (no symbol references it) and CUDA then silently reports
//! unavailable (tch-rs issue 980).
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
    if std::env::var_os("CARGO_FEATURE_GPU").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// csrc/: the few libtorch calls tch does not expose (see csrc/leaky_relu.cpp), compiled against
/// the same headers and C++ ABI as the libtorch wheel (the CXX11 ABI since torch 2.x wheels).
fn compile_shim(libtorch: &std::path::Path) {
    println!("cargo:rerun-if-changed=csrc/leaky_relu.cpp");
    let include = libtorch.join("include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/leaky_relu.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("plankton_shim");
    // The shim calls into libtorch_cpu and c10, which torch-sys links as well.
    println!("cargo:rustc-link-search=native={}", libtorch.join("lib").display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
