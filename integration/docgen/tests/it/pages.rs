//! An operator installs the packages and runs `man ringfence-wave-run` or
//! presses TAB: every command and subcommand of both binaries has a man page,
//! the pages render with groff, and every completion script knows every
//! subcommand. The expected set is walked from the clap trees the binaries
//! parse, so a new subcommand without a page fails here.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use ringfence_docgen::{SHELLS, commands, completion_file_name, generate};

/// (page name, words of the command line) for the command and every visible
/// subcommand below it, without clap's `help`.
fn tree(cmd: &clap::Command, prefix: &[String], out: &mut Vec<(String, Vec<String>)>) {
    let mut words = prefix.to_vec();
    words.push(cmd.get_name().to_string());
    out.push((words.join("-"), words.clone()));
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        tree(sub, &words, out);
    }
}

fn files_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn every_command_and_subcommand_has_a_page_and_completions() {
    let out = tempfile::tempdir().unwrap();
    let written = generate(out.path()).unwrap();
    assert!(!written.is_empty());

    let mut bins = Vec::new();
    for cmd in commands() {
        let bin = cmd.get_name().to_string();
        let mut nodes = Vec::new();
        tree(&cmd, &[], &mut nodes);
        // Both binaries have subcommands; the walk must have found them.
        assert!(
            nodes.len() > 1,
            "{bin}: no subcommands found in the clap tree"
        );

        let expected: BTreeSet<String> =
            nodes.iter().map(|(page, _)| format!("{page}.1")).collect();
        let got = files_in(&out.path().join(&bin).join("man"));
        assert_eq!(got, expected, "{bin}: man pages differ from the clap tree");

        for (page, words) in &nodes {
            let path = out.path().join(&bin).join("man").join(format!("{page}.1"));
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.starts_with(".ie") || text.contains(".TH "),
                "{page}: no .TH header"
            );
            for section in [".SH NAME", ".SH SYNOPSIS"] {
                assert!(text.contains(section), "{page}: no {section}");
            }
            // groff renders it, and the synopsis shows the command line.
            let rendered = Command::new("groff")
                .args(["-man", "-Tutf8", "-P-cbou"])
                .arg(&path)
                .output()
                .expect("groff (Debian: groff-base) must be installed to check the man pages");
            assert!(
                rendered.status.success(),
                "{page}: groff failed: {rendered:?}"
            );
            // Justified text: compare with single spaces.
            let shown = String::from_utf8_lossy(&rendered.stdout)
                .replace('\u{2010}', "-")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            let line = words.join(" ");
            assert!(
                shown.contains(&line),
                "{page}: rendered page does not show `{line}`:\n{shown}"
            );
        }

        let sub_names: BTreeSet<&str> = nodes
            .iter()
            .skip(1)
            .map(|(_, words)| words.last().unwrap().as_str())
            .collect();
        for shell in SHELLS {
            let path = out
                .path()
                .join(&bin)
                .join("completions")
                .join(shell.to_string())
                .join(completion_file_name(shell, &bin));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                text.contains(&bin),
                "{shell} completion does not name {bin}"
            );
            for name in &sub_names {
                assert!(
                    text.contains(name),
                    "{shell} completion of {bin} lacks subcommand `{name}`"
                );
            }
        }
        bins.push(bin);
    }
    assert_eq!(bins, ["ringfence", "ringfenced"]);
}

#[test]
fn the_wave_run_page_exists_where_operators_look() {
    let out = tempfile::tempdir().unwrap();
    generate(out.path()).unwrap();
    for page in ["ringfence-wave-run.1", "ringfenced-check-config.1"] {
        let bin = page.split('-').next().unwrap();
        assert!(
            out.path().join(bin).join("man").join(page).is_file(),
            "{page} missing"
        );
    }
    // A failure names the path it could not write.
    let blocker = out.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let e = generate(&blocker).unwrap_err().to_string();
    assert!(e.contains(&blocker.display().to_string()), "{e}");
}
