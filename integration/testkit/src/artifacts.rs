//! Where cargo put what it built: the profile directory (`target/<profile>`)
//! of the running test or benchmark binary, and the files in it.

use std::path::PathBuf;

use crate::FixtureError;

/// `target/<profile>` for the running executable, which lives either there
/// (a binary) or in its `deps/` (a test binary).
pub fn profile_dir() -> Result<PathBuf, FixtureError> {
    let exe = std::env::current_exe().map_err(FixtureError::CurrentExe)?;
    let Some(dir) = exe.parent() else {
        return Err(FixtureError::CurrentExe(std::io::Error::other(format!(
            "{} has no parent directory",
            exe.display()
        ))));
    };
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    Ok(dir.to_path_buf())
}

/// The built file `name` in [`profile_dir`] (a binary, the fake NVML
/// library), or [`FixtureError::NotBuilt`].
pub fn built(name: &str) -> Result<PathBuf, FixtureError> {
    let path = profile_dir()?.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(FixtureError::NotBuilt { path })
    }
}
