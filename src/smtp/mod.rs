//! The SMTP protocol as pure, synchronous code: commands, replies, the DATA reader and the
//! session state machine. Nothing here touches a socket, a clock or tokio.

pub mod auth;
pub mod command;
pub mod data;
pub mod reply;
pub mod session;

pub use reply::Reply;
pub use session::{Event, Session, Settings, Transaction};
