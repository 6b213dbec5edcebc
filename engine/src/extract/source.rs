//! The changed set from the source: a unified diff (as `git diff`, quilt and Debian's
//! `debian/patches` write them) and the line table of NEW's DWARF.
//!
//! Every byte of machine code the compiler generated from a changed line carries that line in
//! `.debug_line`, wherever it ended up: in the function itself, in every function it was
//! inlined into (transitively), in `.cold`/`.part`/`.constprop`/`.isra` pieces. So the functions
//! to patch are exactly the functions holding code of changed lines. Machine-code differences
//! elsewhere are compiler choices (register allocation, inlining decisions, layout) and are not
//! patched.
use crate::elf::{ElfFile, SymKind};
use crate::error::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};

/// The lines one file of a unified diff changes, on the NEW side.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileChange {
    /// Path as the diff names it on the new side (`b/` and similar prefixes kept; matching
    /// tries shorter suffixes).
    pub path: String,
    /// New-side lines added or replaced.
    pub lines: BTreeSet<u32>,
}

/// Parse a unified diff. Text before the first `---`/`+++` pair (a quilt or DEP-3 header, a
/// commit message) is ignored. Deleted lines mark the new-side lines around the deletion, so
/// the function they were removed from counts as changed.
pub fn parse_unified_diff(text: &str) -> Result<Vec<FileChange>> {
    let mut out: Vec<FileChange> = Vec::new();
    let mut lines = text.lines().peekable();
    let mut cur: Option<FileChange> = None;
    let (mut new_line, mut old_left, mut new_left) = (0u32, 0u32, 0u32);
    while let Some(l) = lines.next() {
        if old_left == 0 && new_left == 0 {
            if l.starts_with("--- ") && lines.peek().is_some_and(|n| n.starts_with("+++ ")) {
                let plus = lines.next().unwrap();
                if let Some(c) = cur.take() {
                    out.push(c);
                }
                let path = plus[4..].split('\t').next().unwrap_or("").trim().to_string();
                cur = (path != "/dev/null").then(|| FileChange { path, lines: BTreeSet::new() });
                continue;
            }
            if let Some(h) = l.strip_prefix("@@ ") {
                let (o, n) = parse_hunk_header(h).ok_or_else(|| Error::Other(format!("source diff: malformed hunk header `{l}`")))?;
                new_line = n.0;
                old_left = o.1;
                new_left = n.1;
                continue;
            }
            continue;
        }
        let Some(c) = cur.as_mut() else {
            // A hunk of a deleted file: skip its lines.
            match l.as_bytes().first() {
                Some(b'-') => old_left = old_left.saturating_sub(1),
                Some(b'+') => new_left = new_left.saturating_sub(1),
                Some(b'\\') => {}
                _ => {
                    old_left = old_left.saturating_sub(1);
                    new_left = new_left.saturating_sub(1)
                }
            }
            continue;
        };
        match l.as_bytes().first() {
            Some(b'+') => {
                c.lines.insert(new_line);
                new_line += 1;
                new_left = new_left.saturating_sub(1);
            }
            Some(b'-') => {
                // The removed code sat between new lines new_line-1 and new_line.
                if new_line > 1 {
                    c.lines.insert(new_line - 1);
                }
                c.lines.insert(new_line);
                old_left = old_left.saturating_sub(1);
            }
            Some(b'\\') => {}
            _ => {
                new_line += 1;
                old_left = old_left.saturating_sub(1);
                new_left = new_left.saturating_sub(1);
            }
        }
    }
    if let Some(c) = cur.take() {
        out.push(c);
    }
    out.retain(|c| !c.lines.is_empty());
    if out.is_empty() {
        return Err(Error::Other("source diff: no changed lines found (is it a unified diff?)".into()));
    }
    Ok(out)
}

/// `-a,b +c,d @@ ...` -> ((a, b), (c, d)); a missing count is 1.
fn parse_hunk_header(h: &str) -> Option<((u32, u32), (u32, u32))> {
    let mut it = h.split_whitespace();
    let range = |s: &str| -> Option<(u32, u32)> {
        let mut p = s.splitn(2, ',');
        let start = p.next()?.parse().ok()?;
        let count = match p.next() {
            Some(c) => c.parse().ok()?,
            None => 1,
        };
        Some((start, count))
    };
    let o = range(it.next()?.strip_prefix('-')?)?;
    let n = range(it.next()?.strip_prefix('+')?)?;
    Some((o, n))
}

/// Why a function is in the changed set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LineHit {
    /// Source file as the line table names it.
    pub file: String,
    pub line: u32,
}

/// What the source diff says about NEW's functions.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SourceChanges {
    /// Function (NEW symbol address) -> the first changed line found in its code, and whether
    /// that line belongs to another function inlined there.
    pub functions: BTreeMap<u64, LineHit>,
    /// Changed lines that produced no code at all (macros, declarations, types, comments).
    pub lines_without_code: Vec<LineHit>,
    /// Files of the diff the line table does not know (not compiled into NEW).
    pub files_not_compiled: Vec<String>,
}

/// Map the diff onto NEW's code through its line table (in NEW itself or in `debug`, a
/// separate debug file of the same build).
pub fn changed_functions(new: &ElfFile, debug: Option<&ElfFile>, diff: &[FileChange]) -> Result<SourceChanges> {
    let dbg = debug.unwrap_or(new);
    if !dbg.sections.iter().any(|s| s.name == ".debug_line") {
        return Err(Error::Elf {
            path: dbg.path.clone(),
            msg: "has no .debug_line: a source diff needs the debug info of the new build (build with -g, or pass its separate debug file with --debug-file)".into(),
        });
    }
    if dbg.sections.iter().any(|s| s.name.starts_with(".debug_") && s.flags & u64::from(goblin::elf::section_header::SHF_COMPRESSED) != 0) {
        return Err(Error::Elf { path: dbg.path.clone(), msg: "has compressed debug sections; decompress them first (objcopy --decompress-debug-sections)".into() });
    }
    let sections = dbg.dwarf_sections()?;
    let dwarf = sections.borrow(|s| gimli::EndianSlice::new(s, gimli::LittleEndian));
    let mut out = SourceChanges::default();
    // (diff file index, line) -> produced code somewhere
    let mut seen_lines: BTreeSet<(usize, u32)> = BTreeSet::new();
    let mut matched_files: BTreeSet<usize> = BTreeSet::new();
    let mut path_cache: BTreeMap<String, Option<usize>> = BTreeMap::new();
    let mut units = dwarf.units();
    while let Some(header) = units.next().map_err(|e| dwarf_err(dbg, e))? {
        let unit = dwarf.unit(header).map_err(|e| dwarf_err(dbg, e))?;
        let Some(program) = unit.line_program.clone() else { continue };
        let comp_dir = unit.comp_dir.map(|d| d.to_string_lossy().into_owned()).unwrap_or_default();
        let mut rows = program.rows();
        while let Some((header, row)) = rows.next_row().map_err(|e| dwarf_err(dbg, e))? {
            if row.end_sequence() {
                continue;
            }
            let Some(line) = row.line().map(|l| l.get() as u32) else { continue };
            let Some(file) = row.file(header) else { continue };
            let mut path = String::new();
            if let Some(dir) = file.directory(header) {
                if let Ok(d) = dwarf.attr_string(&unit, dir) {
                    path.push_str(&d.to_string_lossy());
                }
            }
            if let Ok(n) = dwarf.attr_string(&unit, file.path_name()) {
                let n = n.to_string_lossy();
                if n.starts_with('/') {
                    path = n.into_owned();
                } else {
                    if !path.is_empty() && !path.ends_with('/') {
                        path.push('/');
                    }
                    path.push_str(&n);
                }
            }
            if !path.starts_with('/') && !comp_dir.is_empty() {
                path = format!("{comp_dir}/{path}");
            }
            let idx = *path_cache.entry(path.clone()).or_insert_with(|| match_file(&path, diff));
            let Some(i) = idx else { continue };
            matched_files.insert(i);
            if !diff[i].lines.contains(&line) {
                continue;
            }
            seen_lines.insert((i, line));
            let addr = row.address();
            if let Some(f) = new.symbol_at(addr).filter(|s| s.kind == SymKind::Func) {
                out.functions.entry(f.addr).or_insert(LineHit { file: diff[i].path.clone(), line });
            }
        }
    }
    for (i, fc) in diff.iter().enumerate() {
        if !matched_files.contains(&i) {
            out.files_not_compiled.push(fc.path.clone());
            continue;
        }
        for &l in &fc.lines {
            if !seen_lines.contains(&(i, l)) {
                out.lines_without_code.push(LineHit { file: fc.path.clone(), line: l });
            }
        }
    }
    Ok(out)
}

fn dwarf_err(elf: &ElfFile, e: gimli::Error) -> Error {
    Error::Elf { path: elf.path.clone(), msg: format!("cannot read DWARF: {e}") }
}

/// Which diff file a line-table path is: the diff path, or the diff path without its first
/// components (`a/`, `b/`, `nginx-1.22.1/`, another machine's checkout), is a component-wise
/// suffix of it; the longest such match wins.
fn match_file(path: &str, diff: &[FileChange]) -> Option<usize> {
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    let mut best: Option<(usize, usize)> = None; // (index, matched components)
    for (i, fc) in diff.iter().enumerate() {
        let d: Vec<&str> = fc.path.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
        for skip in 0..d.len() {
            let suffix = &d[skip..];
            // A bare file name matches only when the diff names little more (`a/x.c`).
            if suffix.len() < 2 && d.len() > 2 {
                break;
            }
            if suffix.len() <= comps.len() && comps[comps.len() - suffix.len()..] == *suffix {
                if best.is_none_or(|(_, n)| suffix.len() > n) {
                    best = Some((i, suffix.len()));
                }
                break;
            }
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUILT: &str = "Description: fix an overflow\nAuthor: someone\n---\n\n--- a/src/core/parse.c\n+++ b/src/core/parse.c\n@@ -10,6 +10,7 @@ int parse(char *p)\n     int n = 0;\n \n-    while (*p) {\n+    while (*p && n < 16) {\n+        check(n);\n         n++;\n     }\n     return n;\n@@ -40,4 +41,3 @@ void other(void)\n {\n-    legacy();\n     done();\n }\n";

    #[test]
    fn quilt_patch_lines() {
        let d = parse_unified_diff(QUILT).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].path, "b/src/core/parse.c");
        // replaced line 12 -> new 12,13; the deletion in the second hunk sits between new 41 and 42 (`{` and `done();`)
        let want: BTreeSet<u32> = [11, 12, 13, 41, 42].into_iter().collect();
        assert_eq!(d[0].lines, want, "{:?}", d[0].lines);
    }

    #[test]
    fn git_diff_two_files_and_new_file() {
        let t = "diff --git a/x.c b/x.c\nindex 1..2 100644\n--- a/x.c\n+++ b/x.c\n@@ -1 +1 @@\n-a\n+b\ndiff --git a/y.c b/y.c\nnew file mode 100644\n--- /dev/null\n+++ b/y.c\n@@ -0,0 +1,2 @@\n+int y;\n+int z;\n";
        let d = parse_unified_diff(t).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].lines.iter().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(d[1].path, "b/y.c");
        assert_eq!(d[1].lines.iter().copied().collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn not_a_diff() {
        assert!(parse_unified_diff("hello\nworld\n").is_err());
        assert!(parse_unified_diff("--- a/x\n+++ b/x\n@@ bogus @@\n").is_err());
    }

    #[test]
    fn a_line_starting_with_dashes_inside_a_hunk_is_content() {
        let t = "--- a/x.c\n+++ b/x.c\n@@ -1,2 +1,2 @@\n--- old comment\n+++ new comment\n ctx\n";
        let d = parse_unified_diff(t).unwrap();
        assert_eq!(d[0].lines.iter().copied().collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn file_matching_strips_prefixes() {
        let d = vec![
            FileChange { path: "b/src/http/parse.c".into(), lines: [1].into() },
            FileChange { path: "nginx-1.22/src/core/parse.c".into(), lines: [1].into() },
        ];
        assert_eq!(match_file("/build/nginx/src/http/parse.c", &d), Some(0));
        assert_eq!(match_file("/build/nginx/src/core/parse.c", &d), Some(1));
        assert_eq!(match_file("/build/nginx/src/event/parse.c", &d), None);
        assert_eq!(match_file("/usr/include/stdio.h", &d), None);
    }
}
