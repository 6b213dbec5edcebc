//! Layouts of the program's own types (structs, unions, classes) from DWARF, compared between
//! OLD and NEW: objects of a type whose layout changed may already live in the process (on the
//! heap, on stacks, in globals), and new code would read them with the new offsets. Such a
//! change cannot be applied live.
use crate::elf::ElfFile;
use crate::error::{Error, Result};
use gimli::{AttributeValue, DwTag};
use std::collections::{BTreeMap, BTreeSet};

/// One aggregate type's layout, as text: size, then every member as `name@offset:size`.
type Layout = String;

/// Type name (`struct foo`, `union bar`, `typedef baz` for an anonymous aggregate) -> the
/// layouts it has across compilation units (two units may define different types of one name).
#[derive(Debug, Default)]
pub struct Layouts(BTreeMap<String, BTreeSet<Layout>>);

/// A type whose layout differs between OLD and NEW.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TypeChange {
    pub name: String,
    /// What differs, briefly: the size, members added, removed or moved.
    pub summary: String,
    pub old: Vec<String>,
    pub new: Vec<String>,
}

/// `size 8, a@0:4, b@4:4` vs `size 16, a@0:4, c@4:4, b@8:4` -> `size 8 -> 16; c added; b moved @4 -> @8`.
fn summarise(old: &str, new: &str) -> String {
    let parse = |l: &str| -> (String, Vec<(String, String)>) {
        let mut it = l.split(", ");
        let size = it.next().unwrap_or("").trim_start_matches("size ").to_string();
        (size, it.map(|m| match m.split_once('@') { Some((n, r)) => (n.to_string(), r.to_string()), None => (m.to_string(), String::new()) }).collect())
    };
    let (os, om) = parse(old);
    let (ns, nm) = parse(new);
    let mut out = Vec::new();
    if os != ns {
        out.push(format!("size {os} -> {ns} bytes"));
    }
    for (n, at) in &nm {
        match om.iter().find(|(o, _)| o == n) {
            None => out.push(format!("member `{n}` added (@{at})")),
            Some((_, oat)) if oat != at => out.push(format!("member `{n}` @{oat} -> @{at}")),
            _ => {}
        }
    }
    for (n, _) in &om {
        if !nm.iter().any(|(m, _)| m == n) {
            out.push(format!("member `{n}` removed"));
        }
    }
    if out.len() > 4 {
        let more = out.len() - 4;
        out.truncate(4);
        out.push(format!("{more} more"));
    }
    out.join("; ")
}

/// The aggregate layouts of `elf`'s debug info; `None` when it has none.
pub fn layouts(elf: &ElfFile) -> Result<Option<Layouts>> {
    if elf.section(".debug_info").is_none_or(|s| !s.has_bits()) {
        return Ok(None);
    }
    let err = |e: gimli::Error| Error::Elf { path: elf.path.clone(), msg: format!("cannot read DWARF types: {e}") };
    let sections = elf.dwarf_sections()?;
    let dwarf = sections.borrow(|s| gimli::EndianSlice::new(s, gimli::LittleEndian));
    let mut out = Layouts::default();
    let mut units = dwarf.units();
    while let Some(header) = units.next().map_err(err)? {
        let unit = dwarf.unit(header).map_err(err)?;
        let mut tree = unit.entries_tree(None).map_err(err)?;
        let root = tree.root().map_err(err)?;
        collect(&dwarf, &unit, root, &mut out).map_err(err)?;
    }
    Ok(Some(out))
}

type R<'a> = gimli::EndianSlice<'a, gimli::LittleEndian>;

fn collect<'a>(dwarf: &gimli::Dwarf<R<'a>>, unit: &gimli::Unit<R<'a>>, node: gimli::EntriesTreeNode<'_, '_, R<'a>>, out: &mut Layouts) -> gimli::Result<()> {
    let mut children = node.children();
    while let Some(child) = children.next()? {
        let e = child.entry();
        let tag = e.tag();
        if is_aggregate(tag) {
            if let Some(name) = name_of(dwarf, unit, e)? {
                if let Some(l) = layout_at(dwarf, unit, e.offset())? {
                    out.0.entry(format!("{} {name}", kind(tag))).or_default().insert(l);
                }
            }
        } else if tag == gimli::DW_TAG_typedef {
            // `typedef struct { ... } name_t;`: the aggregate has no name of its own.
            if let (Some(name), Some(AttributeValue::UnitRef(off))) = (name_of(dwarf, unit, e)?, e.attr_value(gimli::DW_AT_type)) {
                let target = unit.entry(off)?;
                if is_aggregate(target.tag()) && target.attr(gimli::DW_AT_name).is_none() {
                    if let Some(l) = layout_at(dwarf, unit, off)? {
                        out.0.entry(format!("typedef {name}")).or_default().insert(l);
                    }
                }
            }
        }
        // Types nested in namespaces, classes or functions.
        if matches!(tag, gimli::DW_TAG_namespace | gimli::DW_TAG_structure_type | gimli::DW_TAG_class_type | gimli::DW_TAG_subprogram | gimli::DW_TAG_lexical_block) {
            collect(dwarf, unit, child, out)?;
        }
    }
    Ok(())
}

fn is_aggregate(t: DwTag) -> bool {
    matches!(t, gimli::DW_TAG_structure_type | gimli::DW_TAG_union_type | gimli::DW_TAG_class_type)
}

fn kind(t: DwTag) -> &'static str {
    match t {
        gimli::DW_TAG_union_type => "union",
        gimli::DW_TAG_class_type => "class",
        _ => "struct",
    }
}

fn name_of<'a>(dwarf: &gimli::Dwarf<R<'a>>, unit: &gimli::Unit<R<'a>>, e: &gimli::DebuggingInformationEntry<R<'a>>) -> gimli::Result<Option<String>> {
    match e.attr_value(gimli::DW_AT_name) {
        Some(v) => Ok(Some(dwarf.attr_string(unit, v)?.to_string_lossy().into_owned())),
        None => Ok(None),
    }
}

/// The layout of the aggregate at `off`, or `None` for a declaration without a body.
fn layout_at<'a>(dwarf: &gimli::Dwarf<R<'a>>, unit: &gimli::Unit<R<'a>>, off: gimli::UnitOffset) -> gimli::Result<Option<Layout>> {
    let mut tree = unit.entries_tree(Some(off))?;
    let root = tree.root()?;
    let e = root.entry();
    if matches!(e.attr_value(gimli::DW_AT_declaration), Some(AttributeValue::Flag(true))) {
        return Ok(None);
    }
    let size = e.attr_value(gimli::DW_AT_byte_size).and_then(|v| v.udata_value()).unwrap_or(0);
    let mut text = format!("size {size}");
    let mut children = root.children();
    while let Some(c) = children.next()? {
        let m = c.entry();
        if m.tag() != gimli::DW_TAG_member && m.tag() != gimli::DW_TAG_inheritance {
            continue;
        }
        let name = name_of(dwarf, unit, m)?.unwrap_or_else(|| "<anon>".into());
        let at = match m.attr_value(gimli::DW_AT_data_member_location) {
            Some(v) => v.udata_value().map(|o| o * 8),
            None => m.attr_value(gimli::DW_AT_data_bit_offset).and_then(|v| v.udata_value()),
        }
        .unwrap_or(0);
        let bits = m.attr_value(gimli::DW_AT_bit_size).and_then(|v| v.udata_value());
        let msize = match m.attr_value(gimli::DW_AT_type) {
            Some(AttributeValue::UnitRef(t)) => type_size(unit, t, 0)?,
            _ => None,
        };
        text.push_str(&format!(", {name}@{}{}", at / 8, if at % 8 != 0 || bits.is_some() { format!(".{}:{}b", at % 8, bits.unwrap_or(0)) } else { String::new() }));
        if let Some(s) = msize {
            text.push_str(&format!(":{s}"));
        }
    }
    Ok(Some(text))
}

/// Byte size of a type, through typedefs and qualifiers.
fn type_size<'a>(unit: &gimli::Unit<R<'a>>, off: gimli::UnitOffset, depth: usize) -> gimli::Result<Option<u64>> {
    if depth > 16 {
        return Ok(None);
    }
    let e = unit.entry(off)?;
    if let Some(s) = e.attr_value(gimli::DW_AT_byte_size).and_then(|v| v.udata_value()) {
        return Ok(Some(s));
    }
    match (e.tag(), e.attr_value(gimli::DW_AT_type)) {
        (gimli::DW_TAG_typedef | gimli::DW_TAG_const_type | gimli::DW_TAG_volatile_type | gimli::DW_TAG_restrict_type, Some(AttributeValue::UnitRef(t))) => {
            type_size(unit, t, depth + 1)
        }
        _ => Ok(None),
    }
}

/// Types defined in both whose layouts differ.
pub fn changed(old: &Layouts, new: &Layouts) -> Vec<TypeChange> {
    new.0
        .iter()
        .filter_map(|(name, nl)| {
            let ol = old.0.get(name)?;
            (ol != nl).then(|| {
                let old: Vec<String> = ol.difference(nl).cloned().collect();
                let new: Vec<String> = nl.difference(ol).cloned().collect();
                let summary = match (old.as_slice(), new.as_slice()) {
                    ([o], [n]) => summarise(o, n),
                    _ => format!("{} layout(s) only in OLD, {} only in NEW", old.len(), new.len()),
                };
                TypeChange { name: name.clone(), summary, old, new }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_what_moved() {
        assert_eq!(summarise("size 8, a@0:4, b@4:4", "size 16, a@0:4, c@4:4, b@8:4"), "size 8 -> 16 bytes; member `c` added (@4:4); member `b` @4:4 -> @8:4");
        assert_eq!(summarise("size 8, a@0:4, b@4:4", "size 8, a@0:4, b@4:2"), "member `b` @4:4 -> @4:2");
        assert_eq!(summarise("size 8, a@0:4, b@4:4", "size 4, a@0:4"), "size 8 -> 4 bytes; member `b` removed");
    }
}
