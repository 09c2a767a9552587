//! project-relay: an SMTP relay proxy that applies the Project SMTP rules.
//!
//! The life of a message:
//! accept (`server`) → greeting → EHLO → [STARTTLS] → MAIL / RCPT (`smtp::session`) →
//! DATA: read, unstuff, bound (`smtp::data`) → policy: project, route, From (`policy`) →
//! upstream send or capture (`upstream`, `capture`, via `relay`) → reply to the client
//! (`smtp::reply`), 250 only once the upstream has the message.
//!
//! `smtp`, `policy`, `address` and `config` are synchronous and pure; only `connection` and
//! `server` touch client sockets; only `upstream` speaks SMTP to upstreams; only `tls` builds rustls
//! configs.

pub mod activity;
pub mod address;
pub mod admin;
pub mod capture;
pub mod config;
pub mod connection;
pub mod metrics;
pub mod policy;
pub mod project;
pub mod proxy;
pub mod relay;
pub mod server;
pub mod smtp;
pub mod source;
pub mod state;
pub mod tls;
pub mod upstream;

pub use config::Config;
pub use server::{Listeners, Reloader, Server, run};
