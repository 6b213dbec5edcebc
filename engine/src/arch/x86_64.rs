//! x86-64: finding the address references inside machine code (rip-relative operands, rel32
//! branches, absolute immediates, `%fs` TLS offsets), encoding the entry jump and the stubs of
//! the region ([`gate`]: the gates of a switch).
pub mod gate;
pub mod sigframe;

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, Register};

/// Length of the jump written at an old function's entry (`jmp rel32`).
pub const JUMP_LEN: usize = 5;
pub const INT3: u8 = 0xcc;
/// `syscall`
pub const SYSCALL: [u8; 2] = [0x0f, 0x05];

/// How a reference field encodes its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefKind {
    /// Signed 32-bit displacement from the end of the instruction.
    PcRel,
    /// Absolute address, 32 bits zero-extended.
    Abs32,
    /// Absolute address, 32 bits sign-extended.
    Abs32S,
    /// Absolute 64-bit address.
    Abs64,
    /// Offset from the thread pointer (`%fs:disp32`, local-exec TLS).
    TpOff32,
    /// 8-bit displacement from the end of the instruction (short branches).
    PcRel8,
}

/// One reference field found in code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeRef {
    /// Address of the instruction.
    pub ip: u64,
    /// Address just after the instruction (base of pc-relative fields).
    pub next_ip: u64,
    /// Offset of the field from the start of the decoded bytes.
    pub field_off: usize,
    pub field_size: u8,
    pub kind: RefKind,
    /// The referenced address (pc-relative fields, absolute fields) or the value (TLS).
    pub target: u64,
    /// A memory operand (load, store, `lea`), not a branch or an immediate.
    pub is_mem: bool,
    pub is_lea: bool,
    pub is_branch: bool,
    pub is_call: bool,
    /// An absolute candidate that may also be a plain number (immediates in non-PIE code).
    pub maybe_number: bool,
    /// `jmp [table + index*8]`: an absolute jump table (non-PIE).
    pub jump_table: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable instruction at {ip:#x}")]
pub struct DecodeError {
    pub ip: u64,
}

/// Decode `code` (placed at `ip`) and list every address reference it contains.
pub fn decode_refs(code: &[u8], ip: u64) -> Result<Vec<CodeRef>, DecodeError> {
    let mut out = Vec::new();
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        let pos = decoder.position();
        decoder.decode_out(&mut insn);
        if insn.is_invalid() {
            return Err(DecodeError { ip: insn.ip() });
        }
        let co = decoder.get_constant_offsets(&insn);
        let next_ip = insn.next_ip();
        let flow = insn.flow_control();
        let is_branch = matches!(flow, FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call);
        let is_call = flow == FlowControl::Call;
        let is_lea = insn.mnemonic() == Mnemonic::Lea;
        let base = CodeRef {
            ip: insn.ip(),
            next_ip,
            field_off: 0,
            field_size: 0,
            kind: RefKind::PcRel,
            target: 0,
            is_mem: false,
            is_lea,
            is_branch: false,
            is_call: false,
            maybe_number: false,
            jump_table: false,
        };
        // Near branches: the displacement is reported as the immediate.
        for i in 0..insn.op_count() {
            if matches!(insn.op_kind(i), OpKind::NearBranch64 | OpKind::NearBranch32 | OpKind::NearBranch16) && co.has_immediate() {
                let size = co.immediate_size() as u8;
                out.push(CodeRef {
                    field_off: pos + co.immediate_offset(),
                    field_size: size,
                    kind: if size == 1 { RefKind::PcRel8 } else { RefKind::PcRel },
                    target: insn.near_branch_target(),
                    is_branch,
                    is_call,
                    ..base.clone()
                });
            }
        }
        let has_mem = (0..insn.op_count()).any(|i| insn.op_kind(i) == OpKind::Memory);
        if has_mem && co.has_displacement() {
            let field_off = pos + co.displacement_offset();
            let dsize = co.displacement_size() as u8;
            if insn.is_ip_rel_memory_operand() {
                out.push(CodeRef {
                    field_off,
                    field_size: dsize,
                    kind: RefKind::PcRel,
                    target: insn.ip_rel_memory_address(),
                    is_mem: true,
                    is_branch: matches!(flow, FlowControl::IndirectBranch | FlowControl::IndirectCall),
                    is_call: flow == FlowControl::IndirectCall,
                    ..base.clone()
                });
            } else if insn.memory_segment() == Register::FS && insn.memory_base() == Register::None && insn.memory_index() == Register::None && dsize == 4 {
                out.push(CodeRef {
                    field_off,
                    field_size: 4,
                    kind: RefKind::TpOff32,
                    target: insn.memory_displacement64(),
                    is_mem: true,
                    ..base.clone()
                });
            } else if dsize == 4 && !matches!(insn.memory_segment(), Register::FS | Register::GS) {
                // Absolute disp32 (non-PIE): `mov eax, [addr]` or a jump table `jmp [tbl + rax*8]`.
                out.push(CodeRef {
                    field_off,
                    field_size: 4,
                    kind: RefKind::Abs32S,
                    target: insn.memory_displacement64(),
                    is_mem: true,
                    is_branch: flow == FlowControl::IndirectBranch,
                    jump_table: flow == FlowControl::IndirectBranch && insn.memory_base() == Register::None && insn.memory_index() != Register::None && insn.memory_index_scale() == 8,
                    // With a base or index register the displacement may be an offset, or the
                    // absolute base of an array (non-PIE): decided by the caller.
                    maybe_number: (insn.memory_base() != Register::None || insn.memory_index() != Register::None) && flow != FlowControl::IndirectBranch,
                    ..base.clone()
                });
            }
        }
        // Immediates that may be addresses (non-PIE code takes addresses with `mov $sym, %edi`).
        if co.has_immediate() && !is_branch {
            for i in 0..insn.op_count() {
                let (kind, size) = match insn.op_kind(i) {
                    OpKind::Immediate32 => (RefKind::Abs32, 4u8),
                    OpKind::Immediate32to64 => (RefKind::Abs32S, 4),
                    OpKind::Immediate64 => (RefKind::Abs64, 8),
                    _ => continue,
                };
                if co.immediate_size() as u8 != size {
                    continue;
                }
                out.push(CodeRef {
                    field_off: pos + co.immediate_offset(),
                    field_size: size,
                    kind,
                    target: insn.immediate(i),
                    maybe_number: true,
                    ..base.clone()
                });
            }
        }
    }
    Ok(out)
}

/// The constant a `lea sym(%rip), %reg` or `mov $imm, %reg` at `ip` puts in its register.
pub fn constant_of(code: &[u8], ip: u64) -> Option<u64> {
    let mut d = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let x = d.decode();
    if x.is_invalid() || x.op_count() != 2 || x.op0_kind() != OpKind::Register {
        return None;
    }
    match (x.mnemonic(), x.op1_kind()) {
        (Mnemonic::Lea, OpKind::Memory) if x.is_ip_rel_memory_operand() => Some(x.ip_rel_memory_address()),
        (Mnemonic::Mov, OpKind::Immediate32 | OpKind::Immediate64 | OpKind::Immediate32to64) => Some(x.immediate(1)),
        _ => None,
    }
}

/// Instruction boundaries of `code` placed at `ip` (for "is this pc at an instruction start").
pub fn instruction_starts(code: &[u8], ip: u64) -> Result<Vec<u64>, DecodeError> {
    Decoder::with_ip(64, code, ip, DecoderOptions::NONE)
        .iter()
        .map(|insn| if insn.is_invalid() { Err(DecodeError { ip: insn.ip() }) } else { Ok(insn.ip()) })
        .collect()
}

/// Targets of the direct jumps (unconditional and conditional, not calls) in `code` placed at
/// `ip`: a tail call leaves no frame behind, so a thread standing on a function's entry may be
/// in the middle of the code that jumped there. Undecodable bytes end the scan.
pub fn jump_targets(code: &[u8], ip: u64) -> Vec<u64> {
    Decoder::with_ip(64, code, ip, DecoderOptions::NONE)
        .iter()
        .take_while(|insn| !insn.is_invalid())
        .filter(|insn| {
            matches!(insn.flow_control(), FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch)
                && matches!(insn.op0_kind(), OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64)
        })
        .map(|insn| insn.near_branch_target())
        .collect()
}

/// Encode `jmp rel32` at `from` to `to`; `None` when out of reach.
pub fn jmp_rel32(from: u64, to: u64) -> Option<[u8; JUMP_LEN]> {
    let rel = (to as i128) - (from as i128 + JUMP_LEN as i128);
    let rel = i32::try_from(rel).ok()?;
    let mut b = [0u8; JUMP_LEN];
    b[0] = 0xe9;
    b[1..].copy_from_slice(&rel.to_le_bytes());
    Some(b)
}

/// Length of the short jump at the entry of a function shorter than [`JUMP_LEN`].
pub const SHORT_JUMP_LEN: usize = 2;

/// Encode `jmp rel8` at `from` to `to`; `None` when out of reach (±127 bytes).
pub fn jmp_rel8(from: u64, to: u64) -> Option<[u8; SHORT_JUMP_LEN]> {
    let rel = i8::try_from((to as i128) - (from as i128 + SHORT_JUMP_LEN as i128)).ok()?;
    Some([0xeb, rel as u8])
}

/// The target of the jump (`jmp rel32` or `jmp rel8`) that `bytes` at `from` hold, if any.
pub fn decode_jump(from: u64, bytes: &[u8]) -> Option<u64> {
    match bytes {
        [0xeb, rel, ..] => Some((from as i64 + SHORT_JUMP_LEN as i64 + *rel as i8 as i64) as u64),
        _ => decode_jmp_rel32(from, bytes),
    }
}

/// Decode a `jmp rel32` written by [`jmp_rel32`]; the target if `bytes` is one.
pub fn decode_jmp_rel32(from: u64, bytes: &[u8]) -> Option<u64> {
    if bytes.len() < JUMP_LEN || bytes[0] != 0xe9 {
        return None;
    }
    let rel = i32::from_le_bytes(bytes[1..5].try_into().ok()?);
    Some((from as i64 + JUMP_LEN as i64 + rel as i64) as u64)
}

/// An import stub: `jmp *[rip+0]` followed by the 8-byte absolute target.
pub const STUB_LEN: usize = 16;
pub fn import_stub(target: u64) -> [u8; STUB_LEN] {
    let mut b = [0u8; STUB_LEN];
    b[..6].copy_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
    b[6..14].copy_from_slice(&target.to_le_bytes());
    b[14] = INT3;
    b[15] = INT3;
    b
}

/// A thunk that enters a patched function keeping the registers `gprs` (iced numbering,
/// 0 = rax .. 15 = r15) and `xmms` (0..15) as the caller had them: push, save, `call target`,
/// restore, pop, `ret`. The stack stays 16-byte aligned at the call. `at` is the thunk's
/// address; `None` when the target is out of `call rel32` reach.
pub fn preserve_thunk(gprs: &[u8], xmms: &[u8], at: u64, target: u64) -> Option<Vec<u8>> {
    let mut b = Vec::with_capacity(32 + gprs.len() * 4 + xmms.len() * 20);
    for &r in gprs {
        if r >= 8 {
            b.push(0x41);
        }
        b.push(0x50 + (r & 7));
    }
    // Entry: rsp = 8 (mod 16); after k pushes and `sub s`: 8 - 8k - s = 0 (mod 16).
    let pad = if gprs.len() % 2 == 0 { 8 } else { 0 };
    let frame = 16 * xmms.len() as u32 + pad;
    if frame > 0 {
        b.extend_from_slice(&[0x48, 0x81, 0xec]); // sub rsp, imm32
        b.extend_from_slice(&frame.to_le_bytes());
    }
    let movdqu = |b: &mut Vec<u8>, op: u8, x: u8, disp: u32| {
        b.push(0xf3);
        if x >= 8 {
            b.push(0x44); // REX.R
        }
        b.extend_from_slice(&[0x0f, op, 0x84 | ((x & 7) << 3), 0x24]); // [rsp + disp32]
        b.extend_from_slice(&disp.to_le_bytes());
    };
    for (i, &x) in xmms.iter().enumerate() {
        movdqu(&mut b, 0x7f, x, 16 * i as u32);
    }
    let call_at = at + b.len() as u64;
    let rel = i32::try_from(target as i128 - (call_at as i128 + 5)).ok()?;
    b.push(0xe8);
    b.extend_from_slice(&rel.to_le_bytes());
    for (i, &x) in xmms.iter().enumerate() {
        movdqu(&mut b, 0x6f, x, 16 * i as u32);
    }
    if frame > 0 {
        b.extend_from_slice(&[0x48, 0x81, 0xc4]); // add rsp, imm32
        b.extend_from_slice(&frame.to_le_bytes());
    }
    for &r in gprs.iter().rev() {
        if r >= 8 {
            b.push(0x41);
        }
        b.push(0x58 + (r & 7));
    }
    b.push(0xc3);
    Some(b)
}

/// Room reserved for one library-variable detour (see [`library_detour`]).
pub const DETOUR_LEN: usize = 80;

/// A detour for one instruction of carried code whose memory operand names a variable that
/// lives in a library, out of 32-bit reach: step over the red zone, borrow a register the
/// instruction does not use, load the variable's address from `slot`, run the instruction with
/// the operand `[scratch + offset]`, give everything back and jump to the next instruction.
/// Flags are untouched (only `lea`, `push`, `pop`, `mov` run besides the instruction).
/// `None` when the instruction cannot be moved (it uses the stack pointer or has an index).
pub fn library_detour(insn_bytes: &[u8], insn_ip: u64, stub_at: u64, slot: u64, offset: i64) -> Option<Vec<u8>> {
    use iced_x86::{Code, Encoder, InstructionInfoFactory, MemoryOperand};
    let mut d = Decoder::with_ip(64, insn_bytes, insn_ip, DecoderOptions::NONE);
    let insn = d.decode();
    if insn.is_invalid() || insn.len() != insn_bytes.len() {
        return None;
    }
    let has_mem = (0..insn.op_count()).any(|i| insn.op_kind(i) == OpKind::Memory);
    if !has_mem || !matches!(insn.memory_base(), Register::RIP | Register::None) || insn.memory_index() != Register::None {
        return None;
    }
    if !matches!(insn.flow_control(), FlowControl::Next) || insn.stack_pointer_increment() != 0 {
        return None;
    }
    let used: Vec<Register> = InstructionInfoFactory::new().info(&insn).used_registers().iter().map(|u| u.register().full_register()).collect();
    if used.contains(&Register::RSP) {
        return None;
    }
    let scratch = [Register::R11, Register::R10, Register::R9, Register::R8, Register::RCX, Register::RDX, Register::RSI, Register::RDI, Register::RAX]
        .into_iter()
        .find(|r| !used.contains(r))?;
    let mut moved = insn;
    moved.set_memory_base(scratch);
    moved.set_memory_displacement64(offset as u64);
    moved.set_memory_displ_size(if i8::try_from(offset).is_ok() { 1 } else { 4 });
    let seq = [
        Instruction::with2(Code::Lea_r64_m, Register::RSP, MemoryOperand::with_base_displ(Register::RSP, -128)).ok()?,
        Instruction::with1(Code::Push_r64, scratch).ok()?,
        Instruction::with2(Code::Mov_r64_rm64, scratch, MemoryOperand::with_base_displ(Register::RIP, slot as i64)).ok()?,
        moved,
        Instruction::with1(Code::Pop_r64, scratch).ok()?,
        Instruction::with2(Code::Lea_r64_m, Register::RSP, MemoryOperand::with_base_displ(Register::RSP, 128)).ok()?,
        Instruction::with_branch(Code::Jmp_rel32_64, insn_ip + insn.len() as u64).ok()?,
    ];
    let mut enc = Encoder::new(64);
    let mut ip = stub_at;
    for i in &seq {
        ip += enc.encode(i, ip).ok()? as u64;
    }
    let out = enc.take_buffer();
    (out.len() <= DETOUR_LEN).then_some(out)
}

/// Whether `bytes` (at `ip`) are padding between functions: zero fill, or only NOP and `int3`
/// instructions (the multi-byte NOPs assemblers align with included).
pub fn is_padding_run(bytes: &[u8], ip: u64) -> bool {
    if bytes.iter().all(|&b| b == 0 || b == INT3) {
        return true;
    }
    let mut d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    while d.can_decode() {
        d.decode_out(&mut insn);
        if insn.is_invalid() || !matches!(insn.mnemonic(), Mnemonic::Nop | Mnemonic::Int3) {
            return false;
        }
    }
    true
}

/// Whether a byte is padding between functions (so a jump may run into it).
pub fn is_padding(b: u8) -> bool {
    b == INT3 || b == 0x90 || b == 0x00
}

#[cfg(test)]
mod tests {
    #[test]
    fn jump_targets_are_jumps_not_calls() {
        // add $1,%rdi; jmp rel8 -0x14; jne rel32; call rel32; jmp *%rax
        let code = [0x48, 0x83, 0xc7, 0x01, 0xeb, 0xea, 0x0f, 0x85, 0x10, 0, 0, 0, 0xe8, 0x20, 0, 0, 0, 0xff, 0xe0];
        let t = super::jump_targets(&code, 0x1850);
        assert_eq!(t, vec![0x1840, 0x185c + 0x10]);
    }

    use super::*;

    #[test]
    fn finds_call_and_riprel() {
        // call rel32 (+0x10); mov eax,[rip+0x20]; lea rdi,[rip-0x8]
        let code = [0xe8, 0x10, 0, 0, 0, 0x8b, 0x05, 0x20, 0, 0, 0, 0x48, 0x8d, 0x3d, 0xf8, 0xff, 0xff, 0xff];
        let refs = decode_refs(&code, 0x1000).unwrap();
        assert_eq!(refs.len(), 3, "{refs:?}");
        assert_eq!(refs[0].kind, RefKind::PcRel);
        assert!(refs[0].is_call);
        assert_eq!(refs[0].field_off, 1);
        assert_eq!(refs[0].target, 0x1005 + 0x10);
        assert_eq!(refs[1].field_off, 7);
        assert_eq!(refs[1].target, 0x100b + 0x20);
        assert!(refs[1].is_mem);
        assert_eq!(refs[2].target, 0x1012 - 8);
        assert!(refs[2].is_lea);
    }

    #[test]
    fn riprel_with_immediate_uses_instruction_end() {
        // cmp dword [rip+0x10], 5  (83 3d disp32 imm8)
        let code = [0x83, 0x3d, 0x10, 0, 0, 0, 0x05];
        let refs = decode_refs(&code, 0x2000).unwrap();
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].next_ip, 0x2007);
        assert_eq!(refs[0].target, 0x2007 + 0x10);
    }

    #[test]
    fn tls_and_absolute() {
        // mov eax, fs:[0xfffffffc] (64 8b 04 25 fc ff ff ff); mov edi, 0x402004 (bf 04 20 40 00)
        let code = [0x64, 0x8b, 0x04, 0x25, 0xfc, 0xff, 0xff, 0xff, 0xbf, 0x04, 0x20, 0x40, 0x00];
        let refs = decode_refs(&code, 0x401000).unwrap();
        assert_eq!(refs.len(), 2, "{refs:?}");
        assert_eq!(refs[0].kind, RefKind::TpOff32);
        assert_eq!(refs[0].target as i64, -4);
        assert_eq!(refs[1].kind, RefKind::Abs32);
        assert_eq!(refs[1].target, 0x402004);
        assert!(refs[1].maybe_number);
    }

    #[test]
    fn absolute_jump_table() {
        // jmp qword [rax*8 + 0x402010]  (ff 24 c5 10 20 40 00)
        let code = [0xff, 0x24, 0xc5, 0x10, 0x20, 0x40, 0x00];
        let refs = decode_refs(&code, 0x401000).unwrap();
        assert_eq!(refs.len(), 1);
        assert!(refs[0].jump_table);
        assert_eq!(refs[0].target, 0x402010);
    }

    #[test]
    fn short_branch_is_pcrel8() {
        let code = [0xeb, 0x02, 0x90, 0x90];
        let refs = decode_refs(&code, 0).unwrap();
        assert_eq!(refs[0].kind, RefKind::PcRel8);
        assert_eq!(refs[0].target, 4);
    }

    #[test]
    fn jump_encoding_roundtrip_and_reach() {
        let b = jmp_rel32(0x1000, 0x2000).unwrap();
        assert_eq!(decode_jmp_rel32(0x1000, &b), Some(0x2000));
        let b = jmp_rel32(0x2000, 0x1000).unwrap();
        assert_eq!(decode_jmp_rel32(0x2000, &b), Some(0x1000));
        assert!(jmp_rel32(0, 1 << 32).is_none());
    }

    #[test]
    fn invalid_code_is_an_error() {
        assert!(decode_refs(&[0x06], 0).is_err()); // push es: invalid in 64-bit mode
    }

    #[test]
    fn preserve_thunk_decodes_and_aligns() {
        use iced_x86::Formatter;
        let code = preserve_thunk(&[1, 2, 9], &[0, 12], 0x1000, 0x2000).unwrap();
        let mut d = Decoder::with_ip(64, &code, 0x1000, DecoderOptions::NONE);
        let mut f = iced_x86::NasmFormatter::new();
        let mut text = Vec::new();
        for i in d.iter() {
            let mut s = String::new();
            f.format(&i, &mut s);
            text.push(s);
            if i.mnemonic() == Mnemonic::Call {
                assert_eq!(i.near_branch_target(), 0x2000);
            }
        }
        assert_eq!(text.first().unwrap(), "push rcx");
        assert!(text.contains(&"sub rsp,20h".to_string()), "{text:?}"); // 3 pushes (odd): 32 bytes, no pad
        assert!(text.iter().any(|t| t.starts_with("movdqu [rsp+10h],xmm12")), "{text:?}");
        assert!(text.iter().any(|t| t.starts_with("movdqu xmm0,[rsp]")), "{text:?}");
        assert_eq!(&text[text.len() - 4..], &["pop r9", "pop rdx", "pop rcx", "ret"]);
        // Two pushes (even): 8 bytes of padding keep the call aligned.
        let code = preserve_thunk(&[1, 2], &[], 0, 0x100).unwrap();
        let text: Vec<_> = Decoder::with_ip(64, &code, 0, DecoderOptions::NONE).iter().map(|i| { let mut s = String::new(); f.format(&i, &mut s); s }).collect();
        assert_eq!(text[2], "sub rsp,8");
        assert!(preserve_thunk(&[], &[], 0, 1 << 40).is_none());
    }

    #[test]
    fn library_detour_moves_a_load() {
        use iced_x86::Formatter;
        // mov rdi, [rip+0x2e17] at 0x1222 (7 bytes): a load of a copy-relocated `stderr`.
        let insn = [0x48, 0x8b, 0x3d, 0x17, 0x2e, 0, 0];
        let code = library_detour(&insn, 0x1222, 0x9000, 0x9800, 0).unwrap();
        let mut f = iced_x86::NasmFormatter::new();
        let text: Vec<String> = Decoder::with_ip(64, &code, 0x9000, DecoderOptions::NONE)
            .iter()
            .map(|i| {
                let mut s = String::new();
                f.format(&i, &mut s);
                s
            })
            .collect();
        assert_eq!(text[0], "lea rsp,[rsp-80h]");
        assert_eq!(text[1], "push r11");
        assert_eq!(text[2], "mov r11,[rel 9800h]");
        assert_eq!(text[3], "mov rdi,[r11]");
        assert_eq!(text[4], "pop r11");
        assert_eq!(text[5], "lea rsp,[rsp+80h]");
        assert_eq!(text[6], "jmp 0000000000001229h");
        // A store with an offset, and a scratch register the instruction does not use.
        // mov [rip+0x10], r11d
        let insn = [0x44, 0x89, 0x1d, 0x10, 0, 0, 0];
        let code = library_detour(&insn, 0x1000, 0x9000, 0x9800, 8).unwrap();
        let text: Vec<String> = Decoder::with_ip(64, &code, 0x9000, DecoderOptions::NONE).iter().map(|i| { let mut s = String::new(); f.format(&i, &mut s); s }).collect();
        assert_eq!(text[1], "push r10");
        assert_eq!(text[3], "mov [r10+8],r11d");
        // push qword [rip+x] moves the stack: refused.
        assert!(library_detour(&[0xff, 0x35, 0, 0, 0, 0], 0x1000, 0x9000, 0x9800, 0).is_none());
    }

    #[test]
    fn short_jump_roundtrip_and_reach() {
        let b = jmp_rel8(0x1000, 0x1070).unwrap();
        assert_eq!(b, [0xeb, 0x6e]);
        assert_eq!(decode_jump(0x1000, &b), Some(0x1070));
        assert_eq!(decode_jump(0x1000, &jmp_rel8(0x1000, 0x0f90).unwrap()), Some(0x0f90));
        assert!(jmp_rel8(0x1000, 0x1000 + 2 + 128).is_none());
        assert!(jmp_rel8(0x1000, 0x1000 + 2 - 129).is_none());
        assert_eq!(decode_jump(0x1000, &jmp_rel32(0x1000, 0x5000).unwrap()), Some(0x5000));
    }

}
