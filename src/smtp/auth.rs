//! Listener SMTP AUTH (RFC 4954): the PLAIN and LOGIN mechanisms, and the table of relay users,
//! each bound to one project. Pure: decoding and a constant-time password check.

use std::collections::HashMap;
use std::fmt;

use base64::Engine;

/// Relay users: username → (project, accepted passwords). Several passwords allow rotation.
#[derive(Clone, Default)]
pub struct Users(HashMap<String, (String, Vec<Vec<u8>>)>);

impl fmt::Debug for Users {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only, never passwords.
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl Users {
    /// Adds a user; false if the name is already taken (which would make the project ambiguous).
    pub fn insert(&mut self, user: &str, project: &str, passwords: Vec<String>) -> bool {
        if self.0.contains_key(user) {
            return false;
        }
        let passwords = passwords.into_iter().map(String::into_bytes).collect();
        self.0
            .insert(user.to_owned(), (project.to_owned(), passwords));
        true
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The project this user may send for, if the password is right.
    pub fn verify(&self, user: &str, password: &[u8]) -> Option<&str> {
        let (project, passwords) = self.0.get(user)?;
        // Check every password, so timing does not tell which one (or how many) matched.
        let ok = passwords
            .iter()
            .fold(false, |ok, p| constant_time_eq(p, password) | ok);
        ok.then_some(project.as_str())
    }
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn b64_decode(line: &[u8]) -> Option<Vec<u8>> {
    let line = std::str::from_utf8(line).ok()?.trim();
    if line == "=" {
        return Some(Vec::new());
    }
    base64::engine::general_purpose::STANDARD.decode(line).ok()
}

pub fn b64_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// RFC 4616: `[authzid] NUL authcid NUL passwd`. An authzid other than the user is refused:
/// a relay user may not act as another.
pub fn decode_plain(response: &[u8]) -> Option<(String, Vec<u8>)> {
    let mut parts = response.split(|b| *b == 0);
    let authz = parts.next()?;
    let user = std::str::from_utf8(parts.next()?).ok()?;
    let pass = parts.next()?;
    if parts.next().is_some() || user.is_empty() || !(authz.is_empty() || authz == user.as_bytes())
    {
        return None;
    }
    Some((user.to_owned(), pass.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_decoding() {
        assert_eq!(decode_plain(b"\0u\0p"), Some(("u".into(), b"p".to_vec())));
        assert_eq!(decode_plain(b"u\0u\0p"), Some(("u".into(), b"p".to_vec())));
        assert_eq!(decode_plain(b"other\0u\0p"), None);
        assert_eq!(decode_plain(b"\0u"), None);
        assert_eq!(decode_plain(b"\0\0p"), None);
        assert_eq!(decode_plain(b"\0u\0p\0x"), None);
    }

    #[test]
    fn users_verify() {
        let mut users = Users::default();
        assert!(users.insert("app", "acme", vec!["old".into(), "new".into()]));
        assert!(!users.insert("app", "beta", vec!["x".into()]));
        assert_eq!(users.verify("app", b"new"), Some("acme"));
        assert_eq!(users.verify("app", b"old"), Some("acme"));
        assert_eq!(users.verify("app", b"ne"), None);
        assert_eq!(users.verify("nobody", b"new"), None);
        assert!(!format!("{users:?}").contains("new"));
    }

    #[test]
    fn base64_lines() {
        assert_eq!(b64_decode(b"AHUAcA=="), Some(b"\0u\0p".to_vec()));
        assert_eq!(b64_decode(b"="), Some(Vec::new()));
        assert_eq!(b64_decode(b"not base64!"), None);
    }
}
