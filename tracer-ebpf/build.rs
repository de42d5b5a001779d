// Rebuild the kernel programs when the linker changes (e.g. after the toolchain script reinstalls it).
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
