//! Loading TOML configuration files with errors an operator can act on:
//! every error names the file, the line and column, and the key.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// the file could not be read
    #[error("{path}: cannot read: {source}")]
    Read {
        /// the file
        path: PathBuf,
        /// why reading failed
        #[source]
        source: std::io::Error,
    },
    /// the file is not valid TOML for this schema (unknown key, wrong type, missing key)
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// the file
        path: PathBuf,
        /// 1-based line of the offending text
        line: usize,
        /// 1-based column of the offending text
        column: usize,
        /// the TOML or schema error
        message: String,
    },
    /// a value parsed but is not acceptable
    #[error("{path}:{line}:{column}: key `{key}`: {message}")]
    Invalid {
        /// the file
        path: PathBuf,
        /// 1-based line of the value
        line: usize,
        /// 1-based column of the value
        column: usize,
        /// dotted path of the refused key
        key: String,
        /// why the value is refused
        message: String,
    },
}

/// The text of a loaded file, kept to turn byte spans into line numbers.
#[derive(Debug, Clone)]
pub struct Source {
    /// Where the text came from.
    pub path: PathBuf,
    /// The file's contents.
    pub text: String,
}

impl Source {
    /// Read a file.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            text,
        })
    }

    /// Wrap text that did not come from disk (tests, embedded defaults).
    pub fn from_text(path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            text: text.into(),
        }
    }

    /// Parse the whole text as `T`; unknown keys are refused by `T`'s
    /// `#[serde(deny_unknown_fields)]`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(&self.text).map_err(|e| {
            let (line, column) = e.span().map(|s| self.line_col(s.start)).unwrap_or((0, 0));
            ConfigError::Parse {
                path: self.path.clone(),
                line,
                column,
                message: e.message().trim().to_string(),
            }
        })
    }

    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
        (line, column)
    }

    /// An error about the value at `span` (from a `toml::Spanned` field).
    pub fn invalid(
        &self,
        span: std::ops::Range<usize>,
        key: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = self.line_col(span.start);
        ConfigError::Invalid {
            path: self.path.clone(),
            line,
            column,
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// Read and parse a TOML file in one go.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<(T, Source), ConfigError> {
    let src = Source::read(path)?;
    let value = src.parse()?;
    Ok((value, src))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Demo {
        name: String,
        port: u16,
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let src = Source::from_text("/etc/x.toml", "name = \"a\"\nport = 1\nbogus = 2\n");
        let err = src.parse::<Demo>().unwrap_err().to_string();
        assert!(err.starts_with("/etc/x.toml:3:"), "{err}");
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn wrong_type_names_line() {
        let src = Source::from_text("a.toml", "name = \"a\"\nport = \"high\"\n");
        let err = src.parse::<Demo>().unwrap_err().to_string();
        assert!(err.starts_with("a.toml:2:"), "{err}");
    }

    #[test]
    fn line_col_counts_from_one() {
        let src = Source::from_text("a", "ab\ncd");
        assert_eq!(src.line_col(0), (1, 1));
        assert_eq!(src.line_col(4), (2, 2));
    }
}
