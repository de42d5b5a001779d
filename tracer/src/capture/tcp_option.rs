//! The trace-context TCP option (`tracer-ebpf/src/tcp_option.rs`): decides whether it can run
//! here and attaches its sock_ops program to the cgroup v2 root, beside any other agent's
//! (multi-attach), so it sees every TCP socket of the host.

use std::fs::File;
use std::path::PathBuf;

use aya::Ebpf;
use aya::programs::{CgroupAttachMode, ProgramError, SockOps};
use thiserror::Error;

use crate::check::{self, MountError};

/// Name of the sock_ops program in the kernel object.
const PROGRAM: &str = "trace_tcp_opt";

/// Why the option does not run.
#[derive(Debug, Error)]
pub enum TcpOptionError {
    /// The kernel has no TCP header option callbacks for BPF (before Linux 5.10).
    #[error("this kernel cannot write TCP header options from BPF (needs Linux 5.10): {0}")]
    Unsupported(String),
    /// No cgroup v2 hierarchy to attach to.
    #[error(transparent)]
    Cgroup(#[from] MountError),
    /// The cgroup directory could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The cgroup directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The program did not load or attach.
    #[error("loading or attaching the sock_ops program to {path} failed: {source}")]
    Attach {
        /// The cgroup directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: ProgramError,
    },
}

/// Where the program attaches: the open root of the cgroup v2 hierarchy.
pub struct Cgroup {
    path: PathBuf,
    dir: File,
}

impl Cgroup {
    /// The cgroup directory.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

/// Checks that the kernel has the header option callbacks and finds (or mounts) cgroup v2.
pub fn prepare() -> Result<Cgroup, TcpOptionError> {
    check::tcp_header_options().map_err(TcpOptionError::Unsupported)?;
    let path = check::ensure_cgroup2()?;
    let dir = File::open(&path).map_err(|source| TcpOptionError::Open {
        path: path.clone(),
        source,
    })?;
    Ok(Cgroup { path, dir })
}

/// Loads the sock_ops program and attaches it to `cgroup`. Dropping `ebpf` detaches it.
pub fn attach(ebpf: &mut Ebpf, cgroup: &Cgroup) -> Result<(), TcpOptionError> {
    let failed = |source| TcpOptionError::Attach {
        path: cgroup.path.clone(),
        source,
    };
    let prog: &mut SockOps = super::typed_program(ebpf, PROGRAM).map_err(failed)?;
    prog.load().map_err(failed)?;
    // aya attaches with a bpf_link (Linux 5.7 and later, so wherever the option runs): links of a
    // cgroup always coexist with other links, and link_create rejects the ALLOW_MULTI flag.
    prog.attach(&cgroup.dir, CgroupAttachMode::Single)
        .map_err(failed)?;
    Ok(())
}
