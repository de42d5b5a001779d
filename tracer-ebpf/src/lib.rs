//! Kernel programs of the tracer (the `tracer-ebpf` binary, built for the BPF target) and the event
//! ABI they share with userspace (this library, built for both).
#![no_std]

pub mod abi;
