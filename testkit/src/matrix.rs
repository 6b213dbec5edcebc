//! The build matrix of the C targets and compiling them, cached by content.
//!
//! Each target is a scenario directory of `tests/targets/` with one source file per version
//! (`v1.c`, `v2.c`, ...). The versions stay separate files rather than one source with
//! `-DVERSION`: [`crate::source_diff`] hands `diff -u v1.c v2.c` to
//! `livepatch build --source-diff` as the fix, exactly as a user would.

use std::collections::HashMap;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};


#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Opt {
    /// `-O0`
    O0,
    /// `-O2`
    O2,
    /// `-O3 -fomit-frame-pointer`
    O3,
}

/// How a build is made: with the live-patching flags (`-flive-patching=inline-clone`, and the
/// sources' `noipa`), or as distributions and upstream Makefiles make them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flavour {
    /// The labelled live-patching-friendly matrix (`-flive-patching=inline-clone`, `noipa`).
    LiveFlags,
    /// Debian's `dpkg-buildflags` with `hardening=+all`: `-g -O2 -fstack-protector-strong
    /// -fstack-clash-protection -fcf-protection -D_FORTIFY_SOURCE=2`, PIE, `-z relro -z now`.
    Hardened,
    /// `-Os` with the same hardening.
    Os,
    /// `-O2 -flto` with the same hardening.
    Lto,
    /// Plain `gcc -g -O2` (the compiler's defaults: PIE on Debian).
    PlainO2,
    /// Plain `gcc -g -Os`: no alignment padding between functions, no `endbr64`.
    PlainOs,
}

/// One build of a target: optimisation, PIE or not, linked with `--emit-relocs` or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    pub opt: Opt,
    pub pie: bool,
    pub relocs: bool,
    pub flavour: Flavour,
}

impl Variant {
    pub const fn new(opt: Opt, pie: bool, relocs: bool) -> Variant {
        Variant { opt, pie, relocs, flavour: Flavour::LiveFlags }
    }

    const fn real(flavour: Flavour) -> Variant {
        Variant { opt: Opt::O2, pie: true, relocs: false, flavour }
    }

    /// The builds as the world makes them (no live-patching flags, debug info kept); their
    /// bundles are built with `--source-diff`.
    pub const REAL: [Variant; 5] = [
        Variant::real(Flavour::Hardened),
        Variant::real(Flavour::Os),
        Variant::real(Flavour::Lto),
        Variant::real(Flavour::PlainO2),
        Variant::real(Flavour::PlainOs),
    ];

    pub fn is_real(&self) -> bool {
        self.flavour != Flavour::LiveFlags
    }

    /// The typical distribution build: `-O2`, PIE, no relocations kept.
    pub const O2_PIE: Variant = Variant::new(Opt::O2, true, false);
    /// The hardest build for the engine: no frame pointers, absolute addresses, no relocations.
    pub const O3_NOPIE: Variant = Variant::new(Opt::O3, false, false);

    /// All twelve builds.
    pub const ALL: [Variant; 12] = [
        Variant::new(Opt::O0, true, false),
        Variant::new(Opt::O0, true, true),
        Variant::new(Opt::O0, false, false),
        Variant::new(Opt::O0, false, true),
        Variant::new(Opt::O2, true, false),
        Variant::new(Opt::O2, true, true),
        Variant::new(Opt::O2, false, false),
        Variant::new(Opt::O2, false, true),
        Variant::new(Opt::O3, true, false),
        Variant::new(Opt::O3, true, true),
        Variant::new(Opt::O3, false, false),
        Variant::new(Opt::O3, false, true),
    ];

    /// `o2_pie`, `o3_nopie_relocs`, `real_hardened`, ...: the names the test macros use.
    pub fn name(&self) -> String {
        match self.flavour {
            Flavour::LiveFlags => {}
            Flavour::Hardened => return "real_hardened".into(),
            Flavour::Os => return "real_os".into(),
            Flavour::Lto => return "real_o2_lto".into(),
            Flavour::PlainO2 => return "real_o2".into(),
            Flavour::PlainOs => return "real_os_plain".into(),
        }
        let opt = match self.opt {
            Opt::O0 => "o0",
            Opt::O2 => "o2",
            Opt::O3 => "o3",
        };
        format!(
            "{opt}_{}{}",
            if self.pie { "pie" } else { "nopie" },
            if self.relocs { "_relocs" } else { "" }
        )
    }

    pub fn named(name: &str) -> Variant {
        Variant::ALL
            .iter()
            .chain(Variant::REAL.iter())
            .copied()
            .find(|v| v.name() == name)
            .unwrap_or_else(|| panic!("no build variant named {name}"))
    }

    /// The compiler flags of this build (all builds: `-g0 -Wl,--build-id -pthread` and
    /// `-flive-patching=inline-clone`, the documented way to build patchable C with GCC: no
    /// interprocedural optimisation makes a caller depend on a changed callee's body).
    pub fn cflags(&self) -> Vec<&'static str> {
        // What `DEB_BUILD_MAINT_OPTIONS=hardening=+all dpkg-buildflags` gives on amd64
        // (CFLAGS, CPPFLAGS, LDFLAGS), less the build-path mapping.
        const DEBIAN: [&str; 9] = [
            "-fstack-protector-strong",
            "-fstack-clash-protection",
            "-fcf-protection",
            "-Wformat",
            "-Werror=format-security",
            "-D_FORTIFY_SOURCE=2",
            "-fPIE",
            "-pie",
            "-Wl,-z,relro,-z,now",
        ];
        let common = ["-g", "-Wl,--build-id", "-pthread", "-DLIVEPATCH_REAL_BUILD"];
        let real = |opt: &[&'static str], hardened: bool| -> Vec<&'static str> {
            let mut f: Vec<&'static str> = opt.to_vec();
            if hardened {
                f.extend(DEBIAN);
            }
            f.extend(common);
            f
        };
        match self.flavour {
            Flavour::LiveFlags => {}
            Flavour::Hardened => return real(&["-O2"], true),
            Flavour::Os => return real(&["-Os"], true),
            Flavour::Lto => return real(&["-O2", "-flto=auto"], true),
            Flavour::PlainO2 => return real(&["-O2"], false),
            Flavour::PlainOs => return real(&["-Os"], false),
        }
        let mut f = match self.opt {
            Opt::O0 => vec!["-O0"],
            Opt::O2 => vec!["-O2"],
            Opt::O3 => vec!["-O3", "-fomit-frame-pointer"],
        };
        if self.pie {
            f.extend(["-fPIE", "-pie"]);
        } else {
            f.extend(["-fno-pie", "-no-pie"]);
        }
        if self.relocs {
            f.push("-Wl,--emit-relocs");
        }
        f.extend(["-g0", "-Wl,--build-id", "-pthread", "-flive-patching=inline-clone"]);
        f
    }
}

/// Tests over all twelve builds: `matrix_tests!(module_name => body_fn);` makes
/// `module_name::o0_pie`, `module_name::o0_pie_relocs`, ... each calling `body_fn(variant)`.
#[macro_export]
macro_rules! matrix_tests {
    ($module:ident => $body:ident) => {
        $crate::variant_tests!($module => $body: o0_pie, o0_pie_relocs, o0_nopie, o0_nopie_relocs,
            o2_pie, o2_pie_relocs, o2_nopie, o2_nopie_relocs,
            o3_pie, o3_pie_relocs, o3_nopie, o3_nopie_relocs);
    };
}

/// Tests over the five real builds (`real_hardened`, `real_os`, `real_o2_lto`, `real_o2`,
/// `real_os_plain`).
#[macro_export]
macro_rules! real_build_tests {
    ($module:ident => $body:ident) => {
        $crate::variant_tests!($module => $body: real_hardened, real_os, real_o2_lto, real_o2, real_os_plain);
    };
}

/// Tests over chosen builds: `variant_tests!(module_name => body_fn: o2_pie, o3_nopie);`
#[macro_export]
macro_rules! variant_tests {
    ($module:ident => $body:ident: $($variant:ident),+ $(,)?) => {
        mod $module {
            $(
                #[test]
                fn $variant() {
                    super::$body($crate::Variant::named(stringify!($variant)))
                }
            )+
        }
    };
}

/// `tests/targets` in the repository.
pub fn targets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests")
        .join("targets")
}

/// `tests/targets/<scenario>/<version>.c`
pub fn source(scenario: &str, version: &str) -> PathBuf {
    targets_dir().join(scenario).join(format!("{version}.c"))
}

/// Every scenario directory (not `common`), sorted.
pub fn scenarios() -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(targets_dir())
        .expect("tests/targets")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "common")
        .collect();
    out.sort();
    out
}

/// The versions (`v1`, `v2`, ...) of a scenario, sorted.
pub fn versions(scenario: &str) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(targets_dir().join(scenario))
        .expect("scenario dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('v') && n.ends_with(".c"))
        .map(|n| n.trim_end_matches(".c").to_string())
        .collect();
    out.sort();
    out
}

fn compiler() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".to_string())
}

fn compiler_identity() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let out = Command::new(compiler())
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("cannot run the C compiler `{}`: {e}", compiler()));
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
}

/// Where compiled targets and source diffs are kept: `livepatch-targets/` in the test scratch
/// directory of the workspace's target directory (what `CARGO_TARGET_TMPDIR` names for
/// integration tests; see [`scratch_dir`]).
pub(crate) fn cache_dir() -> PathBuf {
    let dir = scratch_dir().join("livepatch-targets");
    fs::create_dir_all(&dir).expect("create target cache dir");
    dir
}

/// The tests' scratch directory: `CARGO_TARGET_TMPDIR` if the environment has it, else
/// `tmp/` of the target directory the running test executable was built in
/// (`<target>/<profile>/deps/<test>`, the layout Cargo builds). Cargo hands
/// `CARGO_TARGET_TMPDIR` to integration tests at compile time only, and this crate is compiled
/// as a library, so it finds the same directory from the test executable.
pub fn scratch_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("CARGO_TARGET_TMPDIR") {
            return PathBuf::from(dir);
        }
        let exe = std::env::current_exe().expect("the test executable's path");
        let target = exe
            .ancestors()
            .nth(3)
            .unwrap_or_else(|| panic!("{} is not in <target>/<profile>/deps/", exe.display()));
        target.join("tmp")
    })
    .clone()
}

/// Compile `tests/targets/<scenario>/<version>.c` in `variant` and return the executable.
///
/// Binaries are cached in `CARGO_TARGET_TMPDIR` under a key made of the compiler's identity,
/// the flags and the bytes of the source and the common header, so the test binaries of one
/// run (and later runs) share them. A cached binary is never replaced while it may be running.
pub fn compile(scenario: &str, version: &str, variant: Variant) -> PathBuf {
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = OnceLock::new();

    let src = source(scenario, version);
    let header = targets_dir().join("common").join("target.h");
    let src_bytes = fs::read(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let header_bytes = fs::read(&header).unwrap_or_else(|e| panic!("{}: {e}", header.display()));
    let flags = variant.cflags();

    let mut h = std::collections::hash_map::DefaultHasher::new();
    compiler_identity().hash(&mut h);
    flags.hash(&mut h);
    src_bytes.hash(&mut h);
    header_bytes.hash(&mut h);
    let key = h.finish();
    let out = cache_dir().join(format!(
        "{scenario}-{version}-{}-{key:016x}",
        variant.name()
    ));

    let lock = {
        let mut locks = LOCKS.get_or_init(Default::default).lock().unwrap();
        locks.entry(out.clone()).or_default().clone()
    };
    let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    if out.exists() {
        return out;
    }

    let tmp = out.with_file_name(format!(
        ".tmp-{}-{}-{}",
        std::process::id(),
        unique(),
        out.file_name().unwrap().to_string_lossy()
    ));
    let result = Command::new(compiler())
        .args(&flags)
        .arg("-o")
        .arg(&tmp)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{}`: {e}", compiler()));
    if !result.status.success() {
        let _ = fs::remove_file(&tmp);
        panic!(
            "compiling {} ({}) failed: {} {}\n{}",
            src.display(),
            variant.name(),
            compiler(),
            flags.join(" "),
            String::from_utf8_lossy(&result.stderr)
        );
    }
    // hard_link never replaces an existing file: another test process may already have put
    // the same binary there and be running it.
    match fs::hard_link(&tmp, &out) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => panic!("caching {}: {e}", out.display()),
    }
    let _ = fs::remove_file(&tmp);
    out
}

pub(crate) fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

