//! The PROXY protocol header (HAProxy, versions 1 and 2) that a load balancer puts in front
//! of the SMTP stream, so the relay sees the real client address. Pure parsing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Version 1 headers are at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;
/// We accept no more than this much TLV data in a version 2 header.
const V2_MAX_LEN: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The client's address as the proxy saw it.
    Proxied(SocketAddr),
    /// The proxy's own connection (health check), or an unknown family: use the TCP peer.
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad PROXY protocol header: {0}")]
pub struct ProxyError(&'static str);

impl ProxyError {
    pub fn closed() -> ProxyError {
        ProxyError("connection closed before the header")
    }
    pub fn too_long() -> ProxyError {
        ProxyError("header too long")
    }
}

/// Parses a header at the start of `buf`: `Ok(None)` when more bytes are needed, else the
/// header and its length.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    if buf.len() < V2_SIGNATURE.len() {
        return if V2_SIGNATURE.starts_with(buf) || b"PROXY ".starts_with(&buf[..buf.len().min(6)]) {
            Ok(None)
        } else {
            Err(ProxyError("missing"))
        };
    }
    if buf.starts_with(V2_SIGNATURE) {
        parse_v2(buf)
    } else if buf.starts_with(b"PROXY ") {
        parse_v1(buf)
    } else {
        Err(ProxyError("missing"))
    }
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError("v1 header too long"))
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError("v1 not ASCII"))?;
    let words: Vec<&str> = line.split(' ').collect();
    let header = match words.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Header::Local,
        [
            "PROXY",
            family @ ("TCP4" | "TCP6"),
            src,
            _dst,
            sport,
            _dport,
        ] => {
            let ip: IpAddr = src.parse().map_err(|_| ProxyError("v1 source address"))?;
            if (*family == "TCP4") != ip.is_ipv4() {
                return Err(ProxyError("v1 address family"));
            }
            let port: u16 = sport.parse().map_err(|_| ProxyError("v1 source port"))?;
            Header::Proxied(SocketAddr::new(ip, port))
        }
        _ => return Err(ProxyError("v1 syntax")),
    };
    Ok(Some((header, end + 2)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    let family = buf[13];
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError("v2 version"));
    }
    if len > V2_MAX_LEN {
        return Err(ProxyError("v2 header too long"));
    }
    let total = 16 + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[16..total];
    let header = match (ver_cmd & 0x0f, family) {
        (0x0, _) => Header::Local,
        (0x1, 0x11) if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let port = u16::from_be_bytes([body[8], body[9]]);
            Header::Proxied(SocketAddr::new(IpAddr::V4(ip), port))
        }
        (0x1, 0x21) if body.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            let port = u16::from_be_bytes([body[32], body[33]]);
            Header::Proxied(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
        }
        (0x1, 0x11 | 0x21) => return Err(ProxyError("v2 address block too short")),
        (0x1, _) => Header::Local,
        _ => return Err(ProxyError("v2 command")),
    };
    Ok(Some((header, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
        // Every prefix must ask for more (or fail), never misparse.
        for i in 0..buf.len() {
            if let Ok(Some(h)) = parse(&buf[..i]) {
                panic!("parsed {h:?} from a prefix of {i} bytes");
            }
        }
        parse(buf)
    }

    #[test]
    fn v1() {
        let h = b"PROXY TCP4 203.0.113.5 10.0.0.1 5555 25\r\nEHLO";
        assert_eq!(
            parse(h),
            Ok(Some((
                Header::Proxied("203.0.113.5:5555".parse().unwrap()),
                h.len() - 4
            )))
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 25\r\n";
        assert_eq!(
            full(h).unwrap().unwrap().0,
            Header::Proxied("[2001:db8::1]:4000".parse().unwrap())
        );
        assert_eq!(
            full(b"PROXY UNKNOWN\r\n").unwrap().unwrap().0,
            Header::Local
        );
        assert!(parse(b"PROXY TCP4 2001:db8::1 1.2.3.4 1 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4\r\n").is_err());
        assert!(parse(b"EHLO example.com\r\n").is_err());
        assert!(parse(&[b'P'; 200]).is_err());
        let mut long = b"PROXY ".to_vec();
        long.extend(std::iter::repeat_n(b'1', 150));
        assert!(parse(&long).is_err());
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | cmd);
        h.push(fam);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn v2_headers() {
        let body = [198, 51, 100, 7, 10, 0, 0, 1, 0x1f, 0x90, 0, 25];
        let h = v2(1, 0x11, &body);
        assert_eq!(
            full(&h),
            Ok(Some((
                Header::Proxied("198.51.100.7:8080".parse().unwrap()),
                28
            )))
        );
        let mut body6 = [0u8; 36];
        body6[0] = 0x20;
        body6[1] = 0x01;
        body6[15] = 9;
        body6[32] = 0;
        body6[33] = 80;
        assert_eq!(
            full(&v2(1, 0x21, &body6)).unwrap().unwrap().0,
            Header::Proxied("[2001::9]:80".parse().unwrap())
        );
        assert_eq!(full(&v2(0, 0, &[])).unwrap().unwrap().0, Header::Local);
        // TLVs after the addresses are skipped.
        let mut with_tlv = body.to_vec();
        with_tlv.extend_from_slice(&[0x04, 0, 1, 0]);
        assert_eq!(full(&v2(1, 0x11, &with_tlv)).unwrap().unwrap().1, 16 + 16);
        assert!(parse(&v2(1, 0x11, &body[..4])).is_err());
        assert!(parse(&v2(5, 0x11, &body)).is_err());
        let mut bad_version = v2(1, 0x11, &body);
        bad_version[12] = 0x11;
        assert!(parse(&bad_version).is_err());
    }
}
