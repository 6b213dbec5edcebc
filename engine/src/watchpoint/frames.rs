//! Frames of old code stopped at proven return sites (see [`crate::extract::frames`]): found on
//! the stopped threads' stacks, and moved to the code they continue in at the switch: the
//! return address in the callee's frame, and callee-saved registers that must hold a constant
//! of the new code, wherever the frame keeps them (the thread's register, or the slot where an
//! inner frame saved it).
use super::{Guarded, View};
use crate::error::{Error, Result};
use crate::jump::{Jumps, Site};
use crate::process::{MemoryReader, ProcMem};
use crate::ptrace::{Regs, Stopped};
use crate::bundle::Place;
use crate::unwind::{self, Home};

/// A frame of guarded code stopped at a proven return site, moved to the new code at the
/// switch: the return address in its callee's frame is rewritten.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FrameSwitch {
    pub tid: i32,
    pub function: String,
    /// Where the return address is kept (the callee's CFA - 8).
    pub slot: u64,
    pub old: u64,
    pub new: u64,
    /// Callee-saved registers of the frame set for the new code, and where each is kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regs: Vec<RegWrite>,
    /// Frame slots set for the new code (values it keeps in other slots than the old code).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slots: Vec<SlotWrite>,
}

/// Bytes written into a slot of a switched frame.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlotWrite {
    pub at: u64,
    pub bytes: Vec<u8>,
}

/// A register of a switched frame: its value now, the value it gets, and where it lives (the
/// thread's register, or the slot where an inner frame saved it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegWrite {
    pub reg: u16,
    pub home: unwind::Home,
    pub value: u64,
}

/// Every frame of the stopped threads that stands at a switchable return site of `guarded`.
/// Only frames found through call-frame information count (a scanned word is no frame, and
/// blocks). The caller holds every thread stopped, with no guarded code otherwise active;
/// `stacks` are the threads' registers and stacks from that check (a thread missing there is
/// unwound now).
pub fn frames_to_switch(v: &View, stopped: &Stopped, guarded: &[Guarded], stacks: &super::Stacks) -> Result<Vec<FrameSwitch>> {
    let mut out = Vec::new();
    if guarded.iter().all(|g| g.switch.is_empty()) {
        return Ok(out);
    }
    for tid in stopped.tids() {
        let unwound;
        let (thread_regs, st) = match stacks.get(&tid) {
            Some((r, st)) => (*r, st),
            None => {
                let r = stopped.regs(tid)?;
                unwound = unwind::unwind(&r, v.modules, v.mem, v.maps);
                (r, &unwound)
            }
        };
        for (d, pc) in st.pcs.iter().enumerate().skip(1) {
            let Some(g) = guarded.iter().find(|g| g.switch.contains_key(pc)) else { continue };
            // The return address of frame d-1 sits just below its CFA (x86-64 `call`).
            let slot = st.cfas.get(d - 1).and_then(|c| c.checked_sub(8)).ok_or_else(|| Error::Other(format!("thread {tid}: no frame address for the return to {pc:#x}")))?;
            let held = v.mem.read_u64(slot)?;
            if held != *pc {
                return Err(Error::Other(format!("thread {tid}: the return address to {pc:#x} is not at {slot:#x} (found {held:#x}); not switching")));
            }
            let resume = &g.switch[pc];
            let home = |reg: u16| -> Result<Home> {
                let k = unwind::SAVED.iter().position(|r| *r == reg as usize).ok_or_else(|| Error::Other(format!("register {reg} is not callee-saved")))?;
                match st.homes.get(d).map(|h| h[k]).unwrap_or_default() {
                    Home::Unknown => Err(Error::Other(format!("thread {tid}: where the frame at {pc:#x} keeps register {reg} is unknown; not switching"))),
                    h => Ok(h),
                }
            };
            // The frame's CFA from its callee's (its stack pointer once the callee returned): the
            // patch region has no call-frame information for the unwinder, the bundle knows it.
            let cfa = (slot + 8).wrapping_add(resume.cfa_above_sp as u64);
            if let (Some(unwound), false) = (st.cfas.get(d), resume.moves.is_empty()) {
                if *unwound != cfa {
                    return Err(Error::Other(format!("thread {tid}: the frame at {pc:#x} has its CFA at {unwound:#x}, the bundle says {cfa:#x}; not switching")));
                }
            }
            let slot_at = |offset: i64| (cfa as i64).checked_add(offset).map(|a| a as u64).ok_or_else(|| Error::Other("frame slot address overflows".into()));
            let mut regs = Vec::new();
            let mut slots = Vec::new();
            for s in &resume.sets {
                regs.push(RegWrite { reg: s.reg, home: home(s.reg)?, value: s.value });
            }
            // Every value is read before anything is written (a parallel move).
            for m in &resume.moves {
                let value = match m.from {
                    Place::Reg(r) => match home(r)? {
                        // The thread is stopped: its registers are those read for the unwind.
                        Home::Thread(n) => *reg_field(&mut thread_regs.clone(), n).ok_or_else(|| Error::Other(format!("register {n} is not callee-saved")))?,
                        Home::Memory(a) => v.mem.read_u64(a)?,
                        Home::Unknown => unreachable!("home() refuses unknown homes"),
                    },
                    Place::Slot { offset, width } => {
                        let mut b = [0u8; 8];
                        v.mem.read(slot_at(offset)?, &mut b[..width.min(8) as usize])?;
                        u64::from_le_bytes(b)
                    }
                };
                match m.to {
                    Place::Reg(r) => regs.push(RegWrite { reg: r, home: home(r)?, value }),
                    Place::Slot { offset, width } => slots.push(SlotWrite { at: slot_at(offset)?, bytes: value.to_le_bytes()[..width.min(8) as usize].to_vec() }),
                }
            }
            out.push(FrameSwitch { tid, function: g.name.clone(), slot, old: *pc, new: resume.at, regs, slots });
        }
    }
    Ok(out)
}


/// The writes of a switch of frames: until committed, dropping it puts back every return
/// address, saved register and thread register it changed.
pub struct FrameWrites<'a> {
    memory: Jumps<'a>,
    stopped: &'a Stopped,
    threads: Vec<(i32, Regs)>,
    committed: bool,
}

impl<'a> FrameWrites<'a> {
    /// Write every switch. The caller holds every thread stopped.
    pub fn write(mem: &'a ProcMem, stopped: &'a Stopped, switched: &[FrameSwitch]) -> Result<FrameWrites<'a>> {
        let mut sites = Vec::new();
        for s in switched {
            sites.push(Site { name: format!("the return address of `{}` on thread {}", s.function, s.tid), at: s.slot, expect: s.old.to_le_bytes().to_vec(), write: s.new.to_le_bytes().to_vec() });
            for r in &s.regs {
                if let Home::Memory(at) = r.home {
                    let now = mem.read_vec(at, 8)?;
                    sites.push(Site { name: format!("register {} of `{}` saved at {at:#x} on thread {}", r.reg, s.function, s.tid), at, expect: now, write: r.value.to_le_bytes().to_vec() });
                }
            }
            for w in &s.slots {
                let now = mem.read_vec(w.at, w.bytes.len())?;
                sites.push(Site { name: format!("a frame slot of `{}` at {:#x} on thread {}", s.function, w.at, s.tid), at: w.at, expect: now, write: w.bytes.clone() });
            }
        }
        let memory = Jumps::write(mem, &sites)?;
        let mut w = FrameWrites { memory, stopped, threads: Vec::new(), committed: false };
        for s in switched {
            for r in &s.regs {
                let Home::Thread(n) = r.home else { continue };
                let before = stopped.regs(s.tid)?;
                let mut regs = before;
                *reg_field(&mut regs, n).ok_or_else(|| Error::Other(format!("register {n} is not callee-saved")))? = r.value;
                stopped.set_regs(s.tid, regs)?;
                w.threads.push((s.tid, before));
            }
        }
        Ok(w)
    }

    pub fn commit(mut self) {
        self.committed = true;
        self.memory.commit_in_place();
    }
}

impl Drop for FrameWrites<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for (tid, regs) in self.threads.iter().rev() {
            if let Err(e) = self.stopped.set_regs(*tid, *regs) {
                tracing::error!("could not restore the registers of thread {tid}: {e}");
            }
        }
    }
}

/// The field of a callee-saved register (DWARF number) in the ptrace register set.
fn reg_field(r: &mut Regs, dwarf: u16) -> Option<&mut u64> {
    Some(match dwarf {
        3 => &mut r.rbx,
        6 => &mut r.rbp,
        12 => &mut r.r12,
        13 => &mut r.r13,
        14 => &mut r.r14,
        15 => &mut r.r15,
        _ => return None,
    })
}
