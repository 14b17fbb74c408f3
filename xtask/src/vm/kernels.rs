//! Debian's kernel packages for the matrix: the newest of a series that apt knows, downloaded
//! and unpacked into a cache (never installed), its modules indexed for modprobe.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{is_root, run};

/// A Debian kernel series: its signed image packages are `PREFIX<number>SUFFIX`.
pub struct Series {
    pub name: &'static str,
    prefix: &'static str,
    suffix: &'static str,
}

pub const SERIES: [Series; 2] = [
    Series {
        name: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64",
    },
    Series {
        name: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64",
    },
];

impl Series {
    /// The ABI (6.1) or stable patch (6.12) number of a package of this series: newer is bigger.
    fn number(&self, pkg: &str) -> Option<u32> {
        pkg.strip_prefix(self.prefix)?
            .strip_suffix(self.suffix)?
            .parse()
            .ok()
    }

    fn newest<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Option<String> {
        names
            .into_iter()
            .filter_map(|n| Some((self.number(n)?, n)))
            .max()
            .map(|(_, n)| n.to_string())
    }
}

/// An unpacked kernel package in the cache.
pub struct Kernel {
    pub pkg: String,
    dir: PathBuf,
}

impl Kernel {
    pub fn release(&self) -> &str {
        self.pkg.strip_prefix("linux-image-").unwrap_or(&self.pkg)
    }

    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join(format!("boot/vmlinuz-{}", self.release()))
    }

    pub fn modules(&self) -> PathBuf {
        self.dir.join("lib/modules").join(self.release())
    }
}

/// Written last into an unpacked kernel's folder: the unpacking and indexing finished.
const READY: &str = ".ready";

fn cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
        })
        .join("h2trace/kernels")
}

/// The newest package of the series that apt knows, from the cache if it is there; an older
/// cached one if apt cannot deliver (no network, no lists).
pub fn fetch(series: &Series) -> Result<Kernel> {
    let cache = cache();
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let cached_names: Vec<String> = fs::read_dir(&cache)?
        .filter_map(Result::ok)
        .filter(|e| e.path().join(READY).exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let cached = series
        .newest(cached_names.iter().map(String::as_str))
        .map(|pkg| Kernel {
            dir: cache.join(&pkg),
            pkg,
        });
    let lookup = || {
        apt_names(series).unwrap_or_else(|e| {
            eprintln!("xtask: {e:#}");
            None
        })
    };
    let mut listed = lookup();
    // A fresh machine may have no package lists yet.
    if listed.is_none()
        && is_root()
        && retry(Command::new("apt-get").args(["update", "-qq"])).is_ok()
    {
        listed = lookup();
    }
    let Some(pkg) = listed else {
        return cached.with_context(|| {
            format!(
                "apt knows no {}*{} package and none is cached (apt-get update?)",
                series.prefix, series.suffix
            )
        });
    };
    if cached.as_ref().is_some_and(|k| k.pkg == pkg) {
        return Ok(cached.unwrap());
    }
    match download(&cache, &pkg) {
        Ok(k) => {
            // One kernel per series is enough: drop the older ones.
            for old in &cached_names {
                if series.number(old).is_some() && *old != pkg {
                    let _ = fs::remove_dir_all(cache.join(old));
                }
            }
            Ok(k)
        }
        Err(e) => match cached {
            Some(k) => {
                eprintln!("xtask: {e:#}; using the cached {}", k.pkg);
                Ok(k)
            }
            None => Err(e),
        },
    }
}

/// The newest package name of the series in apt's lists.
fn apt_names(series: &Series) -> Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["search", "--names-only"])
        .arg(format!("^{}", series.prefix.replace('.', "\\.")))
        .output()
        .context("running apt-cache")?;
    if !out.status.success() {
        bail!(
            "apt-cache search failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(series.newest(text.lines().filter_map(|l| l.split(' ').next())))
}

fn download(cache: &Path, pkg: &str) -> Result<Kernel> {
    let k = Kernel {
        pkg: pkg.to_string(),
        dir: cache.join(pkg),
    };
    let _ = fs::remove_dir_all(&k.dir);
    fs::create_dir_all(&k.dir)?;
    println!("xtask: downloading {pkg}");
    let mut download = Command::new("apt-get");
    // As root apt would drop to its sandbox user, who may not write here.
    download
        .args(["download", "-q", "-o", "APT::Sandbox::User=root", pkg])
        .current_dir(&k.dir);
    retry(&mut download)?;
    let deb = fs::read_dir(&k.dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", k.dir.display()))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&k.dir))?;
    fs::remove_file(&deb)?;
    // The package ships its modules without the index its postinst would make; modprobe in the
    // guest needs it.
    run(Command::new("/usr/sbin/depmod")
        .arg("-b")
        .arg(&k.dir)
        .arg(k.release()))
    .context("indexing the modules (depmod is in the kmod package)")?;
    fs::write(k.dir.join(READY), "")?;
    Ok(k)
}

/// apt on these machines can trip over a concurrent apt run: try a few times.
fn retry(cmd: &mut Command) -> Result<()> {
    let mut last = None;
    for attempt in 1..=4 {
        match run(cmd) {
            Ok(()) => return Ok(()),
            Err(e) => {
                eprintln!("xtask: {e:#} (try {attempt})");
                last = Some(e);
                std::thread::sleep(Duration::from_secs(5 * attempt));
            }
        }
    }
    Err(last.unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_package_of_a_series() {
        let names = [
            "linux-image-6.1.0-9-amd64",
            "linux-image-6.1.0-56-amd64",
            "linux-image-6.1.0-57-cloud-amd64",
            "linux-image-6.1.0-58-amd64-unsigned",
            "linux-image-6.12.117+deb12-amd64",
            "linux-image-6.12.99+deb12-amd64",
            "linux-image-6.12.118+deb12-rt-amd64",
        ];
        let [v6_1, v6_12] = &SERIES;
        assert_eq!(
            v6_1.newest(names).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(
            v6_12.newest(names).as_deref(),
            Some("linux-image-6.12.117+deb12-amd64")
        );
    }
}
