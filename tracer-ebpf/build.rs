// Rebuild the kernel programs when the linker changes (e.g. after the toolchain script reinstalls it).
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    // bpf-linker asks LLVM to expand memcpy "in order" by default, which also turns off LLVM's
    // own expansion of memset: every `[0; N]` then becomes a call to a byte-at-a-time `memset`
    // function (hundreds of them in the exit programs, ~80 ns per captured syscall). Without it,
    // small constant copies and fills become plain stores.
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
    }
}
