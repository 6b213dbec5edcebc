//! The typed reason of every skipped process ([`SkipKind`]), including an executable the agent
//! may not read (`EACCES`), on captured `/proc` trees.

use super::tests::{build_id, layouts, Tree, ID, OTHER_UID, UID};
use super::*;

fn query(path: Option<&str>) -> Query {
    Query { container_id: ID.into(), pod_uid: UID.into(), build_id: Some(build_id("/bin/true")), fixed_build_id: None, path: path.map(String::from), pod_in_cgroup: false }
}

fn kinds(found: &Found) -> Vec<(i32, SkipKind)> {
    found.skipped.iter().chain(&found.other_pod).map(|s| (s.pid, s.kind)).collect()
}

#[test]
fn every_skipped_process_says_why_in_a_kind() {
    let tree = Tree::new();
    let root = tree.rootfs("rootfs", "/bin/true");
    let other = tree.rootfs("other", "/bin/false");
    let cgroup = &layouts(ID, UID)[1].1;
    tree.process(10, cgroup, &root.join("usr/local/bin/app"), &root);
    tree.process(11, cgroup, &other.join("usr/local/bin/app"), &other);
    tree.process(12, cgroup, &root.join("usr/local/bin/app"), &root);
    tree.set_stat(12, 'Z', 0, 1012);
    // Not an ELF file.
    fs::write(root.join("usr/local/bin/script"), "#!/bin/sh\n").unwrap();
    tree.process(13, cgroup, &root.join("usr/local/bin/script"), &root);
    tree.process(14, &layouts(ID, OTHER_UID)[1].1, &root.join("usr/local/bin/app"), &root);
    fs::copy("/bin/true", root.join("usr/local/bin/copy")).unwrap();
    tree.process(15, cgroup, &root.join("usr/local/bin/copy"), &root);

    let found = tree.discovery().find(&query(Some("/usr/local/bin/app"))).unwrap();
    assert_eq!(found.targets.iter().map(|t| t.pid).collect::<Vec<_>>(), vec![10]);
    assert_eq!(
        kinds(&found),
        vec![(11, SkipKind::OtherBuild), (12, SkipKind::NotRunning), (13, SkipKind::Unreadable), (15, SkipKind::OtherPath), (14, SkipKind::OtherPod)],
        "{found:?}"
    );
}

/// A process running the bundle's new build (the fixed image) is `Fixed`, not another build; at
/// another path than the task's it is still `OtherPath`.
#[test]
fn the_fixed_build_is_its_own_kind() {
    let tree = Tree::new();
    let fixed = tree.rootfs("fixed", "/bin/false");
    let cgroup = &layouts(ID, UID)[1].1;
    tree.process(20, cgroup, &fixed.join("usr/local/bin/app"), &fixed);
    let q = Query { fixed_build_id: Some(build_id("/bin/false")), ..query(Some("/usr/local/bin/app")) };
    let found = tree.discovery().find(&q).unwrap();
    assert!(found.targets.is_empty());
    assert_eq!(kinds(&found), vec![(20, SkipKind::Fixed)]);
    let elsewhere = Query { path: Some("/usr/bin/app".into()), ..q.clone() };
    assert_eq!(kinds(&tree.discovery().find(&elsewhere).unwrap()), vec![(20, SkipKind::OtherPath)]);
    // Without the bundle's new build id, the same process is another build.
    assert_eq!(kinds(&tree.discovery().find(&query(Some("/usr/local/bin/app"))).unwrap()), vec![(20, SkipKind::OtherBuild)]);
}

/// Drop `CAP_DAC_OVERRIDE` and `CAP_DAC_READ_SEARCH` from the calling thread's effective set (as
/// root they would open any file): capabilities are per thread, so only this thread loses them.
fn drop_dac_override_in_this_thread() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const DAC: u32 = (1 << 1) | (1 << 2);
    let mut header = Header { version: VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a version-3 header and the two data words that version takes.
    unsafe {
        assert_eq!(libc::syscall(libc::SYS_capget, &mut header as *mut Header, data.as_mut_ptr()), 0, "capget: {}", std::io::Error::last_os_error());
        data[0].effective &= !DAC;
        assert_eq!(libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()), 0, "capset: {}", std::io::Error::last_os_error());
    }
}

/// An executable the agent may not read is `PermissionDenied` (from the OS error, whatever the
/// engine's message says), with what the agent needs. Runs as root too: the check runs on a
/// thread without the capabilities that bypass file permissions.
#[test]
fn an_executable_the_agent_may_not_read_is_permission_denied() {
    use std::os::unix::fs::PermissionsExt;
    let tree = Tree::new();
    let root = tree.rootfs("rootfs", "/bin/true");
    let exe = root.join("usr/local/bin/app");
    tree.process(10, &layouts(ID, UID)[0].1, &exe, &root);
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o000)).unwrap();
    let d = tree.discovery();
    let found = std::thread::spawn(move || {
        drop_dac_override_in_this_thread();
        d.find(&query(None)).unwrap()
    })
    .join()
    .unwrap();
    assert!(found.targets.is_empty(), "{found:?}");
    assert_eq!(kinds(&found), vec![(10, SkipKind::PermissionDenied)]);
    assert!(found.skipped[0].reason.contains("CAP_SYS_PTRACE"), "{:?}", found.skipped);
}
