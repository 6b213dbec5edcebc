//! Looking at a process from outside: `/proc/PID/maps`, `/proc/PID/mem`, threads, tracer
//! state, text snapshots, debug registers, and what must not change when an update is
//! refused, blocked or fails.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::elf::Elf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub offset: u64,
    pub path: String,
}

impl Mapping {
    pub fn executable(&self) -> bool {
        self.perms.as_bytes().get(2) == Some(&b'x')
    }
    pub fn writable(&self) -> bool {
        self.perms.as_bytes().get(1) == Some(&b'w')
    }
}

/// `/proc/PID/maps`
pub fn maps(pid: i32) -> Vec<Mapping> {
    let text = fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/maps: {e}"));
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(6, ' ');
            let range = it.next()?;
            let perms = it.next()?.to_string();
            let offset = u64::from_str_radix(it.next()?, 16).ok()?;
            let _dev = it.next()?;
            let _inode = it.next()?;
            let path = it.next().unwrap_or("").trim().to_string();
            let (s, e) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                perms,
                offset,
                path,
            })
        })
        .collect()
}

/// The maps without the parts that move on their own (the main stack): what must be the same
/// after a refused, blocked or failed update.
pub fn stable_maps(pid: i32) -> Vec<Mapping> {
    maps(pid)
        .into_iter()
        .filter(|m| m.path != "[stack]")
        .collect()
}

/// Fail if any mapping of the process is writable and executable at once.
#[track_caller]
pub fn assert_no_wx(pid: i32) {
    for m in maps(pid) {
        assert!(
            !(m.writable() && m.executable()),
            "pid {pid} has a writable and executable mapping: {m:?}"
        );
    }
}

/// Read `len` bytes at `addr` of the process.
pub fn read_mem(pid: i32, addr: u64, len: usize) -> Vec<u8> {
    let f = fs::File::open(format!("/proc/{pid}/mem"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/mem: {e}"));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, addr)
        .unwrap_or_else(|e| panic!("reading {len} bytes at {addr:#x} of pid {pid}: {e}"));
    buf
}

/// The thread ids of the process.
pub fn threads(pid: i32) -> Vec<i32> {
    let mut out: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/task: {e}"))
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    out.sort();
    out
}

/// A field of a thread's /proc status (`key` with its colon, e.g. `SigBlk:`), trimmed.
pub fn task_status_field(pid: i32, tid: i32, key: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(key)).map(|s| s.trim().to_string())
}

/// Fail if any thread of the process is still traced (the tool must detach when it ends).
#[track_caller]
pub fn assert_not_traced(pid: i32) {
    for tid in threads(pid) {
        let tracer = task_status_field(pid, tid, "TracerPid:").unwrap_or_default();
        assert!(
            tracer.is_empty() || tracer == "0",
            "thread {tid} of pid {pid} is still traced by {tracer}"
        );
        let stat = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        assert!(
            !matches!(state, Some('t') | Some('T')),
            "thread {tid} of pid {pid} is left stopped (state {state:?})"
        );
    }
}

/// The executable text of every file-backed executable mapping (program and libraries; not
/// memfd regions, which are the tool's own).
#[derive(Debug, Clone)]
pub struct TextSnapshot {
    pub regions: Vec<(Mapping, Vec<u8>)>,
}

pub fn text_snapshot(pid: i32) -> TextSnapshot {
    let regions = maps(pid)
        .into_iter()
        .filter(|m| m.executable() && m.path.starts_with('/') && !m.path.starts_with("/memfd:"))
        .map(|m| {
            let bytes = read_mem(pid, m.start, (m.end - m.start) as usize);
            (m, bytes)
        })
        .collect();
    TextSnapshot { regions }
}

/// Every byte of the text in `before` that differs in `after`: (address, before, after).
/// A mapping of `before` that is gone or moved counts as a difference at its start address.
/// Mappings that only `after` has are not text of the program (the tool's regions); the
/// mapping checks of [`assert_untouched`] cover them where they must not exist.
pub fn text_differences(before: &TextSnapshot, after: &TextSnapshot) -> Vec<(u64, u8, u8)> {
    let mut out = Vec::new();
    for (m, bytes) in &before.regions {
        match after
            .regions
            .iter()
            .find(|(n, _)| n.start == m.start && n.end == m.end)
        {
            Some((_, other)) => {
                for (i, (a, b)) in bytes.iter().zip(other.iter()).enumerate() {
                    if a != b {
                        out.push((m.start + i as u64, *a, *b));
                    }
                }
            }
            None => out.push((m.start, 0, 0)),
        }
    }
    out
}

/// Fail unless the program's and libraries' text is byte for byte what it was.
#[track_caller]
pub fn assert_text_unchanged(before: &TextSnapshot, pid: i32) {
    let diffs = text_differences(before, &text_snapshot(pid));
    assert!(
        diffs.is_empty(),
        "text of pid {pid} changed at {} places (a breakpoint or jump left behind?): {}",
        diffs.len(),
        describe_diffs(&diffs)
    );
}

/// Fail unless the text differs from `before` only in the 5 bytes at each of `entries`,
/// each of which now starts with a `jmp rel32` (0xe9) into a mapping that is not the program's.
#[track_caller]
pub fn assert_text_changed_only_at(before: &TextSnapshot, pid: i32, entries: &[(String, u64)]) {
    let after = text_snapshot(pid);
    let diffs = text_differences(before, &after);
    let all_maps = maps(pid);
    // Each entry holds `jmp rel32` into a patch region, or (a function shorter than 5 bytes)
    // `jmp rel8` to a trampoline in inter-function padding that holds the `jmp rel32`.
    let mut sites: Vec<(u64, u64)> = Vec::new();
    // Where the entries' jumps go: the new functions (or their register-preserving thunks).
    let mut dests: Vec<u64> = Vec::new();
    for (name, entry) in entries {
        let b = read_mem(pid, *entry, 5);
        let (long_at, short) = match b[0] {
            0xe9 => (*entry, false),
            0xeb => ((*entry as i64 + 2 + b[1] as i8 as i64) as u64, true),
            _ => panic!("{name} at {entry:#x} does not start with a jump: {b:02x?}"),
        };
        if short {
            sites.push((*entry, *entry + 2));
        }
        sites.push((long_at, long_at + 5));
        let t = read_mem(pid, long_at, 5);
        assert_eq!(t[0], 0xe9, "{name}: the jump at {long_at:#x} (entry {entry:#x}) is not jmp rel32: {t:02x?}");
        let rel = i32::from_le_bytes([t[1], t[2], t[3], t[4]]) as i64;
        let dest = (long_at as i64 + 5 + rel) as u64;
        let m = all_maps
            .iter()
            .find(|m| dest >= m.start && dest < m.end)
            .unwrap_or_else(|| panic!("{name}'s jump goes to {dest:#x}, which is not mapped"));
        assert!(
            m.executable() && !m.writable(),
            "{name}'s jump goes to {dest:#x} in {m:?}, which is not read+execute"
        );
        dests.push(dest);
    }
    // Direct calls and jumps to the old functions may be retargeted to the same new code: a
    // rel32 field after `call`/`jmp`/`jcc` whose destination is where an entry's jump goes.
    let retargeted = |a: u64| -> Option<(u64, u64)> {
        (a.saturating_sub(3)..=a).find_map(|f| {
            let b = read_mem(pid, f - 2, 6);
            let branch = matches!(b[1], 0xe8 | 0xe9) || (b[0] == 0x0f && (0x80..=0x8f).contains(&b[1]));
            let dest = (f as i64 + 4 + i32::from_le_bytes([b[2], b[3], b[4], b[5]]) as i64) as u64;
            (branch && dests.contains(&dest)).then_some((f, f + 4))
        })
    };
    let stray: Vec<(u64, u8, u8)> = diffs
        .iter()
        .copied()
        .filter(|(a, _, _)| !sites.iter().any(|(lo, hi)| *a >= *lo && *a < *hi) && retargeted(*a).is_none())
        .collect();
    assert!(
        stray.is_empty(),
        "text of pid {pid} changed outside the jump sites {entries:x?}: {}",
        describe_diffs(&stray)
    );
}

fn describe_diffs(d: &[(u64, u8, u8)]) -> String {
    let mut s = String::new();
    for (a, b, c) in d.iter().take(20) {
        let _ = write!(s, "\n  {a:#x}: {b:02x} -> {c:02x}");
    }
    if d.len() > 20 {
        let _ = write!(s, "\n  ... and {} more", d.len() - 20);
    }
    s
}

/// The debug registers DR0..DR7 of a thread (DR4/DR5 read as 0), read by attaching briefly
/// with ptrace (PTRACE_SEIZE + PTRACE_INTERRUPT, PEEKUSER, detach).
pub fn debug_registers(tid: i32) -> Result<[u64; 8], String> {
    use std::ptr::null_mut;
    let base = std::mem::offset_of!(libc::user, u_debugreg);
    unsafe {
        if libc::ptrace(
            libc::PTRACE_SEIZE,
            tid,
            null_mut::<libc::c_void>(),
            null_mut::<libc::c_void>(),
        ) != 0
        {
            return Err(format!(
                "PTRACE_SEIZE {tid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let detach = || {
            libc::ptrace(
                libc::PTRACE_DETACH,
                tid,
                null_mut::<libc::c_void>(),
                null_mut::<libc::c_void>(),
            );
        };
        if libc::ptrace(
            libc::PTRACE_INTERRUPT,
            tid,
            null_mut::<libc::c_void>(),
            null_mut::<libc::c_void>(),
        ) != 0
        {
            let e = std::io::Error::last_os_error();
            detach();
            return Err(format!("PTRACE_INTERRUPT {tid}: {e}"));
        }
        let mut status = 0;
        if libc::waitpid(tid, &mut status, libc::__WALL) != tid {
            let e = std::io::Error::last_os_error();
            detach();
            return Err(format!("waitpid {tid}: {e}"));
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            return Err(format!("thread {tid} exited"));
        }
        let mut regs = [0u64; 8];
        for (i, r) in regs.iter_mut().enumerate() {
            if i == 4 || i == 5 {
                continue;
            }
            *libc::__errno_location() = 0;
            let v = libc::ptrace(
                libc::PTRACE_PEEKUSER,
                tid,
                (base + i * 8) as *mut libc::c_void,
                null_mut::<libc::c_void>(),
            );
            if v == -1 && *libc::__errno_location() != 0 {
                let e = std::io::Error::last_os_error();
                detach();
                return Err(format!("PTRACE_PEEKUSER DR{i} of {tid}: {e}"));
            }
            *r = v as u64;
        }
        detach();
        Ok(regs)
    }
}

/// Fail unless DR7 (the enable bits of the hardware breakpoints) is zero in every thread.
#[track_caller]
pub fn assert_debug_registers_clear(pid: i32) {
    for tid in threads(pid) {
        match debug_registers(tid) {
            Ok(r) => assert_eq!(
                r[7], 0,
                "DR7 of thread {tid} (pid {pid}) is {:#x}: a hardware breakpoint is left (DR0-3 {:x?})",
                r[7], &r[..4]
            ),
            Err(e) => panic!("reading the debug registers of thread {tid} (pid {pid}): {e}"),
        }
    }
}

/// Everything that must hold after the tool gave up or failed: nothing left behind.
#[track_caller]
pub fn assert_untouched(pid: i32, text_before: &TextSnapshot, maps_before: &[Mapping]) {
    assert_not_traced(pid);
    assert_text_unchanged(text_before, pid);
    let now = stable_maps(pid);
    assert_eq!(
        now, maps_before,
        "the mappings of pid {pid} changed (memory left mapped?)"
    );
    assert_debug_registers_clear(pid);
}


/// The load bias of the process's executable: 0 for non-PIE executables.
pub fn load_bias(pid: i32, exe: &Path) -> u64 {
    let elf = Elf::read(exe);
    if !elf.is_pie() {
        return 0;
    }
    let real = fs::read_link(format!("/proc/{pid}/exe")).expect("/proc/PID/exe");
    let real = real.to_string_lossy();
    let start = maps(pid)
        .into_iter()
        .filter(|m| m.path == real)
        .map(|m| m.start - m.offset)
        .min()
        .unwrap_or_else(|| panic!("no mapping of {real} in pid {pid}"));
    start - elf.first_load_vaddr()
}

/// The live entry addresses of functions of the process's executable (`exe` is its file).
pub fn live_entries(pid: i32, exe: &Path, functions: &[String]) -> Vec<(String, u64)> {
    let elf = Elf::read(exe);
    let bias = load_bias(pid, exe);
    functions
        .iter()
        .map(|f| {
            let (addr, _) = elf
                .function(f)
                .unwrap_or_else(|| panic!("no function {f} in {}", exe.display()));
            (f.clone(), addr + bias)
        })
        .collect()
}


/// The threads of `pid` other than the main thread.
pub fn worker_threads(pid: i32) -> Vec<i32> {
    threads(pid).into_iter().filter(|&t| t != pid).collect()
}

/// Snapshot of what must not change when an update is refused, blocked or fails.
pub struct Untouched {
    pub text: TextSnapshot,
    pub maps: Vec<Mapping>,
}

impl Untouched {
    pub fn take(pid: i32) -> Untouched {
        Untouched {
            text: text_snapshot(pid),
            maps: stable_maps(pid),
        }
    }

    #[track_caller]
    pub fn check(&self, pid: i32) {
        assert_untouched(pid, &self.text, &self.maps);
    }
}
