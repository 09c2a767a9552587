pub mod address;
pub mod config;
pub mod policy;
pub mod smtp;
