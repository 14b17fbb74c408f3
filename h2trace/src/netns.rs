//! Network namespaces as the operator names them, and doing things inside one.
use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {0}")]
    Open(String, #[source] std::io::Error),
    #[error("entering network namespace {0} (needs CAP_SYS_ADMIN)")]
    Setns(String, #[source] nix::Error),
}

/// Which namespace to follow, as the operator said it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsSpec {
    /// The host's: the namespace of pid 1, or h2trace's own where pid 1's cannot be opened
    /// (inside a container without the host's pid namespace).
    Host,
    /// The namespace of a traced process.
    Pid(u32),
    /// A name under /run/netns (as `ip netns` makes them) or a path to a namespace file.
    Named(String),
}

impl NetnsSpec {
    pub fn path(&self) -> PathBuf {
        match self {
            Self::Host => {
                let init = PathBuf::from("/proc/1/ns/net");
                if std::fs::File::open(&init).is_ok() {
                    init
                } else {
                    PathBuf::from("/proc/self/ns/net")
                }
            }
            Self::Pid(p) => PathBuf::from(format!("/proc/{p}/ns/net")),
            Self::Named(n) if n.contains('/') => PathBuf::from(n),
            Self::Named(n) => Path::new("/run/netns").join(n),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Self::Host => "host".into(),
            Self::Pid(p) => format!("pid:{p}"),
            Self::Named(n) => n.clone(),
        }
    }
}

/// The inode that identifies the namespace (what the kernel programs report as `netns`).
pub fn netns_inode(spec: &NetnsSpec) -> Result<u32, NetnsError> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(spec.path())
        .map(|m| m.ino() as u32)
        .map_err(|e| NetnsError::Open(spec.name(), e))
}

/// Run `f` on a thread that has entered the namespace; the thread ends with `f`, so nothing
/// else of the agent changes namespace. Sockets opened there stay bound to it.
/// `f`'s own errors come back as the inner result.
pub fn in_netns<T: Send + 'static, E: Send + 'static>(
    spec: &NetnsSpec,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<Result<T, E>, NetnsError> {
    let name = spec.name();
    let ns = std::fs::File::open(spec.path()).map_err(|e| NetnsError::Open(name.clone(), e))?;
    std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| NetnsError::Setns(name, e))?;
        Ok(f())
    })
    .join()
    .expect("the namespace thread does not panic")
}
