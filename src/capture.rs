//! The capture transport: instead of sending, writes each message as
//! `<dir>/<project or _server>/<timestamp>-<id>.eml` with a JSON envelope beside it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// What the JSON file beside each `.eml` holds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Envelope {
    /// Set by `write`: the file name without its extension.
    pub id: String,
    /// Set by `write`: UTC, as in the file name.
    pub received_at: String,
    /// MAIL FROM as the client sent it.
    pub client_mail_from: String,
    /// MAIL FROM as it would go upstream: the resolved From's address.
    pub mail_from: String,
    pub recipients: Vec<String>,
    pub project: Option<String>,
    /// The transport that carried the message (here always the capture).
    pub transport: String,
    pub original_from: Option<String>,
    pub resolved_from: String,
    pub from_rewritten: bool,
    pub size: usize,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A file-name-safe folder name for a project; `_server` for server mail.
fn folder(project: Option<&str>) -> String {
    match project {
        None => "_server".to_owned(),
        Some(p) => {
            let safe: String = p
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            if safe.starts_with('.') || safe.is_empty() {
                format!("_{safe}")
            } else {
                safe
            }
        }
    }
}

/// `20261124T231434.123456Z`: sorts in time order, like the file names.
fn timestamp(now: SystemTime) -> String {
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Writes the message and its envelope into `dir`; returns the path of the `.eml`. Both files
/// are written under temporary names, synced, then renamed, so a reader never sees half a
/// mail and an acknowledged mail survives a crash. The `.eml` lands last: once it is there,
/// its envelope is too.
pub fn write(dir: &Path, mut envelope: Envelope, message: &[&[u8]]) -> std::io::Result<PathBuf> {
    let stamp = timestamp(SystemTime::now());
    let id = format!(
        "{stamp}-{:x}{:04x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff
    );
    std::fs::create_dir_all(dir)?;
    envelope.size = message.iter().map(|p| p.len()).sum();
    envelope.received_at = stamp;
    envelope.id = id.clone();
    let json = serde_json::to_vec_pretty(&envelope).map_err(std::io::Error::other)?;
    write_atomic(&dir.join(format!("{id}.json")), &[&json])?;
    let eml = dir.join(format!("{id}.eml"));
    write_atomic(&eml, message)?;
    Ok(eml)
}

fn write_atomic(path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    for part in parts {
        f.write_all(part)?;
    }
    let f = f.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The folder for a message of `project` under the capture root.
pub fn project_dir(root: &Path, project: Option<&str>) -> PathBuf {
    root.join(folder(project))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(UNIX_EPOCH), "19700101T000000.000000Z");
        let t = UNIX_EPOCH + Duration::from_micros(1_795_993_274_123_456);
        assert_eq!(timestamp(t), "20261129T230114.123456Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert!(timestamp(leap).starts_with("20000229T"));
    }

    #[test]
    fn folders_cannot_escape() {
        assert_eq!(folder(None), "_server");
        assert_eq!(folder(Some("acme")), "acme");
        assert_eq!(folder(Some("../etc")), "_.._etc");
        assert_eq!(folder(Some("a/b")), "a_b");
    }
}
