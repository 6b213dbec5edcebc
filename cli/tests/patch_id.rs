//! Same fix, same patch id: the id is a digest of what the patch does, not of the file. Two
//! builds of one fix (another path of the old executable, another time) are two files (two
//! sha256s, what specs pin and signatures sign) but one patch, and applying the second over the
//! first answers "already applied" instead of stacking a copy.

mod support;

use std::ffi::OsStr;
use support::*;

/// `inspect --json` of a bundle: (patch_id, sha256, target.path).
fn identity(bundle: &Bundle) -> (String, String, String) {
    let run = livepatch([OsStr::new("inspect"), bundle.path.as_os_str(), OsStr::new("--json")]);
    let v = run.assert_ok().json();
    let s = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("inspect --json: no string {k}: {v}")).to_string();
    (s("patch_id"), s("sha256"), v["target"]["path"].as_str().unwrap_or_default().to_string())
}

#[test]
fn rebuilt_bundle_has_the_same_patch_id_and_is_already_applied() {
    let v = Variant::O2_PIE;
    let old = compile("plain", "v1", v);
    let new = compile("plain", "v2", v);
    let first = build_bundle(&old, &new, &[]);
    // The same old executable elsewhere (another build machine's path), built again later.
    let elsewhere = tempfile::tempdir().unwrap();
    let copy = elsewhere.path().join("plain-v1");
    std::fs::copy(&old, &copy).unwrap();
    let second = build_bundle(&copy, &new, &[]);

    let (id1, sha1, path1) = identity(&first);
    let (id2, sha2, path2) = identity(&second);
    assert_ne!(path1, path2, "the bundles must record two paths of the old executable");
    assert_ne!(sha1, sha2, "two builds, two files");
    assert_eq!(id1, id2, "the same fix must have the same patch id");

    let mut t = Target::start(&old);
    let a = apply(t.pid, &first, IDLE).assert_ok().applied();
    assert_eq!(a.patch_id, id1);
    assert_eq!(a.raw["already_applied"], false, "{}", a.raw);
    t.expect("call 5", "result v2 15");

    let again = apply(t.pid, &second, IDLE).assert_ok().applied();
    assert_eq!(again.patch_id, id1);
    assert_eq!(again.raw["already_applied"], true, "the rebuilt bundle stacked a copy: {}", again.raw);
    t.expect("call 5", "result v2 15");
    let st = status(t.pid);
    assert_eq!((st.stacked, st.ids()), (1, vec![id1.clone()]), "{}", st.raw);
    // The region records the file that was applied.
    assert_eq!(st.raw["patches"][0]["bundle_sha256"], sha1.as_str(), "{}", st.raw);

    // The text form says so too.
    let text = livepatch([OsStr::new("apply"), OsStr::new("--pid"), OsStr::new(&t.pid.to_string()), second.path.as_os_str()]);
    text.assert_ok();
    assert!(text.stdout.contains("already applied"), "{}", text.stdout);

    revert(t.pid, IDLE).assert_ok();
    t.expect("call 5", "result v1 10");
    assert!(status(t.pid).patches.is_empty());
}

/// Another fix against the same executable is another patch.
#[test]
fn another_fix_has_another_patch_id() {
    let v = Variant::O2_PIE;
    let old = compile("plain", "v1", v);
    let to_v2 = build_bundle(&old, &compile("plain", "v2", v), &[]);
    let to_v3 = build_bundle(&old, &compile("plain", "v3", v), &[]);
    assert_ne!(identity(&to_v2).0, identity(&to_v3).0);
}
