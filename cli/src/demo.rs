//! `livepatch demo`: compile a small service in two versions with the system C compiler, run
//! the old one, update it live, show its output change and the pause, revert, clean up.
use livepatch::apply;
use livepatch::bundle::Bundle;
use livepatch::elf::ElfFile;
use livepatch::extract;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const V1: &str = r#"#include <stdio.h>
#include <unistd.h>
#include <time.h>
/* A tiny "service": prices an order every 200 ms. Version 1 has a bug: no discount. */
long orders;
__attribute__((noinline)) long price(long qty, long unit) {
    long total = qty * unit;
    return total;
}
int main(void) {
    struct timespec ts = {0, 200 * 1000 * 1000};
    for (;;) {
        orders++;
        long qty = 8 + orders % 5;
        printf("order %ld: %ld x 10 = %ld\n", orders, qty, price(qty, 10));
        fflush(stdout);
        nanosleep(&ts, 0);
    }
}
"#;

const V2_PRICE: &str = r#"__attribute__((noinline)) long price(long qty, long unit) {
    long total = qty * unit;
    if (qty >= 10) {
        total -= total / 10;          /* the fix: 10% off for 10 or more */
        fprintf(stderr, "");          /* a libc call version 1 never made */
    }
    return total;
}"#;

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn compile(cc: &str, src: &Path, out: &Path) -> Result<()> {
    let st = Command::new(cc)
        // As a distribution builds it (Debian's hardening flags, debug info kept): no special
        // flags for live patching.
        .args([
            "-g",
            "-O2",
            "-fstack-protector-strong",
            "-fstack-clash-protection",
            "-fcf-protection",
            "-D_FORTIFY_SOURCE=2",
            "-fPIE",
            "-pie",
            "-Wl,-z,relro,-z,now",
            "-Wl,--build-id",
            "-Wno-format-zero-length",
            "-o",
        ])
        .arg(out)
        .arg(src)
        .status()
        .with_context(|| format!("running the C compiler `{cc}` (install gcc, or set CC)"))?;
    if !st.success() {
        bail!("{cc} failed on {}", src.display());
    }
    Ok(())
}

/// A unified diff of `old` and `new` that differ in one contiguous run of lines.
fn one_hunk_diff(old: &str, new: &str, name: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    let pre = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let post = a[pre..].iter().rev().zip(b[pre..].iter().rev()).take_while(|(x, y)| x == y).count();
    let (ra, rb) = (&a[pre..a.len() - post], &b[pre..b.len() - post]);
    let mut out = format!("--- a/{name}\n+++ b/{name}\n@@ -{},{} +{},{} @@\n", pre + 1, ra.len(), pre + 1, rb.len());
    for l in ra {
        out.push_str(&format!("-{l}\n"));
    }
    for l in rb {
        out.push_str(&format!("+{l}\n"));
    }
    out
}

pub fn run(keep: bool) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("livepatch-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let res = run_in(&dir);
    if keep {
        println!("work directory kept: {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    res
}

fn run_in(dir: &Path) -> Result<()> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let v2 = V1.replace(&V1[V1.find("__attribute__").unwrap()..V1.find("int main").unwrap()], &format!("{V2_PRICE}\n"));
    let v2 = v2.replace("Version 1 has a bug: no discount.", "Version 2 fixes it.");
    // Each version's source in its own tree, as `service.c`, like two checkouts of a project.
    for (name, src) in [("v1", V1), ("v2", v2.as_str())] {
        let tree = dir.join(format!("src-{name}"));
        std::fs::create_dir_all(&tree)?;
        std::fs::write(tree.join("service.c"), src)?;
        compile(&cc, &tree.join("service.c"), &dir.join(name))?;
    }
    println!("== compiled {0}/v1 and {0}/v2 with {cc}", dir.display());

    println!("== compiled with Debian's hardening flags (-O2, stack protector, FORTIFY, CET, PIE, relro/now, -g)");

    // The fix as a user has it: a unified diff of the source.
    let fix = one_hunk_diff(V1, &v2, "service.c");
    std::fs::write(dir.join("fix.patch"), &fix)?;
    let (old, new) = (ElfFile::open(&dir.join("v1"))?, ElfFile::open(&dir.join("v2"))?);
    let source = extract::SourceInput { changes: extract::source::parse_unified_diff(&fix)?, debug_file: None };
    let opts = extract::BuildOptions { source: Some(source), ..Default::default() };
    let (manifest, blob, diff) = extract::build(&old, &new, &opts)?;
    let bundle_path = dir.join("fix.lpatch");
    let bundle = Bundle::write(&manifest, &blob, &bundle_path)?;
    let explained = diff.source.as_ref().map(|s| {
        let not: Vec<String> = s.not_patched.iter().map(|e| e.name.clone()).collect();
        if not.is_empty() { String::new() } else { format!(" (also differ, compiler choices, not patched: {})", not.join(", ")) }
    });
    println!(
        "== built {} ({} bytes) from the source diff {}: patches {}{}",
        bundle_path.display(),
        std::fs::metadata(&bundle_path)?.len(),
        dir.join("fix.patch").display(),
        manifest.functions.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", "),
        explained.unwrap_or_default()
    );

    let mut child = Kill(Command::new(dir.join("v1")).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().context("starting v1")?);
    let pid = child.0.id() as i32;
    let (tx, rx) = mpsc::channel();
    let out = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let show = |n: usize| -> Result<()> {
        for _ in 0..n {
            let l = rx.recv_timeout(Duration::from_secs(5)).context("the demo service stopped printing")?;
            println!("   [pid {pid}] {l}");
        }
        Ok(())
    };
    println!("== running the old version (pid {pid}):");
    show(3)?;

    let r = apply::apply(pid, &bundle, &apply::Options::default())?;
    println!(
        "== applied {} live: {} (process stopped for {} us; {} attempt(s); {} ms in all)",
        r.patch_id,
        r.functions.join(", "),
        r.pause_us,
        r.attempts,
        r.total_ms
    );
    while rx.try_recv().is_ok() {}
    show(3)?;
    let st = livepatch::status::status(pid)?;
    println!("== status read back from the process: {} patch(es): {}", st.stacked, st.patches.iter().map(|p| p.patch_id.as_str()).collect::<Vec<_>>().join(", "));

    let rv = livepatch::revert::revert(pid, false, Default::default(), Duration::from_secs(10), Default::default())?;
    println!("== reverted {} (process stopped for {} us):", rv.reverted.join(", "), rv.pause_us);
    while rx.try_recv().is_ok() {}
    show(2)?;
    drop(child);
    println!("== done: same process, same state (the order counter kept counting), new code while it ran");
    Ok(())
}
