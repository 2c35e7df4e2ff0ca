//! Compiles every `cuda/**/*.cu` to an sm_90a cubin with `nvcc` and embeds it.
//!
//! nvcc is looked for in `$FLA_NVCC`, then `<repo>/.cuda/nvidia/cu13/bin/nvcc` (installed by
//! `scripts/install-nvcc.sh`). Without one the crate builds with no kernels embedded, and asking
//! for a kernel is an error at run time. With one, a kernel that fails to compile fails the build.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn cu_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            cu_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "cu") {
            out.push(p);
        }
    }
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FLA_NVCC") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            println!("cargo:warning=fla-kernels: FLA_NVCC={} is not a file", p.display());
            return None;
        }
        return Some(p);
    }
    let p = manifest.join("../../.cuda/nvidia/cu13/bin/nvcc");
    p.is_file().then_some(p)
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    let cuda_dir = manifest.join("cuda");
    println!("cargo:rerun-if-changed={}", cuda_dir.display());
    println!("cargo:rerun-if-env-changed=FLA_NVCC");
    let default_nvcc = manifest.join("../../.cuda/nvidia/cu13/bin/nvcc");
    println!("cargo:rerun-if-changed={}", default_nvcc.display());
    let mut files = Vec::new();
    cu_files(&cuda_dir, &mut files);
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let mut headers = Vec::new();
    if let Ok(e) = std::fs::read_dir(cuda_dir.join("common")) {
        headers.extend(e.filter_map(|e| e.ok().map(|e| e.path())));
    }
    for h in &headers {
        println!("cargo:rerun-if-changed={}", h.display());
    }

    let mut gen =
        String::from("/// Embedded cubins: (module name, image).\npub static CUBINS: &[(&str, &[u8])] = &[\n");
    let mut version = String::new();
    if let Some(nvcc) = find_nvcc(&manifest) {
        if let Ok(o) = Command::new(&nvcc).arg("--version").output() {
            version = String::from_utf8_lossy(&o.stdout).lines().last().unwrap_or("").trim().to_string();
        }
        for f in &files {
            let rel = f.strip_prefix(&cuda_dir).expect("under cuda/").with_extension("");
            let name = rel.to_string_lossy().replace(std::path::MAIN_SEPARATOR, "/");
            let cubin = out.join(format!("{}.cubin", name.replace('/', "__")));
            let status = Command::new(&nvcc)
                .args(["-gencode=arch=compute_90a,code=sm_90a", "-cubin", "-O3", "-std=c++17", "-lineinfo"])
                .arg("-I")
                .arg(&cuda_dir)
                .arg("-o")
                .arg(&cubin)
                .arg(f)
                .status();
            match status {
                Ok(s) if s.success() => {}
                Ok(s) => panic!("nvcc failed on {} ({s})", f.display()),
                Err(e) => panic!("could not run {}: {e}", nvcc.display()),
            }
            writeln!(gen, "    ({name:?}, include_bytes!({:?})),", cubin.display().to_string()).expect("string");
        }
    } else {
        println!("cargo:warning=fla-kernels: no nvcc found (FLA_NVCC or .cuda/); building without GPU kernels");
    }
    gen.push_str("];\n");
    writeln!(gen, "/// `nvcc --version` of the compiler that built [`CUBINS`] (empty when none).").expect("string");
    writeln!(gen, "pub const NVCC_VERSION: &str = {version:?};").expect("string");
    std::fs::write(out.join("cubins.rs"), gen).expect("write cubins.rs");
}
