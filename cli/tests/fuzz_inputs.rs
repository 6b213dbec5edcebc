//! Bounded mutation fuzzing of every parser that reads outside input: the bundle reader, the
//! ELF and symbol readers (with diff and build on top), and the instruction decoder front end.
//! Runs in CI for a bounded number of cases (LIVEPATCH_FUZZ_CASES to change it), deterministic
//! (fixed RNG seeds). A failure is:
//! - a panic;
//! - a hang: each input runs on a worker thread and must finish within [`PER_INPUT`];
//! - an unbounded allocation: no single allocation of this test binary may ask for more than
//!   [`MAX_ALLOC`] (the allocator refuses it and the binary aborts with "memory allocation of N
//!   bytes failed").
//!
//! The seed corpus is `fuzz/corpus/<target>/` at the repository root (committed; every file is
//! run as it is and then mutated, next to the seeds built fresh from the C source below). A
//! failing input is written to `CARGO_TARGET_TMPDIR/fuzz-failures/`; once fixed, add it to the
//! corpus so it stays a regression case. `LIVEPATCH_FUZZ_WRITE_SEEDS=1` rewrites the corpus's
//! `seed*` files from a fresh build (after a bundle format change).
use livepatch::arch::x86_64;
use livepatch::bundle::Bundle;
use livepatch::elf::ElfFile;
use livepatch::extract;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

/// How long one input may take (generous: a loaded two-core machine; a correct parser needs
/// milliseconds).
const PER_INPUT: Duration = Duration::from_secs(10);

/// The largest single allocation any input may cause (the engine's own limits, such as the
/// 512 MiB bundle size, stay under it).
const MAX_ALLOC: usize = 1 << 30;

/// The system allocator, refusing any single request over [`MAX_ALLOC`].
struct Bounded;

// SAFETY: forwards to the system allocator; refusing (null) is allowed by the contract.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        System.realloc(p, l, new_size)
    }
}

#[global_allocator]
static ALLOC: Bounded = Bounded;

/// Runs a check on one input after another on its own thread, each within [`PER_INPUT`]; a
/// panic or a timeout fails the test, naming the input saved for reproduction.
struct Worker {
    name: &'static str,
    inputs: Option<mpsc::Sender<Vec<u8>>>,
    done: mpsc::Receiver<()>,
    count: usize,
    limit: Duration,
}

impl Worker {
    /// `make` runs on the worker thread and returns the check (so it may own non-`Send` state).
    fn new<F: FnMut(&[u8]) + 'static>(name: &'static str, make: impl FnOnce() -> F + Send + 'static) -> Worker {
        let (inputs, rx) = mpsc::channel::<Vec<u8>>();
        let (tx, done) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("fuzz-{name}"))
            .spawn(move || {
                let mut check = make();
                for input in rx {
                    check(&input);
                    if tx.send(()).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn the fuzz worker");
        Worker { name, inputs: Some(inputs), done, count: 0, limit: PER_INPUT }
    }

    #[track_caller]
    fn run(&mut self, input: &[u8]) {
        self.count += 1;
        let sent = self.inputs.as_ref().expect("worker").send(input.to_vec());
        let failure = match sent.map_err(|_| RecvTimeoutError::Disconnected).and_then(|()| self.done.recv_timeout(self.limit)) {
            Ok(()) => return,
            Err(RecvTimeoutError::Timeout) => format!("took more than {:?} (a hang?)", self.limit),
            Err(RecvTimeoutError::Disconnected) => "panicked (message above)".to_string(),
        };
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
        let saved = std::fs::create_dir_all(&dir)
            .and_then(|()| {
                use sha2::Digest;
                let file = dir.join(format!("{}-{}", self.name, &hex::encode(sha2::Sha256::digest(input))[..12]));
                std::fs::write(&file, input).map(|()| file)
            })
            .map(|f| format!("saved as {}", f.display()))
            .unwrap_or_else(|e| format!("could not be saved: {e}"));
        panic!("{} fuzz input #{} ({} bytes) {failure}; the input {saved}", self.name, self.count, input.len());
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Ends the worker's loop (a hung worker is left behind; the test has failed then).
        self.inputs.take();
    }
}

/// `fuzz/corpus/<target>/` at the repository root.
fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("fuzz").join("corpus").join(target)
}

/// Every file of the target's corpus (it must exist and hold at least one).
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the seed corpus {} cannot be read: {e}", dir.display()))
        .map(|e| e.unwrap_or_else(|e| panic!("{}: {e}", dir.display())).path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the seed corpus {} is empty", dir.display());
    files.iter().map(|f| std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()))).collect()
}

/// With LIVEPATCH_FUZZ_WRITE_SEEDS=1, (re)write `fuzz/corpus/<target>/<name>`.
fn maybe_write_seed(target: &str, name: &str, bytes: &[u8]) {
    if std::env::var("LIVEPATCH_FUZZ_WRITE_SEEDS").as_deref() != Ok("1") {
        return;
    }
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    std::fs::write(dir.join(name), bytes).unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()));
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn cases() -> usize {
    std::env::var("LIVEPATCH_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000)
}

/// One random mutation: bit flips, byte sets, interesting integers, truncation, splicing.
fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    let n = 1 + rng.below(4);
    for _ in 0..n {
        if data.is_empty() {
            data.push(rng.next() as u8);
            continue;
        }
        let i = rng.below(data.len());
        match rng.below(7) {
            0 => data[i] ^= 1 << rng.below(8),
            1 => data[i] = rng.next() as u8,
            2 => {
                let v: [u64; 6] = [0, u64::MAX, 0x7fff_ffff, 0x8000_0000, 1 << 40, 0xffff];
                let w = v[rng.below(v.len())].to_le_bytes();
                let k = 1 << rng.below(4);
                for (j, b) in w.iter().take(k).enumerate() {
                    if let Some(x) = data.get_mut(i + j) {
                        *x = *b;
                    }
                }
            }
            3 => data.truncate(i),
            4 => {
                let j = rng.below(data.len());
                let chunk: Vec<u8> = data[j..(j + rng.below(64)).min(data.len())].to_vec();
                data.splice(i..i, chunk);
            }
            5 => data.retain(|_| rng.below(200) != 0),
            _ => data.extend((0..rng.below(32)).map(|_| rng.next() as u8)),
        }
    }
}

fn work(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("livepatch-fuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cc(dir: &Path, name: &str, src: &str, flags: &[&str]) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, src).unwrap();
    let out = dir.join(name);
    let st = Command::new("cc").args(["-O2", "-Wl,--build-id"]).args(flags).arg("-o").arg(&out).arg(&c).status().expect("cc");
    assert!(st.success());
    out
}

const SRC: &str = "#include <stdio.h>\nint g; __thread int t;\n__attribute__((noinline)) int f(int x) { switch (x) { case 0: return g; case 1: return 7; case 2: return t; case 3: return 9; case 4: return 1; case 5: return 3; default: return VERSION; } }\nint main(int c, char **v) { printf(\"%d\\n\", f(c)); return 0; }\n";

/// The two versions of [`SRC`], compiled in `dir`.
fn pair(dir: &Path) -> (PathBuf, PathBuf) {
    (cc(dir, "a", SRC, &["-DVERSION=1"]), cc(dir, "b", SRC, &["-DVERSION=2"]))
}

/// The seeds of a target: `fresh` first, then the committed corpus.
fn seeds(target: &str, fresh: Vec<u8>) -> Vec<Vec<u8>> {
    let mut all = vec![fresh];
    all.extend(corpus(target));
    all
}

#[test]
fn bundle_reader_survives_mutations() {
    let dir = work("bundle");
    let (a, b) = pair(&dir);
    let (m, blob, _) = extract::build(&ElfFile::open(&a).unwrap(), &ElfFile::open(&b).unwrap(), &Default::default()).unwrap();
    let fresh = Bundle::to_bytes(&m, &blob);
    maybe_write_seed("bundle", "seed.lpatch", &fresh);
    let seeds = seeds("bundle", fresh);
    assert!(Bundle::parse(&seeds[0]).is_ok());
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let mut w = Worker::new("bundle", move || {
        move |input: &[u8]| {
            let _ = Bundle::parse(input);
            // The digest makes almost every mutation a clean refusal; also fuzz behind it by
            // re-sealing, so the manifest checks are exercised too.
            if input.len() > 48 {
                let mut d = input.to_vec();
                let body = d.len() - 32;
                use sha2::Digest;
                let digest = sha2::Sha256::digest(&d[..body]);
                d[body..].copy_from_slice(&digest);
                if Bundle::parse(&d).is_ok_and(|b| !b.patch_id().is_empty()) {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    });
    for seed in &seeds {
        w.run(seed);
    }
    let base = accepted.load(std::sync::atomic::Ordering::Relaxed);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..cases() {
        let mut d = seeds[i % seeds.len()].clone();
        mutate(&mut rng, &mut d);
        w.run(&d);
    }
    // Corrupt manifests must be refused, not only digests.
    let accepted = accepted.load(std::sync::atomic::Ordering::Relaxed) - base;
    assert!(accepted < cases() / 2, "{accepted} mutated bundles accepted");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn elf_reader_and_diff_survive_mutations() {
    let dir = work("elf");
    let (a, b) = pair(&dir);
    let fresh = std::fs::read(&b).unwrap();
    maybe_write_seed("elf", "seed-b", &fresh);
    let seeds = seeds("elf", fresh);
    let mut w = Worker::new("elf", move || {
        let old = ElfFile::open(&a).unwrap();
        move |input: &[u8]| {
            if let Ok(new) = ElfFile::parse(Path::new("mutated"), input.to_vec()) {
                let _ = extract::diff(&old, &new);
                let _ = extract::build(&old, &new, &Default::default());
            }
        }
    });
    for seed in &seeds {
        w.run(seed);
    }
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for i in 0..cases() / 3 {
        let mut d = seeds[i % seeds.len()].clone();
        // Aim at the headers and tables, where parsing decisions are made.
        for _ in 0..1 + rng.below(3) {
            let region = match rng.below(3) {
                0 => 0..64.min(d.len()),
                1 => d.len().saturating_sub(4096)..d.len(),
                _ => 0..d.len(),
            };
            if region.is_empty() {
                continue;
            }
            let i = region.start + rng.below(region.len());
            d[i] = rng.next() as u8;
        }
        if rng.below(10) == 0 {
            mutate(&mut rng, &mut d);
        }
        w.run(&d);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A decoder input: the address of the code (8 bytes, little-endian), then the code.
fn decode(input: &[u8]) {
    let ip = u64::from_le_bytes(input.get(..8).and_then(|b| b.try_into().ok()).unwrap_or_default()) & 0x0000_7fff_ffff_ffff;
    let code = input.get(8..).unwrap_or_default();
    if let Ok(refs) = x86_64::decode_refs(code, ip) {
        for r in refs {
            assert!(r.field_off + r.field_size as usize <= code.len(), "field outside the code: {r:?}");
        }
    }
    let _ = x86_64::instruction_starts(code, ip);
}

#[test]
fn decoder_survives_random_code() {
    let dir = work("decoder");
    let (_, b) = pair(&dir);
    let elf = ElfFile::open(&b).unwrap();
    let (text, bytes) = elf.section_data(".text").expect(".text");
    let fresh: Vec<u8> = text.addr.to_le_bytes().into_iter().chain(bytes.iter().copied()).collect();
    maybe_write_seed("decoder", "seed-text", &fresh);
    let seeds = seeds("decoder", fresh);
    let mut w = Worker::new("decoder", || decode);
    for seed in &seeds {
        w.run(seed);
    }
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    for i in 0..cases() * 10 {
        let d: Vec<u8> = if i % 2 == 0 {
            // Random code at a random address.
            let len = 8 + rng.below(64);
            (0..len).map(|_| rng.next() as u8).collect()
        } else {
            // A window of real code, mutated.
            let seed = &seeds[i % seeds.len()];
            let (ip, code) = seed.split_at(8.min(seed.len()));
            let at = rng.below(code.len());
            let window = &code[at..(at + 1 + rng.below(64)).min(code.len())];
            let ip = u64::from_le_bytes(ip.try_into().unwrap_or_default()).wrapping_add(at as u64);
            let mut d: Vec<u8> = ip.to_le_bytes().into_iter().chain(window.iter().copied()).collect();
            mutate(&mut rng, &mut d);
            d
        };
        w.run(&d);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The bounds themselves: a hang and a panic fail the run, an allocation over the limit is refused.
#[test]
fn the_harness_catches_hangs_panics_and_huge_allocations() {
    let outcome = |check: fn(&[u8])| {
        let mut w = Worker::new("harness-self-test", move || check);
        w.limit = Duration::from_millis(200);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run(b"input")));
        r.err().and_then(|e| e.downcast_ref::<String>().cloned()).unwrap_or_default()
    };
    assert_eq!(outcome(|_| {}), "");
    let hang = outcome(|_| std::thread::sleep(Duration::from_secs(2)));
    assert!(hang.contains("took more than 200ms") && hang.contains("saved as"), "{hang}");
    let panic = outcome(|_| panic!("parser bug"));
    assert!(panic.contains("panicked"), "{panic}");
    let reserve = |n: usize| Vec::<u8>::new().try_reserve_exact(n);
    assert!(reserve(MAX_ALLOC + 1).is_err(), "an allocation over MAX_ALLOC was granted");
    assert!(reserve(1 << 20).is_ok());
}
