//! What backs guest RAM, and its prerequisites: a 4 KiB memfd, a file on a tmpfs mounted
//! with transparent huge pages (shmem THP), or a memfd of 2 MiB hugetlb pages.
//!
//! Each backing is checked before anything is mapped, and a missing prerequisite is an error
//! that says what to do. This module never changes a host setting (no mount, no hugetlb
//! reservation): the user, or a test for itself, does that.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// A 2 MiB huge page, in bytes.
pub const HUGE_PAGE: u64 = 2 << 20;
const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
/// MFD_HUGE_2MB: log2(2 MiB) << MFD_HUGE_SHIFT (26).
const MFD_HUGE_2MB: libc::c_uint = 21 << 26;
const HUGEPAGES_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// The unit a backing gives memory back to the host in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granule {
    /// 4 KiB pages: any range of frames.
    Page,
    /// 2 MiB blocks: only whole, 2 MiB-aligned blocks, unless `can_split` (the kernel splits
    /// a shmem huge page when part of it is punched; a hugetlb page is all or nothing).
    Block { can_split: bool },
}

/// What backs guest RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// An anonymous memfd in 4 KiB pages.
    Memfd,
    /// An unnamed file in `dir`, which must be on a tmpfs mounted with `huge=always` or
    /// `huge=within_size`: shmem backs it with transparent 2 MiB pages where it can, and
    /// splits one when a part of it is punched.
    ShmemThp { dir: PathBuf },
    /// A memfd of 2 MiB hugetlb pages (MFD_HUGETLB), reserved beforehand in
    /// /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages. A hugetlb page cannot be
    /// freed in part.
    Hugetlb,
}

/// `--memory-backend` and `--memory-path`, as `vmm run` and the tools take them (feature
/// `cli`): one definition of the options and of their errors.
#[cfg(feature = "cli")]
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct BackingArgs {
    /// What backs guest RAM: memfd (4 KiB pages), shmem-thp (a file on a tmpfs mounted with
    /// huge=always or huge=within_size, given by --memory-path: transparent 2 MiB pages) or
    /// hugetlb (a memfd of 2 MiB hugetlb pages, reserved beforehand in
    /// /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages). With 2 MiB pages the gather
    /// releases whole 2 MiB blocks once all 512 of their frames are in the balloon
    /// (docs/ARCHITECTURE.md, "Huge pages").
    #[arg(long, default_value = "memfd", value_parser = ["memfd", "shmem-thp", "hugetlb"])]
    pub memory_backend: String,
    /// For --memory-backend shmem-thp: a directory on a tmpfs mounted with huge=always (e.g.
    /// `mount -t tmpfs -o huge=always,size=8G tmpfs DIR`).
    #[arg(long)]
    pub memory_path: Option<PathBuf>,
}

#[cfg(feature = "cli")]
impl BackingArgs {
    /// The backing these options name, or why they do not name one.
    pub fn backing(&self) -> Result<Backing, String> {
        Ok(match (self.memory_backend.as_str(), &self.memory_path) {
            ("shmem-thp", Some(dir)) => Backing::ShmemThp { dir: dir.clone() },
            ("shmem-thp", None) => return Err(
                "--memory-backend shmem-thp needs --memory-path DIR, a directory on a tmpfs mounted with huge=always (e.g. `mount -t tmpfs -o huge=always,size=8G tmpfs DIR`)".into()
            ),
            (_, Some(_)) => return Err("--memory-path is only for --memory-backend shmem-thp".into()),
            ("hugetlb", None) => Backing::Hugetlb,
            _ => Backing::Memfd,
        })
    }
}

impl Backing {
    /// The page size the backing gives the host back in: 4 KiB, or 2 MiB.
    pub fn page_size(&self) -> u64 {
        match self {
            Backing::Memfd => 4096,
            _ => HUGE_PAGE,
        }
    }

    /// What this backing gives back in.
    pub fn granule(&self) -> Granule {
        match self {
            Backing::Memfd => Granule::Page,
            _ => Granule::Block {
                can_split: self.can_split(),
            },
        }
    }

    /// Whether part of a huge page can be given back (the kernel splits a shmem THP; a
    /// hugetlb page is all or nothing).
    pub fn can_split(&self) -> bool {
        !matches!(self, Backing::Hugetlb)
    }

    /// Whether mappings must reserve their pages up front (hugetlb: a fault without a
    /// reservation would kill the VMM with SIGBUS).
    pub fn reserves(&self) -> bool {
        matches!(self, Backing::Hugetlb)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backing::Memfd => "memfd",
            Backing::ShmemThp { .. } => "shmem-thp",
            Backing::Hugetlb => "hugetlb",
        }
    }
}

#[derive(Debug, Error)]
pub enum BackingError {
    #[error("memfd_create failed: {0}")]
    Memfd(io::Error),
    #[error("guest RAM of {size} bytes is not a whole number of 2 MiB huge pages; use a multiple of 2M with --memory-backend {backing}")]
    NotHugeAligned { size: u64, backing: &'static str },
    #[error("{} does not exist or is not a directory: {err} (give a directory on a tmpfs mounted with huge=always, e.g. `mkdir -p /mnt/guest && mount -t tmpfs -o huge=always,size=8G tmpfs /mnt/guest`)", dir.display())]
    NoDir { dir: PathBuf, err: io::Error },
    #[error("{} is on hugetlbfs, not tmpfs: for hugetlb pages use --memory-backend hugetlb (a memfd of reserved 2 MiB pages)", dir.display())]
    OnHugetlbfs { dir: PathBuf },
    #[error("{} is on neither tmpfs nor hugetlbfs: shmem huge pages need a tmpfs mounted with huge=always or huge=within_size (e.g. `mount -t tmpfs -o huge=always,size=8G tmpfs DIR`)", dir.display())]
    NotTmpfs { dir: PathBuf },
    #[error("the tmpfs at {} (holding {}) is mounted without huge=always or huge=within_size (its options: {options}), so it would give guest RAM 4 KiB pages; remount it with `mount -o remount,huge=always {}`", mount.display(), dir.display(), mount.display())]
    NoHugeOption {
        dir: PathBuf,
        mount: PathBuf,
        options: String,
    },
    #[error("cannot create the guest memory file in {}: {err}", dir.display())]
    Open { dir: PathBuf, err: io::Error },
    #[error("guest RAM needs {needed} 2 MiB hugetlb pages, but only {available} are free and unreserved ({HUGEPAGES_2M}: {detail}); reserve them first, e.g. `echo $(( $(cat {HUGEPAGES_2M}/nr_hugepages) + {needed} )) > {HUGEPAGES_2M}/nr_hugepages`")]
    HugetlbUnavailable {
        needed: u64,
        available: u64,
        detail: String,
    },
}

/// Creates the file that backs `size` bytes of guest RAM, after checking the backing's
/// prerequisites. The caller sizes and maps it.
pub fn create(backing: &Backing, size: u64) -> Result<File, BackingError> {
    if backing.page_size() == HUGE_PAGE && !size.is_multiple_of(HUGE_PAGE) {
        return Err(BackingError::NotHugeAligned {
            size,
            backing: backing.name(),
        });
    }
    match backing {
        Backing::Memfd => memfd(0),
        Backing::Hugetlb => {
            check_hugetlb(size / HUGE_PAGE)?;
            memfd(libc::MFD_HUGETLB | MFD_HUGE_2MB)
        }
        Backing::ShmemThp { dir } => {
            check_thp_dir(dir)?;
            let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|e| {
                BackingError::Open {
                    dir: dir.clone(),
                    err: io::Error::new(io::ErrorKind::InvalidInput, e),
                }
            })?;
            // An unnamed file: it disappears with its last descriptor.
            // SAFETY: a valid C string; the result is checked and then owned by File.
            let fd = unsafe {
                libc::open(
                    path.as_ptr(),
                    libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
                    0o600,
                )
            };
            if fd < 0 {
                return Err(BackingError::Open {
                    dir: dir.clone(),
                    err: io::Error::last_os_error(),
                });
            }
            // SAFETY: a fresh fd we own.
            Ok(unsafe { File::from_raw_fd(fd) })
        }
    }
}

fn memfd(flags: libc::c_uint) -> Result<File, BackingError> {
    let name = c"guest-ram";
    // SAFETY: a valid C string; the returned fd is checked and then owned by File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(BackingError::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh, owned file descriptor.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn read_count(name: &str) -> u64 {
    std::fs::read_to_string(Path::new(HUGEPAGES_2M).join(name))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Enough free, unreserved 2 MiB hugetlb pages for `needed`.
fn check_hugetlb(needed: u64) -> Result<(), BackingError> {
    let (total, free, resv) = (
        read_count("nr_hugepages"),
        read_count("free_hugepages"),
        read_count("resv_hugepages"),
    );
    let available = free.saturating_sub(resv);
    if available < needed {
        return Err(BackingError::HugetlbUnavailable {
            needed,
            available,
            detail: format!("nr_hugepages {total}, free {free}, reserved {resv}"),
        });
    }
    Ok(())
}

fn fs_type(dir: &Path) -> Result<i64, BackingError> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|e| {
        BackingError::NoDir {
            dir: dir.to_path_buf(),
            err: io::Error::new(io::ErrorKind::InvalidInput, e),
        }
    })?;
    // SAFETY: statfs writes only into `st`.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(BackingError::NoDir {
            dir: dir.to_path_buf(),
            err: io::Error::last_os_error(),
        });
    }
    Ok(st.f_type as i64)
}

/// `dir` is a directory on a tmpfs mounted with huge=always or huge=within_size.
fn check_thp_dir(dir: &Path) -> Result<(), BackingError> {
    let canon = dir.canonicalize().map_err(|err| BackingError::NoDir {
        dir: dir.to_path_buf(),
        err,
    })?;
    if !canon.is_dir() {
        return Err(BackingError::NoDir {
            dir: dir.to_path_buf(),
            err: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    match fs_type(&canon)? {
        TMPFS_MAGIC => {}
        HUGETLBFS_MAGIC => {
            return Err(BackingError::OnHugetlbfs {
                dir: dir.to_path_buf(),
            })
        }
        _ => {
            return Err(BackingError::NotTmpfs {
                dir: dir.to_path_buf(),
            })
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let (mount, options) = mount_of(&mountinfo, &canon).unwrap_or_default();
    let huge = options
        .split(',')
        .any(|o| o == "huge=always" || o == "huge=within_size");
    if !huge {
        return Err(BackingError::NoHugeOption {
            dir: dir.to_path_buf(),
            mount,
            options,
        });
    }
    Ok(())
}

/// The mount point holding `path` and its super options, from /proc/self/mountinfo: the
/// longest mount point that is `path` or an ancestor of it (the last one, if stacked).
fn mount_of(mountinfo: &str, path: &Path) -> Option<(PathBuf, String)> {
    let mut best: Option<(PathBuf, String)> = None;
    for line in mountinfo.lines() {
        let (before, after) = line.split_once(" - ")?;
        let point = PathBuf::from(unescape(before.split(' ').nth(4)?));
        let options = after.split(' ').nth(2).unwrap_or("").to_string();
        let longer = best
            .as_ref()
            .is_none_or(|(b, _)| point.as_os_str().len() >= b.as_os_str().len());
        if path.starts_with(&point) && longer {
            best = Some((point, options));
        }
    }
    best
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_innermost_mount_holding_a_path_is_found_with_its_options() {
        let info = "\
22 1 0:21 / / rw,relatime - ext4 /dev/root rw
30 22 0:25 / /mnt/guest rw - tmpfs tmpfs rw,size=65536k,huge=always
31 30 0:26 / /mnt/guest/inner rw - tmpfs tmpfs rw,size=1024k
32 22 0:27 / /mnt/with\\040space rw - tmpfs tmpfs rw,huge=within_size
";
        let m = |p: &str| mount_of(info, Path::new(p)).unwrap();
        assert_eq!(
            m("/mnt/guest/vm1"),
            (
                PathBuf::from("/mnt/guest"),
                "rw,size=65536k,huge=always".into()
            )
        );
        assert_eq!(m("/mnt/guest/inner/x").1, "rw,size=1024k");
        assert_eq!(m("/mnt/with space").1, "rw,huge=within_size");
        assert_eq!(m("/home").0, PathBuf::from("/"));
        // /mnt/guestbook is not under /mnt/guest.
        assert_eq!(m("/mnt/guestbook").0, PathBuf::from("/"));
    }

    #[test]
    fn a_directory_on_neither_tmpfs_nor_hugetlbfs_is_refused_with_what_to_do() {
        let dir = std::env::current_dir().unwrap(); // the build tree: not tmpfs here
        if fs_type(&dir).unwrap() == TMPFS_MAGIC {
            println!("SKIPPED: the working directory is on tmpfs");
            return;
        }
        let e = create(&Backing::ShmemThp { dir }, 4 << 20).unwrap_err();
        assert!(matches!(e, BackingError::NotTmpfs { .. }), "{e}");
        assert!(
            e.to_string().contains("mount -t tmpfs -o huge=always"),
            "{e}"
        );
    }

    #[test]
    fn huge_backends_need_whole_huge_pages() {
        let e = create(&Backing::Hugetlb, 3 << 20).unwrap_err();
        assert!(
            e.to_string()
                .contains("not a whole number of 2 MiB huge pages"),
            "{e}"
        );
    }

    #[test]
    fn too_few_hugetlb_pages_is_an_error_that_says_how_to_reserve_them() {
        // More than any test host reserves.
        let e = create(&Backing::Hugetlb, 1 << 46).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("needs 33554432 2 MiB hugetlb pages"), "{msg}");
        assert!(msg.contains("nr_hugepages"), "{msg}");
    }
}
