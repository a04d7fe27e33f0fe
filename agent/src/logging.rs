//! Logging through `tracing`: to the systemd journal when stderr is
//! connected to it (`$JOURNAL_STREAM`), otherwise to stderr (with colour
//! only when stderr is a terminal). Each formatted
//! event (with the fields of its spans: task id, wave id, host id) becomes
//! one journal entry at the event's priority, sent by
//! systemd-journal-logger.

use std::io::{self, IsTerminal, Write};

use systemd_journal_logger::JournalLog;
use tracing::Level;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Environment variable with a tracing filter, e.g. `ringfenced=debug`.
pub const FILTER_ENV: &str = "RINGFENCE_LOG";

/// Install the global subscriber. Safe to call once; later calls do nothing.
pub fn init() {
    let filter = EnvFilter::try_from_env(FILTER_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    if systemd_journal_logger::connected_to_journal()
        && let Ok(journal) = JournalLog::new()
    {
        let journal = journal.with_syslog_identifier("ringfenced".to_string());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .without_time()
            .with_target(false)
            .with_level(false)
            .with_writer(JournalWriter { journal })
            .try_init();
        return;
    }
    // Colour codes only on a terminal: in a file, a pipe or a log collector
    // they are noise that breaks grep.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::stderr().is_terminal())
        .with_writer(io::stderr)
        .try_init();
}

/// Makes one [`JournalLine`] per event, remembering its level.
struct JournalWriter {
    journal: JournalLog,
}

/// Buffers one formatted event; sends it to the journal when dropped.
struct JournalLine<'a> {
    journal: &'a JournalLog,
    level: log::Level,
    buf: Vec<u8>,
}

impl<'a> MakeWriter<'a> for JournalWriter {
    type Writer = JournalLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        self.line(log::Level::Info)
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        let level = match *meta.level() {
            Level::ERROR => log::Level::Error,
            Level::WARN => log::Level::Warn,
            Level::INFO => log::Level::Info,
            Level::DEBUG => log::Level::Debug,
            Level::TRACE => log::Level::Trace,
        };
        self.line(level)
    }
}

impl JournalWriter {
    fn line(&self, level: log::Level) -> JournalLine<'_> {
        JournalLine {
            journal: &self.journal,
            level,
            buf: Vec::with_capacity(256),
        }
    }
}

impl Write for JournalLine<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for JournalLine<'_> {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.buf);
        let text = text.trim_end();
        if text.is_empty() {
            return;
        }
        let _ = self.journal.journal_send(
            &log::Record::builder()
                .level(self.level)
                .target("ringfenced")
                .args(format_args!("{text}"))
                .build(),
        );
    }
}
