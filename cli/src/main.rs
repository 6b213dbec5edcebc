//! The `livepatch` command line: the engine, locally, with no cluster.
mod demo;
mod manifest;

use anyhow::Context;
use clap::{Parser, Subcommand};
use livepatch::bundle::Bundle;
use livepatch::elf::ElfFile;
use livepatch::extract;
use livepatch::signature;
use livepatch::watchpoint::{Frames, Strategy};
use std::path::PathBuf;
use std::time::Duration;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "livepatch", version, about = "Live procedure update for running processes")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show which functions and data differ between two executables.
    Diff {
        old: PathBuf,
        new: PathBuf,
        #[command(flatten)]
        source: SourceArgs,
        #[arg(long)]
        json: bool,
    },
    /// Build a patch bundle turning OLD's changed functions into NEW's.
    Build {
        #[arg(long)]
        old: PathBuf,
        #[arg(long)]
        new: PathBuf,
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// Only these functions (repeatable); default: every changed function.
        #[arg(long = "function")]
        functions: Vec<String>,
        #[command(flatten)]
        source: SourceArgs,
        /// If the update cannot be applied live, still write a bundle that records why; applying
        /// it refuses (exit 3) and flags the process for an offline restart.
        #[arg(long)]
        record_refusal: bool,
        #[command(flatten)]
        manifest: manifest::ManifestArgs,
        #[arg(long)]
        json: bool,
    },
    /// Print what a bundle contains.
    Inspect {
        bundle: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Apply a bundle to a running process (or several: `--pid` repeated, patched concurrently).
    Apply {
        #[arg(long, required = true)]
        pid: Vec<i32>,
        /// With several processes: how many are patched at once (default: the CPUs).
        #[arg(long)]
        jobs: Option<usize>,
        bundle: PathBuf,
        /// How to wait until the old code is not active: trap (entries lead to gates where new
        /// calls wait; stacks polled) or wait (poll stacks, entries untouched).
        #[arg(long, default_value = "trap")]
        strategy: Strategy,
        /// Give up (exit 4, target unchanged) when the old code stays active this long.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// Frames of old code stopped at a return site proven to continue in the new code:
        /// switch them to the new code (a function that never returns gets the fix), or wait
        /// for them to return like any active frame.
        #[arg(long, default_value = "switch")]
        frames: Frames,
        #[arg(long)]
        json: bool,
    },
    /// Show the patches applied to a process (read from the process itself).
    Status {
        #[arg(long)]
        pid: i32,
        #[arg(long)]
        json: bool,
    },
    /// Remove the newest patch (or all) from a process; with nothing applied, say so (exit 0).
    Revert {
        #[arg(long)]
        pid: i32,
        #[arg(long)]
        all: bool,
        /// How to wait until the patch's code is not active (as for apply).
        #[arg(long, default_value = "trap")]
        strategy: Strategy,
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// Frames of the patch's code stopped at a return site proven both ways: switch them
        /// back to the original code, or wait for them to return.
        #[arg(long, default_value = "switch")]
        frames: Frames,
        #[arg(long)]
        json: bool,
    },
    /// Make an ed25519 key pair for bundle signatures: PREFIX.key (private, mode 0600) and
    /// PREFIX.pub (one base64 line: the value for the chart's agent.signatures.trustedKeys).
    Keygen {
        #[arg(long = "out")]
        out: PathBuf,
    },
    /// Sign a bundle: a detached signature over its sha256, with the key id.
    Sign {
        bundle: PathBuf,
        /// The private key (PREFIX.key from `livepatch keygen`).
        #[arg(long)]
        key: PathBuf,
        /// Where the signature goes (default: BUNDLE.sig).
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
    },
    /// Check a bundle's signature against trusted public keys (exit 0 only if it verifies).
    Verify {
        bundle: PathBuf,
        /// The signature file (default: BUNDLE.sig).
        #[arg(long)]
        sig: Option<PathBuf>,
        /// A public key file, or a directory of *.pub files.
        #[arg(long)]
        trusted: PathBuf,
    },
    /// Compile a small program in two versions, run the old one and update it live.
    Demo {
        /// Keep the work directory.
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LIVEPATCH_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    livepatch::cancel::install_handlers();
    if !matches!(cli.cmd, Cmd::Apply { .. } | Cmd::Revert { .. } | Cmd::Demo { .. }) {
        // Read-only commands end quietly when their reader goes away (`livepatch diff | head`)
        // instead of panicking on EPIPE. Commands that change a process keep SIGPIPE ignored:
        // a closed pipe must never kill the tool in the middle of an update.
        // SAFETY: resetting a signal disposition to its default; no handler is involved.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let json = cli.cmd.json();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<Reported>().is_some() => ExitCode::from(e.downcast_ref::<Reported>().map_or(1, |r| r.0)),
        Err(e) => {
            let engine = e.downcast_ref::<livepatch::Error>();
            let code = engine.map(|e| e.exit_code()).unwrap_or(1);
            eprintln!("livepatch: {e:#}");
            if json {
                println!("{}", error_json(&format!("{e:#}"), code, engine));
            }
            ExitCode::from(code as u8)
        }
    }
}

impl Cmd {
    fn json(&self) -> bool {
        match self {
            Cmd::Diff { json, .. } | Cmd::Build { json, .. } | Cmd::Inspect { json, .. } | Cmd::Apply { json, .. } | Cmd::Status { json, .. } | Cmd::Revert { json, .. } => *json,
            _ => false,
        }
    }
}

/// One apply's report, as JSON or as text.
fn print_applied(r: &livepatch::apply::Report, json: bool) -> anyhow::Result<()> {
    let pid = r.pid;
    if json {
        let mut v = serde_json::to_value(r)?;
        v["peak_rss_kib"] = peak_rss_kib().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if r.already_applied {
        println!("patch {} is already applied to process {pid}; nothing to do", r.patch_id);
    } else {
        println!(
            "applied {} to process {pid}: {} (pause {} us, {} attempt(s), waited {} ms, total {} ms)",
            r.patch_id,
            r.functions.join(", "),
            r.pause_us,
            r.attempts,
            r.waited_ms,
            r.total_ms
        );
        for f in &r.switched_frames {
            println!("    switched a frame of {} on thread {}: return address {:#x} -> {:#x}", f.function, f.tid, f.old, f.new);
        }
        if r.restart_recommended {
            println!("warning: {} patches are stacked; an offline restart is recommended", r.stacked);
        }
    }
    Ok(())
}

/// Apply to several processes at once, `jobs` at a time (each on its own thread: a thread is
/// the tracer of the process it patches). Every process gets its verdict; the exit code is
/// that of the first failure, in the order the processes were given.
fn apply_many(pids: &[i32], jobs: Option<usize>, b: &Bundle, opts: &livepatch::apply::Options, json: bool) -> anyhow::Result<()> {
    let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).clamp(1, pids.len());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<livepatch::Result<livepatch::apply::Report>>>> = pids.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&pid) = pids.get(i) else { break };
                *results[i].lock().unwrap() = Some(livepatch::apply::apply(pid, b, opts));
            });
        }
    });
    let mut first_failure: Option<livepatch::Error> = None;
    let mut out = Vec::new();
    for (pid, r) in pids.iter().zip(results) {
        match r.into_inner().unwrap().expect("every process was tried") {
            Ok(r) if json => out.push(serde_json::to_value(&r)?),
            Ok(r) => print_applied(&r, false)?,
            Err(e) => {
                let code = e.exit_code();
                if json {
                    let mut v = error_json(&e.to_string(), code, Some(&e));
                    v["pid"] = (*pid).into();
                    out.push(v);
                } else {
                    eprintln!("livepatch: process {pid}: {e}");
                }
                first_failure.get_or_insert(e);
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "results": out, "peak_rss_kib": peak_rss_kib() }))?);
    }
    match first_failure {
        // Every verdict is printed already: exit with the first failure's code, nothing more.
        Some(e) if json => Err(Reported(e.exit_code() as u8).into()),
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// The machine-readable verdict of a failure: scripts act on `refusal_kind`, never on the text.
fn error_json(message: &str, code: i32, engine: Option<&livepatch::Error>) -> serde_json::Value {
    let kind = engine.and_then(|e| e.refusal_kind());
    serde_json::json!({
        "error": message,
        "exit_code": code,
        "refusal_kind": kind,
        "restart_required": engine.is_some_and(|e| e.restart_required()),
        "advice": kind.map(|k| k.advice()),
    })
}

/// A failure already reported on stdout (as JSON): only its exit code is left to give.
#[derive(Debug)]
struct Reported(u8);

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "failed (exit {}; see the results)", self.0)
    }
}

impl std::error::Error for Reported {}

/// This process's peak resident memory (`VmHWM`, KiB): the high-water mark of its own address
/// space only. (`getrusage` and `wait4` report a `ru_maxrss` that also holds the parent's
/// resident size at the exec that started us: useless for a small tool started by a big one.)
/// Write through a temporary file in the same directory, so a reader (or a crash) never sees
/// half a file.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()
}

/// The changed set from the fix's source.
#[derive(clap::Args)]
struct SourceArgs {
    /// The fix as a unified diff (git diff, quilt, debian/patches): patch exactly the functions
    /// holding code of its changed lines (found through NEW's DWARF line table).
    #[arg(long = "source-diff")]
    source_diff: Option<PathBuf>,
    /// NEW's separate debug file (default: NEW itself, then /usr/lib/debug/.build-id/).
    #[arg(long = "debug-file", requires = "source_diff")]
    debug_file: Option<PathBuf>,
}

impl SourceArgs {
    fn input(&self) -> anyhow::Result<Option<extract::SourceInput>> {
        self.source_diff
            .as_ref()
            .map(|p| extract::SourceInput::from_diff_file(p, self.debug_file.clone()).with_context(|| format!("reading the source diff {}", p.display())))
            .transpose()
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Diff { old, new, source, json } => {
            let (o, n) = (ElfFile::open(&old)?, ElfFile::open(&new)?);
            let d = extract::diff_with_source(&o, &n, source.input()?.as_ref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                print_diff(&d);
            }
        }
        Cmd::Build { old, new, output, functions, source, record_refusal, manifest, json } => {
            let rollout = manifest.plan(&output)?;
            let (o, n) = (ElfFile::open(&old)?, ElfFile::open(&new)?);
            let opts = extract::BuildOptions { functions, record_refusal, source: source.input()? };
            let (manifest, blob, diff) = extract::build(&o, &n, &opts)?;
            if let Some(src) = &diff.source {
                // A changed macro or constant changes the functions using it without a changed
                // line in their code: say which differing functions are left out.
                let unexplained = src.not_patched_for(extract::Why::NoChangedLine);
                if !src.lines_without_code.is_empty() && !unexplained.is_empty() {
                    eprintln!(
                        "livepatch: warning: {} changed line(s) produced no code ({}; a macro, type or declaration?), and these functions differ without a changed line, so they are not patched: {}. If the fix changes a macro or constant they use, add them with --function.",
                        src.lines_without_code.len(),
                        src.lines_without_code.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
                        unexplained.join(", ")
                    );
                }
            }
            if let Some(r) = &manifest.refusal {
                eprintln!("livepatch: warning: this update cannot be applied live ({r}); the bundle records the refusal, and applying it flags the process for an offline restart");
            }
            let b = Bundle::write(&manifest, &blob, &output).with_context(|| format!("writing {}", output.display()))?;
            let emitted = match &rollout {
                Some(plan) => {
                    let bytes = std::fs::read(&output).with_context(|| format!("reading back {}", output.display()))?;
                    let yaml = plan.render(&b, &bytes).with_context(|| format!("the bundle {} is written; its manifest is not", output.display()))?;
                    write_atomically(plan.file(), yaml.as_bytes())?;
                    Some(plan.file())
                }
                None => None,
            };
            if json {
                println!("{}", serde_json::json!({"bundle": output, "patch_id": b.patch_id(), "sha256": b.digest,
                    "functions": b.manifest.functions.iter().map(|f| &f.name).collect::<Vec<_>>(), "manifest": emitted}));
            } else {
                println!("wrote {} ({} bytes, patch {} sha256 {})", output.display(), std::fs::metadata(&output)?.len(), b.patch_id(), b.digest);
                for f in &b.manifest.functions {
                    println!("  {:<10} {}", format!("{:?}", f.kind).to_lowercase(), f.name);
                }
                if let Some(f) = emitted {
                    println!("wrote {} (kubectl apply -f {})", f.display(), f.display());
                }
            }
        }
        Cmd::Inspect { bundle, json } => {
            let b = Bundle::read(&bundle)?;
            if json {
                let mut v = serde_json::to_value(&b.manifest)?;
                v["patch_id"] = b.patch_id().into();
                v["sha256"] = b.digest.clone().into();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_bundle(&b);
            }
        }
        Cmd::Apply { pid, jobs, bundle, strategy, timeout, frames, json } => {
            let b = Bundle::read(&bundle)?;
            let opts = livepatch::apply::Options { strategy, timeout: secs(timeout)?, frames };
            if let [pid] = pid[..] {
                let r = livepatch::apply::apply(pid, &b, &opts)?;
                print_applied(&r, json)?;
            } else {
                apply_many(&pid, jobs, &b, &opts, json)?;
            }
        }
        Cmd::Status { pid, json } => {
            let s = livepatch::status::status(pid)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("process {pid} build id {}", s.build_id.as_deref().unwrap_or("none"));
                if s.patches.is_empty() {
                    println!("no patches applied");
                }
                for p in &s.patches {
                    println!("#{} {} [{}] region {} applied at {}", p.seq, p.patch_id, p.state, p.region, p.applied_at_rfc3339);
                    for e in &p.entries {
                        println!("    {:<32} {} -> {} {}", e.name, e.entry, e.target, e.state);
                    }
                    if let Some(lib) = &p.library {
                        println!("    in the shared library {lib}");
                    }
                    if p.calls_retargeted > 0 {
                        println!("    {} direct call(s) lead straight to the new code", p.calls_retargeted);
                    }
                    for f in &p.switched {
                        println!("    frame of {} on thread {} switched at apply: return address {:#x} -> {:#x}", f.function, f.tid, f.old, f.new);
                    }
                }
                for w in &s.warnings {
                    println!("warning: {w}");
                }
            }
        }
        Cmd::Revert { pid, all, strategy, timeout, frames, json } => {
            let r = livepatch::revert::revert(pid, all, strategy, secs(timeout)?, frames)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else if r.reverted.is_empty() {
                println!("nothing applied to process {pid}; nothing to revert");
            } else {
                println!("reverted {} in process {pid}: {} (pause {} us); {} patch(es) remain", r.reverted.join(", "), r.functions.join(", "), r.pause_us, r.remaining);
            }
        }
        Cmd::Keygen { out } => {
            let (key, private, public) = signature::write_keypair(&out)?;
            let vk = key.verifying_key();
            println!("wrote {} (private, keep it secret) and {}", private.display(), public.display());
            println!("key id     {}", signature::key_id(&vk));
            println!("public key {}", signature::encode_public_key(&vk).trim_end());
        }
        Cmd::Sign { bundle, key, output } => {
            let (key, open) = signature::read_private_key(&key).with_context(|| format!("reading the key {}", key.display()))?;
            if open {
                eprintln!("livepatch: warning: the private key file is readable by others (chmod 600 it)");
            }
            let b = Bundle::read(&bundle)?;
            let digest: [u8; 32] = hex::decode(&b.digest)?.try_into().map_err(|_| anyhow::anyhow!("digest length"))?;
            let sig = signature::sign(&key, &digest);
            let output = output.unwrap_or_else(|| with_suffix(&bundle, ".sig"));
            std::fs::write(&output, sig.to_text()).with_context(|| format!("writing {}", output.display()))?;
            println!("signed {} (patch {} sha256 {}) with key {}: {}", bundle.display(), b.patch_id(), b.digest, sig.key_id, output.display());
        }
        Cmd::Verify { bundle, sig, trusted } => {
            let keys = signature::TrustedKeys::load(&trusted)?;
            if keys.is_empty() {
                anyhow::bail!("no trusted key in {} (expected *.pub files)", trusted.display());
            }
            let sig_path = sig.unwrap_or_else(|| with_suffix(&bundle, ".sig"));
            let meta = std::fs::metadata(&bundle).with_context(|| format!("reading {}", bundle.display()))?;
            if meta.len() > livepatch::bundle::MAX_BUNDLE {
                anyhow::bail!("{} is over the bundle size limit", bundle.display());
            }
            let bytes = std::fs::read(&bundle).with_context(|| format!("reading {}", bundle.display()))?;
            let sig_meta = std::fs::metadata(&sig_path).with_context(|| format!("reading {}", sig_path.display()))?;
            if sig_meta.len() > signature::MAX_FILE {
                anyhow::bail!("{}: not a signature file ({} bytes)", sig_path.display(), sig_meta.len());
            }
            let sig_bytes = std::fs::read(&sig_path).with_context(|| format!("reading {}", sig_path.display()))?;
            // The signature first: the bundle reader sees only signed bytes.
            let ok = keys.verify_bundle(&bytes, &sig_bytes).with_context(|| format!("{} does not verify", sig_path.display()))?;
            let b = Bundle::parse(&bytes)?;
            println!("good signature: {} (patch {} sha256 {}) signed by key {} ({})", bundle.display(), b.patch_id(), b.digest, ok.key_id, ok.key_name);
        }
        Cmd::Demo { keep } => demo::run(keep)?,
    }
    Ok(())
}

fn with_suffix(path: &std::path::Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn secs(s: f64) -> anyhow::Result<Duration> {
    if !(s.is_finite() && s >= 0.0 && s < 86400.0 * 365.0) {
        anyhow::bail!("--timeout must be a number of seconds");
    }
    Ok(Duration::from_secs_f64(s))
}

fn print_diff(d: &extract::Diff) {
    println!("references: {}", d.reference_source);
    for c in &d.changed_functions {
        println!("changed   {} ({} -> {} bytes)", c.name, c.old_size, c.new_size);
    }
    for a in &d.added_functions {
        println!("added     {} ({} bytes)", a.name, a.size);
    }
    for r in &d.removed_functions {
        println!("removed   {}", r.name);
    }
    for c in &d.changed_data {
        println!("data      {}: {}", c.name, c.note);
    }
    for a in &d.added_data {
        println!("new data  {} ({} bytes)", a.name, a.size);
    }
    if let Some(src) = &d.source {
        println!("source diff:");
        for e in &src.patched {
            println!("  patch     {}: {}", e.name, e.reason);
        }
        for e in &src.not_patched {
            println!("  not       {}: {}", e.name, e.reason);
        }
        if !src.lines_without_code.is_empty() {
            println!("  changed lines with no code (macros, types, declarations): {}", src.lines_without_code.join(", "));
        }
        for f in &src.files_not_compiled {
            println!("  not compiled into NEW: {f}");
        }
    } else if !d.changed_functions.is_empty() {
        println!("(without --source-diff every function whose machine code differs is patched; with it, only those holding changed lines)");
    }
    if let Some(r) = d.layout_refusals().first() {
        println!("=> cannot be applied live: `{}` changed layout; an offline restart is needed", r.name);
    }
}

fn print_bundle(b: &Bundle) {
    let m = &b.manifest;
    println!("patch {} (format {}, {})", b.patch_id(), m.format_version, m.arch);
    println!("sha256     {}", b.digest);
    println!("target     build id {} ({}){}", m.target.build_id, if m.target.pie { "PIE" } else { "non-PIE" },
        m.target.path.as_deref().map(|p| format!(" {p}")).unwrap_or_default());
    println!("references {}", m.reference_source);
    if let Some(r) = &m.refusal {
        println!("REFUSAL    {r}");
    }
    println!("span       {:#x}..{:#x}", m.span.lo, m.span.lo + m.span.len);
    println!("functions:");
    for f in &m.functions {
        println!("  {:<9} {:<32} new {:#x}+{}  old {}", format!("{:?}", f.kind).to_lowercase(), f.name, f.new_svma, f.new_size,
            f.old_svma.map(|a| format!("{a:#x}+{}", f.old_size)).unwrap_or_else(|| "-".into()));
        if !f.preserve.is_empty() {
            println!("            entry thunk keeps {} for unpatched callers", f.preserve.join(" "));
        }
        if let Some(t) = f.trampoline {
            println!("            short jump to a trampoline at {t:#x}");
        }
    }
    for d in &m.detours {
        println!("detour     {:#x}+{}: `{}`+{} (library variable, no copy in the running executable)", d.at, d.len, d.symbol, d.offset);
    }
    println!("pieces:");
    for p in &m.pieces {
        println!("  {:<6} {:#x}+{} {}", format!("{:?}", p.kind).to_lowercase(), p.svma, p.len, p.name);
    }
    println!("fixups: {}", m.fixups.len());
    for x in &m.fixups {
        println!("  {:#x} {:?} -> {:?}", x.at, x.kind, x.target);
    }
    for d in &m.changed_data {
        println!("data       {}: {}", d.name, d.note);
    }
}
