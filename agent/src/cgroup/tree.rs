//! cgroup id → path: a walk of the cgroup2 tree.
//!
//! A cgroup's id is its directory's inode number, which `readdir` returns
//! without a `stat`, so a walk of a node's few thousand cgroups costs a few
//! milliseconds. It runs off the scrape path (see `tracker`).

use crate::ids::IdMap;
use std::{fs, io, os::unix::fs::MetadataExt as _, path::Path};

use nix::{
    dir::{Dir, Type},
    fcntl::{AtFlags, OFlag},
    sys::stat::{Mode, SFlag, fstatat},
};

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_CLOEXEC)
    .union(OFlag::O_NOFOLLOW);

/// Walks the cgroup2 tree at `root` and returns every cgroup's id with its
/// path relative to `root`, as `/a/b` (`/` for the root).
///
/// Each directory is opened relative to its parent's descriptor (`openat`),
/// so the kernel resolves one name per cgroup instead of the whole path
/// from `/`: the walk runs every refresh, and path resolution was most of
/// its cost. At most one descriptor per tree level is open.
///
/// Cgroups that disappear during the walk are skipped; only a failure to read
/// `root` itself is an error.
pub fn scan(root: &Path) -> io::Result<IdMap<String>> {
    let mut out = IdMap::default();
    out.insert(fs::metadata(root)?.ino(), "/".to_owned());
    let dir = Dir::open(root, DIR_FLAGS, Mode::empty()).map_err(io::Error::from)?;
    walk(dir, "", &mut out);
    Ok(out)
}

fn walk(mut dir: Dir, rel: &str, out: &mut IdMap<String>) {
    let mut children = Vec::new();
    let mut unknown = Vec::new();
    for entry in dir.iter().flatten() {
        let Ok(name) = entry.file_name().to_str() else {
            continue; // cgroup names are UTF-8 in practice; skip the rest
        };
        match entry.file_type() {
            _ if name == "." || name == ".." => {}
            Some(Type::Directory) => children.push((entry.ino(), name.to_owned())),
            Some(_) => {}
            // cgroupfs fills in d_type; this is for anything that does not.
            None => unknown.push((entry.ino(), name.to_owned())),
        }
    }
    let is_dir = |name: &str| {
        fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR)
    };
    children.extend(unknown.into_iter().filter(|(_, name)| is_dir(name)));
    for (ino, name) in children {
        let child = format!("{rel}/{name}");
        // Removed meanwhile: still listed, as a walk by path did.
        if let Ok(sub) = Dir::openat(&dir, name.as_str(), DIR_FLAGS, Mode::empty()) {
            walk(sub, &child, out);
        }
        out.insert(ino, child);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_a_directory_tree() {
        let root = std::env::temp_dir().join(format!("podmeter-tree-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("a/b/c")).unwrap();
        fs::create_dir_all(root.join("d")).unwrap();
        fs::write(root.join("a/file"), "x").unwrap();
        let found = scan(&root).unwrap();
        let mut paths: Vec<&str> = found.values().map(String::as_str).collect();
        paths.sort_unstable();
        assert_eq!(paths, ["/", "/a", "/a/b", "/a/b/c", "/d"]);
        let ino = fs::metadata(root.join("a/b")).unwrap().ino();
        assert_eq!(found[&ino], "/a/b");
        fs::remove_dir_all(&root).unwrap();
        assert!(scan(&root).is_err());
    }
}
