//! Man pages and shell completions of `ringfence` and `ringfenced`, rendered
//! from the clap definitions the binaries parse with
//! ([`ringfence_coordinator::cli::command`], [`ringfenced::cli::command`]),
//! so the documentation cannot drift from the options. `packaging/build.sh`
//! runs the `ringfence-docgen` binary and ships its output in the packages;
//! this crate itself is never packaged or linked into them.
//!
//! Layout under the output directory, per binary `BIN`:
//!
//! | path | what |
//! |---|---|
//! | `BIN/man/BIN.1`, `BIN/man/BIN-SUB[-SUB…].1` | one page per command and per subcommand (clap_mangen) |
//! | `BIN/completions/bash/BIN` | bash completion |
//! | `BIN/completions/zsh/_BIN` | zsh completion |
//! | `BIN/completions/fish/BIN.fish` | fish completion |

use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// The binaries documented, with their clap command trees.
pub fn commands() -> Vec<clap::Command> {
    vec![
        ringfence_coordinator::cli::command(),
        ringfenced::cli::command(),
    ]
}

/// The shells completions are written for.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// What could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DocgenError {
    /// a directory could not be created
    #[error("cannot create directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// the man pages could not be written
    #[error("cannot write the man pages of {bin} into {}: {source}", dir.display())]
    Man {
        bin: String,
        dir: PathBuf,
        source: std::io::Error,
    },
    /// a completion script could not be written
    #[error("cannot write the {shell} completion of {bin} into {}: {source}", dir.display())]
    Completion {
        bin: String,
        shell: Shell,
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// The completion file name of `bin` for `shell`, as the packages install it
/// (bash: `BIN`, zsh: `_BIN`, fish: `BIN.fish`).
pub fn completion_file_name(shell: Shell, bin: &str) -> String {
    match shell {
        Shell::Bash => bin.to_string(),
        other => clap_complete::Generator::file_name(&other, bin),
    }
}

/// Writes the man pages and completions of every binary of [`commands`]
/// under `out`; returns the files written.
pub fn generate(out: &Path) -> Result<Vec<PathBuf>, DocgenError> {
    let mut written = Vec::new();
    for cmd in commands() {
        written.extend(generate_one(cmd, out)?);
    }
    written.sort();
    Ok(written)
}

fn create_dir(path: &Path) -> Result<(), DocgenError> {
    std::fs::create_dir_all(path).map_err(|source| DocgenError::CreateDir {
        path: path.to_path_buf(),
        source,
    })
}

fn generate_one(cmd: clap::Command, out: &Path) -> Result<Vec<PathBuf>, DocgenError> {
    let bin = cmd.get_name().to_string();
    let mut written = Vec::new();

    let man_dir = out.join(&bin).join("man");
    create_dir(&man_dir)?;
    let man_err = |source| DocgenError::Man {
        bin: bin.clone(),
        dir: man_dir.clone(),
        source,
    };
    // One page per command and subcommand, named BIN-SUB-SUB.1; the help
    // subcommand is left out.
    clap_mangen::generate_to(cmd.clone(), &man_dir).map_err(man_err)?;
    for entry in std::fs::read_dir(&man_dir).map_err(man_err)? {
        written.push(entry.map_err(man_err)?.path());
    }

    for shell in SHELLS {
        let dir = out.join(&bin).join("completions").join(shell.to_string());
        create_dir(&dir)?;
        let path = dir.join(completion_file_name(shell, &bin));
        let err = |source| DocgenError::Completion {
            bin: bin.clone(),
            shell,
            dir: dir.clone(),
            source,
        };
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), bin.clone(), &mut text);
        std::fs::write(&path, text).map_err(err)?;
        written.push(path);
    }
    Ok(written)
}
