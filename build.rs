//! With the `cuda` feature, compile src/model/cuda/kernels.cu with nvcc (from CUDA_HOME,
//! CUDA_PATH or PATH) into a fatbin holding machine code for compute capability CUDA_COMPUTE_CAP
//! (default 80) and its PTX, which newer GPUs JIT-compile. Machine code matters: the PTX is
//! several MB of unrolled kernels, whose JIT compilation would delay every process's first
//! forward. Without the feature, nothing to do.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let src = "src/model/cuda/kernels.cu";
    println!("cargo:rerun-if-changed={src}");
    for v in ["CUDA_HOME", "CUDA_PATH", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let nvcc = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|h| PathBuf::from(h).join("bin").join("nvcc"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("mone_kernels.fatbin");
    let status = Command::new(&nvcc)
        .args(["--fatbin", "-O3", "-gencode"])
        .arg(format!("arch=compute_{cap},code=sm_{cap}"))
        .arg("-gencode")
        .arg(format!("arch=compute_{cap},code=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg(src)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{} failed on {src} ({s})", nvcc.display()),
        Err(e) => panic!(
            "the cuda feature needs nvcc (set CUDA_HOME; scripts/build_cuda.sh installs one): {}: {e}",
            nvcc.display()
        ),
    }
}
