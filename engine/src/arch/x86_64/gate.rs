//! The gate stub an old entry jumps to while a switch is pending (see [`crate::gate`]): one
//! load of the commit word decides between the new code, the old code (the entry's displaced
//! instructions, relocated, then a jump back past them) and parking (a bounded futex wait
//! that gives up, and takes the fallback way, once the tool's heartbeat stops).
//!
//! Every register a function may receive an argument in is kept (rax for varargs, r10 for a
//! static chain); only the flags change, which no ABI passes into a function.
use iced_x86::{BlockEncoder, BlockEncoderOptions, Decoder, DecoderOptions, FlowControl, Instruction, InstructionBlock};

/// Commit word values.
pub const PARK: u64 = 0;
pub const NEW: u64 = 1;
pub const OLD: u64 = 2;

/// Offsets of the control words in the control page.
pub const STATE_OFF: u64 = 0;
pub const FALLBACK_OFF: u64 = 8;
pub const HEARTBEAT_OFF: u64 = 16;
pub const TIMESPEC_OFF: u64 = 24;
/// One futex wait lasts this long (the `timespec` in the control page)...
pub const WAIT_NS: u64 = 1_000_000;
/// ...and this many timed-out waits in a row without the heartbeat moving mean the tool is
/// gone: at least 250 ms.
pub const STALE_WAITS: u32 = 250;
/// Room for one gate (the longest is about 150 bytes plus the relocated instructions).
pub const GATE_ROOM: u64 = 256;

const SYS_FUTEX: u32 = 202;
const FUTEX_WAIT_PRIVATE: u32 = 128;
const ETIMEDOUT: i8 = -110;

/// A generated gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateCode {
    pub bytes: Vec<u8>,
    /// Offset of the first instruction after the commit word is read and acted on: a thread
    /// in [1, `decided`) carries a decision made on a value that may be stale.
    pub decided: u64,
    /// Where the relocated old instructions start (to the end of `bytes`).
    pub old_path: u64,
    /// Stack depth in 8-byte words at each instruction start below `old_path`, as change
    /// points (offset, words pushed since the entry).
    pub depths: Vec<(u32, u8)>,
}

/// Why an entry cannot get a gate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ungateable {
    #[error("its first instructions cannot be decoded")]
    Undecodable,
    #[error("its first instructions include a call")]
    CallInPrologue,
    #[error("a branch of the function lands inside the bytes the jump replaces (at {0:#x})")]
    BranchIntoEntry(u64),
    #[error("its first instructions cannot be moved: {0}")]
    Relocation(String),
}

/// How many bytes from `entry` (whole instructions of `code`, which starts there) the jump
/// of `width` bytes displaces. `function` is the whole old function at `entry` (for branches
/// that land inside those bytes).
pub fn displaced_len(code: &[u8], entry: u64, width: usize, function: &[u8]) -> Result<usize, Ungateable> {
    let mut d = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
    let mut len = 0usize;
    let mut insn = Instruction::default();
    while len < width {
        if !d.can_decode() {
            return Err(Ungateable::Undecodable);
        }
        d.decode_out(&mut insn);
        if insn.is_invalid() {
            return Err(Ungateable::Undecodable);
        }
        if matches!(insn.flow_control(), FlowControl::Call | FlowControl::IndirectCall) {
            return Err(Ungateable::CallInPrologue);
        }
        len += insn.len();
    }
    let end = entry + len as u64;
    let mut d = Decoder::with_ip(64, function, entry, DecoderOptions::NONE);
    while d.can_decode() {
        d.decode_out(&mut insn);
        if insn.is_invalid() {
            continue;
        }
        if matches!(insn.flow_control(), FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch) && insn.op0_kind().is_near_branch() {
            let t = insn.near_branch_target();
            if t > entry && t < end {
                return Err(Ungateable::BranchIntoEntry(t));
            }
        }
    }
    Ok(len)
}

trait NearBranch {
    fn is_near_branch(&self) -> bool;
}

impl NearBranch for iced_x86::OpKind {
    fn is_near_branch(&self) -> bool {
        matches!(self, iced_x86::OpKind::NearBranch16 | iced_x86::OpKind::NearBranch32 | iced_x86::OpKind::NearBranch64)
    }
}

/// A tiny assembler: bytes, the stack depth at each instruction, and rel fixups.
struct Asm {
    at: u64,
    b: Vec<u8>,
    depth: u8,
    depths: Vec<(u32, u8)>,
}

impl Asm {
    fn op(&mut self, bytes: &[u8], delta: i8) {
        let off = self.b.len() as u32;
        if self.depths.last().is_none_or(|(_, d)| *d != self.depth) {
            self.depths.push((off, self.depth));
        }
        self.b.extend_from_slice(bytes);
        self.depth = (self.depth as i16 + delta as i16) as u8;
    }
    fn ip(&self) -> u64 {
        self.at + self.b.len() as u64
    }
    /// An instruction ending with a rip-relative disp32 to `target`.
    fn rip(&mut self, head: &[u8], target: u64, delta: i8) -> Option<()> {
        let next = self.ip() + head.len() as u64 + 4;
        let rel = i32::try_from(target as i128 - next as i128).ok()?;
        let mut v = head.to_vec();
        v.extend_from_slice(&rel.to_le_bytes());
        self.op(&v, delta);
        Some(())
    }
    /// An instruction ending with rel8 to be patched: returns the field's offset.
    fn short(&mut self, op: u8) -> usize {
        self.op(&[op, 0], 0);
        self.b.len() - 1
    }
    fn bind(&mut self, field: usize, to: usize) {
        self.b[field] = i8::try_from(to as i64 - (field as i64 + 1)).expect("gate branch within 127 bytes") as u8;
    }
}

/// The gate placed at `at` for the entry at `entry`, whose first `displaced` bytes (whole
/// instructions) it runs on the old way; `new` is the new code, `control` the control page.
/// `None` when something is out of rel32 reach.
pub fn gate(at: u64, entry: u64, displaced: &[u8], new: u64, control: u64) -> Result<GateCode, Ungateable> {
    let reach = || Ungateable::Relocation("out of reach of the patch region".into());
    let (state, fallback, heartbeat, timespec) = (control + STATE_OFF, control + FALLBACK_OFF, control + HEARTBEAT_OFF, control + TIMESPEC_OFF);
    let mut a = Asm { at, b: Vec::with_capacity(GATE_ROOM as usize), depth: 0, depths: Vec::new() };
    // Dispatch: one read of the commit word.
    a.op(&[0x50], 1); // push rax
    a.rip(&[0x48, 0x8b, 0x05], state, 0).ok_or_else(reach)?; // mov rax, [state]
    a.op(&[0x48, 0x83, 0xf8, NEW as u8], 0); // cmp rax, NEW
    a.op(&[0x58], -1); // pop rax (flags kept)
    a.rip(&[0x0f, 0x84], new, 0).ok_or_else(reach)?; // je new
    let ja_old = a.b.len();
    a.op(&[0x0f, 0x87, 0, 0, 0, 0], 0); // ja old path (patched below)
    let decided = a.b.len() as u64;
    // Park: keep every register the wait touches.
    for r in [&[0x50u8][..], &[0x57], &[0x56], &[0x52], &[0x51], &[0x41, 0x50], &[0x41, 0x51], &[0x41, 0x52], &[0x41, 0x53]] {
        a.op(r, 1); // push rax, rdi, rsi, rdx, rcx, r8, r9, r10, r11
    }
    a.rip(&[0x4c, 0x8b, 0x0d], heartbeat, 0).ok_or_else(reach)?; // mov r9, [heartbeat]
    a.op(&[0x45, 0x31, 0xc0], 0); // xor r8d, r8d: timed-out waits without a beat
    let wait = a.b.len();
    a.rip(&[0x48, 0x8b, 0x05], state, 0).ok_or_else(reach)?; // mov rax, [state]
    a.op(&[0x48, 0x85, 0xc0], 0); // test rax, rax (PARK is 0)
    let to_done = a.short(0x75); // jnz done
    let mut mov_eax = vec![0xb8];
    mov_eax.extend_from_slice(&SYS_FUTEX.to_le_bytes());
    a.op(&mov_eax, 0); // mov eax, SYS_futex
    a.rip(&[0x48, 0x8d, 0x3d], state, 0).ok_or_else(reach)?; // lea rdi, [state]
    let mut mov_esi = vec![0xbe];
    mov_esi.extend_from_slice(&FUTEX_WAIT_PRIVATE.to_le_bytes());
    a.op(&mov_esi, 0); // mov esi, FUTEX_WAIT_PRIVATE
    a.op(&[0x31, 0xd2], 0); // xor edx, edx: wait while the word is PARK
    a.rip(&[0x4c, 0x8d, 0x15], timespec, 0).ok_or_else(reach)?; // lea r10, [timespec]
    a.op(&[0x0f, 0x05], 0); // syscall
    a.op(&[0x48, 0x89, 0xc1], 0); // mov rcx, rax: the wait's result
    a.rip(&[0x48, 0x8b, 0x05], heartbeat, 0).ok_or_else(reach)?; // mov rax, [heartbeat]
    a.op(&[0x4c, 0x39, 0xc8], 0); // cmp rax, r9
    let to_same = a.short(0x74); // je same
    a.op(&[0x49, 0x89, 0xc1], 0); // mov r9, rax: the tool is alive
    a.op(&[0x45, 0x31, 0xc0], 0); // xor r8d, r8d
    let back1 = a.short(0xeb); // jmp wait
    a.bind(back1, wait);
    let same = a.b.len();
    a.bind(to_same, same);
    a.op(&[0x48, 0x83, 0xf9, ETIMEDOUT as u8], 0); // cmp rcx, -ETIMEDOUT
    let back2 = a.short(0x75); // jne wait (woken, interrupted: not a timed-out wait)
    a.bind(back2, wait);
    a.op(&[0x49, 0xff, 0xc0], 0); // inc r8
    let mut cmp = vec![0x49, 0x81, 0xf8];
    cmp.extend_from_slice(&STALE_WAITS.to_le_bytes());
    a.op(&cmp, 0); // cmp r8, STALE_WAITS
    let back3 = a.short(0x72); // jb wait
    a.bind(back3, wait);
    // The tool is gone: PARK becomes the fallback, once, for every thread.
    a.rip(&[0x48, 0x8b, 0x0d], fallback, 0).ok_or_else(reach)?; // mov rcx, [fallback]
    a.op(&[0x31, 0xc0], 0); // xor eax, eax
    a.rip(&[0xf0, 0x48, 0x0f, 0xb1, 0x0d], state, 0).ok_or_else(reach)?; // lock cmpxchg [state], rcx
    let back4 = a.short(0xeb); // jmp wait (which sees the word no longer PARK)
    a.bind(back4, wait);
    let done = a.b.len();
    a.bind(to_done, done);
    for r in [&[0x41u8, 0x5b][..], &[0x41, 0x5a], &[0x41, 0x59], &[0x41, 0x58], &[0x59], &[0x5a], &[0x5e], &[0x5f], &[0x58]] {
        a.op(r, -1); // pop r11 .. rax
    }
    let again = crate::arch::x86_64::jmp_rel32(a.ip(), at).ok_or_else(reach)?;
    a.op(&again, 0); // back to the dispatch
    // The old way: the displaced instructions, moved here, then on into the old function.
    let old_path = a.b.len() as u64;
    let rel = i32::try_from(old_path as i64 - (ja_old as i64 + 6)).expect("gate fits");
    a.b[ja_old + 2..ja_old + 6].copy_from_slice(&rel.to_le_bytes());
    let mut insns = Vec::new();
    let mut d = Decoder::with_ip(64, displaced, entry, DecoderOptions::NONE);
    while d.can_decode() {
        let i = d.decode();
        if i.is_invalid() {
            return Err(Ungateable::Undecodable);
        }
        insns.push(i);
    }
    let moved = BlockEncoder::encode(64, InstructionBlock::new(&insns, at + old_path), BlockEncoderOptions::NONE).map_err(|e| Ungateable::Relocation(e.to_string()))?;
    a.b.extend_from_slice(&moved.code_buffer);
    let back = crate::arch::x86_64::jmp_rel32(a.ip(), entry + displaced.len() as u64).ok_or_else(reach)?;
    a.b.extend_from_slice(&back);
    Ok(GateCode { bytes: a.b, decided, old_path, depths: a.depths })
}

/// The control page's initial contents: PARK, the fallback, a zero heartbeat, and the wait's
/// `timespec`.
pub fn control_page(fallback: u64) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[STATE_OFF as usize..][..8].copy_from_slice(&PARK.to_le_bytes());
    p[FALLBACK_OFF as usize..][..8].copy_from_slice(&fallback.to_le_bytes());
    p[TIMESPEC_OFF as usize + 8..][..8].copy_from_slice(&WAIT_NS.to_le_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Formatter, NasmFormatter};

    fn disasm(bytes: &[u8], ip: u64) -> Vec<String> {
        let mut d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
        let mut f = NasmFormatter::new();
        let mut out = Vec::new();
        while d.can_decode() {
            let i = d.decode();
            assert!(!i.is_invalid(), "invalid instruction at {:#x}", i.ip());
            let mut s = String::new();
            f.format(&i, &mut s);
            out.push(format!("{:x} {s}", i.ip()));
        }
        out
    }

    #[test]
    fn gate_decodes_and_branches_where_it_should() {
        // endbr64; push rbp; mov rbp, rsp  (4 + 1 + 3 bytes: 8 displaced by a 5-byte jump)
        let f = [0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5, 0x90, 0xc3];
        let n = displaced_len(&f, 0x40_1000, 5, &f).unwrap();
        assert_eq!(n, 5, "endbr64 and push rbp");
        let g = gate(0x50_0000, 0x40_1000, &f[..n], 0x50_8000, 0x50_f000).unwrap();
        assert!(g.bytes.len() as u64 <= GATE_ROOM);
        let text = disasm(&g.bytes, 0x50_0000).join("\n");
        assert!(text.contains("je near 0000000000508000h"), "{text}");
        assert!(text.contains("lock cmpxchg"), "{text}");
        assert!(text.contains("syscall"), "{text}");
        assert!(text.contains("endbr64"), "{text}");
        // The old way ends jumping back past the displaced bytes.
        assert!(text.trim_end().ends_with("jmp 0000000000401005h"), "{text}");
        // The stack depth comes back to zero before every way out.
        assert_eq!(g.depths.first(), Some(&(0, 0)));
        assert!(g.depths.iter().any(|(_, d)| *d == 9));
        assert_eq!(g.depths.last().map(|(_, d)| *d), Some(0));
    }

    #[test]
    fn relocated_branches_keep_their_targets() {
        // jmp rel32 to an earlier patch (what a stacked entry holds), then a short jcc.
        let entry = 0x40_2000;
        let mut f = crate::arch::x86_64::jmp_rel32(entry, 0x48_0000).unwrap().to_vec();
        f.extend_from_slice(&[0x90, 0xc3]);
        let n = displaced_len(&f, entry, 5, &f).unwrap();
        let g = gate(0x50_0000, entry, &f[..n], 0x50_8000, 0x50_f000).unwrap();
        let text = disasm(&g.bytes[g.old_path as usize..], 0x50_0000 + g.old_path).join("\n");
        assert!(text.contains("480000h"), "{text}");
    }

    #[test]
    fn refusals() {
        // call in the first bytes
        let f = [0xe8, 0, 0, 0, 0, 0xc3];
        assert_eq!(displaced_len(&f, 0x1000, 5, &f), Err(Ungateable::CallInPrologue));
        // xor eax,eax; .L: add eax,1 (3 bytes at +2); cmp eax,10; jne .L; ret — a loop back to +2
        let f = [0x31, 0xc0, 0x83, 0xc0, 0x01, 0x83, 0xf8, 0x0a, 0x75, 0xf8, 0xc3];
        assert_eq!(displaced_len(&f, 0x1000, 5, &f), Err(Ungateable::BranchIntoEntry(0x1002)));
    }
}
