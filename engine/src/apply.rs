//! Apply: the whole sequence for one process, in order: check the target, fix up and map the
//! region (the target keeps running), then stop it, make sure no old code is active, write the
//! jumps and let it go. Any failure leaves the target on its previous code and unstopped;
//! the region is unmapped.
use crate::arch::x86_64::{JUMP_LEN, SHORT_JUMP_LEN};
use crate::bundle::{Bundle, FunctionKind};
use crate::error::{Error, RefusalKind, Result};
use crate::fixup::{self, Layout};
use crate::jump::{Jumps, Site};
use crate::map;
use crate::process::{Lock, MemoryReader, ProcMem, Process};
use crate::ptrace::{Gadgets, Stopped};
use crate::region::{CodeRange, Entry, Header, RegValue, SiteRecord};
use crate::status::{self, Applied};
use crate::unwind::Modules;
use crate::watchpoint::{self, Frames, Guarded, Resume, Strategy, View};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Options {
    pub strategy: Strategy,
    pub timeout: Duration,
    pub frames: Frames,
}

impl Default for Options {
    fn default() -> Self {
        Options { strategy: Strategy::default(), timeout: Duration::from_secs(30), frames: Frames::default() }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub pid: i32,
    pub patch_id: String,
    pub functions: Vec<String>,
    /// How long every thread of the target was stopped for the switch (microseconds).
    pub pause_us: u64,
    pub strategy: Strategy,
    pub attempts: u32,
    pub waited_ms: u64,
    /// Time to map the region (one thread held for the injected system calls).
    pub map_us: u64,
    pub total_ms: u64,
    pub region: String,
    pub already_applied: bool,
    pub stacked: usize,
    pub restart_recommended: bool,
    /// Frames of old functions stopped at return sites, moved to the new code.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub switched_frames: Vec<watchpoint::FrameSwitch>,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Apply `bundle` to process `pid`.
pub fn apply(pid: i32, bundle: &Bundle, opts: &Options) -> Result<Report> {
    let t0 = Instant::now();
    let proc = Process::open(pid)?;
    let _lock = Lock::take(&proc)?;
    let exe = proc.exe()?;
    let m = &bundle.manifest;
    let running = exe.build_id_hex().unwrap_or_else(|| "none".into());
    if running != m.target.build_id {
        return Err(Error::BuildIdMismatch { pid, expected: m.target.build_id.clone(), found: running });
    }
    if let Some(reason) = &m.refusal {
        return Err(Error::Refused {
            kind: m.refusal_kind.unwrap_or(RefusalKind::Recorded),
            reason: format!("{reason} (recorded when the bundle was built)"),
            restart_required: true,
        });
    }
    let mem = ProcMem::open(pid)?;
    let maps = proc.maps()?;
    let bias = proc.exe_bias(&exe, &maps)?;
    let (applied, _) = status::applied(&mem, &maps);
    let patch_id = bundle.patch_id();
    let functions: Vec<String> = m.functions.iter().filter(|f| f.has_entry_jump()).map(|f| f.name.clone()).collect();
    let live: Vec<&Applied> = applied.iter().filter(|a| !a.orphan).collect();
    // A livepatch process that died between two jumps leaves a patch only partly switched:
    // neither "already applied" nor a base to stack on. Revert repairs it.
    if let Some(a) = live.iter().find(|a| status::partly_switched(&mem, a)) {
        return Err(Error::Other(format!(
            "patch {} is only partly switched in process {pid} (a livepatch process died while writing its jumps); run `livepatch revert --pid {pid} --all` to restore the original code, then apply again",
            a.header.patch_id
        )));
    }
    if live.iter().any(|a| a.header.patch_id == patch_id) {
        return Ok(Report {
            pid,
            patch_id,
            functions,
            pause_us: 0,
            strategy: opts.strategy,
            attempts: 0,
            waited_ms: 0,
            map_us: 0,
            total_ms: ms(t0.elapsed()),
            region: String::new(),
            already_applied: true,
            stacked: live.len(),
            restart_recommended: live.len() > status::STACK_LIMIT,
            switched_frames: Vec::new(),
        });
    }
    // Leftovers of a tool that died between map and jump are unreachable: remove them.
    let gadget = map::find_gadgets(&mem, &maps)?;
    for a in applied.iter().filter(|a| a.orphan) {
        let _ = map::unmap(pid, gadget, a.mapping.start, a.mapping.end - a.mapping.start);
    }
    let _ = map::close_leaked_memfds(pid, gadget);

    // Check the live old code against the bundle and note what each entry holds now.
    // (function, entry, original bytes, current bytes, short jump to a trampoline)
    let mut entries = Vec::new();
    // What an entry held before any patch: an earlier patch's header knows, else it is what is there.
    let original_at = |at: u64, current: &[u8]| -> Vec<u8> {
        live.iter()
            .find_map(|a| a.header.entries.iter().find(|e| e.entry == at).and_then(|e| hex::decode(&e.original).ok()))
            .unwrap_or_else(|| current.to_vec())
    };
    for f in &m.functions {
        let Some(old_svma) = f.old_svma else { continue };
        let at = old_svma.checked_add(bias).ok_or_else(|| Error::Bundle("old address overflows".into()))?;
        let mut live_code = mem.read_vec(at, f.old_size as usize)?;
        let width = if f.trampoline.is_some() { SHORT_JUMP_LEN } else { JUMP_LEN };
        let current = mem.read_vec(at, width)?;
        // The entry may carry an earlier patch's jump: compare with its original bytes.
        let original = original_at(at, &current);
        let n = live_code.len().min(original.len());
        live_code[..n].copy_from_slice(&original[..n]);
        if Some(hex::encode(Sha256::digest(&live_code))) != f.old_digest {
            return Err(Error::Refused {
                kind: RefusalKind::CodeMismatch,
                reason: format!(
                    "the code of `{}` in process {pid} differs from the executable the bundle was built against (digest mismatch); the bundle does not fit this process",
                    f.name
                ),
                restart_required: false,
            });
        }
        if f.has_entry_jump() {
            if let Some(t) = f.trampoline {
                // The trampoline's 5-byte jump first: padding no thread runs, then the entry.
                let t = t.checked_add(bias).ok_or_else(|| Error::Bundle("trampoline address overflows".into()))?;
                let t_current = mem.read_vec(t, JUMP_LEN)?;
                entries.push((f, t, original_at(t, &t_current), t_current, false));
            }
            entries.push((f, at, original, current, f.trampoline.is_some()));
        }
    }

    // Lay out and fix up the region.
    let mut layout = Layout::new(bundle, bias);
    let (lo, hi) = exe.image_range();
    let addr = map::choose_address(&maps, lo.wrapping_add(bias), hi.wrapping_add(bias), layout.len, !exe.pie).ok_or_else(|| Error::Process {
        pid,
        msg: format!("no free address range of {} bytes within reach of the executable's code", layout.len),
    })?;
    layout.place(addr);
    let imports = resolve_imports(&proc, &mem, &maps, &exe_inode(&proc)?, gadget, &layout)?;
    let mut image = fixup::build_image(bundle, &layout, &imports)?;
    let seq = live.iter().map(|a| a.header.seq).max().unwrap_or(0) + 1;
    let header = Header {
        patch_id: patch_id.clone(),
        bundle_sha256: bundle.digest.clone(),
        build_id: m.target.build_id.clone(),
        applied_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        seq,
        base: layout.base,
        len: layout.len,
        entries: entries
            .iter()
            .map(|(f, at, original, current, short)| Entry {
                name: f.name.clone(),
                entry: *at,
                // A short entry jumps to its trampoline, which jumps to the new code.
                target: match (short, f.trampoline) {
                    (true, Some(t)) => t.wrapping_add(bias),
                    _ => layout.entry_target(f),
                },
                original: hex::encode(original),
                previous: hex::encode(current),
                old_start: f.old_svma.unwrap_or(0).wrapping_add(bias),
                old_len: f.old_size,
                short: *short,
            })
            .collect(),
        code: m
            .functions
            .iter()
            .map(|f| CodeRange { name: f.name.clone(), start: layout.mirror(f.new_svma), len: f.new_size })
            .chain(layout.thunk_ranges().map(|(n, start, len)| CodeRange { name: n.to_string(), start, len }))
            .collect(),
        return_sites: m
            .functions
            .iter()
            .filter(|f| f.has_entry_jump())
            .flat_map(|f| f.return_sites.iter().map(move |r| (f, r)))
            .filter_map(|(f, r)| {
                // Constants for the frame's registers: from the fixed-up new code in the image,
                // and (for a switch back) from the old code in the process.
                let in_image = |svma: u64| {
                    let ip = layout.mirror(svma);
                    let off = ip.checked_sub(layout.base)? as usize;
                    crate::arch::x86_64::constant_of(image.get(off..(off + 15).min(image.len()))?, ip)
                };
                let in_old = |svma: u64| {
                    let ip = svma.checked_add(bias)?;
                    crate::arch::x86_64::constant_of(&mem.read_vec(ip, 15).ok()?, ip)
                };
                let values = |sets: &[crate::bundle::RegFromCode], at: &dyn Fn(u64) -> Option<u64>| -> Option<Vec<RegValue>> {
                    sets.iter().map(|s| Some(RegValue { reg: s.reg, value: at(s.at)? })).collect()
                };
                let sets = values(&r.sets, &in_image)?;
                let back_sets = if r.back { values(&r.back_sets, &in_old) } else { None };
                Some(SiteRecord {
                    name: f.name.clone(),
                    old: r.old.checked_add(bias)?,
                    new: layout.mirror(r.new?),
                    back: back_sets.is_some(),
                    sets,
                    back_sets: back_sets.unwrap_or_default(),
                })
            })
            .collect(),
        switched: Vec::new(),
        switched_unrecorded: 0,
    };
    let enc = header.encode();
    if enc.len() as u64 > layout.header_len {
        return Err(Error::Other("patch region header does not fit its reserved space".into()));
    }
    image[..enc.len()].copy_from_slice(&enc);
    let sites: Vec<Site> = header
        .entries
        .iter()
        .map(|e| {
            let write = e.jump().ok_or_else(|| Error::Other(format!("`{}`: new code out of jump range", e.name)))?;
            Ok(Site { name: format!("the entry of `{}`", e.name), at: e.entry, expect: hex::decode(&e.previous).expect("hex we wrote"), write })
        })
        .collect::<Result<_>>()?;

    // Map. From here on, dropping `region` unmaps it.
    let tm = Instant::now();
    let region = map::map_region(&proc, &mem, &maps, gadget, &format!("{}{patch_id}", crate::region::NAME_PREFIX), addr, &image)?;
    let map_us = tm.elapsed().as_micros() as u64;
    crate::fault::point("mapped");

    // What must not be active: the old functions (the jump's bytes included) and any copies
    // of them that earlier patches carry.
    // A frame stopped at a proven return site of an old function is switched to the new code
    // instead (functions that never return).
    let mut guarded = Vec::new();
    for f in m.functions.iter().filter(|f| f.kind != FunctionKind::Added) {
        let at = f.old_svma.unwrap() + bias;
        let end = at + f.old_size.max(f.entry_jump_len() as u64);
        let mut g = Guarded::new(f.name.clone(), at, end);
        if opts.frames == Frames::Switch {
            g.switch = header.return_sites.iter().filter(|r| r.name == f.name).map(|r| (r.old, Resume { at: r.new, sets: r.sets.clone() })).collect();
        }
        g.stuck = f.return_sites.iter().filter_map(|r| Some((r.old.checked_add(bias)?, r.why.clone()?))).collect();
        guarded.push(g);
        for a in &live {
            for c in a.header.code.iter().filter(|c| c.name == f.name) {
                guarded.push(Guarded::new(format!("{} (patch {})", f.name, a.header.patch_id), c.start, c.start + c.len));
            }
        }
    }
    let maps_now = proc.maps()?;
    let modules = Modules::load(pid, &maps_now, &mem);
    let view = View { proc: &proc, mem: &mem, maps: &maps_now, modules: &modules };
    let watchpoint::Quiet { stopped, attempts, waited } = watchpoint::until_inactive(&view, opts.strategy, &guarded, &header.entries, opts.timeout)?;
    // The wait strategy lets the process run untraced between two checks: had it called exec
    // meanwhile, the entries would belong to another program and the region would be gone.
    if !proc.maps()?.iter().any(|m| m.start == region.base && m.path.contains(&patch_id)) {
        return Err(Error::Process { pid, msg: "called exec during the operation (the patch region is gone); it runs another program now".into() });
    }
    let switched = watchpoint::frames_to_switch(&view, &stopped, &guarded)?;
    crate::fault::point("stopped");
    let jumps = Jumps::write(&mem, &sites)?;
    // Frames at proven return sites: their return addresses now lead into the new code.
    let frames = watchpoint::frames::FrameWrites::write(&mem, &stopped, &switched)?;
    if !switched.is_empty() {
        crate::fault::point("frames-switched");
        record_switched(&region, header.clone(), &switched, layout.header_len)?;
    }
    // Last, as nothing undoes it: threads held at an entry go straight to the new code.
    if opts.strategy == Strategy::Trap {
        watchpoint::trap::move_held_threads(&stopped, &header.entries)?;
    }
    jumps.commit();
    frames.commit();
    let since = stopped.since();
    stopped.detach();
    let pause_us = since.elapsed().as_micros() as u64;
    region.commit();
    let stacked = live.len() + 1;
    Ok(Report {
        pid,
        patch_id,
        functions,
        pause_us,
        strategy: opts.strategy,
        attempts,
        waited_ms: ms(waited),
        map_us,
        total_ms: ms(t0.elapsed()),
        region: format!("{:#x}-{:#x}", layout.base, layout.base + layout.len),
        already_applied: false,
        stacked,
        restart_recommended: stacked > status::STACK_LIMIT,
        switched_frames: switched,
    })
}

/// Add the switched frames to the region's header (for `status`), as many as its room holds.
fn record_switched(region: &map::MappedRegion, mut header: Header, switched: &[watchpoint::FrameSwitch], room: u64) -> Result<()> {
    header.switched = switched.to_vec();
    loop {
        let enc = header.encode();
        if enc.len() as u64 <= room {
            return region.rewrite(0, &enc);
        }
        if header.switched.pop().is_none() {
            return Err(Error::Other("patch region header does not fit its reserved space".into()));
        }
        header.switched_unrecorded += 1;
    }
}

fn exe_inode(proc: &Process) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(proc.exe_path()).map_err(|e| crate::process::proc_err(proc.pid, "stat its executable", e))?.ino())
}

/// Live addresses of the dynamic symbols the new code needs and OLD never linked.
fn resolve_imports(proc: &Process, mem: &ProcMem, maps: &[crate::process::Mapping], exe_ino: &u64, gadget: Gadgets, layout: &Layout) -> Result<HashMap<String, u64>> {
    let mut out = HashMap::new();
    for name in layout.imports() {
        if out.contains_key(name) {
            continue;
        }
        let s = fixup::find_live_symbol(proc.pid, maps, *exe_ino, name).ok_or_else(|| {
            Error::refused_kind(RefusalKind::MissingSymbol, format!("the new code calls `{name}`, which no library loaded in process {} defines", proc.pid))
        })?;
        let addr = if s.ifunc {
            // An indirect function: ask its resolver, in the target, for the implementation.
            let tid = proc.pid;
            let mut t = Stopped::one(proc, tid, Duration::from_secs(5))?;
            let a = t.call(tid, gadget, s.addr, [0; 6])?;
            drop(t);
            if a == 0 || mem.read_vec(a, 1).is_err() {
                return Err(Error::Process { pid: proc.pid, msg: format!("resolver of `{name}` returned {a:#x}") });
            }
            a
        } else {
            s.addr
        };
        out.insert(name.to_string(), addr);
    }
    Ok(out)
}
