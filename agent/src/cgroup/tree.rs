//! cgroup id → path: a walk of the cgroup2 tree.
//!
//! A cgroup's id is its directory's inode number, which `readdir` returns
//! without a `stat`, so a walk of a node's few thousand cgroups costs a few
//! milliseconds. It runs off the scrape path (see `tracker`).

use std::{collections::HashMap, fs, io, os::unix::fs::DirEntryExt as _, path::Path};

use std::os::unix::fs::MetadataExt as _;

/// Walks the cgroup2 tree at `root` and returns every cgroup's id with its
/// path relative to `root`, as `/a/b` (`/` for the root).
///
/// Cgroups that disappear during the walk are skipped; only a failure to read
/// `root` itself is an error.
pub fn scan(root: &Path) -> io::Result<HashMap<u64, String>> {
    let mut out = HashMap::new();
    out.insert(fs::metadata(root)?.ino(), "/".to_owned());
    let mut stack = vec![(root.to_owned(), String::new())];
    let mut first = true;
    while let Some((dir, rel)) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if first => return Err(e),
            Err(_) => continue, // removed meanwhile
        };
        first = false;
        for entry in entries.flatten() {
            let Ok(ft) = entry.file_type() else { continue };
            if !ft.is_dir() {
                continue;
            }
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue; // cgroup names are UTF-8 in practice; skip the rest
            };
            let child = format!("{rel}/{name}");
            out.insert(entry.ino(), child.clone());
            stack.push((entry.path(), child));
        }
    }
    Ok(out)
}
