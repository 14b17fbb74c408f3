//! Cgroups and containers: the kernel reports a cgroup v2 id (the inode of the cgroup's
//! directory); the agent turns it into the cgroup's path and, where the path follows a common
//! runtime's naming, a container id, without talking to any runtime.
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use foldhash::HashMap;

/// Directories scanned at most per resolution (a host has a few thousand cgroups).
const MAX_SCAN: usize = 100_000;

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// on hybrid hosts).
pub fn v2_root() -> Option<PathBuf> {
    let info = procfs::process::Process::myself().ok()?.mountinfo().ok()?;
    info.into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
}

/// The cgroup v2 id of a process: the inode of its cgroup directory, found through the
/// process's own view (`/proc/PID/root` is not needed: the v2 path in /proc/PID/cgroup is
/// relative to h2trace's cgroup namespace, which is the host's outside containers).
pub fn id_of_pid(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    id_of(path).ok()
}

/// A container named by its cgroup path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub runtime: &'static str,
    pub id: String,
}

/// The container a cgroup path belongs to, from the runtimes' naming: systemd-driver scopes
/// (`docker-ID.scope`, `cri-containerd-ID.scope`, `crio-ID.scope`, `libpod-ID.scope`) and
/// cgroupfs-driver directories (`/docker/ID`, `/kubepods/…/podUID/ID`). Pure.
pub fn container_of(path: &str) -> Option<Container> {
    let is_id = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let mut parts = path.rsplit('/');
    let last = parts.next()?;
    for (prefix, runtime) in [
        ("docker-", "docker"),
        ("cri-containerd-", "containerd"),
        ("crio-", "cri-o"),
        ("libpod-", "podman"),
    ] {
        if let Some(id) = last
            .strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(".scope"))
            .filter(|id| is_id(id))
        {
            return Some(Container {
                runtime,
                id: id.to_string(),
            });
        }
    }
    let parent = parts.next().unwrap_or_default();
    if is_id(last) {
        let runtime = if parent == "docker" {
            "docker"
        } else if path.contains("/kubepods") {
            "kubernetes"
        } else {
            return None;
        };
        return Some(Container {
            runtime,
            id: last.to_string(),
        });
    }
    None
}

/// The systemd unit a cgroup path belongs to (`…/nginx.service`), for processes that are
/// not in a container.
pub fn unit_of(path: &str) -> Option<&str> {
    path.rsplit('/')
        .find(|p| p.ends_with(".service") || p.ends_with(".scope"))
}

/// Cgroup id → path, learned by walking the hierarchy when an unknown id shows up.
#[derive(Default)]
pub struct Cgroups {
    root: Option<PathBuf>,
    paths: HashMap<u64, Option<Arc<str>>>,
}

impl Cgroups {
    pub fn new() -> Self {
        Self {
            root: v2_root(),
            paths: HashMap::default(),
        }
    }

    /// The path of cgroup `id` relative to the v2 root (`/` for the root), if it exists.
    pub fn path(&mut self, id: u64) -> Option<Arc<str>> {
        if id == 0 {
            return None;
        }
        if !self.paths.contains_key(&id) {
            self.scan();
            // Remember misses too (a cgroup removed meanwhile), so each costs one walk.
            self.paths.entry(id).or_insert(None);
        }
        self.paths[&id].clone()
    }

    fn scan(&mut self) {
        let Some(root) = self.root.clone() else {
            return;
        };
        let mut stack = vec![root.clone()];
        let mut seen = 0;
        while let Some(dir) = stack.pop() {
            seen += 1;
            if seen > MAX_SCAN {
                break;
            }
            if let Ok(m) = std::fs::metadata(&dir) {
                let rel = Path::new("/").join(dir.strip_prefix(&root).unwrap_or(Path::new("")));
                self.paths
                    .insert(m.ino(), Some(rel.to_string_lossy().into()));
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                stack.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
    }
}

/// The id (inode) of a cgroup given as an absolute path or relative to the v2 root.
pub fn id_of(path: &str) -> std::io::Result<u64> {
    let p = Path::new(path);
    let full = if p.is_absolute() && p.exists() {
        p.to_path_buf()
    } else {
        v2_root()
            .ok_or_else(|| std::io::Error::other("no cgroup v2 hierarchy is mounted"))?
            .join(path.trim_start_matches('/'))
    };
    std::fs::metadata(full).map(|m| m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_from_the_common_runtimes() {
        let id = "4f1c".repeat(16);
        let case = |p: String| container_of(&p).map(|c| (c.runtime, c.id));
        assert_eq!(
            case(format!("/system.slice/docker-{id}.scope")),
            Some(("docker", id.clone()))
        );
        assert_eq!(
            case(format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{id}.scope"
            )),
            Some(("containerd", id.clone()))
        );
        assert_eq!(
            case(format!("/machine.slice/libpod-{id}.scope")),
            Some(("podman", id.clone()))
        );
        assert_eq!(
            case(format!("/crio-{id}.scope")),
            Some(("cri-o", id.clone()))
        );
        assert_eq!(case(format!("/docker/{id}")), Some(("docker", id.clone())));
        assert_eq!(
            case(format!("/kubepods/besteffort/pod0a/{id}")),
            Some(("kubernetes", id.clone()))
        );
        assert_eq!(case("/system.slice/nginx.service".into()), None);
        assert_eq!(case("/docker-short.scope".into()), None);
        assert_eq!(
            unit_of("/system.slice/nginx.service"),
            Some("nginx.service")
        );
        assert_eq!(unit_of("/"), None);
    }
}
