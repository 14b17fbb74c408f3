//! An initramfs (cpio "newc", uncompressed) assembled from host files without a staging copy.
//!
//! Uncompressed because under software emulation the guest would spend longer inflating it than
//! the host spends writing the extra bytes. Host programs keep their host paths, so test
//! binaries find `env!("CARGO_BIN_EXE_h2trace")` and their sibling examples where cargo put them,
//! and the dynamic loader finds libraries where `ldd` saw them.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufWriter, Write},
    os::unix::fs::PermissionsExt as _,
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

enum Entry {
    Dir,
    /// A host file's bytes (`src`), with the given permission bits.
    File {
        src: PathBuf,
        mode: u32,
    },
    Data {
        bytes: Vec<u8>,
        mode: u32,
    },
    Symlink(PathBuf),
}

#[derive(Default)]
pub struct Archive {
    /// Sorted by path, so every directory comes before what it holds, as the kernel's unpacker
    /// needs (it does not create missing parents).
    entries: BTreeMap<PathBuf, Entry>,
}

impl Archive {
    /// An archive whose top-level links (`/bin -> usr/bin` on a merged-/usr host) are those of
    /// the host, so a file reached through either name on the host is reached so in the guest.
    pub fn new() -> Result<Self> {
        let mut a = Self::default();
        for top in ["bin", "sbin", "lib", "lib64"] {
            let p = Path::new("/").join(top);
            if let Ok(target) = std::fs::read_link(&p) {
                a.entries.insert(p, Entry::Symlink(target));
            }
        }
        Ok(a)
    }

    /// Where `path` lands inside the archive: through a top-level link, like on the host.
    fn place(&self, path: &Path) -> PathBuf {
        let mut comps = path.components();
        if let (Some(Component::RootDir), Some(Component::Normal(top))) =
            (comps.next(), comps.next())
        {
            let top = Path::new("/").join(top);
            if let Some(Entry::Symlink(target)) = self.entries.get(&top) {
                return Path::new("/").join(target).join(comps.as_path());
            }
        }
        path.to_path_buf()
    }

    fn insert(&mut self, path: &Path, entry: Entry) {
        let path = self.place(path);
        for dir in path.ancestors().skip(1) {
            if dir != Path::new("/") {
                self.entries.entry(dir.to_path_buf()).or_insert(Entry::Dir);
            }
        }
        self.entries.insert(path, entry);
    }

    pub fn dir(&mut self, path: &Path) {
        self.insert(path, Entry::Dir);
    }

    pub fn data(&mut self, path: &Path, bytes: impl Into<Vec<u8>>, mode: u32) {
        let bytes = bytes.into();
        self.insert(path, Entry::Data { bytes, mode });
    }

    pub fn symlink(&mut self, path: &Path, target: &Path) {
        self.insert(path, Entry::Symlink(target.to_path_buf()));
    }

    /// The host file `src` at `path`, with its permission bits.
    pub fn file(&mut self, path: &Path, src: &Path) -> Result<()> {
        let mode = std::fs::metadata(src)
            .with_context(|| format!("reading {}", src.display()))?
            .permissions()
            .mode()
            & 0o7777;
        self.insert(
            path,
            Entry::File {
                src: src.to_path_buf(),
                mode,
            },
        );
        Ok(())
    }

    /// A host program at its host path (and at the name it was called by, if that is a link),
    /// with the shared libraries it loads. `contents` stands in for its bytes (a stripped copy).
    pub fn program(&mut self, path: &Path, contents: Option<&Path>) -> Result<()> {
        let real = std::fs::canonicalize(path)
            .with_context(|| format!("{} is missing on this machine", path.display()))?;
        self.file(&real, contents.unwrap_or(&real))?;
        if self.place(path) != real {
            self.symlink(path, &real);
        }
        for lib in shared_libraries(&real)? {
            if !self.entries.contains_key(&self.place(&lib)) {
                self.program(&lib, None)?;
            }
        }
        Ok(())
    }

    /// Write the archive in the cpio "newc" format the kernel unpacks.
    pub fn write(&self, out: &Path) -> Result<()> {
        let f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let name = path.strip_prefix("/").unwrap_or(path);
            let (mode, size) = match entry {
                Entry::Dir => (0o040_755, 0),
                Entry::File { src, mode } => (0o100_000 | mode, std::fs::metadata(src)?.len()),
                Entry::Data { bytes, mode } => (0o100_000 | mode, bytes.len() as u64),
                Entry::Symlink(t) => (0o120_777, t.as_os_str().len() as u64),
            };
            header(&mut w, ino as u32 + 1, mode, size, name)?;
            match entry {
                Entry::Dir => {}
                Entry::File { src, .. } => {
                    let copied = std::io::copy(
                        &mut File::open(src).with_context(|| format!("{}", src.display()))?,
                        &mut w,
                    )?;
                    if copied != size {
                        bail!("{} changed while being archived", src.display());
                    }
                }
                Entry::Data { bytes, .. } => w.write_all(bytes)?,
                Entry::Symlink(t) => w.write_all(t.as_os_str().as_encoded_bytes())?,
            }
            pad(&mut w, size as usize)?;
        }
        header(&mut w, 0, 0, 0, Path::new("TRAILER!!!"))?;
        w.flush()?;
        Ok(())
    }
}

/// One newc header and the name after it, padded to 4 bytes.
fn header(w: &mut impl Write, ino: u32, mode: u32, size: u64, name: &Path) -> Result<()> {
    let name = name.as_os_str().as_encoded_bytes();
    let size = u32::try_from(size).context("a file over 4 GiB in the initramfs")?;
    let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
    // rdevminor, namesize (with its NUL), check.
    write!(w, "070701")?;
    for field in [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0] {
        write!(w, "{field:08x}")?;
    }
    write!(w, "{:08x}{:08x}", name.len() + 1, 0)?;
    w.write_all(name)?;
    w.write_all(&[0])?;
    pad(w, 110 + name.len() + 1)
}

fn pad(w: &mut impl Write, len: usize) -> Result<()> {
    w.write_all(&[0; 3][..(4 - len % 4) % 4])?;
    Ok(())
}

/// The libraries `ldd` resolves for `bin`, the dynamic loader included; none for a static one.
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        return Ok(Vec::new()); // "not a dynamic executable"
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)", "/lib64/ld-linux-x86-64.so.2 (0x…)",
        // "linux-vdso.so.1 (0x…)" (in the kernel, no file).
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        match path {
            Some(p) if p.starts_with('/') => libs.push(PathBuf::from(p)),
            _ if line.contains("not found") => bail!("{}: {}", bin.display(), line.trim()),
            _ => {}
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut a = Archive::default();
        a.data(Path::new("/etc/x"), "abcde", 0o644);
        let out = std::env::temp_dir().join(format!("xtask-cpio-{}", std::process::id()));
        a.write(&out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        // "etc" (dir), "etc/x", trailer; names and data padded so each record starts 4-aligned.
        assert_eq!(&bytes[110..114], b"etc\0");
        let x = 116; // 110 + "etc\0" = 114, padded
        assert_eq!(&bytes[x..x + 6], b"070701");
        assert_eq!(&bytes[x + 110..x + 116], b"etc/x\0");
        let data = x + 116; // already aligned
        assert_eq!(&bytes[data..data + 5], b"abcde");
        assert_eq!(&bytes[data + 8..data + 14], b"070701");
        assert_eq!(&bytes[data + 8 + 110..data + 8 + 121], b"TRAILER!!!\0");
        assert_eq!(bytes.len() % 4, 0);
    }
}
