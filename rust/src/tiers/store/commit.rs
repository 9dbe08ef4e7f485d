//! Putting a finished store in place: [`Staging`].
//!
//! A new store is built in a sibling of its directory, `PARENT/.NAME.partial-PID/`,
//! and swapped with the directory in one `renameat2(RENAME_EXCHANGE)` once
//! everything in it is on disk: at every instant `NAME` is the old store
//! (or, for a first conversion, absent or empty) or the complete new one.
//! The old one then sits under the staging name and is deleted.
//!
//! Writers of one store take an advisory lock on `PARENT/.NAME.lock`
//! (`flock`): the kernel drops it when its holder dies, so a writer holding
//! it knows that every `.NAME.partial-*` or `.NAME.old-*` beside it was left
//! by a dead one and removes it, and a second live writer is refused.
//! Filesystems without `RENAME_EXCHANGE` get two renames (the old store aside
//! to `.NAME.old-PID`, the new one in); a writer killed between them leaves
//! no `NAME`, and the next writer renames the old store back first.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{layer_file_name, store_error, INDEX_FILE, PARTIAL_PREFIX};
use crate::error::{CoreError, Result};

/// Marks a staging directory beside the store: `.NAME.partial-PID`.
const STAGING_INFIX: &str = ".partial-";
/// Marks an old store moved aside by the two-rename fallback.
const OLD_INFIX: &str = ".old-";

/// A new store's staging directory and the lock that makes it ours; see the
/// module doc. Dropped without [`commit`](Self::commit), it removes what it
/// created.
pub(super) struct Staging {
    /// The store directory as the caller named it (for messages).
    shown: PathBuf,
    parent: PathBuf,
    name: OsString,
    dir: PathBuf,
    /// Directories created for the store's parent, deepest last.
    created: Vec<PathBuf>,
    lock: Option<StoreLock>,
    /// The staging directory exists and is ours.
    staged: bool,
    committed: bool,
}

impl Staging {
    /// Locks the store directory `dir`, clears what dead writers left
    /// beside it, checks that it may be (re)placed, and creates the staging
    /// directory. `fail` turns an I/O error into the caller's error.
    pub(super) fn begin(
        dir: &Path,
        overwrite: bool,
        fail: &dyn Fn(&Path, &str, std::io::Error) -> CoreError,
    ) -> Result<Self> {
        let (parent, name) = split(dir)?;
        let created = missing_ancestors(&parent);
        fs::create_dir_all(&parent).map_err(|e| fail(dir, "creating the directory", e))?;
        let parent = fs::canonicalize(&parent).map_err(|e| fail(&parent, "resolving", e))?;
        let mut staging = Self {
            shown: dir.to_path_buf(),
            dir: parent.join(sibling(&name, STAGING_INFIX, std::process::id())),
            parent,
            name,
            created,
            lock: None,
            staged: false,
            committed: false,
        };
        let lock_path = staging.parent.join(sibling(&staging.name, ".lock", ""));
        staging.lock = Some(StoreLock::acquire(&lock_path, dir, fail)?);
        staging.clear_leftovers(fail)?;
        check_target(&staging.target(), dir, overwrite)?;
        fs::create_dir(&staging.dir)
            .map_err(|e| fail(&staging.dir, "creating the staging directory", e))?;
        staging.staged = true;
        Ok(staging)
    }

    /// Where the store's files are written until the commit.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    fn target(&self) -> PathBuf {
        self.parent.join(&self.name)
    }

    /// Swaps the staged store (synced by the caller) into place, then
    /// deletes what was there.
    pub(super) fn commit(mut self) -> Result<()> {
        let target = self.target();
        let fail = |path: &Path, doing: &str, e: std::io::Error| {
            store_error(path, format!("{doing} failed: {e}"))
        };
        sync_dir(&self.dir).map_err(|e| fail(&self.dir, "syncing the staging directory", e))?;
        let moving = |e| fail(&self.shown, "moving the new store into place", e);
        if fs::symlink_metadata(&target).is_err() {
            fs::rename(&self.dir, &target).map_err(moving)?;
        } else {
            match exchange(&self.dir, &target) {
                Ok(()) => {}
                Err(e) if exchange_unsupported(&e) => self.swap_by_renames(&target)?,
                Err(e) => return Err(moving(e)),
            }
        }
        self.committed = true;
        let synced = sync_dir(&self.parent);
        // The old store (or the empty directory) now has the staging name;
        // the new one is complete whether or not this removal succeeds.
        let _ = fs::remove_dir_all(&self.dir);
        synced.map_err(|e| fail(&self.parent, "syncing the directory", e))
    }

    /// The fallback for filesystems without `RENAME_EXCHANGE`: the old
    /// store aside, the new one in, the old one back under the staging name
    /// (so that the caller removes it).
    fn swap_by_renames(&self, target: &Path) -> Result<()> {
        let old = self
            .parent
            .join(sibling(&self.name, OLD_INFIX, std::process::id()));
        let fail = |e| {
            store_error(
                &self.shown,
                format!("moving the new store into place failed: {e}"),
            )
        };
        fs::rename(target, &old).map_err(fail)?;
        if let Err(e) = fs::rename(&self.dir, target) {
            let _ = fs::rename(&old, target);
            return Err(fail(e));
        }
        // The new store is in place; an old one left aside is removed by
        // the next writer.
        let _ = fs::rename(&old, &self.dir);
        Ok(())
    }

    /// Holding the lock, every staging or moved-aside directory of this
    /// store was left by a writer that died: an old store moved aside goes
    /// back in place when nothing replaced it, the rest is removed.
    fn clear_leftovers(
        &self,
        fail: &dyn Fn(&Path, &str, std::io::Error) -> CoreError,
    ) -> Result<()> {
        let target = self.target();
        let entries = fs::read_dir(&self.parent)
            .map_err(|e| fail(&self.parent, "listing the directory", e))?;
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let path = entry.path();
            if is_sibling(&file_name, &self.name, OLD_INFIX)
                && fs::symlink_metadata(&target).is_err()
            {
                fs::rename(&path, &target)
                    .map_err(|e| fail(&path, "restoring the old store", e))?;
            } else if is_sibling(&file_name, &self.name, OLD_INFIX)
                || is_sibling(&file_name, &self.name, STAGING_INFIX)
            {
                fs::remove_dir_all(&path)
                    .map_err(|e| fail(&path, "removing a dead writer's leftovers", e))?;
            }
        }
        // Staging directories inside the store, from earlier versions.
        if let Ok(entries) = fs::read_dir(&target) {
            for entry in entries.flatten() {
                if entry
                    .file_name()
                    .as_bytes()
                    .starts_with(PARTIAL_PREFIX.as_bytes())
                {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.staged && !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
        // The lock goes after the staging directory (nobody may reuse its
        // name meanwhile) and before the directories made for it (it is in
        // the innermost one).
        self.lock.take();
        if !self.committed {
            for dir in self.created.iter().rev() {
                let _ = fs::remove_dir(dir);
            }
        }
    }
}

/// The advisory lock of one store's writers (see the module doc). The file
/// holds the holder's process id, for the message a second writer gets.
struct StoreLock {
    path: PathBuf,
    _file: File,
}

impl StoreLock {
    fn acquire(
        path: &Path,
        store: &Path,
        fail: &dyn Fn(&Path, &str, std::io::Error) -> CoreError,
    ) -> Result<Self> {
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| fail(path, "creating the lock file", e))?;
            // SAFETY: `flock` only takes the descriptor, which `file` owns
            // for the duration of the call.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    return Err(fail(path, "locking", e));
                }
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => String::new(),
                    pid => format!(" (process {pid})"),
                };
                return Err(store_error(
                    store,
                    format!(
                        "another conversion{holder} is writing this store; wait for it to finish"
                    ),
                ));
            }
            // A holder that finished unlinks the file before it unlocks: if
            // ours is no longer the one at `path`, a third writer may hold
            // the new one, so start over.
            let ours = file.metadata().map_err(|e| fail(path, "inspecting", e))?;
            let current = fs::metadata(path).ok();
            if current.is_some_and(|m| m.dev() == ours.dev() && m.ino() == ours.ino()) {
                let _ = file.set_len(0);
                let _ = write!(file, "{}", std::process::id());
                return Ok(Self {
                    path: path.to_path_buf(),
                    _file: file,
                });
            }
        }
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        // Unlinked while still locked (see `acquire`); closing unlocks.
        let _ = fs::remove_file(&self.path);
    }
}

/// The store directory's parent and name; refuses paths that name no
/// directory of their own (`/`, `..`).
fn split(dir: &Path) -> Result<(PathBuf, OsString)> {
    let resolved = match fs::symlink_metadata(dir) {
        // An existing store (or a link to one) is replaced where it really is.
        Ok(_) => fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()),
        Err(_) => dir.to_path_buf(),
    };
    let name = resolved.file_name().filter(|n| *n != OsStr::new(".."));
    let Some(name) = name else {
        return Err(store_error(
            dir,
            "cannot hold an expert store: name a directory of its own (e.g. .../moe-store)",
        ));
    };
    let parent = match resolved.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_os_string()))
}

/// `.NAME<infix><suffix>`, a hidden sibling of the store directory.
fn sibling(name: &OsStr, infix: &str, suffix: impl std::fmt::Display) -> OsString {
    let mut sibling = OsString::from(".");
    sibling.push(name);
    sibling.push(format!("{infix}{suffix}"));
    sibling
}

/// Whether `file_name` is `.NAME<infix>` followed by a process id.
fn is_sibling(file_name: &OsStr, name: &OsStr, infix: &str) -> bool {
    let prefix = sibling(name, infix, "");
    file_name
        .as_bytes()
        .strip_prefix(prefix.as_bytes())
        .is_some_and(|pid| !pid.is_empty() && pid.iter().all(u8::is_ascii_digit))
}

fn missing_ancestors(dir: &Path) -> Vec<PathBuf> {
    let mut missing: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|p| !p.as_os_str().is_empty() && fs::symlink_metadata(p).is_err())
        .map(Path::to_path_buf)
        .collect();
    missing.reverse();
    missing
}

/// Refuses to replace what is not an expert store: without `overwrite`,
/// anything but an empty directory; with it, a directory that holds no
/// store (so that `--overwrite` can never delete unrelated files).
fn check_target(target: &Path, shown: &Path, overwrite: bool) -> Result<()> {
    let meta = match fs::symlink_metadata(target) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(store_error(shown, format!("cannot be inspected: {e}"))),
    };
    if !meta.is_dir() {
        return Err(store_error(
            shown,
            "exists and is not a directory; choose another place for the store",
        ));
    }
    let parent_dev = target
        .parent()
        .and_then(|p| fs::metadata(p).ok())
        .map(|m| m.dev());
    if parent_dev.is_some_and(|dev| dev != meta.dev()) {
        return Err(store_error(
            shown,
            "is a mount point; a store is built beside its directory and swapped in, so name a directory \
             inside it (e.g. .../moe-store)",
        ));
    }
    let names: Vec<OsString> = fs::read_dir(target)
        .map_err(|e| store_error(shown, format!("cannot be listed: {e}")))?
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| !n.as_bytes().starts_with(PARTIAL_PREFIX.as_bytes()))
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    if !overwrite {
        return Err(store_error(
            shown,
            "already exists and is not empty; choose another directory, or replace the store in it \
             (moe-offload convert --overwrite, or overwrite=True)",
        ));
    }
    let is_store = names
        .iter()
        .any(|n| n == INDEX_FILE || *n == *layer_file_name(0));
    if !is_store {
        return Err(store_error(
            shown,
            format!(
                "holds files but no expert store (no {INDEX_FILE}); overwriting replaces the whole directory, \
                 so only a store is replaced. Choose another directory or empty this one"
            ),
        ));
    }
    Ok(())
}

/// Swaps two directories atomically (`renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::new(ErrorKind::InvalidInput, "a path holds a NUL byte"))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both paths are NUL-terminated strings that outlive the call;
    // the syscall reads nothing else.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn exchange_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

pub(super) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiers::store::round_trip_tests::names;

    fn no_fail(path: &Path, doing: &str, e: std::io::Error) -> CoreError {
        store_error(path, format!("{doing} failed: {e}"))
    }

    #[test]
    fn a_second_writer_is_refused_while_the_first_holds_the_lock() {
        let root = tempfile::tempdir().unwrap();
        let store = root.path().join("store");
        let first = Staging::begin(&store, false, &no_fail).unwrap();
        let Err(e) = Staging::begin(&store, false, &no_fail) else {
            panic!("a second writer got in");
        };
        let text = e.to_string();
        assert!(
            text.contains("another conversion") && text.contains(&std::process::id().to_string()),
            "{text}"
        );
        assert!(
            first.dir().is_dir(),
            "the refused writer leaves the first one's staging alone"
        );
        drop(first);
        assert_eq!(
            names(root.path()),
            Vec::<String>::new(),
            "lock and staging are gone"
        );
    }

    #[test]
    fn leftovers_of_dead_writers_are_cleared_whatever_their_pid() {
        let root = tempfile::tempdir().unwrap();
        let store = root.path().join("store");
        // Named after a live process (this one): a pid check would keep it.
        let stale = root
            .path()
            .join(format!(".store.partial-{}", std::process::id()));
        fs::create_dir(&stale).unwrap();
        fs::write(stale.join("layer-000.bin"), b"x").unwrap();
        fs::write(root.path().join(".store.lock"), b"12345").unwrap();
        let staging = Staging::begin(&store, false, &no_fail).unwrap();
        assert_eq!(
            names(staging.dir()),
            Vec::<String>::new(),
            "a fresh, empty staging directory"
        );
        fs::write(staging.dir().join(INDEX_FILE), b"new").unwrap();
        staging.commit().unwrap();
        assert_eq!(names(root.path()), ["store"]);
        assert_eq!(fs::read(store.join(INDEX_FILE)).unwrap(), b"new");
    }

    #[test]
    fn a_commit_swaps_the_old_store_out_and_the_new_one_in() {
        let root = tempfile::tempdir().unwrap();
        let store = root.path().join("store");
        fs::create_dir(&store).unwrap();
        fs::write(store.join(INDEX_FILE), b"old").unwrap();
        fs::write(store.join("tokenizer.json"), b"old").unwrap();
        let staging = Staging::begin(&store, true, &no_fail).unwrap();
        fs::write(staging.dir().join(INDEX_FILE), b"new").unwrap();
        staging.commit().unwrap();
        assert_eq!(names(root.path()), ["store"]);
        assert_eq!(
            names(&store),
            [INDEX_FILE],
            "nothing of the old store is left"
        );
        assert_eq!(fs::read(store.join(INDEX_FILE)).unwrap(), b"new");
    }

    #[test]
    fn the_rename_fallback_killed_halfway_is_undone_by_the_next_writer() {
        let root = tempfile::tempdir().unwrap();
        let store = root.path().join("store");
        fs::create_dir(&store).unwrap();
        fs::write(store.join(INDEX_FILE), b"old").unwrap();
        let staging = Staging::begin(&store, true, &no_fail).unwrap();
        fs::write(staging.dir().join(INDEX_FILE), b"new").unwrap();
        // A complete fallback swap leaves the old store under the staging name.
        staging.swap_by_renames(&store).unwrap();
        assert_eq!(fs::read(store.join(INDEX_FILE)).unwrap(), b"new");
        assert_eq!(fs::read(staging.dir().join(INDEX_FILE)).unwrap(), b"old");
        drop(staging);
        // Killed between its two renames: the store is aside, nothing in place.
        let aside = root.path().join(".store.old-77");
        fs::rename(&store, &aside).unwrap();
        let staging = Staging::begin(&store, true, &no_fail).unwrap();
        assert_eq!(
            fs::read(store.join(INDEX_FILE)).unwrap(),
            b"new",
            "put back in place"
        );
        assert!(!aside.exists());
        drop(staging);
        assert_eq!(names(root.path()), ["store"]);
    }

    #[test]
    fn overwriting_replaces_only_a_store() {
        let root = tempfile::tempdir().unwrap();
        let home = root.path().join("home");
        fs::create_dir(&home).unwrap();
        fs::write(home.join("notes.txt"), b"mine").unwrap();
        let Err(e) = Staging::begin(&home, true, &no_fail) else {
            panic!("a directory without a store was taken");
        };
        assert!(e.to_string().contains("no expert store"), "{e}");
        let Err(e) = Staging::begin(&home, false, &no_fail) else {
            panic!("a non-empty directory was taken");
        };
        assert!(e.to_string().contains("--overwrite"), "{e}");
        assert_eq!(names(root.path()), ["home"]);
        assert_eq!(names(&home), ["notes.txt"]);
        let Err(e) = Staging::begin(Path::new("/"), true, &no_fail) else {
            panic!("/ was taken");
        };
        assert!(e.to_string().contains("directory of its own"), "{e}");
    }

    #[test]
    fn directories_created_for_a_store_that_never_finished_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let store = root.path().join("a/b/store");
        let staging = Staging::begin(&store, false, &no_fail).unwrap();
        assert!(root.path().join("a/b").is_dir());
        drop(staging);
        assert_eq!(names(root.path()), Vec::<String>::new());
    }
}
