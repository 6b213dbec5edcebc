//! Writes the CRD YAML generated from the `livepatch-api` types into `crds/` and
//! `charts/livepatch/crds/`.
//!
//! `crdgen [--root DIR]` writes the files; `crdgen --check [--root DIR]` only reports stale files
//! and exits 1 if there is any; `crdgen --stdout` prints both CRDs.

use std::path::PathBuf;
use std::process::ExitCode;

use livepatch_operator::crdgen;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut root = crdgen::workspace_root();
    let mut check = false;
    let mut stdout = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--check" => check = true,
            "--stdout" => stdout = true,
            "--root" => match args.next() {
                Some(dir) => root = PathBuf::from(dir),
                None => return usage(),
            },
            _ => return usage(),
        }
    }
    if stdout {
        for (_, yaml) in crdgen::render() {
            print!("{yaml}");
        }
        return ExitCode::SUCCESS;
    }
    if check {
        let stale = crdgen::stale(&root);
        for path in &stale {
            eprintln!("stale: {}", path.display());
        }
        return if stale.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    match crdgen::write(&root) {
        Ok(paths) => {
            for path in paths {
                println!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crdgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: crdgen [--check] [--stdout] [--root DIR]");
    ExitCode::from(2)
}
