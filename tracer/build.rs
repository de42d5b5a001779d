//! Builds the kernel programs (`tracer-ebpf`, BPF target, nightly toolchain) and leaves the object
//! in OUT_DIR for `include_bytes_aligned!`. The toolchain comes from scripts/setup-toolchain.sh.

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../tracer-ebpf");
    println!("cargo:rerun-if-changed={root}/src");
    let package = aya_build::Package {
        name: "tracer-ebpf",
        root_dir: root,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
