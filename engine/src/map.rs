//! Map: place a region within reach of the old code and map it into the target, without the
//! target's help, by injecting system calls into one stopped thread (the other threads run on).
//!
//! The region is a memfd named `livepatch:<patch id>`, filled from our side through
//! `/proc/PID/fd/N`, and mapped read+execute, but for its last page (the gates' control words),
//! which is mapped private and read+write: no page is ever writable and executable at once.
//! [`MappedRegion`] unmaps itself on drop unless committed.
use crate::arch::x86_64::sigframe;
use crate::error::{Error, Result};
use crate::fixup::{Image, Layout, PAGE};
use crate::process::{Mapping, MemoryReader, ProcMem, Process};
use crate::ptrace::{Gadgets, Stopped, INJECT_SCRATCH};
use crate::region::Header;
use crate::target::{Executable, Target};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

// The injected calls' numbers and flags are the target's ABI; libc's are this process's, the
// same architecture (ptrace does not cross architectures).
const SYS_CLOSE: i64 = libc::SYS_close;
const SYS_MMAP: i64 = libc::SYS_mmap;
const SYS_MUNMAP: i64 = libc::SYS_munmap;
const PROT_WRITE: u64 = libc::PROT_WRITE as u64;
const SYS_MEMFD_CREATE: i64 = libc::SYS_memfd_create;
const MFD_CLOEXEC: u64 = libc::MFD_CLOEXEC as u64;
const PROT_READ: u64 = libc::PROT_READ as u64;
const PROT_EXEC: u64 = libc::PROT_EXEC as u64;
const MAP_SHARED: u64 = libc::MAP_SHARED as u64;
const MAP_PRIVATE: u64 = libc::MAP_PRIVATE as u64;
const MAP_FIXED: u64 = libc::MAP_FIXED as u64;
const MAP_FIXED_NOREPLACE: u64 = libc::MAP_FIXED_NOREPLACE as u64;
/// Keep regions well inside the ±2 GiB of a rel32.
const REACH: u64 = 0x7000_0000;
/// Lowest address we place at (above vm.mmap_min_addr).
const LOW: u64 = 0x10_0000;
/// Absolute 32-bit references of non-PIE code need the region below 2 GiB.
const LOW_2G: u64 = 0x7fff_0000;
const INJECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Find an address for `len` bytes in reach of [exe_lo, exe_hi).
pub fn choose_address(maps: &[Mapping], exe_lo: u64, exe_hi: u64, len: u64, below_2g: bool) -> Option<u64> {
    let win_lo = exe_hi.saturating_sub(REACH).max(LOW);
    let mut win_hi = exe_lo.saturating_add(REACH);
    if below_2g {
        win_hi = win_hi.min(LOW_2G);
    }
    let mut sorted: Vec<(u64, u64)> = maps.iter().map(|m| (m.start, m.end)).collect();
    sorted.sort();
    let mut gaps = Vec::new();
    let mut prev = 0u64;
    for (s, e) in sorted {
        if s > prev {
            gaps.push((prev, s));
        }
        prev = prev.max(e);
    }
    gaps.push((prev, 0x7fff_ffff_f000));
    let heap_end = maps.iter().find(|m| m.path == "[heap]").map(|m| m.end).unwrap_or(exe_hi);
    let mut best: Option<(u64, u64)> = None; // (score, addr): lower score is better
    for (gs, ge) in gaps {
        // A guard page on each side.
        let lo = gs.saturating_add(PAGE).max(win_lo);
        let hi = ge.saturating_sub(PAGE).min(win_hi);
        if hi <= lo || hi - lo < len {
            continue;
        }
        let addr = (hi - len) & !(PAGE - 1);
        if addr < lo {
            continue;
        }
        // Prefer just below the executable (the heap grows upward after it); else far above
        // the heap's end.
        let score = if addr + len <= exe_lo {
            exe_lo - (addr + len)
        } else if addr >= heap_end + (256 << 20) || !below_2g {
            (1 << 40) + addr.abs_diff(exe_hi)
        } else {
            (1 << 50) + addr.abs_diff(exe_hi)
        };
        let score = if below_2g { u64::MAX - addr } else { score };
        if best.is_none_or(|(s, _)| score < s) {
            best = Some((score, addr));
        }
    }
    best.map(|(_, a)| a)
}

/// The code injections run through ([`Gadgets`]): a `syscall; ret` and an `rt_sigreturn`
/// sequence, searched in libc first, then in any code of the target.
pub fn find_gadgets(mem: &dyn MemoryReader, maps: &[Mapping]) -> Result<Gadgets> {
    let mut cands: Vec<&Mapping> = maps.iter().filter(|m| m.is_exec() && m.path != "[vsyscall]").collect();
    cands.sort_by_key(|m| (!m.path.contains("libc"), m.path == "[vdso]"));
    let (mut syscall_ret, mut sigreturn) = (None, None);
    'maps: for m in cands {
        let mut addr = m.start;
        while addr < m.end {
            let n = (m.end - addr).min(64 << 10) as usize;
            if let Ok(buf) = mem.read_vec(addr, n) {
                if syscall_ret.is_none() {
                    syscall_ret = find(&buf, &sigframe::SYSCALL_RET).map(|i| addr + i as u64);
                }
                if sigreturn.is_none() {
                    sigreturn = sigframe::SIGRETURN_SEQUENCES.iter().find_map(|seq| find(&buf, seq)).map(|i| addr + i as u64);
                }
                if syscall_ret.is_some() && sigreturn.is_some() {
                    break 'maps;
                }
            }
            // Overlap the windows by the longest pattern, less one byte.
            addr += (n as u64).saturating_sub(8).max(1);
        }
    }
    match (syscall_ret, sigreturn) {
        (Some(syscall_ret), Some(sigreturn)) => Ok(Gadgets { syscall_ret, sigreturn }),
        _ => Err(Error::Other(format!(
            "the target's code has no {} sequence to inject system calls through safely (livepatch needs a glibc or musl program)",
            if syscall_ret.is_none() { "`syscall; ret`" } else { "`rt_sigreturn`" }
        ))),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A region mapped into the target. Unmapped on drop unless [`MappedRegion::commit`]ted.
pub struct MappedRegion {
    pub pid: i32,
    pub base: u64,
    pub len: u64,
    gadget: Gadgets,
    committed: std::cell::Cell<bool>,
    /// The region's memfd, opened from our side: the header can still be rewritten after the
    /// mapping (the mapping itself is read-only, and /proc/PID/mem cannot write a read-only
    /// shared mapping).
    file: std::fs::File,
}

impl MappedRegion {
    pub fn commit(self) {
        self.committed.set(true);
    }

    /// Keep the region mapped after all (a thread may still run in it): the next command
    /// removes it once no thread is inside.
    pub fn leave_mapped(&self) {
        self.committed.set(true);
    }

    /// Write `bytes` at `offset` of the region (the target sees them at once).
    pub fn rewrite(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        if offset.checked_add(bytes.len() as u64).is_none_or(|e| e > self.len) {
            return Err(Error::Other("write past the end of the patch region".into()));
        }
        self.file.write_all_at(bytes, offset).map_err(|e| Error::io("cannot rewrite the patch region", e))
    }

    /// Unmap now, reporting errors.
    pub fn unmap(self) -> Result<()> {
        self.committed.set(true);
        unmap(self.pid, self.gadget, self.base, self.len)
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        if !self.committed.get() {
            if let Err(e) = unmap(self.pid, self.gadget, self.base, self.len) {
                tracing::warn!(pid = self.pid, base = self.base, "could not unmap the patch region: {e}");
            }
        }
    }
}

/// A thread to inject into: the main thread unless it is gone.
fn injection_thread(proc: &Process) -> Result<i32> {
    let tids = proc.threads()?;
    if tids.contains(&proc.pid) && !is_zombie_thread(proc.pid, proc.pid) {
        return Ok(proc.pid);
    }
    tids.into_iter().find(|t| !is_zombie_thread(proc.pid, *t)).ok_or_else(|| Error::Process { pid: proc.pid, msg: "has no live thread".into() })
}

fn is_zombie_thread(pid: i32, tid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
        .ok()
        .and_then(|s| crate::process::parse_stat(&s))
        .is_none_or(|st| st.state == 'Z' || st.state == 'X')
}

/// Unmap [base, base+len) in the target.
pub fn unmap(pid: i32, gadget: Gadgets, base: u64, len: u64) -> Result<()> {
    let proc = Process::open(pid)?;
    // Only ever one of our regions: after an exec the address may hold the new program's memory.
    let ours = format!("/memfd:{}", crate::region::NAME_PREFIX);
    if !proc.maps()?.iter().any(|m| m.start == base && m.path.starts_with(&ours)) {
        return Err(Error::Process { pid, msg: format!("no patch region at {base:#x} any more (the process called exec?); nothing unmapped") });
    }
    let tid = injection_thread(&proc)?;
    let mut t = Stopped::one(&proc, tid, INJECT_TIMEOUT)?;
    let r = t.syscall(tid, gadget, SYS_MUNMAP, [base, len, 0, 0, 0, 0])?;
    if r < 0 {
        return Err(Error::Process { pid, msg: format!("munmap of the patch region failed: errno {}", -r) });
    }
    Ok(())
}

/// Descriptors of the target that name one of our memfds. A mapped region keeps no descriptor
/// (it is closed right after the mmap), so each of these was left by a livepatch process that
/// died between memfd_create and close.
pub fn leaked_memfds(pid: i32) -> Vec<u64> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    let prefix = format!("/memfd:{}", crate::region::NAME_PREFIX);
    rd.filter_map(|e| {
        let e = e.ok()?;
        let link = std::fs::read_link(e.path()).ok()?;
        let fd: u64 = e.file_name().to_str()?.parse().ok()?;
        link.to_string_lossy().starts_with(&prefix).then_some(fd)
    })
    .collect()
}

/// Close the descriptors [`leaked_memfds`] finds (best effort).
pub fn close_leaked_memfds(pid: i32, gadget: Gadgets) -> Result<()> {
    let fds = leaked_memfds(pid);
    if fds.is_empty() {
        return Ok(());
    }
    let proc = Process::open(pid)?;
    let tid = injection_thread(&proc)?;
    let mut t = Stopped::one(&proc, tid, INJECT_TIMEOUT)?;
    for fd in fds {
        t.syscall(tid, gadget, SYS_CLOSE, [fd, 0, 0, 0, 0, 0])?;
    }
    Ok(())
}

/// Create the memfd, fill it with `image`, and map it at `addr` read+execute, with the page at
/// offset `writable` read+write instead.
pub fn map_region(proc: &Process, mem: &ProcMem, maps: &[Mapping], gadget: Gadgets, name: &str, addr: u64, image: &[u8], writable: u64) -> Result<MappedRegion> {
    let len = image.len() as u64;
    let tid = injection_thread(proc)?;
    let mut t = Stopped::one(proc, tid, INJECT_TIMEOUT)?;
    crate::fault::point("attached");
    let pid = proc.pid;
    let regs = t.regs(tid)?;
    // The name goes below the red zone of the stopped thread's stack, in the scratch space
    // above the injection's restore frame.
    let name_at = (regs.rsp - INJECT_SCRATCH + 128) & !15;
    let maps_now = proc.maps().unwrap_or_else(|_| maps.to_vec());
    if !maps_now.iter().any(|m| m.contains(name_at) && m.contains(regs.rsp)) {
        return Err(Error::Process { pid, msg: "no room on the stack of the injection thread".into() });
    }
    let mut cname = name.as_bytes().to_vec();
    cname.push(0);
    let saved = mem.read_vec(name_at, cname.len())?;
    mem.write(name_at, &cname)?;
    let fd = t.syscall(tid, gadget, SYS_MEMFD_CREATE, [name_at, MFD_CLOEXEC, 0, 0, 0, 0]);
    let _ = mem.write(name_at, &saved);
    let fd = fd?;
    if fd < 0 {
        return Err(Error::Process { pid, msg: format!("memfd_create failed in the target: errno {}", -fd) });
    }
    let close = |t: &mut Stopped| {
        let _ = t.syscall(tid, gadget, SYS_CLOSE, [fd as u64, 0, 0, 0, 0, 0]);
    };
    // Fill it from our side.
    let fill = (|| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/fd/{fd}"))
            .map_err(|e| Error::io("cannot open the target's memfd", e))?;
        f.set_len(len).map_err(|e| Error::io("cannot size the patch region", e))?;
        f.write_all_at(image, 0).map_err(|e| Error::io("cannot write the patch region", e))?;
        Ok(f)
    })();
    let file = match fill {
        Ok(f) => f,
        Err(e) => {
            close(&mut t);
            return Err(e);
        }
    };
    crate::fault::point("injected");
    let r = t.syscall(tid, gadget, SYS_MMAP, [addr, len, PROT_READ | PROT_EXEC, MAP_SHARED | MAP_FIXED_NOREPLACE, fd as u64, 0]);
    // The control page over the last page, private: a child forked during a pending switch
    // keeps its own copy of the commit word, frozen with a heartbeat that no longer moves, so
    // its gates send it the old way instead of following its parent's switch.
    let control = match r {
        Ok(r) if r as u64 == addr => t.syscall(tid, gadget, SYS_MMAP, [addr + writable, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd as u64, writable]),
        _ => Ok(0),
    };
    close(&mut t);
    let r = r?;
    if r < 0 {
        return Err(Error::Process { pid, msg: format!("mmap of the patch region at {addr:#x} failed: errno {}", -r) });
    }
    let got = r as u64;
    let region = MappedRegion { pid, base: got, len, gadget, committed: std::cell::Cell::new(false), file };
    if got != addr {
        // An old kernel took MAP_FIXED_NOREPLACE as a hint.
        drop(t);
        drop(region);
        return Err(Error::Process { pid, msg: format!("patch region landed at {got:#x} instead of {addr:#x}") });
    }
    if !matches!(control, Ok(c) if c as u64 == addr + writable) {
        drop(t);
        drop(region);
        return Err(match control {
            Err(e) => e,
            Ok(c) => Error::Process { pid, msg: format!("mmap of the patch region's control page failed: {c}") },
        });
    }
    Ok(region)
}

/// The mapped region with what it holds. Dropping it unmaps the region (until committed).
pub struct Mapped {
    pub region: MappedRegion,
    pub layout: Layout,
    pub header: Header,
    /// How long one thread was held for the injected system calls (microseconds).
    pub map_us: u64,
}

/// Place the region within reach of the old code (below 2 GiB for non-PIE code), have `fill`
/// make its image for that place, and map it in the target.
pub fn map(target: &Target, exe: &Executable, mut layout: Layout, fill: impl FnOnce(&Layout) -> Result<Image>) -> Result<Mapped> {
    let (lo, hi) = exe.elf.image_range();
    let addr = choose_address(&target.maps, lo.wrapping_add(exe.bias), hi.wrapping_add(exe.bias), layout.len, !exe.elf.pie).ok_or_else(|| Error::Process {
        pid: target.pid,
        msg: format!("no free address range of {} bytes within reach of the executable's code", layout.len),
    })?;
    layout.place(addr);
    let image = fill(&layout)?;
    let t0 = Instant::now();
    let name = format!("{}{}", crate::region::NAME_PREFIX, image.header.patch_id);
    let region = map_region(&target.proc, &target.mem, &target.maps, target.gadgets, &name, addr, &image.bytes, layout.control() - layout.base)?;
    let map_us = t0.elapsed().as_micros() as u64;
    crate::fault::point("mapped");
    Ok(Mapped { region, layout, header: image.header, map_us })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(start: u64, end: u64, path: &str) -> Mapping {
        Mapping { start, end, perms: "r-xp".into(), offset: 0, inode: 1, path: path.into() }
    }

    #[test]
    fn pie_region_goes_just_below_the_executable() {
        let maps = vec![m(0x5555_5555_4000, 0x5555_5555_9000, "/a"), m(0x5555_5555_9000, 0x5555_5557_a000, "[heap]"), m(0x7fff_f000_0000, 0x7fff_f001_0000, "/libc")];
        let a = choose_address(&maps, 0x5555_5555_4000, 0x5555_5555_9000, 0x3000, false).unwrap();
        assert!(a + 0x3000 <= 0x5555_5555_4000 - PAGE, "{a:#x}");
        assert!(0x5555_5555_4000 - a < 0x10_0000);
    }

    #[test]
    fn non_pie_region_stays_below_2g_and_away_from_the_heap() {
        let maps = vec![m(0x40_0000, 0x40_5000, "/a"), m(0x40_5000, 0x50_0000, "[heap]")];
        let a = choose_address(&maps, 0x40_0000, 0x40_5000, 0x3000, true).unwrap();
        assert!(a + 0x3000 <= LOW_2G);
        assert!(a > 0x1000_0000, "{a:#x}");
    }

    #[test]
    fn no_room_is_none() {
        let maps = vec![m(0, 0x7fff_ffff_f000, "/all")];
        assert!(choose_address(&maps, 0x40_0000, 0x40_5000, 0x3000, true).is_none());
    }
}
