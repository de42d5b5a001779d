//! `tracer check`: probes what the running kernel really offers (by creating maps and loading
//! trivial programs, not by guessing from the version), mounts tracefs/bpffs when missing, and
//! checks the process's capabilities.

use std::fmt;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::capture::btf::{Btf, BtfKind, VMLINUX_BTF, resolve_offsets};

/// Where tracefs is mounted on current systems.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// Where tracefs appears on older systems (inside debugfs).
pub const DEBUG_TRACEFS: &str = "/sys/kernel/debug/tracing";
/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Where the agent mounts cgroup v2 when no cgroup2 file system is mounted.
pub const CGROUP2_FALLBACK: &str = "/run/tracer/cgroup2";

const PMU_DIR: &str = "/sys/bus/event_source/devices";
/// Kernel function whose BTF id the fentry probe attaches to.
const FENTRY_PROBE_TARGET: &str = "tcp_sendmsg";

const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;
const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
const BPF_TRACE_FENTRY: u32 = 24;
/// `bpf_reserve_hdr_opt`, a helper of the TCP header option callbacks (Linux 5.10).
const BPF_FUNC_RESERVE_HDR_OPT: u8 = 144;

/// `r0 = 0; exit`.
const RETURN_ZERO: [[u8; 8]; 2] = [[0xb7, 0, 0, 0, 0, 0, 0, 0], [0x95, 0, 0, 0, 0, 0, 0, 0]];

const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// An errno value, displayed by its symbolic name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    fn last() -> Self {
        Self(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::ESRCH => "ESRCH",
            libc::EBADF => "EBADF",
            libc::ENOMEM => "ENOMEM",
            libc::EACCES => "EACCES",
            libc::EFAULT => "EFAULT",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::ENODEV => "ENODEV",
            libc::ENOTDIR => "ENOTDIR",
            libc::EINVAL => "EINVAL",
            libc::ENOSPC => "ENOSPC",
            libc::E2BIG => "E2BIG",
            libc::ENOSYS => "ENOSYS",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            // The kernel-internal ENOTSUPP leaks out of bpf(2) for unsupported program features.
            524 => "ENOTSUPP",
            n => return write!(f, "{}", std::io::Error::from_raw_os_error(n)),
        };
        f.write_str(name)
    }
}

/// Failure to make tracefs or bpffs available.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The mount table could not be read.
    #[error("cannot read /proc/mounts: {0}")]
    ProcMounts(#[source] std::io::Error),
    /// tracefs is missing and could not be mounted.
    #[error("tracefs is not mounted at {path} and mounting it failed: {errno}")]
    Tracefs {
        /// Where it was tried first.
        path: &'static str,
        /// Error of that attempt.
        errno: Errno,
    },
    /// bpffs is missing and could not be mounted.
    #[error("bpffs is not mounted at {path} and mounting it failed: {errno}")]
    Bpffs {
        /// Where it was tried.
        path: &'static str,
        /// Error of the mount.
        errno: Errno,
    },
    /// /proc/self/mountinfo could not be read.
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(#[source] std::io::Error),
    /// No cgroup v2 file system is mounted and mounting one failed.
    #[error("no cgroup2 file system is mounted and mounting one at {path} failed: {reason}")]
    Cgroup2 {
        /// Where it was tried.
        path: &'static str,
        /// What failed.
        reason: String,
    },
}

/// Missing privileges.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// /proc/self/status could not be read.
    #[error("cannot read /proc/self/status: {0}")]
    Status(#[source] std::io::Error),
    /// /proc/self/status has no parseable CapEff line.
    #[error("no CapEff line in /proc/self/status")]
    NoCapEff,
    /// Capabilities the tracer needs are not effective.
    #[error(
        "missing capabilities: {}; run as root or grant them (e.g. docker run --cap-add ...)",
        .0.join(", ")
    )]
    Missing(Vec<&'static str>),
}

/// The outcome of probing one feature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Feature {
    /// Whether the feature works.
    pub available: bool,
    /// What was found, or why it does not work.
    pub detail: String,
}

impl Feature {
    fn yes(detail: impl Into<String>) -> Self {
        Self {
            available: true,
            detail: detail.into(),
        }
    }

    fn no(detail: impl Into<String>) -> Self {
        Self {
            available: false,
            detail: detail.into(),
        }
    }
}

/// How the agent captures socket payloads on this kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaptureMode {
    /// Syscall tracepoints (`sys_enter_*`/`sys_exit_*` of read, write, sendmsg, ...).
    SyscallTracepoints,
    /// Socket reads and writes at the socket layer's tracepoints, the other calls at their
    /// syscall tracepoints: pipe and file reads run no program, and with `writes` neither do
    /// their writes.
    SocketLayer {
        /// `tcp_sendmsg_locked` is there too, so a socket write's start is taken there and not
        /// at its syscall's entry.
        writes: bool,
        /// With `writes`, connections open and close at `inet_sock_set_state` (their TCP state
        /// changes) too, and no syscall tracepoint is attached.
        states: bool,
    },
    /// Capture is impossible; names the missing features.
    Unavailable(Vec<&'static str>),
}

impl fmt::Display for CaptureMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SyscallTracepoints => f.write_str("syscall tracepoints"),
            Self::SocketLayer {
                writes: true,
                states: true,
            } => f.write_str(
                "socket tracepoints for socket reads and writes, TCP state changes for \
                 connections' opens and closes, no syscall tracepoint",
            ),
            Self::SocketLayer { writes, .. } => write!(
                f,
                "socket tracepoints for socket reads and {}, syscall tracepoints for the rest",
                if *writes {
                    "writes"
                } else {
                    "the ends of socket writes"
                }
            ),
            Self::Unavailable(missing) => write!(f, "none (missing: {})", missing.join(", ")),
        }
    }
}

/// Everything `tracer check` found out about this kernel.
#[derive(Clone, Debug)]
pub struct Report {
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// Effective capabilities suffice.
    pub privileges: Feature,
    /// Kernel BTF is present, parses, and every needed struct offset resolves.
    pub btf: Feature,
    /// bpf(2) works (an array map can be created).
    pub bpf_syscall: Feature,
    /// A ring buffer map can be created.
    pub ringbuf: Feature,
    /// tracefs is mounted and has the syscall tracepoints.
    pub syscall_tracepoints: Feature,
    /// The socket layer's tracepoints (`sock_recv_length` and `sock_send_length`, Linux 6.3) are
    /// there, so socket reads and the ends of socket writes need no program on every read and
    /// write of the host.
    pub socket_tracepoints: Feature,
    /// Whole socket writes can be taken there (`tcp_sendmsg_locked` too).
    pub socket_writes: bool,
    /// With `socket_writes`, connections can open and close at their state changes: the
    /// `inet_sock_set_state` and `tcp_destroy_sock` tracepoints are there and BTF gives
    /// `sock.sk_shutdown` as a byte.
    pub socket_states: bool,
    /// A tracepoint program loads.
    pub tracepoint_prog: Feature,
    /// The uprobe PMU exists.
    pub uprobes: Feature,
    /// The kprobe PMU exists.
    pub kprobes: Feature,
    /// An fentry program attached to a kernel function loads.
    pub fentry: Feature,
    /// The trace-context TCP option can run: sock_ops programs with the header option helpers
    /// load and a cgroup v2 hierarchy is mounted to attach them to.
    pub tcp_option: Feature,
}

impl Report {
    /// The rows of the table, in display order.
    fn rows(&self) -> [(&'static str, &Feature); 11] {
        [
            ("privileges", &self.privileges),
            ("BTF + offsets", &self.btf),
            ("bpf syscall", &self.bpf_syscall),
            ("ring buffer", &self.ringbuf),
            ("syscall tracepoints", &self.syscall_tracepoints),
            ("socket tracepoints", &self.socket_tracepoints),
            ("tracepoint programs", &self.tracepoint_prog),
            ("uprobes", &self.uprobes),
            ("kprobes", &self.kprobes),
            ("fentry", &self.fentry),
            ("trace TCP option", &self.tcp_option),
        ]
    }

    /// Which capture mode the agent uses here.
    pub fn capture_mode(&self) -> CaptureMode {
        let required = [
            ("BTF", &self.btf),
            ("bpf syscall", &self.bpf_syscall),
            ("ring buffer", &self.ringbuf),
            ("syscall tracepoints", &self.syscall_tracepoints),
            ("tracepoint programs", &self.tracepoint_prog),
        ];
        let missing: Vec<_> = required
            .iter()
            .filter(|(_, f)| !f.available)
            .map(|(name, _)| *name)
            .collect();
        if !missing.is_empty() {
            CaptureMode::Unavailable(missing)
        } else if self.socket_tracepoints.available && self.btf.available {
            CaptureMode::SocketLayer {
                writes: self.socket_writes,
                states: self.socket_writes && self.socket_states,
            }
        } else {
            CaptureMode::SyscallTracepoints
        }
    }
}

/// Which socket calls the socket layer's tracepoints can take (see [`Report::socket_tracepoints`]):
/// reads and the ends of writes when `sock_recv_length` and `sock_send_length` are there, whole
/// writes with `tcp_sendmsg_locked` too; last, whether the state-change tracepoints
/// (`inet_sock_set_state`, `tcp_destroy_sock`) are there.
fn socket_tracepoints() -> (Feature, bool, bool) {
    let tracefs = match ensure_tracefs() {
        Ok(t) => t,
        Err(e) => return (Feature::no(e.to_string()), false, false),
    };
    let has = |event: &str| tracefs.join("events").join(event).join("id").is_file();
    // Both `sock` tracepoints came in 6.3.
    let socket = has("sock/sock_recv_length") && has("sock/sock_send_length");
    let writes = socket && has("tcp/tcp_sendmsg_locked");
    let feature = match (socket, writes) {
        (true, true) => Feature::yes("sock_recv_length, sock_send_length, tcp_sendmsg_locked"),
        (true, false) => Feature::yes(
            "sock_recv_length, sock_send_length (no tcp_sendmsg_locked: writes start at syscalls)",
        ),
        _ => Feature::no("no sock:sock_recv_length (Linux 6.3)"),
    };
    let states = has("sock/inet_sock_set_state") && has("tcp/tcp_destroy_sock");
    (feature, writes, states)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel {}", self.kernel)?;
        let width = self.rows().iter().map(|(n, _)| n.len()).max().unwrap_or(0);
        for (name, feature) in self.rows() {
            let yes = if feature.available { "yes" } else { "no" };
            writeln!(f, "{name:<width$}  {yes:<3}  {}", feature.detail)?;
        }
        write!(f, "capture mode: {}", self.capture_mode())
    }
}

/// Probes every feature on the running kernel. Mounts tracefs if it is missing.
pub fn probe() -> Report {
    let privileges = match require_privileges() {
        Ok(()) => Feature::yes("required capabilities effective"),
        Err(e) => Feature::no(e.to_string()),
    };
    let parsed = Btf::from_file(VMLINUX_BTF);
    let btf = match &parsed {
        Ok(b) => match resolve_offsets(b) {
            Ok(_) => Feature::yes(format!(
                "{VMLINUX_BTF}: {} types, offsets resolved",
                b.type_count()
            )),
            Err(e) => Feature::no(e.to_string()),
        },
        Err(e) => Feature::no(e.to_string()),
    };
    let fentry = match &parsed {
        Ok(b) => match b.type_id_by_name(BtfKind::Func, FENTRY_PROBE_TARGET) {
            Some(id) => load_program(BPF_PROG_TYPE_TRACING, BPF_TRACE_FENTRY, id, &RETURN_ZERO)
                .map(|()| format!("fentry on {FENTRY_PROBE_TARGET} loads")),
            None => Err(format!("{FENTRY_PROBE_TARGET} not in kernel BTF")),
        },
        Err(_) => Err("needs kernel BTF".to_owned()),
    };
    let (socket_tracepoints, socket_writes, state_tracepoints) = socket_tracepoints();
    let shutdown_byte = parsed
        .as_ref()
        .is_ok_and(|b| resolve_offsets(b).is_ok_and(|o| o.sk_shutdown != 0));
    let socket_states = shutdown_byte && state_tracepoints;
    Report {
        kernel: kernel_release().unwrap_or_else(|| "unknown".to_owned()),
        privileges,
        btf,
        bpf_syscall: feature(create_map(BPF_MAP_TYPE_ARRAY, 4, 8, 1).map(|()| "array map created")),
        ringbuf: feature(
            create_map(BPF_MAP_TYPE_RINGBUF, 0, 0, page_size()).map(|()| "ring buffer map created"),
        ),
        syscall_tracepoints: feature(syscall_tracepoints()),
        socket_tracepoints,
        socket_writes,
        socket_states,
        tracepoint_prog: feature(
            load_program(BPF_PROG_TYPE_TRACEPOINT, 0, 0, &RETURN_ZERO)
                .map(|()| "tracepoint program loads"),
        ),
        uprobes: feature(pmu_type("uprobe")),
        kprobes: feature(pmu_type("kprobe")),
        fentry: feature(fentry),
        tcp_option: feature(tcp_option()),
    }
}

/// Whether the trace-context TCP option can run here: where cgroup v2 is, or why not.
fn tcp_option() -> Result<String, String> {
    tcp_header_options()?;
    let cgroup = ensure_cgroup2().map_err(|e| e.to_string())?;
    Ok(format!(
        "sock_ops header option helpers load; cgroup2 at {}",
        cgroup.display()
    ))
}

/// Probes the TCP header option callbacks for BPF (Linux 5.10) by loading a sock_ops program that
/// calls `bpf_reserve_hdr_opt`; older verifiers reject the unknown helper.
pub fn tcp_header_options() -> Result<(), String> {
    // r2 = 0; r3 = 0; call bpf_reserve_hdr_opt (r1 is still the context); r0 = 1; exit
    let insns = [
        [0xb7, 0x02, 0, 0, 0, 0, 0, 0],
        [0xb7, 0x03, 0, 0, 0, 0, 0, 0],
        [0x85, 0, 0, 0, BPF_FUNC_RESERVE_HDR_OPT, 0, 0, 0],
        [0xb7, 0, 0, 0, 1, 0, 0, 0],
        [0x95, 0, 0, 0, 0, 0, 0, 0],
    ];
    load_program(BPF_PROG_TYPE_SOCK_OPS, 0, 0, &insns)
}

fn feature<T: Into<String>>(result: Result<T, String>) -> Feature {
    match result {
        Ok(detail) => Feature::yes(detail),
        Err(reason) => Feature::no(reason),
    }
}

fn syscall_tracepoints() -> Result<String, String> {
    let tracefs = ensure_tracefs().map_err(|e| e.to_string())?;
    let id_file = tracefs.join("events/syscalls/sys_enter_read/id");
    let id =
        std::fs::read_to_string(&id_file).map_err(|e| format!("{}: {e}", id_file.display()))?;
    let id: u32 = id
        .trim()
        .parse()
        .map_err(|_| format!("{}: not a number", id_file.display()))?;
    Ok(format!("{} (sys_enter_read id {id})", tracefs.display()))
}

/// Reads the PMU type of a perf event source such as `kprobe`, which exists only if the kernel
/// supports that probe kind.
fn pmu_type(pmu: &str) -> Result<String, String> {
    let path = Path::new(PMU_DIR).join(pmu).join("type");
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("no {pmu} PMU ({} missing)", path.display()),
        _ => format!("{}: {e}", path.display()),
    })?;
    let id: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{}: not a number", path.display()))?;
    Ok(format!("perf PMU type {id}"))
}

/// The prefix of `union bpf_attr` used by BPF_MAP_CREATE.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// The prefix of `union bpf_attr` used by BPF_PROG_LOAD, up to `core_relo_cnt` so that no
/// padding (which the kernel would read as a field) is left at the end.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
    attach_btf_obj_fd: u32,
    core_relo_cnt: u32,
}

fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> Result<OwnedFd, Errno> {
    // SAFETY: `attr` is a fully initialised #[repr(C)] prefix of `union bpf_attr` without padding,
    // and the kernel reads at most the size passed; any pointers in it outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        return Err(Errno::last());
    }
    let fd = i32::try_from(ret).map_err(|_| Errno(libc::EBADF))?;
    // SAFETY: on success bpf(2) returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> Result<(), String> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        ..Default::default()
    };
    bpf(BPF_MAP_CREATE, &mut attr)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Loads `insns` as a program of `prog_type`; on failure returns the errno and, when the verifier
/// said something, its last line.
fn load_program(
    prog_type: u32,
    expected_attach_type: u32,
    attach_btf_id: u32,
    insns: &[[u8; 8]],
) -> Result<(), String> {
    let license = b"GPL\0";
    let attr = |log: &mut [u8]| ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: u32::from(!log.is_empty()),
        log_size: log.len() as u32,
        // The kernel rejects a log buffer without a log level, so an empty log passes null.
        log_buf: if log.is_empty() {
            0
        } else {
            log.as_mut_ptr() as u64
        },
        expected_attach_type,
        attach_btf_id,
        ..Default::default()
    };
    let errno = match bpf(BPF_PROG_LOAD, &mut attr(&mut [])) {
        Ok(_) => return Ok(()),
        Err(errno) => errno,
    };
    // Privilege errors have no verifier log; others are retried with one to say why.
    if errno.0 == libc::EPERM {
        return Err(errno.to_string());
    }
    let mut log = vec![0u8; 64 * 1024];
    let _ = bpf(BPF_PROG_LOAD, &mut attr(&mut log));
    let text = String::from_utf8_lossy(&log);
    let last_line = text
        .trim_end_matches('\0')
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty());
    Err(match last_line {
        Some(line) => format!("{errno}: {}", line.trim()),
        None => errno.to_string(),
    })
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

pub(crate) fn kernel_release() -> Option<String> {
    // SAFETY: utsname is plain old data; all-zero is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    let release: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Some(String::from_utf8_lossy(&release).into_owned())
}

/// `(major, minor)` of a kernel release such as `6.18.44-foo`.
pub(crate) fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Mount points and file system types from /proc/mounts text.
fn parse_mounts(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let _source = fields.next()?;
            let target = fields.next()?;
            let fstype = fields.next()?;
            Some((unescape_mount_path(target), fstype.to_owned()))
        })
        .collect()
}

/// Undoes the octal escaping (`\040` for space, ...) of /proc/mounts.
fn unescape_mount_path(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0')));
        match octal.and_then(|v| u8::try_from(v).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mounts() -> Result<Vec<(String, String)>, MountError> {
    let text = std::fs::read_to_string("/proc/mounts").map_err(MountError::ProcMounts)?;
    Ok(parse_mounts(&text))
}

fn is_mounted(mounts: &[(String, String)], target: &str, fstype: &str) -> bool {
    mounts.iter().any(|(t, f)| t == target && f == fstype)
}

fn mount(fstype: &str, target: &str, data: &str) -> Result<(), Errno> {
    let to_c = |s: &str| std::ffi::CString::new(s).map_err(|_| Errno(libc::EINVAL));
    let (source, c_target, c_fstype, c_data) =
        (to_c(fstype)?, to_c(target)?, to_c(fstype)?, to_c(data)?);
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            c_target.as_ptr(),
            c_fstype.as_ptr(),
            flags,
            c_data.as_ptr().cast(),
        )
    };
    if ret == 0 {
        tracing::info!(fstype, target, "mounted");
        Ok(())
    } else {
        Err(Errno::last())
    }
}

/// Makes sure tracefs is mounted (at [`TRACEFS`], else at [`DEBUG_TRACEFS`]) and returns where.
pub fn ensure_tracefs() -> Result<PathBuf, MountError> {
    let table = mounts()?;
    for path in [TRACEFS, DEBUG_TRACEFS] {
        if is_mounted(&table, path, "tracefs") {
            return Ok(PathBuf::from(path));
        }
    }
    // A mounted debugfs exposes tracefs on first access without it being listed yet.
    if Path::new(DEBUG_TRACEFS).join("events").is_dir() {
        return Ok(PathBuf::from(DEBUG_TRACEFS));
    }
    let first = match mount("tracefs", TRACEFS, "") {
        Ok(()) => return Ok(PathBuf::from(TRACEFS)),
        Err(errno) => errno,
    };
    if Path::new(DEBUG_TRACEFS).is_dir() && mount("tracefs", DEBUG_TRACEFS, "").is_ok() {
        return Ok(PathBuf::from(DEBUG_TRACEFS));
    }
    Err(MountError::Tracefs {
        path: TRACEFS,
        errno: first,
    })
}

/// Makes sure bpffs is mounted at [`BPFFS`].
pub fn ensure_bpffs() -> Result<(), MountError> {
    if is_mounted(&mounts()?, BPFFS, "bpf") {
        return Ok(());
    }
    mount("bpf", BPFFS, "mode=700").map_err(|errno| MountError::Bpffs { path: BPFFS, errno })
}

/// Mount point of the cgroup v2 hierarchy root in /proc/self/mountinfo text: a cgroup2 mount of
/// its root (`/`) if there is one, else the first cgroup2 mount.
fn cgroup2_mount(mountinfo: &str) -> Option<String> {
    let mut any = None;
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options [optional fields] - fstype source ...
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        if after.split_ascii_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let mut fields = before.split_ascii_whitespace().skip(3);
        let (Some(root), Some(point)) = (fields.next(), fields.next()) else {
            continue;
        };
        let point = unescape_mount_path(point);
        if root == "/" {
            return Some(point);
        }
        any.get_or_insert(point);
    }
    any
}

/// The mount point of the cgroup v2 hierarchy, mounting it at [`CGROUP2_FALLBACK`] if none is
/// mounted (hybrid systems mount it at /sys/fs/cgroup/unified, unified ones at /sys/fs/cgroup).
pub fn ensure_cgroup2() -> Result<PathBuf, MountError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(MountError::MountInfo)?;
    if let Some(point) = cgroup2_mount(&text) {
        return Ok(PathBuf::from(point));
    }
    let failed = |reason: String| MountError::Cgroup2 {
        path: CGROUP2_FALLBACK,
        reason,
    };
    std::fs::create_dir_all(CGROUP2_FALLBACK).map_err(|e| failed(e.to_string()))?;
    mount("cgroup2", CGROUP2_FALLBACK, "").map_err(|errno| failed(errno.to_string()))?;
    Ok(PathBuf::from(CGROUP2_FALLBACK))
}

/// Makes sure tracefs and bpffs are mounted, mounting them if needed; both are attempted and the
/// first failure is returned.
pub fn ensure_mounts() -> Result<(), MountError> {
    let tracefs = ensure_tracefs();
    let bpffs = ensure_bpffs();
    tracefs.map(drop).and(bpffs)
}

/// Checks that the effective capabilities allow loading and attaching the programs, and explains
/// what is missing.
pub fn require_privileges() -> Result<(), PrivilegeError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(PrivilegeError::Status)?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or(PrivilegeError::NoCapEff)?;
    let missing = missing_capabilities(cap_eff, memlock_limited());
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError::Missing(missing))
    }
}

/// Whether BPF memory is charged to RLIMIT_MEMLOCK (kernels before 5.11) with a finite limit, so
/// raising it needs CAP_SYS_RESOURCE.
fn memlock_limited() -> bool {
    let old_kernel = kernel_release()
        .as_deref()
        .and_then(kernel_version)
        .is_none_or(|v| v < (5, 11));
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit.
    let unlimited = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } == 0
        && limit.rlim_cur == libc::RLIM_INFINITY;
    old_kernel && !unlimited
}

/// Names of the needed capabilities missing from `cap_eff`.
fn missing_capabilities(cap_eff: u64, need_sys_resource: bool) -> Vec<&'static str> {
    let has = |cap: u32| cap_eff & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_SYS_ADMIN) {
        if !has(CAP_BPF) {
            missing.push("CAP_BPF (or CAP_SYS_ADMIN)");
        }
        if !has(CAP_PERFMON) {
            missing.push("CAP_PERFMON (or CAP_SYS_ADMIN)");
        }
    }
    if !has(CAP_SYS_PTRACE) {
        missing.push("CAP_SYS_PTRACE");
    }
    if need_sys_resource && !has(CAP_SYS_RESOURCE) {
        missing.push("CAP_SYS_RESOURCE (to raise RLIMIT_MEMLOCK on this kernel)");
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(list: &[u32]) -> u64 {
        list.iter().fold(0, |acc, c| acc | 1 << c)
    }

    #[test]
    fn capability_rules() {
        let all = caps(&[
            CAP_BPF,
            CAP_PERFMON,
            CAP_SYS_PTRACE,
            CAP_SYS_RESOURCE,
            CAP_SYS_ADMIN,
        ]);
        assert!(missing_capabilities(all, true).is_empty());
        assert!(missing_capabilities(caps(&[CAP_SYS_ADMIN, CAP_SYS_PTRACE]), false).is_empty());
        assert!(
            missing_capabilities(caps(&[CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE]), false).is_empty()
        );
        assert_eq!(
            missing_capabilities(caps(&[CAP_BPF, CAP_SYS_PTRACE]), false),
            ["CAP_PERFMON (or CAP_SYS_ADMIN)"]
        );
        assert_eq!(
            missing_capabilities(caps(&[CAP_SYS_ADMIN]), true),
            [
                "CAP_SYS_PTRACE",
                "CAP_SYS_RESOURCE (to raise RLIMIT_MEMLOCK on this kernel)"
            ]
        );
        assert_eq!(missing_capabilities(0, false).len(), 3);
        let err = PrivilegeError::Missing(missing_capabilities(caps(&[CAP_SYS_ADMIN]), false));
        assert!(
            err.to_string()
                .starts_with("missing capabilities: CAP_SYS_PTRACE;"),
            "{err}"
        );
    }

    #[test]
    fn parses_proc_mounts() {
        let text = "sysfs /sys sysfs rw 0 0\n\
                    tracefs /sys/kernel/tracing tracefs rw 0 0\n\
                    none /mnt/with\\040space bpf rw 0 0\n\
                    short line\n\
                    x /a\\\\b\\777 ext4 rw 0 0\n";
        let table = parse_mounts(text);
        assert!(is_mounted(&table, "/sys/kernel/tracing", "tracefs"));
        assert!(!is_mounted(&table, "/sys/kernel/tracing", "sysfs"));
        assert!(is_mounted(&table, "/mnt/with space", "bpf"));
        // `\\` is not an octal escape and `\777` overflows a byte: both stay as written.
        assert!(is_mounted(&table, "/a\\\\b\\777", "ext4"));
        assert_eq!(table.len(), 4);
    }

    #[test]
    fn finds_cgroup2_in_mountinfo() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(hybrid).as_deref(),
            Some("/sys/fs/cgroup/unified")
        );
        // A bind mount of a sub-cgroup is used only when the root is mounted nowhere.
        let nested = "50 1 0:38 /system.slice /mnt/sub rw - cgroup2 cgroup2 rw\n\
                      51 1 0:38 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(nested).as_deref(), Some("/mnt/with space"));
        let only_sub = "50 1 0:38 /system.slice /mnt/sub rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(only_sub).as_deref(), Some("/mnt/sub"));
        assert_eq!(cgroup2_mount("garbage\n1 2 3 - tmpfs x rw\n"), None);
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(kernel_version("6.1-rc3"), Some((6, 1)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn errno_names() {
        assert_eq!(Errno(libc::EPERM).to_string(), "EPERM");
        assert_eq!(Errno(524).to_string(), "ENOTSUPP");
        assert!(Errno(libc::EXDEV).to_string().contains("os error"));
        let err = MountError::Tracefs {
            path: TRACEFS,
            errno: Errno(libc::EPERM),
        };
        assert_eq!(
            err.to_string(),
            "tracefs is not mounted at /sys/kernel/tracing and mounting it failed: EPERM"
        );
    }

    /// Mounting and probing touch global state; one test does both in order.
    #[test]
    fn mounts_and_probes_this_kernel() {
        ensure_mounts().expect("tracefs and bpffs mount");
        let table = mounts().expect("/proc/mounts");
        assert!(
            is_mounted(&table, TRACEFS, "tracefs") || is_mounted(&table, DEBUG_TRACEFS, "tracefs")
        );
        assert!(is_mounted(&table, BPFFS, "bpf"));
        // Idempotent: a second call finds both and mounts nothing more.
        ensure_mounts().expect("second call");
        assert_eq!(mounts().expect("/proc/mounts").len(), table.len());

        let report = probe();
        // The project requires these; CI runs on the same kind of machine.
        for f in [
            &report.btf,
            &report.bpf_syscall,
            &report.ringbuf,
            &report.syscall_tracepoints,
            &report.tracepoint_prog,
        ] {
            assert!(f.available, "{report}");
        }
        // This kernel (6.18) has all three socket-layer tracepoints, `inet_sock_set_state` and
        // `sk_shutdown` as a byte.
        assert_eq!(
            report.capture_mode(),
            CaptureMode::SocketLayer {
                writes: true,
                states: true
            },
            "{report}"
        );
        let pmu = |name: &str| Path::new(PMU_DIR).join(name).join("type").exists();
        assert_eq!(report.uprobes.available, pmu("uprobe"), "{report}");
        assert_eq!(report.kprobes.available, pmu("kprobe"), "{report}");
        let effective = require_privileges().is_ok();
        assert_eq!(report.privileges.available, effective);
        if !report.fentry.available {
            // The reason starts with the errno (e.g. "EPERM") or names the missing BTF function.
            let d = &report.fentry.detail;
            assert!(d.starts_with('E') || d.contains(FENTRY_PROBE_TARGET), "{d}");
        }
        // TCP header option callbacks exist since Linux 5.10; CI runs newer kernels.
        assert!(report.tcp_option.available, "{report}");
        assert!(
            ensure_cgroup2()
                .expect("cgroup2")
                .join("cgroup.procs")
                .is_file()
        );
        let shown = report.to_string();
        for (name, feature) in report.rows() {
            let line = shown
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no row {name} in\n{shown}"));
            let yes = if feature.available { " yes " } else { " no " };
            assert!(
                line.contains(yes) && line.ends_with(&feature.detail),
                "{line}"
            );
        }
        assert!(
            shown.ends_with(
                "capture mode: socket tracepoints for socket reads and writes, TCP state changes \
                 for connections' opens and closes, no syscall tracepoint"
            ),
            "{shown}"
        );
    }

    #[test]
    fn capture_mode_names_missing_requirements() {
        let ok = Feature::yes("ok");
        let mut report = Report {
            kernel: "test".to_owned(),
            privileges: ok.clone(),
            btf: ok.clone(),
            bpf_syscall: ok.clone(),
            ringbuf: ok.clone(),
            syscall_tracepoints: ok.clone(),
            socket_tracepoints: Feature::no("x"),
            socket_writes: false,
            socket_states: true,
            tracepoint_prog: ok.clone(),
            uprobes: Feature::no("x"),
            kprobes: Feature::no("x"),
            fentry: Feature::no("x"),
            tcp_option: Feature::no("x"),
        };
        assert_eq!(report.capture_mode(), CaptureMode::SyscallTracepoints);
        report.socket_tracepoints = ok.clone();
        assert_eq!(
            report.capture_mode().to_string(),
            "socket tracepoints for socket reads and the ends of socket writes, syscall \
             tracepoints for the rest"
        );
        report.socket_writes = true;
        assert_eq!(
            report.capture_mode(),
            CaptureMode::SocketLayer {
                writes: true,
                states: true
            }
        );
        report.socket_states = false;
        assert_eq!(
            report.capture_mode().to_string(),
            "socket tracepoints for socket reads and writes, syscall tracepoints for the rest"
        );
        report.ringbuf = Feature::no("EPERM");
        report.btf = Feature::no("missing");
        assert_eq!(
            report.capture_mode().to_string(),
            "none (missing: BTF, ring buffer)"
        );
    }
}
