//! Kernel programs: syscall and socket-layer tracepoints that copy socket payloads into a ring
//! buffer.
//!
//! Thin on purpose: decide whether an fd is a TCP socket, copy at most `CAPTURE_LIMIT` bytes of what
//! the syscall actually transferred, attach the connection's identity, tuple and role, emit. All
//! parsing happens in userspace.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

/// Host builds (`cargo clippy --workspace`) compile this stub; the real object is built for BPF.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path, so this never runs.
    unsafe { core::hint::unreachable_unchecked() }
}
