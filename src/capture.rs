//! The capture transport: instead of sending, writes each message as
//! `<dir>/<project or _server>/<timestamp>-<id>.eml` with a JSON envelope beside it; and
//! reads them back for the admin inbox API.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    /// What happened to the caller's From, in words.
    pub from_decision: Option<String>,
    /// The project header field the relay removed, as it was.
    pub project_header: Option<String>,
    /// RFC 2047 decoded, for the inbox list (which reads no message bodies).
    pub subject: Option<String>,
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

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's civil-from-days.
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A moment in UTC, broken down once for the formats below.
struct Utc {
    /// Days since 1970-01-01 (its weekday is a Thursday).
    days: i64,
    year: i64,
    month: i64,
    day: i64,
    hour: u64,
    minute: u64,
    second: u64,
    micros: u32,
}

fn utc(now: SystemTime) -> Utc {
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (year, month, day) = civil(days);
    Utc {
        days,
        year,
        month,
        day,
        hour: rem / 3600,
        minute: rem / 60 % 60,
        second: rem % 60,
        micros: d.subsec_micros(),
    }
}

/// `20261124T231434.123456Z`: sorts in time order, like the file names.
fn timestamp(now: SystemTime) -> String {
    let t = utc(now);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}.{:06}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second, t.micros
    )
}

/// Now in UTC as RFC 3339 with milliseconds: `2026-11-24T23:14:34.123Z`.
pub fn utc_now() -> String {
    let t = utc(SystemTime::now());
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year,
        t.month,
        t.day,
        t.hour,
        t.minute,
        t.second,
        t.micros / 1000
    )
}

/// The decoded Subject of a header section (the rewritten fields the relay sends).
pub fn subject(head: &[u8]) -> Option<String> {
    let mut with_end = head.to_vec();
    with_end.extend_from_slice(b"\r\n");
    let message = mail_parser::MessageParser::default().parse_headers(&with_end)?;
    message.subject().map(str::to_owned)
}

/// An RFC 5322 `Date:` value in UTC, e.g. `Tue, 24 Nov 2026 23:14:34 +0000`.
pub fn rfc5322_date(now: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let t = utc(now);
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[t.days.rem_euclid(7) as usize],
        t.day,
        MONTHS[(t.month - 1) as usize],
        t.year,
        t.hour,
        t.minute,
        t.second
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

/// A message id as the inbox API takes it: a file stem we wrote, nothing that walks paths.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
}

/// The files of each project folder under `roots`, a folder at a time.
fn project_folders(roots: &[PathBuf]) -> impl Iterator<Item = Vec<std::fs::DirEntry>> + '_ {
    roots
        .iter()
        .filter_map(|root| std::fs::read_dir(root).ok())
        .flat_map(|folders| folders.flatten())
        .filter_map(|folder| std::fs::read_dir(folder.path()).ok())
        .map(|files| files.flatten().collect())
}

/// The stored envelopes, read again only when their file changes: the inbox page asks for
/// the list every second, and reading and parsing every envelope each time costs about 0.1 s
/// of CPU per 5,000 messages.
#[derive(Default)]
pub struct Listing {
    // By the envelope's path as bytes (hashing a `Path` walks its components).
    read: std::sync::Mutex<HashMap<std::ffi::OsString, Read>>,
}

/// One envelope as read, with what its file looked like then.
struct Read {
    modified: SystemTime,
    len: u64,
    /// The envelope's `id`, which the listing is sorted by.
    id: String,
    envelope: Arc<serde_json::Value>,
}

impl Listing {
    /// The stored envelopes under `roots` whose message is there too, oldest first.
    pub fn list(&self, roots: &[PathBuf]) -> Vec<Arc<serde_json::Value>> {
        let mut read = self.read.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen = HashMap::with_capacity(read.len());
        for files in project_folders(roots) {
            let names: HashSet<std::ffi::OsString> = files.iter().map(|f| f.file_name()).collect();
            for file in files {
                let path = file.path();
                if path.extension().is_none_or(|e| e != "json")
                    || !names.contains(path.with_extension("eml").file_name().unwrap_or_default())
                {
                    continue;
                }
                let Ok(meta) = file.metadata() else { continue };
                let (modified, len) = (meta.modified().unwrap_or(UNIX_EPOCH), meta.len());
                let key = path.into_os_string();
                let entry = match read.remove(&key) {
                    Some(r) if r.modified == modified && r.len == len => r,
                    _ => {
                        let Some(envelope) = std::fs::read(&key)
                            .ok()
                            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                        else {
                            continue;
                        };
                        Read {
                            modified,
                            len,
                            id: envelope["id"].as_str().unwrap_or_default().to_owned(),
                            envelope: Arc::new(envelope),
                        }
                    }
                };
                seen.insert(key, entry);
            }
        }
        // What was not seen this time is gone: deleted files are forgotten.
        *read = seen;
        let mut found: Vec<&Read> = read.values().collect();
        found.sort_by(|a, b| a.id.cmp(&b.id));
        found.into_iter().map(|r| r.envelope.clone()).collect()
    }
}

/// The `.eml` and `.json` of one message.
pub fn find(roots: &[PathBuf], id: &str) -> Option<(PathBuf, PathBuf)> {
    if !valid_id(id) {
        return None;
    }
    for root in roots {
        // A folder that has received no mail yet does not exist: the others still count.
        let Ok(folders) = std::fs::read_dir(root) else {
            continue;
        };
        for folder in folders.flatten() {
            let eml = folder.path().join(format!("{id}.eml"));
            let json = folder.path().join(format!("{id}.json"));
            if eml.is_file() && json.is_file() {
                return Some((eml, json));
            }
        }
    }
    None
}

/// Deletes one captured message; false if there is no such message.
pub fn delete(roots: &[PathBuf], id: &str) -> bool {
    match find(roots, id) {
        // The `.eml` first: without it the message is gone from every listing.
        Some((eml, json)) => {
            std::fs::remove_file(eml).is_ok() && std::fs::remove_file(json).is_ok()
        }
        None => false,
    }
}

/// What the inbox shows of a message: its decoded Subject, text body, HTML body (only if it
/// has one: none is made up from the text) and attachments.
pub fn content(message: &[u8]) -> serde_json::Value {
    use mail_parser::MimeHeaders;
    let Some(m) = mail_parser::MessageParser::default().parse(message) else {
        return serde_json::json!({ "subject": null, "text": null, "html": null, "attachments": [] });
    };
    let html = m
        .html_bodies()
        .find(|p| p.is_text_html())
        .and_then(|p| p.text_contents())
        .map(str::to_owned);
    let text = m
        .text_bodies()
        .find(|p| p.is_text() && !p.is_text_html())
        .and_then(|p| p.text_contents())
        .map(str::to_owned);
    let attachments: Vec<serde_json::Value> = m
        .attachments()
        .enumerate()
        .map(|(index, a)| {
            serde_json::json!({
                "index": index,
                "name": a.attachment_name().unwrap_or("attachment"),
                "type": mime_type(a),
                "size": a.len(),
            })
        })
        .collect();
    serde_json::json!({
        "subject": m.subject(),
        "text": text,
        "html": html,
        "attachments": attachments,
    })
}

fn mime_type(part: &mail_parser::MessagePart<'_>) -> String {
    use mail_parser::MimeHeaders;
    match part.content_type() {
        Some(ct) => match ct.subtype() {
            Some(sub) => format!("{}/{sub}", ct.ctype()),
            None => ct.ctype().to_owned(),
        },
        None => "application/octet-stream".to_owned(),
    }
    .to_ascii_lowercase()
}

/// Attachment `n` of a message: its name, MIME type and decoded bytes.
pub fn attachment(message: &[u8], n: usize) -> Option<(String, String, Vec<u8>)> {
    use mail_parser::MimeHeaders;
    let m = mail_parser::MessageParser::default().parse(message)?;
    let a = m.attachments().nth(n)?;
    Some((
        a.attachment_name().unwrap_or("attachment").to_owned(),
        mime_type(a),
        a.contents().to_vec(),
    ))
}

/// Deletes every captured message under `roots`; returns how many.
pub fn delete_all(roots: &[PathBuf]) -> usize {
    project_folders(roots)
        .flatten()
        .map(|file| file.path())
        .filter(|path| {
            let ext = path.extension().and_then(|e| e.to_str());
            matches!(ext, Some("eml" | "json"))
                && std::fs::remove_file(path).is_ok()
                && ext == Some("eml")
        })
        .count()
}

/// The header fields of a message, unfolded, in order.
pub fn headers(message: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(message);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.1.push_str(line);
            }
        } else if let Some((name, value)) = line.split_once(':') {
            fields.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    fields
}

/// A time as comparable digits: `2026-11-24T23:18:58Z`, `20261124T231858.825332Z` and the
/// like become `YYYYMMDDhhmmssffffff`. Only UTC (`Z` or no zone) is understood.
pub fn sortable_time(t: &str) -> Option<String> {
    let t = t.trim();
    // Only the characters of the two forms: anything else (other zones, multi-byte text,
    // garbage) is refused before any slicing.
    if t.len() > 32
        || !t
            .bytes()
            .all(|b| b.is_ascii_digit() || b"-:.TZ".contains(&b))
    {
        return None;
    }
    if t[t.len().min(10)..].contains('-') {
        return None;
    }
    let mut digits: String = t.chars().filter(char::is_ascii_digit).collect();
    if digits.len() < 8 || digits.len() > 20 {
        return None;
    }
    while digits.len() < 20 {
        digits.push('0');
    }
    Some(digits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_listing_follows_the_files_and_rereads_only_what_changed() {
        let root = tempfile::tempdir().unwrap();
        let folder = root.path().join("acme");
        std::fs::create_dir(&folder).unwrap();
        let put = |id: &str, subject: &str, eml: bool| {
            let envelope = serde_json::json!({ "id": id, "subject": subject });
            std::fs::write(folder.join(format!("{id}.json")), envelope.to_string()).unwrap();
            if eml {
                std::fs::write(folder.join(format!("{id}.eml")), "x").unwrap();
            }
        };
        let ids = |found: &[Arc<serde_json::Value>]| -> Vec<String> {
            found
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_owned())
                .collect()
        };
        let roots = [root.path().to_owned()];
        let listing = Listing::default();
        put("b", "two", true);
        put("a", "one", true);
        // An envelope whose message is not (yet) there is not listed.
        put("c", "three", false);
        let first = listing.list(&roots);
        assert_eq!(ids(&first), ["a", "b"]);
        // Unchanged files are not read again; a changed one is.
        put("b", "two, changed", true);
        std::fs::write(folder.join("c.eml"), "x").unwrap();
        let second = listing.list(&roots);
        assert_eq!(ids(&second), ["a", "b", "c"]);
        assert!(Arc::ptr_eq(&first[0], &second[0]), "a was read again");
        assert_eq!(second[1]["subject"], "two, changed");
        // A deleted message leaves the listing.
        std::fs::remove_file(folder.join("a.eml")).unwrap();
        assert_eq!(ids(&listing.list(&roots)), ["b", "c"]);
        std::fs::remove_file(folder.join("b.json")).unwrap();
        assert_eq!(ids(&listing.list(&roots)), ["c"]);
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(UNIX_EPOCH), "19700101T000000.000000Z");
        let t = UNIX_EPOCH + Duration::from_micros(1_795_993_274_123_456);
        assert_eq!(timestamp(t), "20261129T230114.123456Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert!(timestamp(leap).starts_with("20000229T"));
    }

    #[test]
    fn any_since_value_is_refused_or_understood_never_a_panic() {
        for t in [
            "2026-11-2€T23:18:58Z",
            "ééééééééééé",
            "2026-11-24T23:18:58+01:00",
            "x",
            "",
            "2026-11-24T23:18:58Z\u{0}",
            &"9".repeat(5000),
        ] {
            assert_eq!(sortable_time(t), None, "{t:?}");
        }
        assert!(sortable_time("2026-11-24").is_some());
    }

    #[test]
    fn times_compare_across_formats() {
        let stored = sortable_time("20261124T231858.825332Z").unwrap();
        assert!(sortable_time("2026-11-24T23:18:58Z").unwrap() < stored);
        assert!(sortable_time("2026-11-24T23:18:59Z").unwrap() > stored);
        assert!(sortable_time("2026-11-24").unwrap() < stored);
        assert_eq!(sortable_time("2026-11-24T23:18:58+02:00"), None);
        assert_eq!(sortable_time("yesterday"), None);
    }

    #[test]
    fn rfc5322_dates() {
        assert_eq!(rfc5322_date(UNIX_EPOCH), "Thu, 1 Jan 1970 00:00:00 +0000");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_993_274);
        assert_eq!(rfc5322_date(t), "Sun, 29 Nov 2026 23:01:14 +0000");
    }

    #[test]
    fn ids_cannot_walk_paths() {
        assert!(valid_id("20261124T231858.825332Z-1d0a0000"));
        assert!(!valid_id("../etc/passwd"));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(""));
    }

    #[test]
    fn header_fields_unfolded() {
        let h = headers(b"From: a@x\r\nSubject: one\r\n two\r\n\r\nbody: no\r\n");
        assert_eq!(
            h,
            [
                ("From".into(), "a@x".into()),
                ("Subject".into(), "one two".into())
            ]
        );
    }

    #[test]
    fn folders_cannot_escape() {
        assert_eq!(folder(None), "_server");
        assert_eq!(folder(Some("acme")), "acme");
        assert_eq!(folder(Some("../etc")), "_.._etc");
        assert_eq!(folder(Some("a/b")), "a_b");
    }
}
