//! Replays every fuzz input kept in the repository — `fuzz/corpus/<target>/` (what
//! scripts/fuzz.sh found interesting) and `fuzz/seeds/<target>/` (written by hand) — through the
//! very functions the fuzz targets call (fuzz/src/lib.rs, compiled in here with `#[path]`), on
//! stable and without libFuzzer: CI exercises the corpora and their checks on every run.

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files: Vec<PathBuf> = ["corpus", "seeds"]
        .iter()
        .flat_map(|d| {
            std::fs::read_dir(root.join(d).join(target))
                .into_iter()
                .flatten()
        })
        .map(|e| e.expect("read a corpus directory").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(target: &str) {
    let (_, run) = harness::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a target in harness::TARGETS");
    let files = inputs(target);
    assert!(
        !files.is_empty(),
        "no inputs in fuzz/corpus/{target} or fuzz/seeds/{target}"
    );
    let mut failed = Vec::new();
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failed.push(f.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} {target} inputs panicked (messages above); reproduce one with \
         `RUSTC_BOOTSTRAP=1 cargo fuzz run {target} <file>`:\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

#[test]
fn every_target_has_a_test_here() {
    let names: Vec<&str> = harness::TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["compose", "pop3_reply", "config"]);
}

#[test]
fn compose_corpus() {
    replay("compose");
}

#[test]
fn pop3_reply_corpus() {
    replay("pop3_reply");
}

#[test]
fn config_corpus() {
    replay("config");
}

// ---------------------------------------------------------------------------------------------
// Defects found while fuzzing, kept as regression tests.
// ---------------------------------------------------------------------------------------------

/// `config::parse_size` multiplied without a check: `max_message_size = "17179869184GiB"`
/// panicked ("attempt to multiply with overflow") in a debug build and, in a release build,
/// wrapped to 0 — a config that passed validation and then failed every mail as too_large.
/// Fixed in be6f42b.
#[test]
fn an_oversized_max_message_size_is_a_config_error() {
    for size in [
        "\"17179869184GiB\"",
        "\"20000000000GiB\"",
        "\"18446744073709551615kB\"",
    ] {
        let text = format!(
            "[queue]\ndatabase = \"q.db\"\nmax_message_size = {size}\n\
             [sender]\nfrom_address = \"a@example.com\"\nlocal_hostname = \"h.example\"\n\
             [smtp]\ntransport = \"file\"\ndir = \"out\"\n"
        );
        let r = catch_unwind(|| mailqueue::config::parse(&text, Path::new("x.toml")));
        match r {
            Err(_) => panic!("max_message_size = {size}: config::parse panicked"),
            Ok(Ok(c)) => panic!(
                "max_message_size = {size} was accepted as {} bytes",
                c.queue.max_message_size
            ),
            Ok(Err(e)) => assert_eq!(e.code(), "config_invalid"),
        }
    }
}
