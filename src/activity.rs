//! The last message outcomes of every transport, in memory (no message bodies): what the
//! admin page's Activity view and `GET /api/activity` show.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

/// Outcomes kept; the oldest are dropped past it.
pub const KEEP: usize = 1000;

#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Increases by one per message: a client asks for what came after the last it saw.
    pub seq: u64,
    pub time: String,
    pub project: Option<String>,
    pub transport: String,
    pub upstream: Option<String>,
    pub mail_from: String,
    pub recipients: usize,
    pub size: usize,
    pub outcome: &'static str,
    pub code: u16,
    /// The whole reply line(s) the client got: code, enhanced code and text.
    pub reply: String,
    pub ms: u64,
}

#[derive(Debug, Default)]
pub struct Activity {
    ring: Mutex<(u64, VecDeque<Entry>)>,
}

impl Activity {
    /// Records one outcome; `seq` and `time` are filled in here.
    pub fn record(&self, mut entry: Entry) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.0 += 1;
        entry.seq = ring.0;
        entry.time = crate::capture::utc_now();
        if ring.1.len() == KEEP {
            ring.1.pop_front();
        }
        ring.1.push_back(entry);
    }

    /// The entries after `after` that `keep` accepts, newest first.
    pub fn newest(&self, after: u64, keep: impl Fn(&Entry) -> bool) -> Vec<Entry> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.1
            .iter()
            .rev()
            .take_while(|e| e.seq > after)
            .filter(|e| keep(e))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(project: &str) -> Entry {
        Entry {
            seq: 0,
            time: String::new(),
            project: Some(project.into()),
            transport: "capture".into(),
            upstream: None,
            mail_from: "a@x.example".into(),
            recipients: 1,
            size: 10,
            outcome: "delivered",
            code: 250,
            reply: "ok".into(),
            ms: 1,
        }
    }

    #[test]
    fn keeps_the_last_thousand_newest_first() {
        let a = Activity::default();
        for i in 0..KEEP + 5 {
            a.record(entry(if i % 2 == 0 { "even" } else { "odd" }));
        }
        let all = a.newest(0, |_| true);
        assert_eq!(all.len(), KEEP);
        assert_eq!(all[0].seq, (KEEP + 5) as u64);
        assert_eq!(all.last().unwrap().seq, 6);
        assert_eq!(a.newest((KEEP + 3) as u64, |_| true).len(), 2);
        assert!(
            a.newest(0, |e| e.project.as_deref() == Some("odd"))
                .iter()
                .all(|e| e.seq % 2 == 0)
        );
    }
}
