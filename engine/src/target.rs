//! The process being updated, as every step of apply and revert sees it: opened, locked against
//! other livepatch processes, its memory and mappings, and the patches already applied (read
//! from the process itself, so any livepatch process knows them).
use crate::elf::ElfFile;
use crate::error::{Error, Result};
use crate::map;
use crate::process::{Lock, Mapping, MemoryReader, ProcMem, Process};
use crate::ptrace::Gadgets;
use crate::status::{self, Applied};

pub struct Target {
    pub pid: i32,
    pub proc: Process,
    pub mem: ProcMem,
    /// The mappings when the update started.
    pub maps: Vec<Mapping>,
    /// Every patch region, oldest first; orphans (a tool died between map and jump) included.
    pub applied: Vec<Applied>,
    /// Where injected system calls enter the kernel and return.
    pub gadgets: Gadgets,
    _lock: Lock,
}

impl Target {
    pub fn open(pid: i32) -> Result<Target> {
        let proc = Process::open(pid)?;
        let lock = Lock::take(&proc)?;
        let mem = ProcMem::open(pid)?;
        let maps = proc.maps()?;
        let (applied, _) = status::applied(&mem, &maps);
        let gadgets = map::find_gadgets(&mem, &maps)?;
        Ok(Target { pid, proc, mem, maps, applied, gadgets, _lock: lock })
    }

    /// The executable the process runs, as it sees it, and its load bias.
    pub fn executable(&self) -> Result<Executable> {
        let elf = self.proc.exe()?;
        let bias = self.proc.exe_bias(&elf, &self.maps)?;
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(self.proc.exe_path()).map(|m| m.ino()).map_err(|e| crate::process::proc_err(self.pid, "stat its executable", e))?;
        Ok(Executable { elf, bias, inode, library: None })
    }

    /// The object a bundle built for `build_id` patches: the executable, or a shared library
    /// the process maps (found by the build id of each mapped file, read as the process sees
    /// it), with its load bias.
    pub fn object(&self, build_id: &str) -> Result<Executable> {
        let exe = self.executable()?;
        let running = exe.elf.build_id_hex().unwrap_or_else(|| "none".into());
        if running == build_id {
            return Ok(exe);
        }
        let mut seen = Vec::new();
        for m in self.maps.iter().filter(|m| m.offset == 0 && m.inode != 0 && m.inode != exe.inode && m.path.starts_with('/') && !m.path.starts_with("/memfd:")) {
            if seen.contains(&(m.inode, m.path.clone())) || !self.maps.iter().any(|x| x.path == m.path && x.is_exec()) {
                continue;
            }
            seen.push((m.inode, m.path.clone()));
            let Ok(elf) = ElfFile::open(&crate::unwind::map_file(self.pid, &self.maps, &m.path)) else { continue };
            if elf.build_id_hex().as_deref() != Some(build_id) {
                continue;
            }
            let bias = m.start.checked_sub(elf.first_page()).ok_or_else(|| Error::Process { pid: self.pid, msg: format!("{} is mapped below its first segment", m.path) })?;
            return Ok(Executable { elf, bias, inode: m.inode, library: Some(m.path.clone()) });
        }
        Err(Error::BuildIdMismatch { pid: self.pid, expected: build_id.to_string(), found: format!("{running} (its executable; no library it maps has build id {build_id} either)") })
    }

    /// The patches in effect, oldest first.
    pub fn live(&self) -> Vec<&Applied> {
        self.applied.iter().filter(|a| !a.orphan).collect()
    }

    /// Remove what a tool that died mid-way left (best effort: all of it is harmless, only
    /// wasteful): commit words still parking threads get their fallback at once (we hold the
    /// lock, so that tool is gone); regions never switched to, or switched back through their
    /// gates, lose their entries' gate jumps and are unmapped once no thread is inside; memfd
    /// descriptors are closed.
    pub fn remove_leftovers(&self) {
        for a in &self.applied {
            if let Err(e) = crate::gate::settle(&self.mem, &a.header) {
                tracing::warn!(pid = self.pid, "could not settle the gates of patch {}: {e}", a.header.patch_id);
            }
        }
        for a in self.applied.iter().filter(|a| a.orphan) {
            if a.interrupted {
                if let Err(e) = self.ungate(a) {
                    tracing::warn!(pid = self.pid, "could not take back the gates of patch {}: {e}", a.header.patch_id);
                    continue;
                }
            }
            if !crate::gate::drain(self.pid, &[(a.mapping.start, a.mapping.end)], std::time::Duration::from_secs(1)) {
                tracing::warn!(pid = self.pid, "a thread is still inside the region of patch {}: left for the next command", a.header.patch_id);
                continue;
            }
            if let Err(e) = map::unmap(self.pid, self.gadgets, a.mapping.start, a.mapping.end - a.mapping.start) {
                tracing::warn!(pid = self.pid, "could not unmap the region of patch {}: {e}", a.header.patch_id);
            }
        }
        let _ = map::close_leaked_memfds(self.pid, self.gadgets);
    }

    /// Entries of an interrupted patch that lead to its gates get back what they held before it.
    fn ungate(&self, a: &Applied) -> Result<()> {
        let _stopped = crate::ptrace::Stopped::all(&self.proc, std::time::Duration::from_secs(10))?;
        for e in &a.header.entries {
            let Some(g) = a.header.gates.iter().find(|g| g.entry == e.entry) else { continue };
            let Some(jump) = g.jump() else { continue };
            if self.mem.read_vec(e.entry, jump.len())? == jump {
                self.mem.write(e.entry, &e.previous_bytes()?)?;
            }
        }
        Ok(())
    }

    /// A patch only partly switched (a tool died between two jumps) is neither applied nor a
    /// base to stack on: revert repairs it.
    pub fn refuse_partly_switched(&self) -> Result<()> {
        match self.live().into_iter().find(|a| status::partly_switched(&self.mem, a)) {
            Some(a) => Err(Error::Other(format!(
                "patch {} is only partly switched in process {} (a livepatch process died while writing its jumps); run `livepatch revert --pid {} --all` to restore the original code, then apply again",
                a.header.patch_id, self.pid, self.pid
            ))),
            None => Ok(()),
        }
    }

    /// The process calls exec while a `wait` strategy lets it run: the region is then gone
    /// and the entries belong to another program. Read through the memory opened at the start
    /// (which reads nothing once its address space is gone), not `/proc/PID/maps`: this runs
    /// while the target is stopped.
    pub fn check_region_still_mapped(&self, base: u64, patch_id: &str) -> Result<()> {
        // The header starts with the magic, then the JSON, whose first field is the patch id.
        let want = format!("{{\"patch_id\":\"{patch_id}\"");
        let head = self.mem.read_vec(base, 16 + want.len()).unwrap_or_default();
        if head.len() == 16 + want.len() && head[..8] == crate::region::MAGIC[..] && head[16..] == *want.as_bytes() {
            Ok(())
        } else {
            Err(Error::Process { pid: self.pid, msg: "called exec during the operation (the patch region is gone); it runs another program now".into() })
        }
    }
}

/// The object being patched (the running executable, or a shared library it maps) and its load
/// bias (AVMA = SVMA + bias).
pub struct Executable {
    pub elf: ElfFile,
    pub bias: u64,
    /// The file's inode (its own symbols are bound directly, not looked up in other objects).
    pub inode: u64,
    /// The library's path as the process maps it; `None` for the executable.
    pub library: Option<String>,
}

impl Executable {
    /// The live address of `svma` of the executable.
    pub fn avma(&self, svma: u64) -> Result<u64> {
        svma.checked_add(self.bias).ok_or_else(|| Error::Bundle(format!("old address overflows: {svma:#x} plus the load bias {:#x}", self.bias)))
    }
}
